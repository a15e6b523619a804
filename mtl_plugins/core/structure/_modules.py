"""Module selection by name or glob pattern, shared by the structure methods."""
from __future__ import annotations

import fnmatch
from typing import Callable, Dict, List, Optional, Sequence

from torch import nn

from ..tasks import MTLConfigError

_GLOB = set("*?[")


def select_modules(model: nn.Module, names: Sequence[str] | str, key: str,
                   accept: Optional[Callable[[nn.Module], bool]] = None,
                   expected: str = "a module") -> Dict[str, nn.Module]:
    """``{name: module}`` for exact names and glob patterns (``"layer4.*.conv*"``), in the
    model's registration order. A name that matches nothing, or a module that ``accept``
    rejects when named exactly, raises :class:`MTLConfigError` naming ``key`` and the value.
    Modules matched only by a pattern and rejected by ``accept`` are skipped."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise MTLConfigError(f"{key}=[]: expected at least one module name or pattern")
    modules = dict(model.named_modules())
    picked: Dict[str, nn.Module] = {}
    for name in names:
        if not isinstance(name, str):
            raise MTLConfigError(f"{key} contains {name!r}: expected module names (str)")
        if _GLOB & set(name):
            hits = [n for n in modules if n and fnmatch.fnmatchcase(n, name)
                    and (accept is None or accept(modules[n]))]
            if not hits:
                raise MTLConfigError(f"{key}: pattern {name!r} matches no {expected} of the "
                                     f"model")
            for n in hits:
                picked[n] = modules[n]
            continue
        if name not in modules or not name:
            close = [n for n in modules if n and n.endswith(name.split(".")[-1])][:5]
            raise MTLConfigError(f"{key}: unknown module name {name!r}; expected a name of "
                                 f"model.named_modules() (similar: {close})")
        if accept is not None and not accept(modules[name]):
            raise MTLConfigError(f"{key}: module {name!r} is a {type(modules[name]).__name__}; "
                                 f"expected {expected}")
        picked[name] = modules[name]
    order = {n: i for i, n in enumerate(modules)}
    return dict(sorted(picked.items(), key=lambda kv: order[kv[0]]))


def parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def nested(names: List[str]) -> List[tuple[str, str]]:
    """Pairs (outer, inner) where one selected name is inside another."""
    return [(a, b) for a in names for b in names if a != b and b.startswith(a + ".")]
