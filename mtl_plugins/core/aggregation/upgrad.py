"""UPGrad: unconflicting projection of gradients (Quinton & Rey, 2024; TorchJD)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._utils import (active_rows, check_number, check_vector, check_vector_length,
                     solver_gramian, to_like)
from .base import GramianWeighting
from .solvers import nonneg_qp


def dual_cone_projection_weights(k: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Weights ``v`` with ``v^T G = pi(u^T G)``, the projection onto the dual cone of the rows.

    The dual cone is ``{x : G x >= 0}``. Quinton & Rey (Prop. on the dual problem) show
    ``pi(u^T G) = v^T G`` with ``v = argmin_{v >= u} v^T K v``. Writing ``v = u + x``, this is
    the non-negative QP ``min_{x >= 0} 1/2 x^T K x + (K u)^T x``, solved exactly by
    :func:`nonneg_qp`.
    """
    return u + nonneg_qp(k, k @ u)


class DualConeWeighting(GramianWeighting):
    """What UPGrad and DualProj share: the options ``pref_vector`` / ``reg_eps``, the active
    (non-zero) rows of the Gramian, its scale normalisation (the minimisers are
    scale-invariant) and the optional ridge; subclasses map the prepared ``[a, a]`` Gramian
    of the active rows and their preference weights to the active rows' weights."""

    deterministic = True
    #: the aggregator's name in errors
    name = ""

    def __init__(self, pref_vector: Optional[Sequence[float]] = None, reg_eps: float = 0.0) -> None:
        super().__init__()
        self.pref_vector = check_vector(self.name, "pref_vector", pref_vector)
        self.reg_eps = float(check_number(self.name, "reg_eps", reg_eps, low=0.0))

    def active_weights(self, k: torch.Tensor, pref: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        k = solver_gramian(gramian, self.name)
        t = k.shape[0]
        if self.pref_vector is not None:
            check_vector_length(self.name, "pref_vector", self.pref_vector, t)
            pref = self.pref_vector.expand(t) if self.pref_vector.numel() == 1 else self.pref_vector
        else:
            pref = torch.full((t,), 1.0 / t, dtype=torch.float64)
        act = active_rows(k)
        out = torch.zeros(t, dtype=torch.float64)
        if bool(act.any()):
            ka = k[act][:, act]
            ka = ka / ka.diagonal().mean()  # solver scale; the minimisers are scale-invariant
            if self.reg_eps > 0:
                ka = ka + self.reg_eps * torch.eye(ka.shape[0], dtype=ka.dtype)
            out[act] = self.active_weights(ka, pref[act].clone())
        return to_like(out, gramian)

    def extra_repr(self) -> str:
        pref = None if self.pref_vector is None else self.pref_vector.tolist()
        return f"pref_vector={pref}, reg_eps={self.reg_eps}"


class UPGrad(DualConeWeighting):
    """UPGrad: average of the projections of each row onto the dual cone of all rows.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv:2406.16232,
    2024, section "Unconflicting projection of gradients": the aggregator
    ``A_UPGrad(J) = (1/m) sum_i pi_J(J^T e_i)``, with ``pi_J`` the projection onto the dual
    cone ``{x : J x >= 0}``, computed from the Gramian through the dual problem
    ``min_{v >= e_i} v^T (J J^T) v`` (their proposition expressing the projection as a QP). The result has a non-negative inner product with every row
    ("non-conflicting"), is linear under scaling, and equals the mean when no two rows
    conflict (every row is then already in the cone).

    The QPs are solved exactly in float64 by an active-set (Lawson-Hanson) method on the
    Gramian: no ``qpsolvers``/``quadprog`` dependency.

    Args:
        pref_vector: weights of the projected rows (default ``1/T`` each: the paper's mean;
            TorchJD's generalisation ``sum_i p_i pi(g_i)``).
        reg_eps: optional ridge ``reg_eps * mean(diag K) * I`` added to the Gramian before
            solving (default 0; TorchJD adds 1e-4 for its generic QP solver, which needs a
            positive-definite matrix; the active-set solver does not).

    Zero rows project to zero and do not constrain the cone (weight 0 from them).
    ``T = 1`` returns the row. Cost: Gramian plus ``T`` small QPs (O(T^4) worst case).
    """

    name = "upgrad"

    def active_weights(self, k: torch.Tensor, pref: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(k.shape[0], dtype=torch.float64)
        proj = torch.stack([dual_cone_projection_weights(k, eye[i]) for i in range(k.shape[0])])
        return pref @ proj
