"""GLS: Geometric Loss Strategy.

Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and
Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019 (Sec. on GLS):

``L_GLS = (prod_t L_t)^(1/T) = exp(mean_t log L_t)``  (geometric mean of the task losses)

The contract returns one weighted loss per task, so GLS is expressed through its gradient:
``d L_GLS / d L_t = L_GLS / (T * L_t)``. With the detached weights ``w_t = L_GLS / (T L_t)``,
``sum_t w_t L_t`` has exactly the value ``L_GLS`` and exactly the gradient of ``L_GLS`` (the
weights are constants of the backward, as in the chain rule). Each weighted loss
``w_t L_t`` equals ``L_GLS / T``.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch

from ..distributed import mean_over_ranks
from .base import LossBalancer, check_number, stack_detached


class GeometricLossStrategy(LossBalancer):
    """Geometric mean of the task losses, as per-task weighted losses.

    Args:
        task_names: the tasks.
        min_loss: losses ``<= min_loss`` (default 0: zero or negative) cannot enter a log; such
            a task is treated like an absent task for the step (weight 0).

    Absent tasks: the product always runs over every task seen so far, with the *last known*
    loss of a task standing in (as a constant) for a task absent from the step; before a task
    has been seen it is left out of the product and of T. So with all tasks present the sum is
    exactly the geometric mean, and a task's weight does not jump because another task is
    missing. With tasks absent the sum of the returned losses is ``(present/T) * L_GLS`` (the
    gradient is still exactly that of ``L_GLS``). GLS needs positive losses: log-likelihood
    losses that can go negative do not fit it.

    Protocol: none beyond ``forward``. State: the last known log-loss per task (a buffer).
    """

    def __init__(self, task_names: Sequence[str], min_loss: float = 0.0) -> None:
        super().__init__(task_names)
        self.min_loss = check_number(min_loss, "balancer.min_loss", min_value=0.0)
        self.register_buffer("last_log_losses", torch.full((len(self.task_names),), float("nan")))

    def task_weights(self) -> torch.Tensor:
        """``L_GLS / (T L_t)`` from the last known losses (1 before the first ``forward``).

        Tasks seen so far get the weight they had (or would have had) at their last loss; a
        task never seen gets 1.
        """
        logs = self.last_log_losses
        seen = torch.isfinite(logs)
        safe = torch.where(seen, logs, torch.zeros_like(logs))
        n_seen = seen.sum().clamp_min(1)
        w = torch.exp(safe.sum() / n_seen - safe) / n_seen
        return torch.where(seen, w, torch.ones_like(w))

    def moves_within(self) -> Optional[int]:
        """The weights follow the first step's losses."""
        return 1

    def forward(self, losses: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Under DDP the weights and the state come from the losses averaged over the ranks
        that have each task (the gradient of the global geometric mean; every rank must call
        it, one without any task too); they are applied to this rank's own losses."""
        self.check_losses(losses)
        stats = mean_over_ranks(losses, self.task_names, self.last_log_losses.device)
        if not stats:
            return {}
        tasks, device, idx = self._present(stats)
        values = stack_detached(stats, tasks).to(device)
        valid = torch.isfinite(values) & (values > self.min_loss)
        logs = torch.log(torch.where(valid, values, torch.ones_like(values)))
        known = self.last_log_losses.to(values.dtype, copy=True)
        known.index_copy_(0, idx, torch.where(valid, logs, known.index_select(0, idx)))
        seen = torch.isfinite(known)
        n_seen = seen.sum().clamp_min(1)
        log_gls = torch.where(seen, known, torch.zeros_like(known)).sum() / n_seen
        gls = torch.exp(log_gls)
        w = torch.where(valid, gls / (n_seen * values.clamp_min(1e-30)), torch.zeros_like(values))
        self.last_log_losses.copy_(known)
        return {t: w[tasks.index(t)].to(losses[t].dtype) * losses[t] for t in losses}

    def extra_repr(self) -> str:
        return f"min_loss={self.min_loss}"
