"""Progress of long phases (calibration, bias correction, fallback, verification).

``with Progress("calibrating", total, enabled=...) as bar: ... bar.advance()`` reports the
same steps three ways:

- **terminal**: one line on stderr with the phase name, count, elapsed time and ETA, drawn
  only when ``enabled`` is true and stderr is a terminal; it is cleared when the phase
  ends, so consecutive phases share one line;
- **log line**: when ``enabled`` is true and stderr is not a terminal (a CI log, a pipe),
  once stderr has had no line of this run for ``QUIET_SECONDS``, the innermost open phase
  prints ``optcc: <phase> <done>/<total> (<elapsed> s)`` (no count for a one-step phase;
  a phase named as one opened before it in the run, counted anew, says which it is:
  ``optcc: bias correction, run 3: 28/53 (3 s)``):
  at once when that phase is new since the last line, else at most once every
  ``LINE_EVERY_SECONDS``. A watcher thread checks every ``TICK_SECONDS``, so a phase of
  one long step (a confirmation, a pass) is named while it runs, not only at a step;
  phases opened inside another (in the same thread or task) share its run and its clock.
  Short work prints nothing; the lines go to stderr alone and decide nothing;
- **callback** (the Python API): ``callback(phase, done, total)`` is called when a phase
  starts and after every step. Give it as ``enabled=callback`` (``optcc.optimize(...,
  progress=callback)`` passes it down; a callable never draws on the terminal) or install
  it around any call with ``with optcc.progress.reporting(callback): optcc.optimize(...)``,
  which reaches every phase whatever its ``enabled`` says;
- **logging**: a DEBUG record ``"<phase> <done>/<total>"`` on the ``optcc.progress`` logger.

The terminal line is tqdm's: a small, dependency-free, widely used library that already
does rate and ETA estimation, redraw throttling, terminal-width handling and stacked bars.
rich would draw the same line but brings pygments and markdown-it with it; a hand-written
bar has to re-solve each of those.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Union

from tqdm import tqdm

__all__ = ["Progress", "ProgressCallback", "reporting"]

QUIET_SECONDS = 10.0  # stderr silent this long: the innermost phase says what runs
LINE_EVERY_SECONDS = 30.0  # the least time between two log lines of the same phase
TICK_SECONDS = 1.0  # how often the watcher of a run looks at its open phases

ProgressCallback = Callable[[str, int, int], object]
"""``callback(phase, done, total)``: ``done`` steps of ``total`` finished in ``phase``."""

logger = logging.getLogger("optcc.progress")

_callbacks: contextvars.ContextVar[tuple[ProgressCallback, ...]] = contextvars.ContextVar(
    "optcc_progress_callbacks", default=())
# the ``enabled`` of the phase open here (True or a callback; False: none): what ``enabled=None`` inherits
_reporting_here: contextvars.ContextVar[Union[bool, ProgressCallback]] = contextvars.ContextVar(
    "optcc_progress_enabled", default=False)
# the log lines of the run the phases opened here belong to (None: no phase open)
_run: contextvars.ContextVar[_LogLines | None] = contextvars.ContextVar("optcc_progress_run", default=None)


@contextlib.contextmanager
def reporting(callback: ProgressCallback) -> Iterator[None]:
    """Call ``callback(phase, done, total)`` for every progress step inside the block
    (this thread or task; blocks nest, each callback is called)."""
    token = _callbacks.set((*_callbacks.get(), callback))
    try:
        yield
    finally:
        _callbacks.reset(token)


class Progress:
    """One phase of long work: ``with Progress(label, total, enabled=...) as bar: bar.advance()``.

    ``enabled``: True draws on a terminal stderr; False draws nothing; a callable is called
    as ``enabled(phase, done, total)`` instead of drawing; None (the default) does as the
    phase open around it (a pass's own phases inside the manager's ``pass NAME``), else
    nothing. ``bar=False``: no terminal line of its own (a phase that holds others, such as
    a whole run or a pass, which the log lines and callbacks still see). ``set_phase``
    renames the phase (and optionally restarts the count) on the same line.
    """

    def __init__(self, label: str, total: int, *,
                 enabled: Union[bool, ProgressCallback, None] = None, bar: bool = True) -> None:
        if enabled is None:
            enabled = _reporting_here.get()
        self.label = label
        self.total = max(int(total), 1)
        self.done = 0
        self._callbacks: tuple[ProgressCallback, ...] = _callbacks.get()
        if callable(enabled):
            self._callbacks = (*self._callbacks, enabled)
        self.enabled = enabled is True and bar and _is_terminal(sys.stderr)
        self._log_lines = enabled is True and not _is_terminal(sys.stderr)
        self.started = time.monotonic()
        self._bar: tqdm | None = None
        self._lines: _LogLines | None = None
        self._ordinal = 1  # phases of the run named so, this one included (set by the run's log lines)
        self._token: contextvars.Token[_LogLines | None] | None = None
        self._reports: Union[bool, ProgressCallback] = enabled if enabled is True or callable(enabled) else False
        self._reporting_token: contextvars.Token[Union[bool, ProgressCallback]] | None = None

    def __enter__(self) -> Progress:
        if self.enabled:
            self._bar = tqdm(total=self.total, desc=self.label, file=sys.stderr, leave=False,
                             dynamic_ncols=True, unit="step")
        if self._log_lines:
            self._lines = _run.get()
            if self._lines is None:  # the first phase of a run: its lines and their watcher
                self._lines = _LogLines()
                self._token = _run.set(self._lines)
            self._lines.open(self)
        self._reporting_token = _reporting_here.set(self._reports)
        self._notify()
        return self

    def advance(self, steps: int = 1) -> None:
        """``steps`` more steps done (never past ``total``)."""
        before = self.done
        self.done = min(self.total, self.done + steps)
        if self._bar is not None and self.done > before:
            self._bar.update(self.done - before)
        self._notify()

    def set_phase(self, label: str, total: int | None = None) -> None:
        """Rename the phase; with ``total``, start counting again from 0 of ``total``."""
        self.label = label
        if total is not None:
            self.total, self.done = max(int(total), 1), 0
        if self._lines is not None:
            self._ordinal = self._lines.named(label)
        if self._bar is not None:
            if total is not None:
                self._bar.reset(total=self.total)
            self._bar.set_description_str(label)
        self._notify()

    def _notify(self) -> None:
        logger.debug("%s %d/%d", self.label, self.done, self.total)
        for callback in self._callbacks:
            callback(self.label, self.done, self.total)
        if self._lines is not None:
            self._lines.check()

    def line(self, now: float) -> str:
        """The log line of this phase at ``now``: its name, count (none for one step) and time."""
        count = f" {self.done}/{self.total}" if self.total > 1 else ""
        if self._ordinal > 1:  # another phase of the run had this name, with a count of its own
            count = f", run {self._ordinal}" + (f":{count}" if count else "")
        return f"optcc: {self.label}{count} ({now - self.started:.0f} s)"

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._reporting_token is not None:
            _reporting_here.reset(self._reporting_token)
            self._reporting_token = None
        if self._lines is not None:
            self._lines.close(self)
            if self._token is not None:
                self._lines.stop()
                _run.reset(self._token)
            self._lines, self._token = None, None


class _LogLines:
    """The log lines of one run (``Progress``'s non-terminal mode): the phases open, innermost
    last, when the last line was printed and for which phase, and a daemon thread that
    checks every ``TICK_SECONDS`` whether the innermost phase should say what runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[Progress] = []
        self._last_time = time.monotonic()  # the run's start counts as a line: short work prints none
        self._last_phase: Progress | None = None
        self._stopped = threading.Event()
        self._named: dict[str, int] = {}  # phase name -> phases given it so far
        self._watcher = threading.Thread(target=self._watch, name="optcc-progress", daemon=True)
        self._watcher.start()

    def open(self, phase: Progress) -> None:
        phase._ordinal = self.named(phase.label)
        with self._lock:
            self._open.append(phase)

    def named(self, label: str) -> int:
        """How many phases of the run were given the name ``label``, counting one more now."""
        with self._lock:
            self._named[label] = self._named.get(label, 0) + 1
            return self._named[label]

    def close(self, phase: Progress) -> None:
        with self._lock:
            if phase in self._open:
                self._open.remove(phase)

    def stop(self) -> None:
        self._stopped.set()
        if self._watcher is not threading.current_thread():
            self._watcher.join()

    def check(self) -> None:
        """Print the innermost phase's line when stderr has been silent for ``QUIET_SECONDS``
        and that phase is new since the last line or has had none for ``LINE_EVERY_SECONDS``."""
        with self._lock:
            if not self._open:
                return
            phase, now = self._open[-1], time.monotonic()
            quiet = now - self._last_time
            if quiet < QUIET_SECONDS or (phase is self._last_phase and quiet < LINE_EVERY_SECONDS):
                return
            self._last_time, self._last_phase = now, phase
            text = phase.line(now)
        print(text, file=sys.stderr, flush=True)

    def _watch(self) -> None:
        while not self._stopped.wait(TICK_SECONDS):
            try:
                self.check()
            except (OSError, ValueError):  # stderr closed or gone: the run goes on without lines
                return


def _is_terminal(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        return False
