"""Aligned-MTL: independent component alignment (Senushkin et al., CVPR 2023)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._utils import (check_choice, check_vector, check_vector_length, reduce_factor,
                     solver_gramian, to_like)
from .base import GramianWeighting


def alignment_matrix(k: torch.Tensor, scale_mode: str = "min") -> torch.Tensor:
    """``B = sigma V Lambda^{-1/2} V^T`` on the range of the Gramian ``k = V Lambda V^T``.

    The aligned rows ``B G`` have Gramian ``B K B = sigma^2 P_range`` (condition number 1);
    ``sigma^2`` is the smallest non-zero eigenvalue (``'min'``, the paper), their median
    (``'median'``) or mean (``'rmse'``), as in the authors' code. Eigenvalues at most
    ``max(eig) * T * eps`` count as zero (rank-deficient ``G``; zero rows).
    """
    t = k.shape[0]
    evals, evecs = torch.linalg.eigh(k)
    tol = float(evals.max().clamp_min(0.0)) * t * torch.finfo(torch.float64).eps
    keep = evals > tol
    if not bool(keep.any()):
        return torch.zeros_like(k)
    lam = evals[keep]
    v = evecs[:, keep]
    if scale_mode == "min":
        sigma2 = lam.min()
    elif scale_mode == "median":
        sigma2 = lam.median()  # lower median for an even count, like torch.median
    else:
        sigma2 = lam.mean()
    return (v * (sigma2.sqrt() / lam.sqrt())) @ v.T


class AlignedMTL(GramianWeighting):
    """Aligned-MTL: align the principal components of the task gradients, then combine.

    Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for
    Multi-Task Learning", CVPR 2023, Sec. 4 / Algorithm 1: with the Gramian
    ``M = G G^T = V Lambda V^T`` (rank ``R``), the aligned gradients are
    ``G_hat = B G`` with ``B = sqrt(lambda_R) V Lambda^{-1/2} V^T`` (``lambda_R`` the smallest
    non-zero eigenvalue), so that ``G_hat`` has condition number 1 (its Gramian is
    ``lambda_R`` times the identity on the range) and the scale of the smallest singular
    value; the update is ``G_hat^T w`` with pre-defined task weights ``w``. As a weighting of
    the original rows: ``d = (B w)^T G``; no aligned copy of ``G`` is built.

    For orthogonal rows of equal norm ``B = I``: the result is the plain sum (``'sum'``) or
    mean (``'mean'``).

    **Aligned-MTL-UB** is the same aggregator applied by the backward engine to gradients
    with respect to the shared representation (one encoder backward of the weighted losses);
    choose it with the engine's level setting.

    Args:
        scale_mode: ``'min'`` (default, the paper), ``'median'`` or ``'rmse'`` (authors' code
            options: the median or the mean of the non-zero eigenvalues).
        reduction: ``'sum'`` (default; the authors' code sums the aligned gradients, i.e.
            ``w = 1``) or ``'mean'`` (``w = 1/T``, TorchJD's default).
        pref_vector: explicit task weights ``w`` (overrides ``reduction``).

    Zero rows lie outside the range of ``M`` and get weight 0. ``T = 1`` returns the row.
    Cost: Gramian plus one ``T x T`` symmetric eigendecomposition.
    """

    deterministic = True

    def __init__(
        self,
        scale_mode: str = "min",
        reduction: str = "sum",
        pref_vector: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        self.scale_mode = check_choice("aligned_mtl", "scale_mode", scale_mode, ("min", "median", "rmse"))
        self.reduction = check_choice("aligned_mtl", "reduction", reduction, ("sum", "mean"))
        self.pref_vector = check_vector("aligned_mtl", "pref_vector", pref_vector)

    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        k = solver_gramian(gramian, "aligned_mtl")
        t = k.shape[0]
        if self.pref_vector is not None:
            check_vector_length("aligned_mtl", "pref_vector", self.pref_vector, t)
            pref = self.pref_vector.expand(t) if self.pref_vector.numel() == 1 else self.pref_vector
        else:
            pref = torch.full((t,), reduce_factor(self.reduction, t), dtype=torch.float64)
        b = alignment_matrix(k, self.scale_mode)
        return to_like(b @ pref, gramian)

    def extra_repr(self) -> str:
        pref = None if self.pref_vector is None else self.pref_vector.tolist()
        return f"scale_mode={self.scale_mode!r}, reduction={self.reduction!r}, pref_vector={pref}"
