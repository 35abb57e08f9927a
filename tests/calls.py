"""Calls a test watches: recording the first argument of each call of a function
(``first_arguments``), refusing the renames onto given paths (``refuse_replace``), the
peak of the allocations a call makes (``traced_peak``)."""

from __future__ import annotations

import errno
import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def first_arguments(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[Any]:
    """``owner.name`` patched (until ``monkeypatch`` undoes it) to call itself as before and
    append its first argument (a method's ``self``) to the list returned, call by call."""
    calls: list[Any] = []
    original = getattr(owner, name)

    def recorded(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)
    return calls


def refuse_replace(monkeypatch: pytest.MonkeyPatch, *refused: Path) -> None:
    """``os.replace`` as optcc's saving calls it, patched (until ``monkeypatch`` undoes it) to
    refuse a rename onto any of ``refused`` as the system refuses to replace an immutable
    file or another user's in a sticky folder (EPERM); other renames as before."""
    import optcc.ir.saving as saving

    replace = saving.os.replace

    def move(source: str | os.PathLike, target: str | os.PathLike) -> None:
        if Path(target) in refused:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        replace(source, target)

    monkeypatch.setattr(saving.os, "replace", move)


def traced_peak(call: Callable[[], Any]) -> tuple[Any, int]:
    """``call()``'s result and the peak, in bytes, of the allocations traced while it ran
    (numpy's arrays included)."""
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
