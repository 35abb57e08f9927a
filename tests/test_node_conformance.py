"""ONNX backend conformance: optcc -O1/-O2/-O3 must not break any backend test that
onnxruntime passes on the original model.

Cases: the node tests of onnx 1.16.2 (fetched from PyPI by ``fixtures.onnx_node_tests``)
and the ``pytorch-converted``, ``pytorch-operator``, ``simple`` and ``light`` folders of the
installed onnx. For each case onnxruntime (graph optimizations off) first runs the
original against the case's expected outputs with onnx's backend tolerances; cases it
fails are not ours to judge and are left out. Each passing case is optimized at every
level with ``verify=False`` and judged by the test's own data instead. A regression is
any of: optimize raises, a pass is reverted (it raised or broke an invariant), the
result fails the onnx checker or onnxruntime cannot load it, or outputs differ.

Cases are batched: one pytest test per chunk of cases runs all three levels and reports
every regression of the chunk in one message. A level whose result has the same bytes as
an earlier level's reuses that verdict.
"""

from __future__ import annotations

import hashlib
import shutil
import os
import warnings
from typing import Any

import onnx
import pytest

import optcc
from fixtures.onnx_node_tests import (
    INSTALLED_KINDS,
    BackendCase,
    NodeTestsUnavailable,
    compare_outputs,
    fetch_node_tests,
    installed_cases,
    load_data_sets,
    node_cases,
    run_onnxruntime,
)

LEVELS = (1, 2, 3)
NODE_CHUNKS = 8


def _quiet_onnxruntime() -> None:
    import onnxruntime as ort

    ort.set_default_logger_severity(4)


def _node_cases_or_skip() -> list[BackendCase]:
    try:
        fetch_node_tests()
    except NodeTestsUnavailable as e:
        pytest.skip(f"onnx node tests unavailable (PyPI unreachable?): {e}")
    return node_cases()


def _baseline_passes(case: BackendCase, model: onnx.ModelProto, sets: list[Any]) -> bool:
    try:
        return all(
            compare_outputs(expected, run_onnxruntime(model, feeds), case.rtol, case.atol) is None
            for feeds, expected in sets
        )
    except Exception:  # noqa: BLE001 - onnxruntime cannot run it: not a case for us
        return False


def _judge(case: BackendCase, model: onnx.ModelProto, sets: list[Any], level: int,
           verdicts: dict[str, str | None]) -> str | None:
    """None when -O``level`` keeps the case passing, else the regression in one line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = optcc.optimize(model, level=level, verify=False)
    except Exception as e:  # noqa: BLE001 - every failure is reported, none hidden
        return f"optimize raised {type(e).__name__}: {' '.join(str(e).split())[:300]}"
    reverted = result.report.reverted()
    if reverted:
        return "pass(es) reverted: " + "; ".join(f"{r.name}: {r.reason}" for r in reverted)
    optimized = result.model
    data = optimized.SerializeToString()
    key = hashlib.sha256(data).hexdigest()
    if key in verdicts:
        return verdicts[key]
    try:
        onnx.checker.check_model(optimized)
    except Exception as e:  # noqa: BLE001
        verdicts[key] = f"result fails onnx.checker: {' '.join(str(e).split())[:300]}"
        return verdicts[key]
    problem = None
    try:
        for i, (feeds, expected) in enumerate(sets):
            problem = compare_outputs(expected, run_onnxruntime(data, feeds), case.rtol, case.atol)
            if problem:
                problem = f"data set {i}: {problem}"
                break
    except Exception as e:  # noqa: BLE001
        problem = f"onnxruntime fails on the result: {' '.join(str(e).split())[:300]}"
    verdicts[key] = problem
    return problem


def _check_cases(cases: list[BackendCase]) -> tuple[int, list[str]]:
    _quiet_onnxruntime()
    checked = 0
    regressions = []
    for case in cases:
        model = onnx.load(str(case.model_path))
        sets = load_data_sets(case, model)
        if not _baseline_passes(case, model, sets):
            continue
        checked += 1
        verdicts: dict[str, str | None] = {
            hashlib.sha256(model.SerializeToString()).hexdigest(): None
        }
        for level in LEVELS:
            problem = _judge(case, model, sets, level, verdicts)
            if problem:
                regressions.append(f"{case.id} -O{level}: {problem}")
    return checked, regressions


def _assert_no_regressions(checked: int, regressions: list[str]) -> None:
    assert not regressions, (
        f"{len(regressions)} regression(s) among {checked} case(s) that onnxruntime passes:\n"
        + "\n".join(regressions)
    )


@pytest.mark.parametrize("chunk", range(NODE_CHUNKS), ids=lambda c: f"node-{c}of{NODE_CHUNKS}")
def test_node_tests_survive_every_level(chunk: int) -> None:
    cases = _node_cases_or_skip()
    assert len(cases) > 1000, f"expected the ~1,300 node tests of onnx 1.16.2, found {len(cases)}"
    mine = cases[chunk::NODE_CHUNKS]
    checked, regressions = _check_cases(mine)
    assert checked > len(mine) // 2, f"onnxruntime passes only {checked} of {len(mine)} cases"
    _assert_no_regressions(checked, regressions)


@pytest.mark.parametrize("kind", INSTALLED_KINDS)
def test_installed_model_tests_survive_every_level(kind: str) -> None:
    cases = installed_cases(kind)
    if not cases:
        pytest.skip(f"the installed onnx {onnx.__version__} has no backend test data '{kind}'")
    checked, regressions = _check_cases(cases)
    assert checked > 0, f"onnxruntime passes none of the {len(cases)} '{kind}' cases"
    _assert_no_regressions(checked, regressions)


def test_node_test_cache_is_complete_and_inside_the_cache_root() -> None:
    folder = _node_cases_or_skip()[0].model_path.parent.parent
    root = folder.parent.resolve()
    assert folder.name == "node" and folder.is_dir()
    # Every file is a plain file inside the cache folder.
    sample = sorted(folder.rglob("*"))[:200]
    for path in sample:
        assert not path.is_symlink()
        assert root in path.resolve().parents
    assert os.path.isfile(folder / "test_abs" / "model.onnx")


def test_extraction_refuses_unsafe_wheel_members(tmp_path) -> None:
    """A crafted wheel: '..' or absolute member paths and symlinks are refused, and
    nothing is written outside the extraction folder."""
    import stat
    import zipfile

    from fixtures import onnx_node_tests as nt

    for member, mode in [
        (nt.MEMBER_PREFIX + "../../../../escape.txt", 0o100644),
        (nt.MEMBER_PREFIX + "test_x/../../escape.txt", 0o100644),
        (nt.MEMBER_PREFIX + "test_x/link", stat.S_IFLNK | 0o777),
    ]:
        wheel = tmp_path / "crafted.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            info = zipfile.ZipInfo(member)
            info.external_attr = mode << 16
            archive.writestr(info, b"/etc/passwd")
        target = tmp_path / "node"
        with pytest.raises(ValueError):
            nt._extract_node_tests(wheel, target)
        shutil.rmtree(target, ignore_errors=True)
        assert not (tmp_path / "escape.txt").exists() and not (tmp_path.parent / "escape.txt").exists()
