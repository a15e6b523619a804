"""Mean and Sum: the unweighted baselines (equal weighting / joint training)."""
from __future__ import annotations

import torch

from ._utils import combine64
from .base import GramianWeighting, check_grads


class Mean(GramianWeighting):
    """Average of the task gradients, ``d = (1/T) sum_i g_i``.

    The "equal weighting" (EW / LS) baseline of the MTL benchmarks (e.g. the "Equal"
    weighting of Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention",
    CVPR 2019). Weights ``1/T`` for every row; permutation invariant; ``T = 1`` returns the
    row. Zero rows (absent tasks) still count in ``T``.
    """

    deterministic = True
    weights_give_direction = True  # forward only skips the Gramian

    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        t = gramian.shape[0]
        return torch.full((t,), 1.0 / t, dtype=gramian.dtype, device=gramian.device)

    def forward(self, grads: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        check_grads(grads)
        if out is None:
            return grads.mean(dim=0)
        return combine64(grads.new_full((grads.shape[0],), 1.0 / grads.shape[0]), grads,
                         out=out, cancels=False)


class Sum(GramianWeighting):
    """Sum of the task gradients, ``d = sum_i g_i``: the gradient of the summed loss.

    Same direction as :class:`Mean`, ``T`` times longer. It is what a plain
    ``sum(losses).backward()`` produces, so it is the reference for learning rates tuned on
    joint training.
    """

    deterministic = True
    weights_give_direction = True  # forward only skips the Gramian

    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        return torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)

    def forward(self, grads: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        check_grads(grads)
        if out is None:
            return grads.sum(dim=0)
        return combine64(grads.new_ones(grads.shape[0]), grads, out=out, cancels=False)
