"""Base class for loss balancing (task weighting).

A balancer maps the per-task losses of a step to weighted losses. It is an ``nn.Module`` so
that learnable weights (uncertainty log-variances, GradNorm weights) are parameters that the
framework's optimizer and checkpoint see; non-tensor state (epoch histories, RNG) goes
through ``get_extra_state`` / ``set_extra_state``.

Contract:
- ``forward(losses)`` takes ``{task: scalar loss}`` for the tasks *present* in the step
  (absent tasks are simply missing) and returns ``{task: weighted scalar loss}`` for the same
  keys. It must not divide by T of the present tasks only: weights are per task name.
- ``current_weights()`` returns ``{task: float}`` for logging.
- Hooks with default no-ops: ``after_step(losses)`` (called once per optimizer step with the
  detached *unweighted* losses), ``on_epoch_end()``, ``update_kpis(kpis)`` (DTP).
- Balancers that need gradients (GradNorm) set ``needs_shared_grads = True`` and implement
  ``balance_grads(losses, shared_params)``, called by the engine before the task backward.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import torch
from torch import nn

from ..tasks import check_known_tasks, check_task_names


class LossBalancer(nn.Module):
    """Base loss balancer; subclasses override :meth:`task_weights` or :meth:`forward`."""

    needs_shared_grads: bool = False

    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__()
        self.task_names = check_task_names(task_names)

    def check_losses(self, losses: Mapping[str, torch.Tensor]) -> None:
        check_known_tasks(losses.keys(), self.task_names, key="losses")

    def task_weights(self) -> torch.Tensor:
        """Current ``[T]`` weights in ``task_names`` order (default: ones)."""
        return torch.ones(len(self.task_names))

    def forward(self, losses: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        self.check_losses(losses)
        w = self.task_weights()
        return {t: w[self.task_names.index(t)].to(l) * l for t, l in losses.items()}

    def current_weights(self) -> Dict[str, float]:
        w = self.task_weights().detach().float().tolist()
        return dict(zip(self.task_names, w))

    def after_step(self, losses: Mapping[str, torch.Tensor]) -> None:
        """Record the detached, unweighted losses of one optimizer step (default: nothing)."""

    def on_epoch_end(self) -> None:
        """Epoch-level update (default: nothing)."""

    def update_kpis(self, kpis: Mapping[str, float]) -> None:
        """Receive per-task key performance indicators in [0, 1] (default: nothing)."""
