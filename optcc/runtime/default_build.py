"""Whether onnxruntime's default session builds a saved model, asked of a child process.

The verifier's sessions run a graph as written (optimizations off), but a user's session
runs onnxruntime's default options: every graph optimization (``ORT_ENABLE_ALL``), whose
transformers can fail, or crash the process, on graphs the plain session runs (a float16
Transpose feeding a MatMul of a constant, in some onnxruntime releases). The model is
loaded from its file, external data beside it, by a fresh interpreter (``sys.executable``)
so that a crash ends the child alone; the parent reads its exit: 0 builds, a signal
crashed, any other code raised (its message is the child's last stderr line), and a child
that runs past ``timeout_s`` is killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from optcc.runtime.providers import provider_entry

__all__ = ["DEFAULT_BUILD_TIMEOUT_S", "default_build_error"]

DEFAULT_BUILD_TIMEOUT_S = 600.0  # a session build this long is taken as one that never ends

# the child: build the session with onnxruntime's default options, nothing else; an error's
# first line goes to stderr last, for the parent to report
_CHILD = """\
import json, sys
import onnxruntime as ort
entry = json.loads(sys.argv[2])
try:
    ort.InferenceSession(sys.argv[1], providers=[tuple(entry) if isinstance(entry, list) else entry])
except Exception as e:
    lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    sys.stderr.write("\\n" + lines[0][:300] + "\\n")
    sys.exit(1)
"""


def _command(path: str, provider: str) -> list[str]:
    """The child's command line (a seam: tests replace the child)."""
    return [sys.executable, "-c", _CHILD, path, json.dumps(provider_entry(provider))]


def default_build_error(path: str | os.PathLike, provider: str,
                        timeout_s: float = DEFAULT_BUILD_TIMEOUT_S) -> str | None:
    """Why onnxruntime's default session cannot build the model saved at ``path`` on
    ``provider``, in one line; None when it builds."""
    what = f"onnxruntime's default session (all graph optimizations, on {provider})"
    try:
        done = subprocess.run(_command(os.fspath(path), provider), stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"{what} does not finish building the result within {timeout_s:g} s"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        return f"{what} crashes building the result ({name})"
    lines = [line for line in done.stderr.decode(errors="replace").splitlines() if line.strip()]
    return f"{what} cannot build the result: {lines[-1] if lines else f'exit code {done.returncode}'}"
