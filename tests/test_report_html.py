"""The report's per-layer precision table, its text summary and the HTML page, the page
rendered in a real headless browser (Debian's chromium; skipped with the reason when absent)."""

from __future__ import annotations

import collections
import html.parser
import os
import re
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.infra import report_html
from optcc.infra.report import PassRecord, Report, layers_from_stats

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _model() -> onnx.ModelProto:
    """conv1 -> relu -> conv2 -> relu -> conv3 -> GlobalAveragePool, named nodes."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for i, (x, out, cin, cout) in enumerate([("x", "c1", 3, 8), ("r1", "c2", 8, 8), ("r2", "c3", 8, 4)]):
        w = numpy_helper.from_array((rng.standard_normal((cout, cin, 3, 3)) * 0.3).astype(np.float32), f"w{i}")
        b = numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32), f"b{i}")
        inits += [w, b]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [out], name=f"conv{i + 1}", pads=[1, 1, 1, 1]))
        if i < 2:
            nodes.append(helper.make_node("Relu", [out], [f"r{i + 1}"], name=f"relu{i + 1}"))
    nodes.append(helper.make_node("GlobalAveragePool", ["c3"], ["y"], name="gap"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 1, 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def fp16_result() -> optcc.OptimizeResult:
    # conv2 blocked: the per-layer table must say it stayed float32 and why
    return optcc.optimize(_model(), fp16=True, fp16_block=["conv2"])


def _explicit_layers(n: int) -> list[dict]:
    """A pass's own LayerRecords: error falling with the index, every third kept float32."""
    return [{"name": f"layer{i}", "op_type": "Conv", "precision": "float32" if i % 3 == 0 else "int8",
             "reason": "kept: too sensitive" if i % 3 == 0 else "quantized", "error_db": 60.0 - 2.5 * i}
            for i in range(n)]


def _record(name: str, stats: dict, status: str = "changed") -> PassRecord:
    return PassRecord(name=name, status=status, iteration=None, time_s=0.01, nodes_before=3, nodes_after=3,
                      op_delta={}, bytes_before=0, bytes_after=0, stats=stats)


# --------------------------------------------------------------------------- layers schema


def test_layers_from_float16_stats_name_the_blocked_node(fp16_result):
    rows = fp16_result.report.layer_table()
    assert [(r["name"], r["precision"], r["pass"]) for r in rows] == [("conv2", "float32", "convert-float16")]
    assert rows[0]["reason"]  # the pass's own words
    # the written model really computes conv2 in float32 and the other convs in float16
    weights = {i.name: i.data_type for i in optcc.ir.serialize(fp16_result.ir_model).graph.initializer}
    assert weights["w1"] == TensorProto.FLOAT and weights["w0"] == TensorProto.FLOAT16
    assert fp16_result.report.to_dict()["layers"] == rows


def test_layers_from_int8_driver_stats():
    stats = {"modified": True, "pass": {"layers": ["conv1", "conv3", "conv4"], "kept_float": {}},
             "fallback": {"kept_float": ["conv2"], "target_met": True,
                          "sensitivity": [{"layer": "conv2", "model_sqnr_db": 18.25, "local_sqnr_db": 20.0,
                                           "alone_passes": False},
                                          {"layer": "conv1", "model_sqnr_db": float("nan"),
                                           "propagated_sqnr_db": 41.0, "alone_passes": True},
                                          {"layer": "conv3", "output_sqnr_db": 33.5, "local_sqnr_db": 30.0,
                                           "propagated_sqnr_db": 12.0},
                                          {"layer": "conv4", "output_sqnr_db": "inf", "local_sqnr_db": 30.0,
                                           "propagated_sqnr_db": 12.0}]}}
    rows = {r["name"]: r for r in layers_from_stats("quantize-int8-calibrated", stats)}
    assert {n: r["precision"] for n, r in rows.items()} == {"conv1": "int8", "conv3": "int8", "conv4": "int8",
                                                            "conv2": "float32"}
    assert rows["conv2"]["error_db"] == 18.25 and rows["conv2"]["reason"] == "returned to float by the accuracy fallback"
    assert rows["conv1"]["error_db"] == 41.0  # NaN model SQNR: the propagated one
    assert rows["conv3"]["error_db"] == 33.5  # the estimated ranking's: its own error at the outputs
    assert rows["conv3"]["reason"] == "quantized"  # its SQNR is said once, in error_db
    # its own error leaves the outputs unchanged: no error, and never the error accumulated up to it
    assert rows["conv4"]["error_db"] is None
    assert rows["conv4"]["reason"] == "quantized (quantized alone: the outputs do not change)"
    declined = layers_from_stats("q", {**stats, "modified": False, "declined": "accuracy", "reason": "19 dB < 25"})
    assert {r["precision"] for r in declined} == {"float32"} and all("declined" in r["reason"] for r in declined)


def test_int8_layer_rows_name_each_layers_op_type():
    example = os.path.join(os.path.dirname(__file__), "..", "fixtures", "tinycnn.onnx")
    rng = np.random.default_rng(0)
    data = [{"image": rng.random((1, 3, 32, 32), dtype=np.float32)} for _ in range(8)]
    result = optcc.optimize(example, int8_calibration=data, int8_options={"require_speedup": False}, verify=False)
    rows = result.report.layer_table()
    assert rows and all(r["op_type"] for r in rows)
    # the op each layer name has in the float model INT8 starts from, read by onnx itself
    float_ops = {n.name: n.op_type for n in onnx.load(example).graph.node}
    assert all(float_ops.get(r["name"], r["op_type"]) == r["op_type"] for r in rows)
    assert {r["op_type"] for r in rows} <= {"Conv", "Gemm", "MatMul", "MaxPool", "AveragePool", "GlobalAveragePool",
                                           "Relu", "Add", "Reshape", "Flatten", "Mul", "Concat"}


def test_explicit_layer_records_and_reverted_passes():
    report = Report(passes=[_record("p", {"layers": _explicit_layers(2)}),
                            _record("gone", {"layers": _explicit_layers(3)}, status="reverted")])
    rows = report.layer_table()
    assert [r["name"] for r in rows] == ["layer0", "layer1"] and {r["pass"] for r in rows} == {"p"}
    assert rows[0] == {"name": "layer0", "op_type": "Conv", "precision": "float32", "reason": "kept: too sensitive",
                       "error_db": 60.0, "error_rel": None, "pass": "p"}
    # a plain list of names (QuantizeInt8Pass's "layers") is not mistaken for records
    assert [r["precision"] for r in layers_from_stats("q", {"layers": ["a"], "kept_float": {}})] == ["int8"]
    assert layers_from_stats("fuse-attention", {"layers": {"Softmax#0": "fused: Attention"}}) == []
    assert layers_from_stats("x", {"layers": [{"name": "a", "fused": True}]}) == []


def test_summary_shows_the_worst_layers_first():
    report = Report(passes=[_record("p", {"layers": _explicit_layers(15)})])
    text = report.summary(top=4)
    assert "layers: int8 10, float32 5 (worst 4 by SQNR)" in text
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["SQNR", "dB"] and line.endswith("layer"))
    table = [line.split() for line in lines[head + 1:head + 5]]
    assert [row[-1] for row in table] == ["layer14", "layer13", "layer12", "layer11"]
    assert table[0][:3] == ["25.0", "Conv", "int8"]
    assert "layer10" not in text
    assert "layers:" not in Report(passes=[_record("p", {})]).summary()


# --------------------------------------------------------------------------- HTML


class _Page(html.parser.HTMLParser):
    """Tags, ids, table rows per table and every URL-bearing attribute of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: collections.Counter[str] = collections.Counter()
        self.ids: set[str] = set()
        self.rows: collections.Counter[str] = collections.Counter()
        self.urls: list[str] = []
        self._table: list[str] = []
        self._in_body = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags[tag] += 1
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "table":
            self._table.append(attrs.get("id", ""))
        if tag == "tbody":
            self._in_body = True
        if tag == "tr" and self._in_body and self._table:
            self.rows[self._table[-1]] += 1
        self.urls += [v for k, v in attrs.items() if k in ("src", "href", "xlink:href", "data") and v]

    def handle_endtag(self, tag):
        if tag == "table" and self._table:
            self._table.pop()
        if tag == "tbody":
            self._in_body = False


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


def test_html_is_self_contained_and_complete(fp16_result):
    report = fp16_result.report
    page = report.to_html(model="small.onnx")
    parsed = _parse(page)
    assert parsed.urls == []  # nothing to fetch: no src/href at all
    assert not re.search(r"url\(|@import|<link", page)
    assert {"nodes-chart", "passes-chart", "nodes-table", "passes-table", "verification-table",
            "layers-table", "verdict"} <= parsed.ids
    assert parsed.rows["passes-table"] == len(report.passes)
    assert parsed.rows["layers-table"] == 1 and "blocked" in page
    # node table against the models' own op counts, counted here from the protos
    before = collections.Counter(n.op_type for n in _model().graph.node)
    after = collections.Counter(n.op_type for n in optcc.ir.serialize(fp16_result.ir_model).graph.node)
    assert parsed.rows["nodes-table"] == len(set(before) | set(after))
    for op in set(before) | set(after):
        assert re.search(rf"<td>{op}</td><td class=num>{before[op]}</td><td class=num>{after[op]}</td>", page), op
    output = report.verification["outputs"][0]
    assert f"{output['max_rel']:.3g}" in page and f"{output['sqnr_db']:.1f}" in page
    assert "small.onnx" in page and "PASS" in page
    assert page.count("<script") == 1  # the page's own; pygal's config scripts are dropped
    assert report.to_html(model="small.onnx") == page  # no random ids or dates


def test_html_without_pygal_keeps_the_tables(fp16_result, monkeypatch):
    monkeypatch.setattr(report_html, "pygal", None)
    page = fp16_result.report.to_html()
    parsed = _parse(page)
    assert parsed.tags["svg"] == 0 and "no-charts" in parsed.ids
    assert page.count("Charts are not drawn") == 1
    assert parsed.rows["passes-table"] == len(fp16_result.report.passes)


def test_render_for_picks_the_format_by_suffix(fp16_result, tmp_path):
    report = fp16_result.report
    assert report.render_for(tmp_path / "r.HTML", model="/some/dir/m.onnx").startswith("<!DOCTYPE html>")
    assert "optcc report: m.onnx" in report.render_for(tmp_path / "r.html", model="/some/dir/m.onnx")
    assert report.render_for(tmp_path / "r.json").lstrip().startswith("{")


# --------------------------------------------------------------------------- headless browser


def _browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no headless browser: install Debian's chromium (apt-get install chromium) to render the report")


def _run_browser(browser: str, profile: os.PathLike, *args: str) -> subprocess.CompletedProcess:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}",
               "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_html_renders_in_headless_chromium(fp16_result, tmp_path):
    browser = _browser()
    report = fp16_result.report
    # explicit per-layer errors so the page has all three charts
    report = Report(**{**report.__dict__, "passes": [*report.passes, _record("p", {"layers": _explicit_layers(12)})]})
    page = tmp_path / "report.html"
    page.write_text(report.to_html(model="small.onnx"), encoding="utf-8")
    url = page.as_uri()
    dumped = _run_browser(browser, tmp_path / "profile-dom", "--dump-dom", url)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = _parse(dumped.stdout)
    # the page's script ran to its end and saw the charts and tables it counts
    assert "optcc-rendered" in dom.ids, dumped.stderr[-2000:]
    marker = re.search(r'id="optcc-rendered"[^>]*>charts:(\d+) tables:(\d+)<', dumped.stdout)
    assert marker and marker.groups() == ("3", "4")
    assert {"nodes-chart", "passes-chart", "layers-chart"} <= dom.ids
    assert dom.tags["svg"] == 3 and dom.tags["rect"] > 10  # the bars were drawn
    assert dom.rows["passes-table"] == len(report.passes)
    assert dom.rows["layers-table"] == 13
    console = [line for line in dumped.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    shot = tmp_path / "report.png"
    drawn = _run_browser(browser, tmp_path / "profile-shot", "--window-size=1200,3000", f"--screenshot={shot}", url)
    assert drawn.returncode == 0 and shot.stat().st_size > 10_000, drawn.stderr[-2000:]
    keep = os.environ.get("OPTCC_REPORT_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)


def test_cli_report_html(tmp_path):
    from optcc.cli import main

    source = tmp_path / "small.onnx"
    onnx.save(_model(), source)
    page, data = tmp_path / "out.html", tmp_path / "out.json"
    assert main([str(source), "-o", str(tmp_path / "o.onnx"), "--report", str(page), "--quiet"]) == 0
    parsed = _parse(page.read_text(encoding="utf-8"))
    assert {"passes-table", "nodes-table", "verification-table"} <= parsed.ids and parsed.urls == []
    assert "optcc report: small.onnx" in page.read_text(encoding="utf-8")
    assert main([str(source), "-o", str(tmp_path / "o.onnx"), "--report", str(data), "--quiet"]) == 0
    import json

    assert json.loads(data.read_text(encoding="utf-8"))["layers"] == []


def test_summary_without_errors_puts_the_layers_kept_back_first():
    rows = [{"name": f"q{i}", "precision": "int8", "reason": "quantized"} for i in range(12)]
    rows.insert(5, {"name": "kept", "precision": "float32", "reason": "returned to float"})
    text = Report(passes=[_record("p", {"layers": rows})]).summary(top=3)
    assert "layers: int8 12, float32 1 (3 shown)" in text
    assert [line.split()[-1] for line in _summary_table(text)] == ["layer", "kept", "q0", "q1"]
    only_int8 = Report(passes=[_record("p", {"layers": rows[:5]})]).summary(top=3)
    assert "layers: int8 5 (no per-layer error measured)" in only_int8 and "  layer" not in only_int8


def test_summary_of_layers_all_kept_float32_says_why():
    rows = [{"name": f"n{i}", "precision": "float32", "reason": f"'v{i}' reaches |x| = 1e+06 >= 65504"}
            for i in range(12)]
    text = Report(passes=[_record("p", {"layers": rows})]).summary(top=3)
    assert "layers: float32 12 (3 shown)" in text
    shown = _summary_table(text)[1:]
    assert [line.split()[-1] for line in shown] == ["n0", "n1", "n2"]
    assert all(f"'v{i}' reaches |x| = 1e+06 >= 65504" in line for i, line in enumerate(shown))


def _summary_table(text: str) -> list[str]:
    """summary()'s per-layer table: its header line (ending "layer") and the lines after it."""
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("  ") and line.endswith("  layer"))
    return lines[head:]


def test_summary_writes_whole_names_last_and_a_shared_reason_once():
    long_name = "/backbone/stage3/block12/attention/output_projection/MatMul_quantized_branch"
    reason = ("INT8 declined (accuracy): INT8 misses the accuracy target on 16 held-out samples: "
              "logits:top1 deviation 0.4 > 0.015 allowed; kept float32")
    rows = [{"name": long_name if i == 2 else f"conv{i}", "op_type": "Conv", "precision": "float32",
             "reason": reason, "error_db": 10.0 + i} for i in range(12)]
    text = Report(passes=[_record("p", {"layers": rows})]).summary(top=5)
    assert text.count(reason) == 1 and f"  every row: {reason}" in text.splitlines()
    table = _summary_table(text)
    assert table[0].split() == ["SQNR", "dB", "op", "precision", "layer"]
    # worst (lowest SQNR) first, each name whole, in the last column
    assert [line.rsplit("  ", 1)[1] for line in table[1:6]] == ["conv0", "conv1", long_name, "conv3", "conv4"]
    assert [line.split()[0] for line in table[1:6]] == ["10.0", "11.0", "12.0", "13.0", "14.0"]
    assert "SQNR dB: the outputs' SQNR with that layer alone quantized" in text


def test_summary_writes_a_long_reason_once_below_the_table():
    long_reason = "returned to float because " + "its error reaches the outputs unattenuated " * 3
    rows = [{"name": "a", "op_type": "Conv", "precision": "float32", "reason": long_reason, "error_rel": 0.5},
            {"name": "b", "op_type": "Mul", "precision": "int8", "reason": "quantized", "error_rel": 0.01},
            {"name": "c", "op_type": "Conv", "precision": "float32", "reason": long_reason, "error_rel": 0.2}]
    table = _summary_table(Report(passes=[_record("p", {"layers": rows})]).summary())
    assert table[0].split() == ["max", "rel", "op", "precision", "why", "layer"]
    assert [line.split() for line in table[1:4]] == [["0.5", "Conv", "float32", "[1]", "a"],
                                                     ["0.2", "Conv", "float32", "[1]", "c"],
                                                     ["0.01", "Mul", "int8", "quantized", "b"]]
    assert table[4:] == [f"  [1] {long_reason}"]
