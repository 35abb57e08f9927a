"""``python -m optcc`` and the ``optcc`` command: see optcc.cli.

``main`` loads the command line's modules (onnx, onnxruntime: seconds on a busy machine)
with Ctrl-C and SIGTERM answered as the command answers them later in a run
(``optcc.errors.stopped``): one line, exit 128 + the signal's number, nothing written.
"""

import signal
import sys

from optcc.errors import Terminated, raise_terminated, stopped


def main() -> int:
    """Run the command line (``optcc.cli.main``) and return its exit code. SIGTERM stays
    answered for the process's life: the command's run installs its own handling over
    this one, and a signal before or after it ends the process the same way."""
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        from optcc.cli import main as run_command

        return run_command()
    except (KeyboardInterrupt, Terminated, ImportError) as error:
        stop = stopped(_signal_behind(error))
        if stop is None:
            raise
        code, line = stop
        print(f"optcc: {line}", file=sys.stderr)
        return code


def _signal_behind(error: BaseException) -> BaseException:
    """The Ctrl-C or SIGTERM behind ``error``: a signal that lands inside a C extension's
    initialisation (onnxruntime's) reaches Python as an ImportError raised from it."""
    seen: BaseException | None = error
    while seen is not None:
        if stopped(seen) is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    return error


if __name__ == "__main__":
    sys.exit(main())
