"""``python -m optcc`` and the ``optcc`` command: see optcc.cli.

``main`` loads the command line's modules (onnx, onnxruntime: seconds on a busy machine)
with Ctrl-C and SIGTERM answered as the command answers them later in a run: one line,
exit 128 + the signal's number, nothing written.
"""

import signal
import sys

_STOPPED = {signal.SIGINT: "interrupted; nothing written", signal.SIGTERM: "terminated; nothing written"}


class _Stopped(BaseException):
    """A signal that arrived while the command's modules loaded (``args[0]``: its number)."""


def _stop(signum: int, frame: object) -> None:
    raise _Stopped(signum)


def main() -> int:
    """Run the command line (``optcc.cli.main``) and return its exit code. SIGTERM stays
    answered for the process's life: the command's run installs its own handling over
    this one, and a signal before or after it ends the process the same way."""
    signal.signal(signal.SIGTERM, _stop)
    try:
        from optcc.cli import main as run_command

        return run_command()
    except (KeyboardInterrupt, _Stopped) as stop:
        signum = stop.args[0] if isinstance(stop, _Stopped) else signal.SIGINT
        print(f"optcc: {_STOPPED[signum]}", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
