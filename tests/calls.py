"""Recording the calls a test counts: the first argument of each call of a patched function."""

from __future__ import annotations

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
