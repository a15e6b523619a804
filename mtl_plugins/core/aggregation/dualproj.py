"""DualProj: the mean gradient projected onto the dual cone of the task gradients
(Quinton & Rey, 2024; TorchJD)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._utils import (active_rows, check_number, check_vector, check_vector_length,
                     solver_gramian, to_like)
from .base import GramianWeighting
from .upgrad import dual_cone_projection_weights


class DualProj(GramianWeighting):
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

    deterministic = True

    def __init__(self, pref_vector: Optional[Sequence[float]] = None, reg_eps: float = 0.0) -> None:
        super().__init__()
        self.pref_vector = check_vector("dualproj", "pref_vector", pref_vector)
        self.reg_eps = float(check_number("dualproj", "reg_eps", reg_eps, low=0.0))

    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        k = solver_gramian(gramian, "dualproj")
        t = k.shape[0]
        if self.pref_vector is not None:
            check_vector_length("dualproj", "pref_vector", self.pref_vector, t)
            pref = self.pref_vector.expand(t) if self.pref_vector.numel() == 1 else self.pref_vector
        else:
            pref = torch.full((t,), 1.0 / t, dtype=torch.float64)
        act = active_rows(k)
        out = torch.zeros(t, dtype=torch.float64)
        if bool(act.any()):
            ka = k[act][:, act]
            ka = ka / ka.diagonal().mean()  # solver scale; the minimiser is scale-invariant
            if self.reg_eps > 0:
                ka = ka + self.reg_eps * torch.eye(ka.shape[0], dtype=ka.dtype)
            out[act] = dual_cone_projection_weights(ka, pref[act].clone())
        return to_like(out, gramian)

    def extra_repr(self) -> str:
        pref = None if self.pref_vector is None else self.pref_vector.tolist()
        return f"pref_vector={pref}, reg_eps={self.reg_eps}"
