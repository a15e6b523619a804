"""Separate optimizers per task (paper 000 §4.1, "We used separate optimizers for tasks").

Paper 000 trains round-robin: "One multi-task iteration consists of a sequence of forwarding
each task batch and updating parameters" (§3.2), and "We used separate optimizers for tasks
following [18]" (§4.1). Read together: task t's batch gives task t's gradient on the
parameters it reaches (the shared backbone, masked by GradSplit, and its own head), and task
t's optimizer (its own moments, its own step count) applies it. So each task's optimizer state
is built from that task's gradients only: with Adam, task t's first and second moments see
only ∇L_t. The paper gives neither the optimizer type nor how states are split; this module
keeps one state per (parameter, task) and nothing else changes (learning rate, schedule and
hyper-parameters are the one optimizer's, so the framework's LR scheduler still drives them).

:class:`SeparateTaskOptimizers` does this inside the framework's own ``torch.optim`` optimizer:
for each task present in the step it sets ``.grad`` to that task's gradient (``None``
elsewhere), swaps in that task's state for those parameters, and calls the optimizer's step.
Each task's state is kept in the optimizer's own state, ``optimizer.state[p] = {"per_task":
{task: state}, "step": n}`` (n: the steps of all tasks; torch's optimizers expect a ``step``
in a non-empty state when they load a state dict), so the framework's checkpoint of the
optimizer (``state_dict`` / ``load_state_dict``) carries every task's moments. Parameters
outside every task's set (e.g. learnable loss weights) get one ordinary step with their
ordinary state.

With one task per step (the paper's round-robin single-task batches) only that task's
optimizer steps. With several tasks in a step (mixed batches), their gradients are all taken
at the same parameters and the task optimizers step one after another, in task order:
``θ ← θ − Σ_t Δ_t``, ``Δ_t`` the update of task t's optimizer on ``∇L_t`` (exactly the
sum of T independent optimizers' updates for optimizers whose update does not depend on θ,
e.g. Adam and SGD without weight decay). Weight decay and gradient clipping are applied by
each task's step: with T tasks in every step, a shared parameter decays T times per step.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..backward import task_rank_counts
from ..tasks import MTLConfigError, check_task_names

STATE_KEY = "per_task"
Grads = Sequence[Tuple[torch.Tensor, torch.Tensor]]


def task_gradients(rows: torch.Tensor, task_names: Sequence[str],
                   shared_params: Sequence[torch.Tensor],
                   task_params: Mapping[str, Sequence[torch.Tensor]],
                   present: Sequence[str]) -> Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]]:
    """``{task: [(param, grad), ...]}`` for the ``present`` tasks: the shared parameters get
    views of row t of ``rows`` (``[T, P]`` over the shared parameters that require grad, in
    order: e.g. :attr:`~.gradsplit.GradSplit.task_rows`), the task's own parameters their
    ``.grad`` (only task t reaches them)."""
    shared = [p for p in shared_params if p.requires_grad]
    numel = sum(p.numel() for p in shared)
    if rows.dim() != 2 or rows.shape != (len(task_names), numel):
        raise ValueError(f"rows: shape {tuple(rows.shape)}; expected ({len(task_names)}, "
                         f"{numel}) (one row per task over the shared parameters)")
    out: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
    for i, t in enumerate(task_names):
        if t not in present:
            continue
        pairs, start = [], 0
        for p in shared:
            pairs.append((p, rows[i, start:start + p.numel()].view_as(p)))
            start += p.numel()
        pairs += [(p, p.grad) for p in task_params.get(t, ()) if p.requires_grad
                  and p.grad is not None]
        out[t] = pairs
    return out


def present_tasks(task_names: Sequence[str], losses: Mapping[str, Any],
                  device: torch.device) -> List[str]:
    """The tasks with a loss this step on any DDP rank (each rank then steps the same task
    optimizers; one all-reduce of T flags under DDP, none in a single process)."""
    counts = task_rank_counts([t in losses for t in task_names], device)
    return [t for t, c in zip(task_names, counts) if c > 0]


class SeparateTaskOptimizers:
    """One optimizer state per task inside one ``torch.optim`` optimizer (module docstring).

    Args:
        task_names: the model's tasks (the order in which task optimizers step).
    """

    def __init__(self, task_names: Sequence[str]) -> None:
        self.task_names = check_task_names(task_names)

    @staticmethod
    def _params(optimizer: torch.optim.Optimizer) -> List[torch.Tensor]:
        return [p for g in optimizer.param_groups for p in g["params"]]

    def step(self, optimizer: torch.optim.Optimizer, task_grads: Mapping[str, Grads],
             managed: Sequence[torch.Tensor] = (), step: Optional[Callable[[], Any]] = None
             ) -> None:
        """Step each task's optimizer on its own gradient, then the rest once.

        Args:
            optimizer: the framework's optimizer (every parameter must be in it).
            task_grads: ``{task: [(param, grad), ...]}`` for the tasks to step (e.g. from
                :func:`task_gradients`); a task not in it is not stepped.
            managed: every parameter that has per-task state (shared and all tasks' own
                parameters): they are never stepped outside a task's step. The parameters of
                ``task_grads`` are always managed.
            step: what performs one optimizer step (default ``optimizer.step``; adapters pass
                their wrapper's step, which may clip gradients first).
        """
        unknown = [t for t in task_grads if t not in self.task_names]
        if unknown:
            raise MTLConfigError(f"task_grads: unknown task(s) {unknown}; expected tasks of "
                                 f"{list(self.task_names)}")
        step = optimizer.step if step is None else step
        params = self._params(optimizer)
        known = {id(p) for p in params}
        managed_ids = {id(p) for p in managed}
        for t, pairs in task_grads.items():
            for p, g in pairs:
                if id(p) not in known:
                    raise MTLConfigError(f"task_grads[{t!r}]: a parameter of shape "
                                         f"{tuple(p.shape)} is not in the optimizer")
                managed_ids.add(id(p))
        saved = [p.grad for p in params]
        try:
            for t in self.task_names:
                if t not in task_grads:
                    continue
                for p in params:
                    p.grad = None
                swapped = []
                for p, g in task_grads[t]:
                    p.grad = g
                    outer = optimizer.state[p]
                    if outer and STATE_KEY not in outer:
                        raise MTLConfigError(
                            "separate optimizers: the optimizer already holds a joint state "
                            "for a parameter (a checkpoint of a run without separate "
                            "optimizers?); expected per-task state or none")
                    inner = outer.setdefault(STATE_KEY, {}).setdefault(t, {})
                    # torch's optimizers expect a tensor "step" in any non-empty state when
                    # loading a state dict (Adam.__setstate__): the steps of all tasks
                    outer["step"] = torch.tensor(float(outer.get("step", 0)) + 1.0)
                    optimizer.state[p] = inner
                    swapped.append((p, outer))
                try:
                    step()
                finally:
                    for p, outer in swapped:
                        optimizer.state[p] = outer
            rest = [(p, g) for p, g in zip(params, saved)
                    if g is not None and id(p) not in managed_ids]
            if rest:
                for p in params:
                    p.grad = None
                for p, g in rest:
                    p.grad = g
                step()
        finally:
            for p, g in zip(params, saved):
                p.grad = g

    @staticmethod
    def task_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, task: str
                   ) -> Dict[str, Any]:
        """Task ``task``'s optimizer state of ``param`` (empty before its first step)."""
        return optimizer.state[param].get(STATE_KEY, {}).get(task, {})


def step_task_optimizers(optimizer: torch.optim.Optimizer, aggregator: Any,
                         losses: Mapping[str, Any], shared_params: Sequence[torch.Tensor],
                         task_params: Mapping[str, Sequence[torch.Tensor]],
                         step: Optional[Callable[[], Any]] = None) -> bool:
    """The adapters' optimizer step with separate task optimizers: when ``aggregator`` (the
    controller's, possibly wrapped) contains a :class:`~.gradsplit.GradSplit` with
    ``record_task_rows``, step each task present on any rank with its own state and return
    True; otherwise do nothing and return False (the caller steps as usual)."""
    from .gradsplit import GradSplit

    split = None
    if isinstance(aggregator, torch.nn.Module):
        split = next((m for m in aggregator.modules() if isinstance(m, GradSplit)
                      and m.record_task_rows), None)
    if split is None:
        return False
    if split.task_rows is None:
        raise RuntimeError("separate optimizers: GradSplit has no task rows for this step "
                           "(the engine did not run the aggregator)")
    names = split.layout.task_names
    shared = [p for p in shared_params if p.requires_grad]
    present = present_tasks(names, losses, shared[0].device)
    grads = task_gradients(split.task_rows, names, shared, task_params, present)
    managed = shared + [p for t in names for p in task_params.get(t, ())]
    SeparateTaskOptimizers(names).step(optimizer, grads, managed=managed, step=step)
    split.task_rows = None
    return True
