"""The report as one self-contained HTML page: ``render_html(report.to_dict())``.

Everything is inline (CSS, SVG charts, a few lines of script that make tables sortable and
mark the page rendered); nothing is fetched, so the page opens offline and can be archived
as a CI artifact. Sections: header (model, level, verdict, versions, totals), node
reduction by op type, passes (time chart; status, reason, op delta), verification per
output, and for FP16/INT8 the per-layer precision table and error chart.

Charts are static SVG drawn by pygal (the optional ``report`` extra: pure Python, no
dependency, SVG that needs no script). Without pygal the page keeps every table and says
in one line that charts are not drawn.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from optcc.infra.report import format_bytes

__all__ = ["render_html", "charts_available"]

MAX_CHART_ROWS = 40  # bars per chart; tables keep every row
RENDERED_MARKER = "optcc-rendered"  # id of the element the page's script adds when it ran

try:
    import pygal
    from pygal.style import Style
except ImportError:  # the optional "report" extra is not installed
    pygal = None


def charts_available() -> bool:
    """Whether pygal is installed, i.e. the page will have charts."""
    return pygal is not None


def render_html(report: Mapping[str, Any], *, model: str | None = None) -> str:
    """The HTML page for a report in its JSON form (``Report.to_dict()`` or a loaded
    ``--report`` JSON file)."""
    charts = _Charts() if pygal is not None else None
    title = f"optcc report: {model}" if model else "optcc report"
    body = [
        _header(report, title),
        "" if charts else '<p class="note" id="no-charts">Charts are not drawn: pygal is not '
        "installed (pip install 'optcc[report]'); the tables below have every number.</p>",
        _nodes_section(report, charts),
        _passes_section(report, charts),
        _verification_section(report),
        _layers_section(report, charts),
    ]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(b for b in body if b)
        + f"\n<script>{_SCRIPT}</script>\n</body></html>\n"
    )


# --------------------------------------------------------------------------- sections


def _header(report: Mapping[str, Any], title: str) -> str:
    verification = report.get("verification")
    if verification is None:
        verdict, css = "not verified", "skipped"
    else:
        status = str(verification.get("status", "skipped"))
        verdict, css = {"passed": ("PASS", "pass"), "failed": ("FAIL", "fail")}.get(status, (status, "skipped"))
    level = report.get("level")
    before, after = report.get("model_before") or {}, report.get("model_after") or {}
    facts = [
        ("level", "custom pipeline" if level is None else f"-O{level}"),
        ("verdict", f'<span class="verdict {css}" id="verdict">{_e(verdict)}</span>'),
        ("verification", _e((verification or {}).get("summary") or "-")),
        ("nodes", f"{before.get('nodes', '-')} &rarr; {after.get('nodes', '-')}"),
        ("weights", f"{_size(before.get('weight_bytes'))} &rarr; {_size(after.get('weight_bytes'))}"),
        ("opset", f"{before.get('opset', '-')} &rarr; {after.get('opset', '-')}"),
        ("time", f"{_num(report.get('total_time_s'), '.2f')} s, peak RSS {_size(report.get('peak_rss_bytes'))}"),
        ("versions", _e(f"optcc {report.get('optcc_version', '?')}, onnx {report.get('onnx_version', '?')}, "
                        f"onnxruntime {report.get('onnxruntime_version', '?')}")),
    ]
    outcome = report.get("outcome")
    if outcome:  # how the command line ended: a run that ended early has nothing else to show
        said = f"exit {outcome.get('exit_code')}: " + (f"wrote {outcome['output']}" if outcome.get("output")
                                                      else "nothing written")
        facts.insert(0, ("outcome", _e(said + (f"; {outcome['error']}" if outcome.get("error") else ""))))
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in facts)
    warnings = "".join(f"<li>{_e(w)}</li>" for w in report.get("warnings") or [])
    return (f"<header><h1>{_e(title)}</h1><table class=\"facts\">{rows}</table>"
            + (f'<ul class="warnings">{warnings}</ul>' if warnings else "") + "</header>")


def _nodes_section(report: Mapping[str, Any], charts: _Charts | None) -> str:
    before = (report.get("model_before") or {}).get("op_histogram") or {}
    after = (report.get("model_after") or {}).get("op_histogram") or {}
    ops = sorted(set(before) | set(after), key=lambda op: (-(before.get(op, 0) - after.get(op, 0)),
                                                           -before.get(op, 0), op))
    if not ops:
        return ""
    rows = [(op, before.get(op, 0), after.get(op, 0), after.get(op, 0) - before.get(op, 0)) for op in ops]
    table = _table("nodes-table", ["op type", "before", "after", "delta"],
                   [[_e(op), str(b), str(a), _delta(d)] for op, b, a, d in rows], numeric={1, 2, 3})
    chart = ""
    if charts is not None:
        shown = rows[:MAX_CHART_ROWS]
        chart = charts.bars("nodes-chart", "Nodes by op type", [r[0] for r in shown],
                            {"before": [r[1] for r in shown], "after": [r[2] for r in shown]})
    return _section("nodes", "Node reduction by op type", chart + table)


def _passes_section(report: Mapping[str, Any], charts: _Charts | None) -> str:
    passes = report.get("passes") or []
    if not passes:
        return ""
    labels = [_pass_label(p) for p in passes]
    body = [[str(i + 1), _e(label), f'<span class="status {_e(p.get("status", ""))}">{_e(p.get("status", ""))}</span>',
             _num(p.get("time_s"), ".4f"), f"{p.get('nodes_before', '-')} &rarr; {p.get('nodes_after', '-')}",
             _e(", ".join(f"{op} {n:+d}" for op, n in (p.get("op_delta") or {}).items()) or "-"),
             _e(p.get("reason") or "")]
            for i, (label, p) in enumerate(zip(labels, passes))]
    table = _table("passes-table", ["#", "pass", "status", "time (s)", "nodes", "op delta", "reason"], body,
                   numeric={0, 3}, row_class="pass-row")
    chart = ""
    if charts is not None:
        totals: dict[str, float] = {}
        for p in passes:
            totals[str(p.get("name", "?"))] = totals.get(str(p.get("name", "?")), 0.0) + float(p.get("time_s") or 0.0)
        timed = sorted(totals.items(), key=lambda nt: (-nt[1], nt[0]))[:MAX_CHART_ROWS]
        chart = charts.bars("passes-chart", "Time per pass, all its runs (ms)", [name for name, _ in timed],
                            {"time (ms)": [1000.0 * t for _, t in timed]})
    return _section("passes", "Passes", chart + table)


def _verification_section(report: Mapping[str, Any]) -> str:
    verification = report.get("verification")
    if verification is None:
        return _section("verification", "Verification", "<p>Not verified.</p>")
    tolerance = "; ".join(f"{k} {', '.join(map(str, v)) if isinstance(v, list) else v}"  # a list: the outputs judged
                          for k, v in (verification.get("tolerance") or {}).items() if v is not None)
    reference = verification.get("reference") or "the original model on the same provider"
    facts = (f"<p>{_e(verification.get('summary') or verification.get('status', ''))}</p>"
             f"<p>numerics <b>{_e(verification.get('numerics', '-'))}</b> (tolerance: {_e(tolerance or '-')}); "
             f"reference: {_e(reference)}; samples: <b>{_e(verification.get('samples', '-'))}</b>; "
             f"providers: {_e(', '.join(verification.get('providers') or []) or '-')}</p>")
    if verification.get("reason"):
        facts += f"<p class=\"reason\">{_e(verification['reason'])}</p>"
    outputs = verification.get("outputs") or []
    body = [[_e(o.get("name", "")), _e(str(o.get("provider", "")).replace("ExecutionProvider", "")),
             '<span class="verdict pass">pass</span>' if o.get("passed") else '<span class="verdict fail">fail</span>',
             _num(o.get("max_rel"), ".3g"), _num(o.get("max_abs"), ".3g"), _num(o.get("sqnr_db"), ".1f"),
             _num(o.get("cosine"), ".6f"), _num(o.get("argmax_agreement"), ".3f"),
             _e(o.get("reference") or reference), _e(o.get("problem") or "")]
            for o in outputs]
    table = _table("verification-table", ["output", "provider", "verdict", "max rel", "max abs", "SQNR (dB)",
                                          "cosine", "argmax agreement", "reference", "problem"],
                   body, numeric={3, 4, 5, 6, 7}) if outputs else ""
    proof = verification.get("proof")
    if proof and not outputs:  # proved without running a sample: one row per output
        rows = [[_e(name), '<span class="verdict pass">proved</span>' if proved else
                 '<span class="verdict fail">not proved</span>'] for name, proved in proof["outputs"].items()]
        table = _table("verification-table", ["output", "proof"], rows)
    return _section("verification", "Verification", facts + table)


def _layers_section(report: Mapping[str, Any], charts: _Charts | None) -> str:
    rows = report.get("layers") or []
    if not rows:
        return ""
    precisions = sorted({r.get("precision", "?") for r in rows}, key=_precision_order)
    counts = ", ".join(f"{p} {sum(r.get('precision') == p for r in rows)}" for p in precisions)
    body = [[_e(r.get("name", "")), _e(r.get("op_type") or "-"),
             f'<span class="precision {_e(r.get("precision", ""))}">{_e(r.get("precision", ""))}</span>',
             _num(r.get("error_db"), ".1f"), _num(r.get("error_rel"), ".3g"), _e(r.get("reason") or ""),
             _e(r.get("pass") or "")]
            for r in rows]
    table = _table("layers-table", ["layer", "op", "precision", "error SQNR (dB)", "error rel", "why", "pass"],
                   body, numeric={3, 4}, row_class="layer-row")
    chart = ""
    with_error = [r for r in rows if r.get("error_db") is not None]
    if charts is not None and with_error:
        worst = sorted(with_error, key=lambda r: r["error_db"])[:MAX_CHART_ROWS]
        series = {p: [r["error_db"] if r.get("precision") == p else None for r in worst] for p in precisions
                  if any(r.get("precision") == p for r in worst)}
        chart = charts.bars("layers-chart", "Per-layer error, SQNR in dB (lower is worse)",
                            [str(r.get("name")) for r in worst], series, stacked=True)
    elif with_error == []:
        chart = "<p class=\"note\">No per-layer error was measured (the chart needs error values).</p>"
    return _section("layers", f"Per-layer precision ({_e(counts)})", chart + table)


# --------------------------------------------------------------------------- charts


class _Charts:
    """Horizontal bar charts as inline SVG, with ids stable across runs."""

    def __init__(self) -> None:
        self.style = Style(
            background="white", plot_background="white", foreground="#222", foreground_strong="#111",
            foreground_subtle="#bbb", font_family="system-ui, sans-serif", label_font_size=11,
            major_label_font_size=11, value_font_size=10, title_font_size=14, legend_font_size=12,
            colors=("#8da0cb", "#fc8d62", "#66c2a5", "#e78ac3"),
        )

    def bars(self, chart_id: str, title: str, labels: Sequence[str], series: Mapping[str, Sequence[Any]],
             *, stacked: bool = False) -> str:
        chart = (pygal.HorizontalStackedBar if stacked else pygal.HorizontalBar)(
            style=self.style, js=[], disable_xml_declaration=True, width=900,
            height=max(180, 90 + 22 * len(labels) * (1 if stacked else max(1, len(series)) * 0.8)),
            show_legend=len(series) > 1, legend_at_bottom=True, print_values=not stacked,
            print_values_position="top", print_zeroes=False,
            truncate_label=48, explicit_size=True, margin=8, value_formatter=_short_number,
        )
        chart.title = title
        # pygal draws the first label at the bottom; reversed so the table's order reads top-down
        chart.x_labels = list(reversed([str(label) for label in labels]))
        for name, values in series.items():
            chart.add(name, list(reversed(list(values))))
        svg = chart.render(is_unicode=True)
        # the same page for the same report: no generator/date comments, no random chart id,
        # no config script for pygal's tooltip script (which is not loaded)
        svg = re.sub(r"<!--.*?-->", "", svg, flags=re.S)
        svg = re.sub(r"<script[^>]*>.*?</script>", "", svg, flags=re.S)
        generated = re.search(r'id="(chart-[0-9a-f-]+)"', svg)
        if generated:
            svg = svg.replace(generated.group(1), chart_id)
        return f'<figure class="chart">{svg}</figure>'


def _short_number(value: float) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- pieces


def _section(anchor: str, title: str, content: str) -> str:
    return f'<section id="{anchor}"><h2>{title}</h2>{content}</section>'


def _table(table_id: str, head: Sequence[str], rows: Sequence[Sequence[str]], *,
           numeric: frozenset[int] | set[int] = frozenset(), row_class: str = "") -> str:
    """A sortable table; cells are already escaped HTML."""
    heads = "".join(f"<th{' class=num' if i in numeric else ''}>{_e(h)}</th>" for i, h in enumerate(head))
    cls = f' class="{row_class}"' if row_class else ""
    body = "".join(
        f"<tr{cls}>" + "".join(f"<td{' class=num' if i in numeric else ''}>{c}</td>" for i, c in enumerate(row))
        + "</tr>" for row in rows)
    return f'<table id="{table_id}" class="data"><thead><tr>{heads}</tr></thead><tbody>{body}</tbody></table>'


def _pass_label(record: Mapping[str, Any]) -> str:
    name = str(record.get("name", "?"))
    return name if record.get("iteration") is None else f"{name} #{record['iteration']}"


def _precision_order(precision: str) -> tuple[int, str]:
    order = ("int8", "float16", "float32")
    return (order.index(precision) if precision in order else len(order), precision)


def _delta(n: int) -> str:
    css = "down" if n < 0 else "up" if n > 0 else ""
    return f'<span class="{css}">{n:+d}</span>' if n else "0"


def _num(value: Any, fmt: str) -> str:
    if value is None or isinstance(value, bool):
        return "-" if value is None else _e(str(value))
    try:
        number = float(value)
    except (TypeError, ValueError):
        return _e(str(value))  # "inf", "nan" as the JSON writes them
    return format(number, fmt) if math.isfinite(number) else _e(str(value))


def _size(n: Any) -> str:
    return format_bytes(n) if isinstance(n, (int, float)) else "-"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1100px;color:#222;
 padding:0 16px;line-height:1.4}
h1{font-size:22px;margin:0 0 12px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px}
table.facts th{text-align:left;padding:2px 16px 2px 0;color:#555;font-weight:600;vertical-align:top}
table.data{width:100%;margin-top:8px}
table.data th{background:#f3f4f6;text-align:left;padding:4px 8px;cursor:pointer;border-bottom:2px solid #ccc;
 white-space:nowrap}
table.data td{padding:3px 8px;border-bottom:1px solid #eee;vertical-align:top}
table.data tr:hover td{background:#fafafa}
.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{font-weight:700;padding:1px 8px;border-radius:3px}
.verdict.pass{background:#dcfce7;color:#166534}.verdict.fail{background:#fee2e2;color:#991b1b}
.verdict.skipped{background:#fef3c7;color:#92400e}
.status.changed{color:#166534;font-weight:600}.status.reverted,.status.failed{color:#991b1b;font-weight:600}
.status.unchanged{color:#888}
.precision.int8{color:#1d4ed8;font-weight:600}.precision.float16{color:#047857;font-weight:600}
.precision.float32{color:#b45309;font-weight:600}
.down{color:#166534}.up{color:#991b1b}
.note{color:#92400e;background:#fffbeb;padding:6px 10px;border-left:3px solid #f59e0b}
.warnings{color:#92400e}
figure.chart{margin:8px 0}figure.chart svg{max-width:100%;height:auto}
"""

# Sortable tables (click a header) and a marker that proves the script ran to its end.
_SCRIPT = """
(function(){
  function key(td){var t=td.textContent.trim();var n=parseFloat(t.replace(/[^0-9eE+.-]/g,''));
    return (t!=='-'&&!isNaN(n)&&/^[-+]?[0-9.]/.test(t))?n:t.toLowerCase();}
  document.querySelectorAll('table.data').forEach(function(table){
    table.querySelectorAll('th').forEach(function(th,col){
      th.addEventListener('click',function(){
        var body=table.tBodies[0],rows=Array.prototype.slice.call(body.rows);
        var dir=th.dataset.dir==='asc'?-1:1;th.dataset.dir=dir===1?'asc':'desc';
        rows.sort(function(a,b){var x=key(a.cells[col]),y=key(b.cells[col]);
          if(typeof x!==typeof y){x=String(x);y=String(y);}return x<y?-dir:x>y?dir:0;});
        rows.forEach(function(r){body.appendChild(r);});
      });
    });
  });
  var mark=document.createElement('p');mark.id='""" + RENDERED_MARKER + """';mark.hidden=true;
  mark.textContent='charts:'+document.querySelectorAll('figure.chart svg').length+
    ' tables:'+document.querySelectorAll('table.data').length;
  document.body.appendChild(mark);
})();
"""
