"""CAGrad: conflict-averse gradient descent (Liu, Liu, Jin, Stone & Liu, NeurIPS 2021)."""
from __future__ import annotations

import torch

from ._utils import (active_rows, check_choice, check_number, scatter_weights, solver_gramian,
                     to_like)
from .base import GramianWeighting
from .solvers import min_norm_active_set, minimize_on_simplex


def cagrad_weights(k: torch.Tensor, c: float, max_iter: int = 300, tol: float = 1e-10) -> torch.Tensor:
    """Row weights of the (un-rescaled) CAGrad direction for a float64 Gramian ``k``.

    ``g_0`` is the mean of all ``T`` rows. The dual weights ``w`` live on the simplex over the
    non-zero rows only (a zero row would pin the worst-case improvement at 0). Returns
    ``1/T + (c ||g_0|| / ||g_w||) w``, i.e. ``d = g_0 + c ||g_0|| g_w / ||g_w||``.
    """
    t = k.shape[0]
    u = torch.full((t,), 1.0 / t, dtype=torch.float64)
    act = active_rows(k)
    if c == 0.0 or not bool(act.any()):
        return u
    scale = float(k.diagonal()[act].mean())
    ks = k / scale
    g0_norm = max(float(u @ ks @ u), 0.0) ** 0.5
    if g0_norm <= 1e-12:  # g_0 = 0: the trust region has radius 0
        return u
    ka = ks[act][:, act]
    b = ks[act] @ u  # g_t . g_0 for the active rows
    radius = c * g0_norm

    def fun(w: torch.Tensor) -> float:
        return float(w @ b) + radius * max(float(w @ ka @ w), 0.0) ** 0.5

    def grad(w: torch.Tensor) -> torch.Tensor:
        kw = ka @ w
        return b + radius * kw / max(float(w @ kw), 1e-300) ** 0.5

    n = ka.shape[0]
    w = minimize_on_simplex(fun, grad, torch.full((n,), 1.0 / n, dtype=torch.float64), max_iter, tol)
    # the objective is not differentiable where g_w = 0; such a point (if the convex hull
    # holds 0) has value 0: keep it when it beats the smooth solver's answer
    w_mn = min_norm_active_set(ka / ka.diagonal().mean())
    if fun(w_mn) < fun(w):
        w = w_mn
    gw_norm = max(float(w @ ka @ w), 0.0) ** 0.5
    if gw_norm <= 1e-12 * max(g0_norm, 1.0):
        return u
    return u + scatter_weights(w * (radius / gw_norm), act)


class CAGrad(GramianWeighting):
    """Conflict-averse gradient: maximise the worst task improvement near the mean gradient.

    Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021, Sec. 3: ``max_d min_i <g_i, d>  s.t.  ||d - g_0|| <= c ||g_0||`` with
    ``g_0`` the mean gradient. Its dual (solved here) is

        ``w* = argmin_{w in simplex} g_w . g_0 + c ||g_0|| ||g_w||``,  ``g_w = sum_i w_i g_i``,

    and the direction ``d = g_0 + (c ||g_0|| / ||g_w*||) g_w*``. Everything is computed from
    the Gramian in float64 on the CPU with a spectral projected-gradient solver on the simplex
    (no scipy). ``c = 0`` gives the mean; the paper proves convergence to a minimum of the
    average loss for ``0 <= c < 1``.

    Args:
        c: trust-region radius relative to ``||g_0||`` (default 0.5; values 0.1-0.5 are
            used in the literature, e.g. 0.4 in the authors' NYUv2 scripts).
        rescale: the authors' code convention for the final scale:
            ``0`` returns ``d`` as is; ``1`` (default, the code's default) returns
            ``d / (1 + c^2)``; ``2`` returns ``d / (1 + c)``. Scaling does not change the
            direction, only the effective learning rate.
        max_iter, tol: solver limits (projected-gradient stationarity on the normalised
            Gramian).

    Zero rows count as absent tasks: they stay in the mean ``g_0`` (so ``c = 0`` is exactly
    :class:`Mean`) but are left out of the worst case. ``T = 1`` returns
    ``(1 + c) g`` before rescaling (``rescale=2`` gives the row itself).
    """

    deterministic = True

    def __init__(self, c: float = 0.5, rescale: int = 1, max_iter: int = 300, tol: float = 1e-10) -> None:
        super().__init__()
        self.c = float(check_number("cagrad", "c", c, low=0.0))
        self.rescale = check_choice("cagrad", "rescale", rescale, (0, 1, 2))
        self.max_iter = int(check_number("cagrad", "max_iter", max_iter, low=1, integer=True))
        self.tol = float(check_number("cagrad", "tol", tol, low=0.0))

    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        k = solver_gramian(gramian, "cagrad")
        w = cagrad_weights(k, self.c, self.max_iter, self.tol)
        if self.rescale == 1:
            w = w / (1.0 + self.c**2)
        elif self.rescale == 2:
            w = w / (1.0 + self.c)
        return to_like(w, gramian)

    def extra_repr(self) -> str:
        return f"c={self.c}, rescale={self.rescale}"
