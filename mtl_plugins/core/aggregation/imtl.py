"""IMTL-G: impartial multi-task learning, gradient part (Liu et al., ICLR 2021)."""
from __future__ import annotations

import torch

from ._utils import active_rows, scatter_weights, solver_gramian, to_like
from .base import GramianWeighting


def imtl_g_weights(k: torch.Tensor) -> torch.Tensor:
    """Closed-form IMTL-G weights on a float64 Gramian whose rows are all non-zero.

    The conditions ``d . u_i`` equal for all ``i`` (``u_i = g_i/||g_i||``, ``d = sum a_i g_i``)
    and ``sum a_i = 1`` read ``K a = c n`` (``n_i = ||g_i||``), so
    ``a = K^+ n / (1^T K^+ n)``: the paper's closed-form solution
    ``a_{2:T} = g_1 U^T (D U^T)^{-1}``, ``a_1 = 1 - sum a_{2:T}`` (``D`` rows ``g_1 - g_i``,
    ``U`` rows ``u_1 - u_i``), written without singling out task 1 (identical whenever
    ``D U^T`` is invertible, and permutation-equivariant). ``K^+ n`` is a least-squares
    solve (minimum-norm when ``K`` is singular). If ``1^T K^+ n`` vanishes (e.g. exactly
    opposed gradients, where the only equal-projection direction is 0), the mean is returned.
    """
    t = k.shape[0]
    if t == 1:
        return torch.ones(1, dtype=k.dtype)
    scale = k.diagonal().mean()
    ks = k / scale
    n = ks.diagonal().clamp_min(0.0).sqrt()
    x = torch.linalg.lstsq(ks, n.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
    s = float(x.sum())
    if not torch.isfinite(x).all() or abs(s) <= 1e-9 * float(x.abs().sum()) or s == 0.0:
        return torch.full((t,), 1.0 / t, dtype=k.dtype)
    return x / s


class IMTLG(GramianWeighting):
    """IMTL-G: the direction with equal projections on every unit task gradient.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021, Sec. 3 ("gradient balance", IMTL-G) and its closed form for
    ``a_{2:T}``: find ``d = sum_i a_i g_i`` with
    ``sum_i a_i = 1`` such that ``d . u_i`` is the same for every task (``u_i = g_i/||g_i||``).
    Closed form (:func:`imtl_g_weights`); the weights can be negative.

    The paper computes the weights on gradients with respect to the shared feature ``z``
    (representation level, one backward through the encoder) and uses them to scale the
    losses; at parameter level the same closed form applies to parameter gradients. The
    level is chosen by the backward engine.

    Zero rows count as absent tasks (weight 0; ``u_i`` is undefined for them). ``T = 1``
    returns the row. Cost: Gramian plus one ``T x T`` least-squares solve.
    """

    deterministic = True

    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        k = solver_gramian(gramian, "imtl")
        act = active_rows(k)
        out = torch.zeros(k.shape[0], dtype=torch.float64)
        if bool(act.any()):
            out = scatter_weights(imtl_g_weights(k[act][:, act]), act)
        return to_like(out, gramian)
