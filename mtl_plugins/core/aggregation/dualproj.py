"""DualProj: the mean gradient projected onto the dual cone of the task gradients
(Quinton & Rey, 2024; TorchJD)."""
from __future__ import annotations

import torch

from .upgrad import DualConeWeighting, dual_cone_projection_weights


class DualProj(DualConeWeighting):
    """DualProj: project the (weighted) mean of the rows onto the dual cone of all rows.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv:2406.16232,
    2024 (UPGrad's companion aggregator in their comparison and in TorchJD):
    ``A_DualProj(J) = pi_J(J^T u)`` with ``u = (1/m) 1`` and ``pi_J`` the Euclidean projection
    onto the dual cone ``{x : J x >= 0}``. UPGrad projects every row and averages; DualProj
    averages first and projects once, so it is the non-conflicting direction *closest to the
    mean gradient*.

    From the Gramian ``K = J J^T`` only (the same dual problem as UPGrad):
    ``pi_J(J^T u) = v^T J`` with ``v = argmin_{v >= u} v^T K v``; with ``v = u + x`` it is the
    non-negative QP ``min_{x >= 0} 1/2 x^T K x + (K u)^T x``, solved exactly in float64 by the
    active-set :func:`~.solvers.nonneg_qp`. The KKT conditions give the defining properties
    (checked in the tests): ``K v >= 0`` (every task's inner product with the result is
    non-negative), ``x >= 0`` and ``x_i (K v)_i = 0``.

    Args:
        pref_vector: the combination ``u`` that is projected (default ``1/T`` each: the mean;
            a single number means that weight for every row).
        reg_eps: optional ridge ``reg_eps * mean(diag K) * I`` added to the (normalised)
            Gramian before solving (default 0; the active-set solver needs none).

    Zero rows (absent tasks) get weight 0 and do not constrain the cone. ``T = 1`` returns
    the row (times ``u``). Deterministic and stateless. Cost: Gramian plus one small QP.
    """

    name = "dualproj"

    def active_weights(self, k: torch.Tensor, pref: torch.Tensor) -> torch.Tensor:
        return dual_cone_projection_weights(k, pref)
