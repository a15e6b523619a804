"""FAMO: Fast Adaptive Multitask Optimization.

Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023,
Algorithm 1.

Task weights ``z = softmax(xi)`` over learnable logits ``xi``. The model step follows

``d = sum_t c z_t grad L_t / L_t``,  ``c = (sum_t z_t / L_t)^-1``,

i.e. the gradient of ``c * sum_t z_t log L_t`` with ``c`` and ``z`` held constant (a weighted
descent on the log-losses whose per-task weights ``c z_t / L_t`` sum to 1). After the model
step, the change of the log-losses on the same batch,
``delta_t = log L_t(theta_old) - log L_t(theta_new)``, updates the logits:

``xi <- xi - beta * (J_z^T delta + gamma * xi)``,  ``J_z = dz/dxi = diag(z) - z z^T``,

so a task whose loss fell faster than the z-weighted average loses weight. ``beta`` (lr,
default 0.025) and ``gamma`` (weight decay, default 1e-3) follow the paper; the paper's
experiments step ``xi`` with Adam (lr beta, L2 weight decay gamma), which is the default here
(``optimizer="sgd"`` gives the plain update above). Losses enter as ``L_t - L_t*`` with a
known lower bound ``L_t*`` (default 0) plus a small ``eps``.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch

from ..distributed import mean_over_ranks
from ..tasks import MTLConfigError
from .base import (LossBalancer, PerTask, check_number, own_optimizer_step_, per_task_values,
                   stack_detached)

UPDATES = ("after_step", "next_forward")
OPTIMIZERS = ("adam", "sgd")


class FAMO(LossBalancer):
    """FAMO weighting with its own logits ``xi`` and optimizer state (buffers).

    Args:
        task_names: the tasks.
        lr: step size beta of the logit update (default 0.025).
        weight_decay: gamma, decay of the logits towards 0 (equal weights) (default 1e-3).
        optimizer: ``"adam"`` (default; betas 0.9/0.999, eps 1e-8, L2 decay as in
            ``torch.optim.Adam``) or ``"sgd"`` (the plain update of Algorithm 1).
        min_losses: known lower bounds ``L_t*`` of the losses (scalar/dict/list, default 0).
        eps: added to ``L_t - L_t*`` before the log (default 1e-8).
        update: where the logit update takes the "new" losses from:

            - ``"after_step"`` (default, the paper): the training loop recomputes the losses
              of the *same batch* after the optimizer step (one extra no-grad forward) and
              passes them to ``after_step``;
            - ``"next_forward"``: no extra forward; ``delta`` compares the previous step's
              losses with the next step's (a different batch, so a noisier signal). Then
              ``after_step`` does nothing and the update happens at the start of ``forward``.

    Two-call protocol (``update="after_step"``), per optimizer step::

        weighted = famo(losses)            # records log L(theta_old), z, c
        sum(weighted.values()).backward(); optimizer.step()
        with torch.no_grad():
            new_losses = compute_losses(model(same_batch))
        famo.after_step(new_losses)        # xi update from log L(old) - log L(new)

    ``after_step`` given the very tensors that ``forward`` saw (the pre-step losses) raises,
    since that would make ``delta = 0`` and silently disable FAMO.

    ``xi`` is a buffer, not a parameter: the framework optimizer must not step it. The returned
    weighted loss of task t is ``(c z_t / (L_t - L_t* + eps)) * L_t`` with the factor detached:
    the same gradient as ``c z_t log(L_t - L_t* + eps)``, and a positive value (the sum over
    all tasks is ``c``, a z-weighted harmonic mean of the losses).

    Absent tasks: ``c`` is computed over every task seen so far, using the last known loss of
    an absent task, so present tasks keep their per-task weight; ``delta`` is taken only over
    tasks present in both the recorded and the new losses (0 otherwise). Losses
    ``<= L_t*`` are treated as absent for the step. For DDP, pass losses averaged over ranks
    (or keep the update on one rank and broadcast ``xi``), otherwise the logits drift apart.
    """

    needs_post_step_losses = True

    def __init__(
        self,
        task_names: Sequence[str],
        lr: float = 0.025,
        weight_decay: float = 1e-3,
        optimizer: str = "adam",
        min_losses: PerTask = 0.0,
        eps: float = 1e-8,
        update: str = "after_step",
    ) -> None:
        super().__init__(task_names)
        self.lr = check_number(lr, "balancer.lr", min_value=0.0, min_inclusive=False)
        self.weight_decay = check_number(weight_decay, "balancer.weight_decay", min_value=0.0)
        if optimizer not in OPTIMIZERS:
            raise MTLConfigError(
                f"balancer.optimizer={optimizer!r}: expected one of {list(OPTIMIZERS)}"
            )
        if update not in UPDATES:
            raise MTLConfigError(f"balancer.update={update!r}: expected one of {list(UPDATES)}")
        self.optimizer = optimizer
        self.update = update
        self.needs_post_step_losses = update == "after_step"
        self.eps = check_number(eps, "balancer.eps", min_value=0.0, min_inclusive=False)
        self.betas = (0.9, 0.999)
        self.adam_eps = 1e-8
        n = len(self.task_names)
        lows = per_task_values(min_losses, self.task_names, "balancer.min_losses", 0.0)
        nan = float("nan")
        self.register_buffer("min_losses", torch.tensor(lows), persistent=False)
        self.register_buffer("logits", torch.zeros(n))
        self.register_buffer("exp_avg", torch.zeros(n))
        self.register_buffer("exp_avg_sq", torch.zeros(n))
        self.register_buffer("num_updates", torch.zeros(()))
        # log(L - L* + eps) recorded by forward for the pending update (NaN: not recorded)
        self.register_buffer("prev_log_losses", torch.full((n,), nan))
        # last known log-loss per task, for c with absent tasks (NaN: never seen)
        self.register_buffer("last_log_losses", torch.full((n,), nan))
        self._prev_ptrs: Dict[str, int] = {}
        self._last_weights = torch.full((n,), 1.0 / n)

    # ------------------------------------------------------------------------------ weights
    def task_weights(self) -> torch.Tensor:
        """``z = softmax(xi)`` (the FAMO task weights; sum 1)."""
        return torch.softmax(self.logits, dim=0)

    def effective_weights(self) -> Dict[str, float]:
        """The factors ``c z_t / (L_t - L_t* + eps)`` that multiplied the losses at the last forward."""
        return dict(zip(self.task_names, self._last_weights.tolist()))

    def _log_losses(
        self, losses: Mapping[str, torch.Tensor], tasks: Sequence[str], idx: torch.Tensor
    ) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
        values = stack_detached(losses, tasks).to(idx.device, torch.float32)
        shifted = values - self.min_losses.index_select(0, idx)
        valid = torch.isfinite(shifted) & (shifted > 0)
        d = torch.where(valid, shifted, torch.ones_like(shifted)) + self.eps
        return d, torch.log(d), valid

    def moves_within(self) -> Optional[int]:
        """The logits take their first step on the second forward (``next_forward``) or
        after the first step (``after_step``)."""
        return 2

    def forward(self, losses: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Under DDP the logit update, the state and the factors ``c z_t / d_t`` come from
        the losses averaged over the ranks that have each task (every rank must call it, one
        without any task too); the factors multiply this rank's own losses."""
        self.check_losses(losses)
        stats = mean_over_ranks(losses, self.task_names, self.logits.device)
        if not stats:
            return {}
        tasks, device, idx = self._present(stats)
        d, logd, valid = self._log_losses(stats, tasks, idx)
        nan = torch.full_like(logd, float("nan"))
        if self.update == "next_forward":
            self._update_logits(torch.where(valid, logd, nan), idx)

        z = torch.softmax(self.logits, dim=0)
        known = self.last_log_losses.clone()
        known.index_copy_(0, idx, torch.where(valid, logd, known.index_select(0, idx)))
        seen = torch.isfinite(known)
        inv = torch.where(seen, z * torch.exp(-torch.where(seen, known, torch.zeros_like(known))), 0.0)
        c = 1.0 / inv.sum().clamp_min(1e-30)
        w = torch.where(valid, c * z.index_select(0, idx) / d, torch.zeros_like(d))

        self.last_log_losses.copy_(known)
        self.prev_log_losses.fill_(float("nan"))
        self.prev_log_losses.index_copy_(0, idx, torch.where(valid, logd, nan))
        self._prev_ptrs = {t: losses[t].data_ptr() for t in losses}
        all_w = torch.zeros(len(self.task_names), device=device)
        all_w.index_copy_(0, idx, w)
        self._last_weights = all_w.detach()
        return {t: w[tasks.index(t)].to(losses[t].dtype) * losses[t] for t in losses}

    # ------------------------------------------------------------------------------ update
    @torch.no_grad()
    def after_step(self, losses: Mapping[str, torch.Tensor]) -> None:
        """Update ``xi`` from the post-step losses of the same batch (``update="after_step"``)."""
        if self.update != "after_step":
            return
        self.check_losses(losses)
        if not losses:
            return
        same = [t for t in losses if self._prev_ptrs.get(t) == losses[t].data_ptr()]
        if same and len(same) == len(losses):
            raise RuntimeError(
                "FAMO.after_step got the same loss tensors that forward() weighted (the "
                "pre-step losses), which would make delta = 0 and disable FAMO. Pass the losses "
                "recomputed on the same batch after optimizer.step(), or build FAMO with "
                "update='next_forward' (no extra forward)."
            )
        tasks = list(losses)
        device = self.logits.device
        idx = torch.tensor(self._index(tasks), device=device)
        _, logd, valid = self._log_losses(losses, tasks, idx)
        self._update_logits(torch.where(valid, logd, torch.full_like(logd, float("nan"))), idx)
        self._prev_ptrs = {}

    @torch.no_grad()
    def _update_logits(self, new_logd: torch.Tensor, idx: torch.Tensor) -> None:
        """One logit step from ``delta = prev_log - new_log`` (NaN entries: delta 0)."""
        new_all = torch.full_like(self.prev_log_losses, float("nan"))
        new_all.index_copy_(0, idx, new_logd)
        delta = self.prev_log_losses - new_all
        delta = torch.where(torch.isfinite(delta), delta, torch.zeros_like(delta))
        self.prev_log_losses.fill_(float("nan"))
        z = torch.softmax(self.logits, dim=0)
        grad = z * (delta - (z * delta).sum())  # J_z^T delta, J_z = diag(z) - z z^T
        grad = grad + self.weight_decay * self.logits
        own_optimizer_step_(self, self.logits, grad)

    def extra_repr(self) -> str:
        return (
            f"lr={self.lr}, weight_decay={self.weight_decay}, optimizer={self.optimizer!r}, "
            f"update={self.update!r}"
        )
