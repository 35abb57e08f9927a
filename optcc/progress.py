"""Progress of long phases (calibration, bias correction, fallback, verification).

``with Progress("calibrating", total, enabled=...) as bar: ... bar.advance()`` reports the
same steps three ways:

- **terminal**: one line on stderr with the phase name, count, elapsed time and ETA, drawn
  only when ``enabled`` is true and stderr is a terminal; it is cleared when the phase
  ends, so consecutive phases share one line;
- **log line**: when ``enabled`` is true and stderr is not a terminal (a CI log, a pipe), a
  phase still running after ``QUIET_SECONDS`` prints ``optcc: <phase> <done>/<total>
  (<elapsed> s)`` at a step, at most once every ``LINE_EVERY_SECONDS``: long work shows
  a sign of life, short work prints nothing;
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
import time
from collections.abc import Callable, Iterator
from typing import Union

from tqdm import tqdm

__all__ = ["Progress", "ProgressCallback", "reporting"]

QUIET_SECONDS = 10.0  # a phase shorter than this prints no log line
LINE_EVERY_SECONDS = 30.0  # the least time between two log lines

ProgressCallback = Callable[[str, int, int], object]
"""``callback(phase, done, total)``: ``done`` steps of ``total`` finished in ``phase``."""

logger = logging.getLogger("optcc.progress")

_callbacks: contextvars.ContextVar[tuple[ProgressCallback, ...]] = contextvars.ContextVar(
    "optcc_progress_callbacks", default=())


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
    as ``enabled(phase, done, total)`` instead of drawing. ``set_phase`` renames the phase
    (and optionally restarts the count) on the same line.
    """

    def __init__(self, label: str, total: int, *,
                 enabled: Union[bool, ProgressCallback, None] = True) -> None:
        self.label = label
        self.total = max(int(total), 1)
        self.done = 0
        self._callbacks: tuple[ProgressCallback, ...] = _callbacks.get()
        if callable(enabled):
            self._callbacks = (*self._callbacks, enabled)
        self.enabled = enabled is True and _is_terminal(sys.stderr)
        self._log_lines = enabled is True and not self.enabled
        self._started, self._last_line = time.monotonic(), float("-inf")
        self._bar: tqdm | None = None

    def __enter__(self) -> Progress:
        if self.enabled:
            self._bar = tqdm(total=self.total, desc=self.label, file=sys.stderr, leave=False,
                             dynamic_ncols=True, unit="step")
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
        if self._bar is not None:
            if total is not None:
                self._bar.reset(total=self.total)
            self._bar.set_description_str(label)
        self._notify()

    def _notify(self) -> None:
        logger.debug("%s %d/%d", self.label, self.done, self.total)
        for callback in self._callbacks:
            callback(self.label, self.done, self.total)
        if self._log_lines:
            now = time.monotonic()
            if now - self._started >= QUIET_SECONDS and now - self._last_line >= LINE_EVERY_SECONDS:
                self._last_line = now
                print(f"optcc: {self.label} {self.done}/{self.total} ({now - self._started:.0f} s)",
                      file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _is_terminal(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        return False
