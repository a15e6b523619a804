"""The active-task context shared by the structure-changing methods.

Maximum Roaming (per-task channel masks) and Recon (per-task copies of some modules) make the
shared network task-conditioned: task t's head must read features computed "as task t".
Both read the active task from a :class:`TaskContext`; :func:`run_per_task` runs a forward
once per task under that context.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, Optional, Sequence, TypeVar

from ..tasks import MTLConfigError, check_task_names

R = TypeVar("R")


class TaskContext:
    """Holds the active task (a name of ``task_names``, or ``None``)."""

    def __init__(self, task_names: Sequence[str]) -> None:
        self.task_names = check_task_names(task_names)
        self._task: Optional[str] = None

    @property
    def task(self) -> Optional[str]:
        return self._task

    @property
    def index(self) -> Optional[int]:
        return None if self._task is None else self.task_names.index(self._task)

    def resolve(self, task: "str | int") -> str:
        """A task name from a name or an index; raises naming the value otherwise."""
        if isinstance(task, int) and not isinstance(task, bool):
            if not 0 <= task < len(self.task_names):
                raise MTLConfigError(f"task={task!r}: index out of range; expected 0.."
                                     f"{len(self.task_names) - 1} for {list(self.task_names)}")
            return self.task_names[task]
        if task not in self.task_names:
            raise MTLConfigError(f"task={task!r}: unknown task; expected one of "
                                 f"{list(self.task_names)}")
        return task  # type: ignore[return-value]

    def set_task(self, task: "str | int | None") -> None:
        self._task = None if task is None else self.resolve(task)

    @contextlib.contextmanager
    def active(self, task: "str | int") -> Iterator[str]:
        """``with ctx.active(t):`` — the previous task is restored on exit."""
        previous = self._task
        self._task = self.resolve(task)
        try:
            yield self._task
        finally:
            self._task = previous

    def require(self, owner: str) -> str:
        if self._task is None:
            raise RuntimeError(
                f"{owner}: no active task; run the forward inside `with context.active(task):` "
                "(or use run_per_task) so the task-conditioned layers know which task runs")
        return self._task


def run_per_task(context: TaskContext, fn: Callable[[str], R],
                 tasks: Optional[Sequence[str]] = None) -> Dict[str, R]:
    """``{t: fn(t)}`` with ``fn`` run once per task under ``context.active(t)``.

    ``fn`` is typically ``lambda t: heads[t](trunk(x))``: the shared trunk runs once per task
    (T forward passes), which is what Maximum Roaming and Recon need. ``tasks`` defaults to
    every task of the context (pass the tasks present in the batch to skip the others).
    """
    out: Dict[str, R] = {}
    for t in (context.task_names if tasks is None else tasks):
        with context.active(t) as name:
            out[name] = fn(name)
    return out
