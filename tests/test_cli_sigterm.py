"""SIGTERM (a timeout, a cancelled CI job, a stopped container) unwinds the run as Ctrl-C
does: exit 143, one line, nothing written, and no scratch folder left in the temporary
directory. Found by killing `optcc encoder.onnx -O3` (traceforge-title-model 0.2.0)
mid-verification: the process died where it stood (status -15) and left an
optcc-verify-* folder behind, which holds a copy of the model whenever a session must be
loaded from a file (external data in subgraphs, CUDA)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP

# optcc's command, with a SIGTERM to the process once the verifier made a session with its
# scratch folder
_TERMINATED_MIDWAY = """
import importlib, os, signal, sys
from optcc import cli

verify = importlib.import_module("optcc.numerics.verify")

made = verify.make_session

def make_then_terminate(*args, **kwargs):
    session = made(*args, **kwargs)
    if kwargs.get("scratch") and os.path.isdir(kwargs["scratch"]):
        os.kill(os.getpid(), signal.SIGTERM)
    return session

verify.make_session = make_then_terminate
sys.exit(cli.main(sys.argv[1:]))
"""


def _model(path: Path) -> None:
    rng = np.random.default_rng(0)
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("Add", ["h", "b"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", TP.FLOAT, ["n", 16])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["n", 8])],
                          [nh.from_array(rng.normal(size=(16, 8)).astype(np.float32), "w"),
                           nh.from_array(rng.normal(size=8).astype(np.float32), "b")])
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), path)


def test_sigterm_unwinds_writes_nothing_and_leaves_no_scratch(tmp_path: Path) -> None:
    source, out, scratch = tmp_path / "m.onnx", tmp_path / "out" / "m.opt.onnx", tmp_path / "tmp"
    samples = tmp_path / "x.npz"  # samples given: the result is compared on them, in sessions
    _model(source)
    np.savez(samples, x=np.random.default_rng(1).normal(size=(3, 2, 16)).astype(np.float32))
    out.parent.mkdir()
    scratch.mkdir()
    proc = subprocess.run([sys.executable, "-c", _TERMINATED_MIDWAY, str(source), "-O3", "-o", str(out),
                           "--inputs", str(samples)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(scratch)})
    assert proc.returncode == 143, (proc.returncode, proc.stderr)
    assert proc.stderr.strip().splitlines()[-1] == "optcc: terminated; nothing written"
    assert list(out.parent.iterdir()) == []
    assert [p.name for p in scratch.iterdir() if p.name.startswith("optcc")] == []  # onnxruntime may leave its own
