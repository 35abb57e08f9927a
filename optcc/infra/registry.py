"""The pass registry: one name -> pass-factory mapping.

Built lazily on first use from the entry-point group ``optcc.passes``: optcc's built-in
passes are advertised there by optcc's own distribution (pyproject.toml), third-party
passes by theirs. This mapping is optcc's only global mutable state. Nothing registers itself as a side effect
of importing a module.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import inspect
import warnings
from collections.abc import Callable

import onnx_ir as ir

from optcc.errors import BadInputError
from optcc.infra.levels import level_of

__all__ = ["PassInfo", "available_passes", "register", "create_pass"]

ENTRY_POINT_GROUP = "optcc.passes"

PassFactory = Callable[..., ir.passes.PassBase]


@dataclasses.dataclass(frozen=True)
class PassInfo:
    name: str
    factory: PassFactory
    level: int | None  # the lowest -O level whose pipeline runs it (optcc.infra.levels)
    description: str
    origin: str  # "builtin" or the distribution that provides the entry point


_registry: dict[str, PassInfo] | None = None


def _info(factory: PassFactory, origin: str, name: str | None = None) -> PassInfo:
    doc = (getattr(factory, "__doc__", None) or "").strip()
    name = name or getattr(factory, "name", "") or getattr(factory, "__name__", str(factory))
    return PassInfo(
        name=name,
        factory=factory,
        level=level_of(name),
        description=doc.splitlines()[0] if doc else "",
        origin=origin,
    )


def _load() -> dict[str, PassInfo]:
    found: dict[str, PassInfo] = {}
    entries = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    # optcc's own first, so a plugin can never take a built-in name
    for entry in sorted(entries, key=lambda e: not _is_builtin(e)):
        try:
            factory = entry.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break optcc
            warnings.warn(f"optcc: cannot load pass plugin '{entry.name}': {e}", stacklevel=2)
            continue
        origin = "builtin" if _is_builtin(entry) else (entry.dist.name if entry.dist is not None else "plugin")
        if entry.name in found:
            warnings.warn(
                f"optcc: plugin pass '{entry.name}' from {origin} ignored: the name is taken",
                stacklevel=2,
            )
            continue
        found[entry.name] = _info(factory, origin, name=entry.name)
    return found


def _is_builtin(entry: importlib.metadata.EntryPoint) -> bool:
    return entry.value.startswith("optcc.passes.") and entry.dist is not None and entry.dist.name == "optcc"


def available_passes() -> dict[str, PassInfo]:
    """Every registered pass by name, built-ins first."""
    return dict(_passes())


def _passes() -> dict[str, PassInfo]:
    """The registry itself (built on first use), for lookups that do not hand it out."""
    global _registry
    if _registry is None:
        _registry = _load()
    return _registry


def register(factory: PassFactory, name: str | None = None, *, replace: bool = False) -> PassInfo:
    """Register a pass factory (a Pass subclass or any callable returning a pass)."""
    info = _info(factory, "register()", name)
    passes = available_passes()
    if info.name in passes and not replace:
        raise ValueError(f"a pass named '{info.name}' is already registered")
    assert _registry is not None
    _registry[info.name] = info
    return info


def unknown_pass(name: str) -> str:
    """The error for a pass name nobody registered: the registered names closest to it,
    else every name."""
    known = sorted(_passes())
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    if close:
        return f"unknown pass '{name}' (did you mean {' or '.join(close)}? see --list-passes)"
    return f"unknown pass '{name}' (known: {', '.join(known)}; see --list-passes)"


def create_pass(name: str, **options: object) -> ir.passes.PassBase:
    """A new pass object for a registered name. Options the factory does not take, or
    options it needs and lacks, raise BadInputError naming them."""
    passes = _passes()
    if name not in passes:
        raise BadInputError(unknown_pass(name))
    factory = passes[name].factory
    try:
        return factory(**options)
    except TypeError:  # a call the signature refuses is said in its terms; any other error is the factory's
        _check_options(name, factory, options)
        raise


def _check_options(name: str, factory: PassFactory, options: dict[str, object]) -> None:
    """BadInputError when ``options`` do not fit ``factory``'s signature (one it lacks, or
    one it does not take)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no signature to read: the factory says what it lacks
        return
    given = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    missing = [p.name for p in signature.parameters.values()
               if p.kind in given and p.default is p.empty and p.name not in options]
    if missing:
        raise BadInputError(f"pass '{name}' needs options a pass name alone does not give: {', '.join(missing)}")
    try:
        signature.bind(**options)
    except TypeError as error:
        raise BadInputError(f"pass '{name}': {error}") from None
