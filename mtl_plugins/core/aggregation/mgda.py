"""MGDA / MGDA-UB: the min-norm point of the convex hull of the task gradients.

Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ._utils import (active_rows, check_choice, check_number, combine64, gramian64, scatter_weights,
                     solver_gramian, to_like)
from .base import GramianWeighting, check_grads
from .solvers import min_norm_active_set, min_norm_frank_wolfe

Losses = Union[torch.Tensor, Sequence[float]]


class MGDA(GramianWeighting):
    """Multiple-gradient descent: ``alpha = argmin_{alpha in simplex} ||sum_t alpha_t g_t||^2``.

    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
    Eq. (3) (the min-norm problem whose solution is zero at a Pareto-stationary point or else
    a direction that decreases every task), solved by Algorithm 1 (closed form for two tasks:
    ``alpha = clip(((g_2 - g_1) . g_2) / ||g_1 - g_2||^2, 0, 1)``) and, for more tasks,
    Algorithm 2 (Frank-Wolfe) or an exact active-set solver.

    **MGDA-UB** (Sec. 3.3, Theorem 1: the upper bound) is this same aggregator applied by
    the backward engine at the *representation* level: ``G`` holds the gradients of the task losses with
    respect to the shared representation ``Z`` (one cheap backward per task through the
    heads only), and the encoder then receives one backward of ``sum_t alpha_t L_t``. Choose
    that with the engine's level setting; nothing changes here.

    Args:
        normalization: gradient normalisation before solving (the authors' code options):
            ``'none'`` (default: the min-norm element as defined), ``'l2'`` (``g_t/||g_t||``),
            ``'loss'`` (``g_t/L_t``) or ``'loss+'`` (``g_t/(L_t ||g_t||)``; the variant our
            design notes recommend for MGDA-UB). The loss variants need the task losses: call
            ``forward(grads, losses=...)`` / ``weights(gramian, losses=...)``
            (:attr:`needs_losses` tells the engine).
        apply_to: which gradients ``alpha`` weights when ``normalization != 'none'``:
            ``'raw'`` (default; the authors' code scales the raw task losses by ``alpha``) or
            ``'normalized'`` (the min-norm point of the normalised gradients, as in LibMTL).
        solver: for ``T > 2``: ``'active_set'`` (default; Wolfe's exact min-norm-point
            method, finite) or ``'frank_wolfe'`` (the paper's Algorithm 2: start on the best
            pair, exact line search, stop when the L1 change of alpha is below ``tol`` or after
            ``max_iter`` steps; it can stop ~1% above the minimum on conflicting gradients).
        max_iter, tol: Frank-Wolfe settings (paper code: 250, 1e-5).

    Zero rows count as tasks absent from the step: they get weight 0 and are left out of the
    simplex (otherwise a single zero gradient would make the min-norm point zero).
    ``T = 1`` returns the row. Cost: the ``T x T`` Gramian plus O(T^3) per solve.
    """

    deterministic = True
    weights_give_direction = True  # forward: weights(gramian, losses) @ G

    def __init__(
        self,
        normalization: str = "none",
        apply_to: str = "raw",
        solver: str = "active_set",
        max_iter: int = 250,
        tol: float = 1e-5,
    ) -> None:
        super().__init__()
        self.normalization = check_choice(
            "mgda", "normalization", normalization, ("none", "l2", "loss", "loss+")
        )
        self.apply_to = check_choice("mgda", "apply_to", apply_to, ("raw", "normalized"))
        self.solver = check_choice("mgda", "solver", solver, ("active_set", "frank_wolfe"))
        self.max_iter = int(check_number("mgda", "max_iter", max_iter, low=1, integer=True))
        self.tol = float(check_number("mgda", "tol", tol, low=0.0))

    @property
    def needs_losses(self) -> bool:
        """True when ``forward``/``weights`` need the ``losses`` argument."""
        return self.normalization in ("loss", "loss+")

    def _normalizers(self, k: torch.Tensor, losses: Optional[Losses]) -> torch.Tensor:
        t = k.shape[0]
        norms = k.diagonal().clamp_min(0.0).sqrt()
        if self.normalization == "none":
            return torch.ones(t, dtype=torch.float64)
        if self.normalization == "l2":
            return norms
        if losses is None:
            raise ValueError(
                f"aggregator mgda: normalization={self.normalization!r} needs the task losses; "
                "call forward(grads, losses=...) with one loss per row"
            )
        lt = torch.as_tensor(losses).detach().to("cpu", torch.float64).flatten()
        if lt.numel() != t or not bool(torch.isfinite(lt).all()) or bool((lt <= 0).any()):
            raise ValueError(
                f"aggregator mgda: losses={lt.tolist()}: expected {t} finite positive values "
                f"(one per row) for normalization={self.normalization!r}"
            )
        return lt if self.normalization == "loss" else lt * norms

    def weights(self, gramian: torch.Tensor, losses: Optional[Losses] = None) -> torch.Tensor:
        k = solver_gramian(gramian, "mgda")
        act = active_rows(k)
        out = torch.zeros(k.shape[0], dtype=torch.float64)
        if bool(act.any()):
            n = self._normalizers(k, losses)[act]
            ka = k[act][:, act] / torch.outer(n, n)
            ka = ka / ka.diagonal().mean()  # solver scale; the argmin is scale-invariant
            if ka.shape[0] <= 2 or self.solver == "frank_wolfe":
                # T <= 2: the closed form of Algorithm 1 (inside min_norm_frank_wolfe)
                alpha = min_norm_frank_wolfe(ka, self.max_iter, self.tol)
            else:
                alpha = min_norm_active_set(ka)
            if self.apply_to == "normalized":
                alpha = alpha / n
            out = scatter_weights(alpha, act)
        return to_like(out, gramian)

    def forward(self, grads: torch.Tensor, losses: Optional[Losses] = None,
                gramian: Optional[torch.Tensor] = None,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``weights(G G^T, losses) @ G``; ``gramian`` and ``out`` as in
        :meth:`GramianWeighting.forward`."""
        check_grads(grads)
        gramian = gramian64(grads) if gramian is None else gramian.double()
        return combine64(self.weights(gramian, losses), grads, gramian, out=out)

    def extra_repr(self) -> str:
        return (
            f"normalization={self.normalization!r}, apply_to={self.apply_to!r}, "
            f"solver={self.solver!r}"
        )
