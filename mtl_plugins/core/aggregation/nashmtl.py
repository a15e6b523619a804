"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ._utils import (active_rows, check_choice, check_number, combine64, gramian64,
                     solver_gramian, to_like)
from .base import GramianWeighting, check_grads


def nash_bargaining_alpha(
    k: torch.Tensor,
    alpha0: Optional[torch.Tensor] = None,
    max_iter: int = 100,
    tol: float = 1e-10,
    reg: float = 1e-12,
) -> Tuple[torch.Tensor, bool]:
    """Solve ``K alpha = 1 / alpha`` (element-wise), ``alpha > 0``, for a PSD float64 ``K``.

    The equation is the stationarity condition of the strictly convex
    ``f(alpha) = 1/2 alpha^T K alpha - sum_i log alpha_i``; it is minimised by a damped Newton
    method (Hessian ``K + diag(1/alpha^2)``, fraction-to-the-boundary step keeping
    ``alpha > 0``, Armijo backtracking), which converges quadratically near the solution.
    ``K`` is first divided by its mean diagonal ``s`` (the solution scales as ``1/sqrt(s)``)
    and given a tiny ridge ``reg`` (relative), which only matters when the rows are linearly
    dependent with a conflicting non-negative combination (e.g. ``g_2 = -g_1``), where the
    bargaining problem has no solution and ``f`` would be unbounded.

    Returns ``(alpha, converged)`` with ``converged`` meaning
    ``max_i |alpha_i (K alpha)_i - 1| < tol``.
    """
    t = k.shape[0]
    s = float(k.diagonal().mean())
    ks = k / s + reg * torch.eye(t, dtype=k.dtype)
    if alpha0 is not None and alpha0.shape == (t,) and bool(torch.isfinite(alpha0).all()):
        beta = torch.where(alpha0 > 0, alpha0 * s**0.5, ks.diagonal().rsqrt())
    else:
        beta = ks.diagonal().rsqrt()

    def f(b: torch.Tensor) -> float:
        return float(0.5 * b @ ks @ b - torch.log(b).sum())

    converged = False
    for _ in range(max_iter):
        kb = ks @ beta
        if float((beta * kb - 1.0).abs().max()) < tol:
            converged = True
            break
        g = kb - 1.0 / beta
        h = ks + torch.diag(1.0 / beta**2)
        step = -torch.linalg.solve(h, g)
        neg = step < 0
        t_max = 1.0
        if bool(neg.any()):
            t_max = min(1.0, 0.99 * float((-beta[neg] / step[neg]).min()))
        f0, gd, tt = f(beta), float(g @ step), t_max
        while tt > 1e-14 and f(beta + tt * step) > f0 + 1e-4 * tt * gd:
            tt *= 0.5
        beta = beta + tt * step
    return beta / s**0.5, converged


class NashMTL(GramianWeighting):
    """Nash-MTL: the Nash bargaining solution, ``G G^T alpha = 1 / alpha``.

    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task Learning as a
    Bargaining Game", ICML 2022, Sec. 3: the update ``d = sum_i alpha_i g_i`` maximises
    ``sum_i log(d . g_i)`` over a ball; its optimality condition is
    ``(G G^T alpha)_i = 1 / alpha_i`` with ``alpha > 0``, so ``d . (alpha_i g_i) = 1`` for every
    task (each task's contribution gets the same "utility"), and ``||d|| = sqrt(T)``.

    The paper solves for ``alpha`` with a sequence of convex approximations (CCP, cvxpy);
    here the same equation is solved directly by a damped Newton method on its convex
    potential (:func:`nash_bargaining_alpha`), in float64, exact to ``tol``.

    Args:
        update_weights_every: recompute ``alpha`` only every that many calls and reuse the
            previous ``alpha`` in between (the paper's speed-up; 1 = every step). When
            reusing, :meth:`forward` does not even build the Gramian.
        max_norm: if set, the direction is scaled down to this norm when longer (the
            authors' code clips the shared gradient norm, default 1.0; since
            ``||d|| = sqrt(T)`` this makes ``d`` a unit vector for ``T >= 2``). ``None``
            disables it.
        max_iter, tol: Newton limits (residual ``max |alpha_i (K alpha)_i - 1|``).
        normalize_gramian: solve with ``K / ||K||_F`` instead of ``K`` and do not undo the
            scaling, as the authors' code does; then ``||d|| = sqrt(T ||K||_F)`` scales with the
            gradients. Default ``False`` (the paper's equation).

    State (``_extra_state``): the last ``alpha`` (float64) and the call counter. Zero rows
    count as absent tasks (``alpha = 0``; the equation has no solution for them). If ``T``
    changes, ``alpha`` is recomputed. If Newton does not converge, the previous ``alpha`` is
    kept when there is one (as the authors' code keeps it on solver failure).
    ``T = 1`` gives ``alpha = 1/||g||``, i.e. the unit row (then ``max_norm``).
    """

    deterministic = True
    # forward: alpha @ G times the max_norm factor, which weights() folds in
    weights_give_direction = True
    #: the rows must always be the same tasks in the same order (zeros for absent tasks):
    #: ``alpha`` is kept per task between steps.
    needs_all_tasks = True

    def __init__(
        self,
        update_weights_every: int = 1,
        max_norm: Optional[float] = 1.0,
        max_iter: int = 100,
        tol: float = 1e-10,
        normalize_gramian: bool = False,
    ) -> None:
        super().__init__()
        self.update_weights_every = int(
            check_number("nashmtl", "update_weights_every", update_weights_every, low=1, integer=True)
        )
        if max_norm is not None:
            check_number("nashmtl", "max_norm", max_norm, low=0.0, low_open=True)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.max_iter = int(check_number("nashmtl", "max_iter", max_iter, low=1, integer=True))
        self.tol = float(check_number("nashmtl", "tol", tol, low=0.0, low_open=True))
        self.normalize_gramian = bool(
            check_choice("nashmtl", "normalize_gramian", normalize_gramian, (True, False))
        )
        self.alpha: Optional[torch.Tensor] = None  # [T] float64 CPU, unclipped
        self.step = 0
        self.last_converged = True

    def solve(self, gramian: torch.Tensor, warm_start: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``alpha`` (float64, CPU) for ``gramian``; does not touch the state."""
        return self._solve(solver_gramian(gramian, "nashmtl"), warm_start)

    def _solve(self, k: torch.Tensor, warm_start: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`solve` on the solver's Gramian ``k`` (:func:`solver_gramian`)."""
        t = k.shape[0]
        alpha = torch.zeros(t, dtype=torch.float64)
        act = active_rows(k)
        self.last_converged = True
        if not bool(act.any()):
            return alpha
        if self.normalize_gramian:
            k = k / torch.linalg.matrix_norm(k)
        w0 = None if warm_start is None or warm_start.shape != (t,) else warm_start[act]
        a, ok = nash_bargaining_alpha(k[act][:, act], w0, self.max_iter, self.tol)
        self.last_converged = ok
        if not ok and warm_start is not None and warm_start.shape == (t,):
            return warm_start.clone()
        alpha[act] = a
        return alpha

    def _due(self, t: int) -> bool:
        return (
            self.alpha is None
            or self.alpha.shape != (t,)
            or self.step % self.update_weights_every == 0
        )

    def _advance(self, gramian: Optional[torch.Tensor], t: int) -> Tuple[torch.Tensor, float]:
        """This step's ``alpha`` for ``t`` tasks (re-solved when due; the step count
        advances) and the factor ``max_norm`` scales the direction by: ``max_norm /
        ||alpha @ G||`` when longer, else 1. ``||alpha @ G||^2 = alpha^T K alpha`` comes from
        the Gramian: no pass over the direction (nor a float64 copy of it), no scaling pass
        when within ``max_norm``. ``gramian`` may be None only when neither is needed."""
        due = self._due(t)
        k = solver_gramian(gramian, "nashmtl") if due or self.max_norm is not None else None
        if due:
            self.alpha = self._solve(k, self.alpha)
        self.step += 1
        assert self.alpha is not None
        if self.max_norm is not None:
            norm = max(float(self.alpha @ k @ self.alpha), 0.0) ** 0.5
            if norm > self.max_norm:
                return self.alpha, self.max_norm / norm
        return self.alpha, 1.0

    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        alpha, factor = self._advance(gramian, gramian.shape[0])
        return to_like(alpha * factor if factor != 1.0 else alpha.clone(), gramian)

    def forward(self, grads: torch.Tensor, gramian: Optional[torch.Tensor] = None,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``alpha @ G``, alpha re-solved every ``update_weights_every`` steps; ``gramian``
        and ``out`` as in :meth:`GramianWeighting.forward`. With ``max_norm``, ``||d||`` comes
        from the Gramian (formed here when not given, also on the steps without a solve)."""
        check_grads(grads)
        t = grads.shape[0]
        if gramian is None and (self._due(t) or self.max_norm is not None):
            gramian = gramian64(grads)
        alpha, factor = self._advance(gramian, t)
        d = combine64(alpha, grads, gramian, out=out)
        if factor != 1.0:
            d.mul_(factor)
        return d

    def get_extra_state(self) -> Dict[str, Any]:
        return {"alpha": None if self.alpha is None else self.alpha.clone(), "step": self.step}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        alpha = state.get("alpha")
        self.alpha = None if alpha is None else alpha.detach().to("cpu", torch.float64).clone()
        self.step = int(state.get("step", 0))

    def extra_repr(self) -> str:
        return (
            f"update_weights_every={self.update_weights_every}, max_norm={self.max_norm}, "
            f"normalize_gramian={self.normalize_gramian}"
        )
