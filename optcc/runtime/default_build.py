"""Whether onnxruntime's default session builds a saved model, asked of a child process.

The verifier's sessions run a graph as written (optimizations off), but a user's session
runs onnxruntime's default options: every graph optimization (``ORT_ENABLE_ALL``), whose
transformers can fail, or crash the process, on graphs the plain session runs (a float16
Transpose feeding a MatMul of a constant, in some onnxruntime releases). The model is
loaded from its file, external data beside it, by a fresh interpreter (``sys.executable``,
started in the model's folder, so that no module of the caller's working folder shadows
onnxruntime) so that a crash ends the child alone. The parent reads its exit: 0 builds; a
crash by a fault signal (SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL), or an exception from
the build (its message is the child's last stderr line), is the model's problem. What says
nothing about the model is reported as not checked, never as a failure: a child that
cannot start, imports another onnxruntime version than the parent's or none, is killed
(SIGKILL: the system's out-of-memory killer), or runs past ``timeout_s`` (a limit
measured in wall time, which must not decide what is written).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import onnxruntime as ort

from optcc.runtime.providers import provider_entry

__all__ = ["DEFAULT_BUILD_TIMEOUT_S", "DefaultBuild", "default_build"]

DEFAULT_BUILD_TIMEOUT_S = 600.0  # a session build this long is taken as one that never ends
_FAULTS = frozenset({signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL})
_OTHER_ONNXRUNTIME = 3  # the child's exit code when it imports another onnxruntime than the parent's

# the child: build the session with onnxruntime's default options, nothing else; an error's
# first line goes to stderr last, for the parent to report
_CHILD = """\
import json, sys
try:
    import onnxruntime as ort
except Exception as e:
    sys.stderr.write("\\ncannot import onnxruntime: %s\\n" % e)
    sys.exit(3)
if ort.__version__ != sys.argv[3]:
    sys.stderr.write("\\nthe child imports onnxruntime %s, not %s\\n" % (ort.__version__, sys.argv[3]))
    sys.exit(3)
entry = json.loads(sys.argv[2])
try:
    ort.InferenceSession(sys.argv[1], providers=[tuple(entry) if isinstance(entry, list) else entry])
except Exception as e:
    lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    sys.stderr.write("\\n" + lines[0][:300] + "\\n")
    sys.exit(1)
"""


@dataclasses.dataclass(frozen=True)
class DefaultBuild:
    """``problem``: why the model does not build (None: it builds, or was not checked);
    ``unchecked``: why the build could not be asked (None: it was)."""

    problem: str | None = None
    unchecked: str | None = None


def _command(path: str, provider: str) -> list[str]:
    """The child's command line (a seam: tests replace the child)."""
    return [sys.executable, "-c", _CHILD, path, json.dumps(provider_entry(provider)), ort.__version__]


def default_build(path: str | os.PathLike, provider: str, timeout_s: float = DEFAULT_BUILD_TIMEOUT_S) -> DefaultBuild:
    """Whether onnxruntime's default session builds the model saved at ``path`` on ``provider``."""
    what = f"onnxruntime's default session (all graph optimizations, on {provider})"
    folder = os.path.dirname(os.path.abspath(path))
    try:
        done = subprocess.run(_command(os.fspath(path), provider), stdin=subprocess.DEVNULL, cwd=folder,
                              capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return DefaultBuild(unchecked=f"{what} did not finish building the result within {timeout_s:g} s")
    except OSError as e:
        return DefaultBuild(unchecked=f"no child process could ask {what}: {e}")
    lines = [line for line in done.stderr.decode(errors="replace").splitlines() if line.strip()]
    # the file's name, not its folder (a scratch folder's name differs between runs)
    said = lines[-1].replace(os.fspath(path), os.path.basename(path)) if lines else f"exit code {done.returncode}"
    if done.returncode == 0:
        return DefaultBuild()
    if done.returncode < 0:
        try:
            fault = signal.Signals(-done.returncode)
        except ValueError:
            fault = None
        if fault in _FAULTS:
            return DefaultBuild(problem=f"{what} crashes building the result ({fault.name})")
        name = fault.name if fault is not None else f"signal {-done.returncode}"
        return DefaultBuild(unchecked=f"the child asking {what} was killed ({name}; out of memory?)")
    if done.returncode == _OTHER_ONNXRUNTIME:
        return DefaultBuild(unchecked=f"no child process could ask {what}: {said}")
    return DefaultBuild(problem=f"{what} cannot build the result: {said}")
