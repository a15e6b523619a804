"""PCGrad: projecting conflicting gradients (Yu et al., NeurIPS 2020)."""
from __future__ import annotations

from typing import Any, Dict

import torch

from ._utils import (SeededRNG, check_choice, check_seed, reduce_factor, solver_gramian,
                     to_like)
from .base import GramianWeighting


def pcgrad_coefficients(k: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``[T, T]`` matrix ``C`` with the projected rows ``g_i^PC = sum_k C[i, k] g_k``.

    For each task ``i`` the other tasks are visited in a fresh random order (one
    ``randperm(T - 1)`` per ``i`` from ``gen``); whenever ``g_i^PC . g_j < 0`` the component
    along the *original* ``g_j`` is removed: ``g_i^PC -= (g_i^PC . g_j / ||g_j||^2) g_j``.
    Dot products come from the Gramian: ``g_i^PC . g_j = C[i] @ K[:, j]``. Zero rows are never
    projected on (they cannot conflict). Computed in Python floats (float64).
    """
    t = k.shape[0]
    kl = k.tolist()
    coeff = [[1.0 if a == b else 0.0 for b in range(t)] for a in range(t)]
    for i in range(t):
        others = [j for j in range(t) if j != i]
        order = torch.randperm(t - 1, generator=gen).tolist() if t > 1 else []
        ci = coeff[i]
        for p in order:
            j = others[p]
            kjj = kl[j][j]
            if kjj <= 0.0:
                continue
            dot = sum(ci[m] * kl[m][j] for m in range(t))
            if dot < 0.0:
                ci[j] -= dot / kjj
    return torch.tensor(coeff, dtype=torch.float64)


class PCGrad(GramianWeighting):
    """PCGrad ("gradient surgery").

    Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020, Sec. 2 and Algorithm 1: for each task ``i``, for the other tasks ``j`` in
    random order, if ``g_i^PC . g_j < 0`` then ``g_i^PC <- g_i^PC - (g_i^PC . g_j) / ||g_j||^2 g_j``
    (projection against the original ``g_j``); the update is ``sum_i g_i^PC``.

    Projections keep every row in the span of the original rows, so the method is run as
    coefficient bookkeeping on the ``T x T`` Gramian (:func:`pcgrad_coefficients`) and the
    result is a weighting of the original rows: no modified copy of ``G`` is built.

    Args:
        reduction: ``'sum'`` (default, the paper's Algorithm 1: the update of the summed
            loss) or ``'mean'`` (divide by ``T``; the LibMTL / Recon-code convention).
        seed: seed of the ``torch.Generator`` drawing the task orders. Keep it identical on
            every DDP rank (the default is) so that all ranks draw the same orders. The
            generator state is saved in ``state_dict`` (``_extra_state``).

    ``T = 1`` returns the row. Zero rows stay zero and are never projected on.
    """

    deterministic = False

    def __init__(self, reduction: str = "sum", seed: int = 0) -> None:
        super().__init__()
        self.reduction = check_choice("pcgrad", "reduction", reduction, ("sum", "mean"))
        self.seed = check_seed("pcgrad", seed)
        self._rng = SeededRNG(self.seed)

    def coefficients(self, gramian: torch.Tensor) -> torch.Tensor:
        """The ``[T, T]`` projection coefficients (advances the RNG)."""
        return pcgrad_coefficients(solver_gramian(gramian, "pcgrad"), self._rng.get())

    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        coeff = self.coefficients(gramian)
        w = coeff.sum(dim=0) * reduce_factor(self.reduction, coeff.shape[0])
        return to_like(w, gramian)

    def get_extra_state(self) -> Dict[str, Any]:
        return {"rng": self._rng.state()}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self._rng.load(state["rng"])

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, seed={self.seed}"
