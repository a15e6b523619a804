"""Task names and the checks that turn bad input into errors naming the key and value."""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch


class MTLConfigError(ValueError):
    """A configuration value of mtl_plugins is wrong; the message names key, value, expectation."""


def check_task_names(task_names: Sequence[str], key: str = "task_names") -> tuple[str, ...]:
    """Return ``task_names`` as a tuple after checking it is a non-empty list of unique strings."""
    names = tuple(task_names)
    if not names:
        raise MTLConfigError(f"{key}={list(names)!r}: expected at least one task name")
    for name in names:
        if not isinstance(name, str) or not name:
            raise MTLConfigError(f"{key} contains {name!r}: expected non-empty strings")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MTLConfigError(f"{key}={list(names)!r}: task names must be unique, repeated: {dupes}")
    return names


def check_known_tasks(given: Iterable[str], known: Sequence[str], key: str) -> None:
    """Raise if ``given`` names a task that is not in ``known``."""
    unknown = [t for t in given if t not in known]
    if unknown:
        raise MTLConfigError(
            f"{key}: unknown task name(s) {unknown!r}; expected a subset of {list(known)!r}"
        )


def check_finite_losses(losses: Mapping[str, torch.Tensor], where: str = "losses") -> None:
    """Raise ``FloatingPointError`` naming every task whose loss is NaN or infinite.

    One host synchronisation for all tasks together, decided in Python floats: two tensor
    ops (a stack of the scalars, its copy to the host) instead of a handful per task, each
    of which costs microseconds in a training step.
    """
    if not losses:
        return
    names = list(losses)
    with torch.no_grad():  # (no autograd node for the stack)
        values = torch.stack([v if v.dim() == 0 else v.reshape(())
                              for v in (losses[n] for n in names)]).tolist()
    if all(map(math.isfinite, values)):
        return
    bad = {n: v for n, v in zip(names, values) if not math.isfinite(v)}
    raise FloatingPointError(
        f"{where}: non-finite loss for task(s) {bad}; expected finite values. "
        "Check the learning rate, the inputs and the labels of these tasks."
    )
