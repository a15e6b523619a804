"""Small dense solvers over a ``T x T`` Gramian ``K`` (float64, CPU), shared by the aggregators.

- :func:`min_norm_2`: closed-form min-norm point on a segment (Sener & Koltun 2018, Alg. 1).
- :func:`min_norm_frank_wolfe`: min-norm point of the convex hull of the rows, by
  Frank-Wolfe with exact line search (Sener & Koltun 2018, Alg. 2). Used by MGDA.
- :func:`nonneg_qp`: ``min_x 1/2 x^T K x + c^T x  s.t. x >= 0`` by a Lawson-Hanson style
  active-set method on the Gramian (exact up to linear-solve round-off). Used by UPGrad.
- :func:`project_simplex` and :func:`minimize_on_simplex`: spectral projected gradient
  (Birgin, Martinez & Raydan 2000) for a smooth convex function on the probability simplex.
  Used by CAGrad.

All functions expect ``K`` symmetric positive semi-definite and scaled so that its diagonal
is O(1) (callers divide by the mean squared row norm); tolerances are absolute on that scale.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

Tensor = torch.Tensor



def _step_back(x: torch.Tensor, z: torch.Tensor, passive: torch.Tensor, tol: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Active-set step shared by the min-norm and the NNLS solvers: move ``x`` towards the
    subproblem solution ``z`` until a passive coordinate reaches 0, and release the passive
    coordinates at (or below ``tol`` of) 0 — the one with the smallest ``z`` if none did
    numerically."""
    bad = passive & (z <= 0)
    step = x[bad] / (x[bad] - z[bad])
    alpha = float(step.min()) if step.numel() else 0.0
    x = x + alpha * (z - x)
    drop = passive & (x <= tol)
    if not bool(drop.any()):
        drop = passive & (z == z[passive].min())
    passive = passive & ~drop
    x[~passive] = 0.0
    return x, passive

def min_norm_2(aa: float, ab: float, bb: float) -> float:
    """Weight ``gamma`` on ``b`` minimising ``||(1 - gamma) a + gamma b||^2`` over [0, 1].

    ``aa = a.a``, ``ab = a.b``, ``bb = b.b``. Exact closed form; ``0.5`` when ``a == b``.
    """
    den = aa + bb - 2.0 * ab
    if den <= 1e-300:
        return 0.5
    gamma = (aa - ab) / den
    return min(1.0, max(0.0, gamma))


def min_norm_frank_wolfe(k: Tensor, max_iter: int = 250, tol: float = 1e-5) -> Tensor:
    """Simplex weights of the min-norm point of the convex hull of the rows.

    Exact for ``T <= 2``. For more rows: start on the best pair (the closed form on every
    pair), then Frank-Wolfe steps toward the vertex with the smallest ``(K alpha)_t`` with an
    exact line search, until the L1 change of ``alpha`` is below ``tol`` or ``max_iter``.
    """
    t = k.shape[0]
    if t == 1:
        return torch.ones(1, dtype=k.dtype)
    kl = k.tolist()
    best: Optional[Tuple[float, int, int, float]] = None
    for i in range(t):
        for j in range(i + 1, t):
            g = min_norm_2(kl[i][i], kl[i][j], kl[j][j])
            cost = (1 - g) ** 2 * kl[i][i] + 2 * g * (1 - g) * kl[i][j] + g * g * kl[j][j]
            if best is None or cost < best[0]:
                best = (cost, i, j, g)
    assert best is not None
    _, i, j, g = best
    alpha = torch.zeros(t, dtype=k.dtype)
    alpha[i], alpha[j] = 1.0 - g, g
    if t == 2:
        return alpha
    k_alpha = k @ alpha
    for _ in range(max_iter):
        r = int(torch.argmin(k_alpha))
        aa = float(alpha @ k_alpha)
        ab = float(k_alpha[r])
        bb = float(k[r, r])
        gamma = min_norm_2(aa, ab, bb)
        if gamma <= 0.0:
            break
        new = (1.0 - gamma) * alpha
        new[r] += gamma
        change = float((new - alpha).abs().sum())
        k_alpha = (1.0 - gamma) * k_alpha + gamma * k[:, r]
        alpha = new
        if change < tol:
            break
    return alpha


def min_norm_active_set(k: Tensor, tol: float = 1e-12, max_iter: Optional[int] = None) -> Tensor:
    """Simplex weights of the min-norm point of the convex hull of the rows, exactly.

    Wolfe's min-norm-point algorithm (Wolfe, Math. Programming 1976) on the Gramian: keep an
    affinely independent support ``S``; add the row with the smallest ``(K alpha)_t`` while
    it is below ``alpha^T K alpha - tol`` (a row the current point is not optimal against);
    solve the affine-constrained problem ``min z^T K_SS z, sum z = 1`` on the support and,
    when some weight turns non-positive, step back to the boundary and drop it. Finite; exact
    up to the round-off of the small linear solves.
    """
    n = k.shape[0]
    x = torch.zeros(n, dtype=k.dtype)
    j0 = int(torch.argmin(k.diagonal()))
    x[j0] = 1.0
    passive = torch.zeros(n, dtype=torch.bool)
    passive[j0] = True
    max_iter = 3 * n + 10 if max_iter is None else max_iter
    for _ in range(max_iter):
        kx = k @ x
        mu = float(x @ kx)
        cand = (~passive) & (kx < mu - tol)
        if not bool(cand.any()):
            break
        j = int(torch.where(cand, kx, torch.full_like(kx, float("inf"))).argmin())
        passive[j] = True
        for _inner in range(max_iter):
            idx = passive.nonzero().squeeze(-1)
            m = idx.numel()
            a = torch.zeros(m + 1, m + 1, dtype=k.dtype)
            a[:m, :m] = k[idx][:, idx]
            a[:m, m] = 1.0
            a[m, :m] = 1.0
            rhs = torch.zeros(m + 1, dtype=k.dtype)
            rhs[m] = 1.0
            sol = _solve_general(a, rhs)
            z = torch.zeros_like(x)
            z[idx] = sol[:m]
            if bool((z[idx] > 0).all()):
                x = z
                break
            x, passive = _step_back(x, z, passive, 1e-15)
            x = x / x.sum()
        else:  # pragma: no cover - iteration cap
            break
    return x.clamp_min(0.0) / x.clamp_min(0.0).sum()


def _solve_general(a: Tensor, b: Tensor) -> Tensor:
    """Solve a small square system; least squares if it is singular."""
    try:
        x = torch.linalg.solve(a, b)
        if bool(torch.isfinite(x).all()):
            return x
    except RuntimeError:
        pass
    return torch.linalg.lstsq(a, b.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)


def _solve_sym(a: Tensor, b: Tensor) -> Tensor:
    """Solve ``a x = b`` for a small symmetric PSD ``a``; least squares if singular."""
    try:
        l, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            x = torch.cholesky_solve(b.unsqueeze(-1), l).squeeze(-1)
            if bool(torch.isfinite(x).all()):
                return x
    except RuntimeError:
        pass
    return torch.linalg.lstsq(a, b.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)


def nonneg_qp(k: Tensor, c: Tensor, tol: float = 1e-12, max_iter: Optional[int] = None) -> Tensor:
    """``argmin_{x >= 0} 1/2 x^T K x + c^T x`` for PSD ``K`` (assumed bounded below).

    Lawson & Hanson's NNLS active-set method written on the Gramian: with ``K = A A^T`` and
    ``c = A b`` it is NNLS for ``min ||A^T x + b||``. The passive set only grows by a
    coordinate whose negative gradient exceeds ``tol``; each inner step solves the
    equality-constrained problem on the passive set and backs off to the feasible boundary.
    """
    n = c.shape[0]
    x = torch.zeros(n, dtype=k.dtype)
    passive = torch.zeros(n, dtype=torch.bool)
    max_iter = 3 * n + 10 if max_iter is None else max_iter
    for _ in range(max_iter):
        neg_grad = -(k @ x + c)
        cand = (~passive) & (neg_grad > tol)
        if not bool(cand.any()):
            break
        j = int(torch.where(cand, neg_grad, torch.full_like(neg_grad, -float("inf"))).argmax())
        passive[j] = True
        for _inner in range(max_iter):
            idx = passive.nonzero().squeeze(-1)
            z = torch.zeros_like(x)
            z[idx] = _solve_sym(k[idx][:, idx], -c[idx])
            if bool((z[idx] > 0).all()):
                x = z
                break
            x, passive = _step_back(x, z, passive, tol)
            if not bool(passive.any()):
                break
        else:  # pragma: no cover - iteration cap
            break
    return x.clamp_min(0.0)


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of ``v`` onto ``{w >= 0, sum w = 1}`` (sort-based, exact)."""
    n = v.shape[0]
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1.0
    ind = torch.arange(1, n + 1, dtype=v.dtype)
    cond = u - css / ind > 0
    rho = int(cond.nonzero().max()) if bool(cond.any()) else 0
    theta = css[rho] / (rho + 1)
    return (v - theta).clamp_min(0.0)


def minimize_on_simplex(
    fun: Callable[[Tensor], float],
    grad: Callable[[Tensor], Tensor],
    w0: Tensor,
    max_iter: int = 500,
    tol: float = 1e-10,
    memory: int = 10,
) -> Tensor:
    """Minimise a smooth convex ``fun`` over the probability simplex.

    Spectral projected gradient with a non-monotone Armijo line search (Birgin, Martinez &
    Raydan, SIAM J. Optim. 2000, Alg. SPG2). Stops when the projected-gradient step
    ``||P(w - grad) - w||_inf < tol`` or after ``max_iter`` iterations.
    """
    w = project_simplex(w0)
    f = fun(w)
    g = grad(w)
    hist = [f]
    pg = project_simplex(w - g) - w
    lam = 1.0 / max(float(pg.abs().max()), 1e-12)
    for _ in range(max_iter):
        if float(pg.abs().max()) < tol:
            break
        d = project_simplex(w - lam * g) - w
        gd = float(g @ d)
        if gd >= 0.0:  # no descent possible along d (round-off); stationary
            break
        f_ref = max(hist[-memory:])
        t = 1.0
        while True:
            w_new = w + t * d
            f_new = fun(w_new)
            if f_new <= f_ref + 1e-4 * t * gd or t < 1e-12:
                break
            t *= 0.5
        g_new = grad(w_new)
        s = w_new - w
        y = g_new - g
        sy = float(s @ y)
        lam = min(1e12, max(1e-12, float(s @ s) / sy)) if sy > 0 else 1e12
        w, f, g = w_new, f_new, g_new
        hist.append(f)
        pg = project_simplex(w - g) - w
    return w
