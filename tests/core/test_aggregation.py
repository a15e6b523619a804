"""Tests of the gradient aggregators (mtl_plugins.core.aggregation).

Each test checks a property that fails when the method is wrong: hand-computed results,
the optimality conditions of the underlying problems against brute force, invariances,
and state round trips.
"""
from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch

from mtl_plugins.core.aggregation import (AGGREGATORS, MGDA, UPGrad, AlignedMTL, CAGrad,
                                          DualProj, GradDrop, GradVac, GramianWeighting, IMTLG, Mean,
                                          NashMTL, PCGrad, Sum, build_aggregator)
from mtl_plugins.core.aggregation.aligned_mtl import alignment_matrix
from mtl_plugins.core.aggregation._utils import gramian64
from mtl_plugins.core.aggregation.upgrad import dual_cone_projection_weights
from mtl_plugins.core.tasks import MTLConfigError

from ._engine_models import nearly_collinear

D = torch.float64


def t(rows, dtype=D):
    return torch.tensor(rows, dtype=dtype)


def conflicting(T=3, P=6, seed=0, dtype=D):
    """Random rows with at least one conflicting pair (negative inner product)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        G = torch.randn(T, P, generator=g, dtype=D)
        K = G @ G.T
        if bool((K < 0).any()):
            return G.to(dtype)


def simplex_grid(T, step):
    n = round(1 / step)
    pts = [c for c in itertools.product(range(n + 1), repeat=T - 1) if sum(c) <= n]
    w = torch.tensor([list(c) + [n - sum(c)] for c in pts], dtype=D) / n
    return w


# ----------------------------------------------------------------------------- Mean / Sum
def test_mean_and_sum():
    G = t([[1.0, 2.0], [3.0, -4.0]])
    assert torch.equal(Mean()(G), t([2.0, -1.0]))
    assert torch.equal(Sum()(G), t([4.0, -2.0]))
    assert torch.allclose(Mean().weights(G @ G.T), t([0.5, 0.5]))


# ----------------------------------------------------------------------------- PCGrad
def test_pcgrad_opposed_hand_computed():
    G = t([[1.0, 0.0], [-1.0, 1.0]])
    # g1.g2 = -1: g1' = g1 + 1/2 g2 = [0.5, 0.5]; g2' = g2 + 1/1 g1 = [0, 1]
    assert torch.allclose(PCGrad()(G), t([0.5, 1.5]))
    assert torch.allclose(PCGrad(reduction="mean")(G), t([0.25, 0.75]))


def test_pcgrad_orthogonal_and_aligned_unchanged():
    G = t([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, -3.0]])
    assert torch.allclose(PCGrad()(G), G.sum(0))
    G2 = t([[1.0, 1.0], [2.0, 0.5]])
    assert torch.allclose(PCGrad()(G2), G2.sum(0))


def _pcgrad_reference(G, seed):
    """Explicit-vector PCGrad with the same order draws as the aggregator."""
    gen = torch.Generator().manual_seed(seed)
    T = G.shape[0]
    out = []
    for i in range(T):
        others = [j for j in range(T) if j != i]
        order = [others[p] for p in torch.randperm(T - 1, generator=gen).tolist()]
        gi = G[i].clone()
        for j in order:
            dot = gi @ G[j]
            if dot < 0:
                gi = gi - dot / (G[j] @ G[j]) * G[j]
        out.append(gi)
    return torch.stack(out).sum(0)


def test_pcgrad_bookkeeping_matches_explicit_projections():
    G = conflicting(T=4, P=5, seed=3)
    assert torch.allclose(PCGrad(seed=7)(G), _pcgrad_reference(G, 7), atol=1e-12)
    # with several tasks the result depends on the order, hence on the seed
    outs = {tuple(PCGrad(seed=s)(G).round(decimals=8).tolist()) for s in range(8)}
    assert len(outs) > 1


def test_pcgrad_zero_row_is_skipped():
    G = t([[1.0, 0.0], [0.0, 0.0], [-1.0, 1.0]])
    out = PCGrad()(G)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, t([0.5, 1.5]))


# ----------------------------------------------------------------------------- MGDA
def test_mgda_two_tasks_closed_form_hand_computed():
    G = t([[1.0, 0.0], [-1.0, 1.0]])
    # alpha_1 = (g2 - g1).g2 / ||g1 - g2||^2 = (2 + 1) / 5
    w = MGDA().weights(G @ G.T)
    assert torch.allclose(w, t([0.6, 0.4]))
    d = MGDA()(G)
    assert torch.allclose(d, t([0.2, 0.4]))
    # clipped case: g1 is itself the min-norm point
    G2 = t([[1.0, 0.0], [2.0, 0.0]])
    assert torch.allclose(MGDA().weights(G2 @ G2.T), t([1.0, 0.0]))


@pytest.mark.parametrize("solver", ["active_set", "frank_wolfe"])
def test_mgda_min_norm_against_simplex_grid(solver):
    G = conflicting(T=3, P=5, seed=1)
    K = G @ G.T
    w = MGDA(solver=solver).weights(K)
    assert bool((w >= 0).all()) and abs(float(w.sum()) - 1) < 1e-12  # in the convex hull
    grid = simplex_grid(3, 0.005)
    grid_min = float(torch.einsum("nt,ts,ns->n", grid, K, grid).min())
    val = float(w @ K @ w)
    if solver == "active_set":
        assert val <= grid_min + 1e-12
        # KKT: (K w)_t >= w^T K w, with equality on the support
        kw = K @ w
        assert bool((kw >= val - 1e-10).all())
        assert torch.allclose(kw[w > 1e-9], torch.full_like(kw[w > 1e-9], val), atol=1e-10)
    else:
        assert val <= grid_min * 1.02 + 1e-12


def test_mgda_exact_on_many_tasks_and_zero_rows():
    G = conflicting(T=6, P=4, seed=5)
    K = G @ G.T
    w = MGDA().weights(K)
    kw, val = K @ w, float(w @ K @ w)
    assert bool((kw >= val - 1e-10).all())
    # a zero row is an absent task: same weights as without it
    Gz = torch.cat([G[:2], torch.zeros(1, 4, dtype=D), G[2:]])
    wz = MGDA().weights(Gz @ Gz.T)
    assert wz[2] == 0 and torch.allclose(torch.cat([wz[:2], wz[3:]]), w, atol=1e-10)


def test_mgda_normalizations():
    G = t([[10.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(MGDA(normalization="l2")(G), t([5.0, 0.5]))  # alpha (1/2, 1/2) on raw
    assert torch.allclose(MGDA(normalization="l2", apply_to="normalized")(G), t([0.5, 0.5]))
    # loss: g/L; losses (10, 1) make both normalised rows unit vectors again
    assert torch.allclose(MGDA(normalization="loss")(G, losses=t([10.0, 1.0])), t([5.0, 0.5]))
    # loss+: g/(L ||g||) with L = (1, 1) equals l2
    assert torch.allclose(MGDA(normalization="loss+")(G, losses=[1.0, 1.0]), t([5.0, 0.5]))
    assert MGDA(normalization="loss").needs_losses and not MGDA().needs_losses
    with pytest.raises(ValueError, match="losses"):
        MGDA(normalization="loss")(G)


# ----------------------------------------------------------------------------- CAGrad
def test_cagrad_c0_is_mean():
    G = conflicting(T=4, P=7, seed=2)
    for rescale in (0, 1, 2):
        assert torch.allclose(CAGrad(c=0.0, rescale=rescale)(G), G.mean(0), atol=1e-12)


@pytest.mark.parametrize("c", [0.3, 0.8])
def test_cagrad_optimality_against_grid(c):
    G = conflicting(T=3, P=4, seed=4)
    K = G @ G.T
    g0 = G.mean(0)
    r = c * float(g0.norm())
    d = CAGrad(c=c, rescale=0)(G)
    assert float((d - g0).norm()) <= r * (1 + 1e-9)  # feasible
    primal = float((G @ d).min())
    # dual objective on a grid: F(w) = g_w.g0 + c ||g0|| ||g_w|| >= primal optimum
    grid = simplex_grid(3, 0.004)
    gw = grid @ G
    F = gw @ g0 + r * gw.norm(dim=1)
    assert primal <= float(F.min()) + 1e-9  # weak duality
    assert primal >= float(F.min()) - 1e-3 * float(K.diagonal().mean())  # zero gap up to grid
    # no random feasible direction does better
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(20000, 4, generator=gen, dtype=D)
    cand = g0 + r * u / u.norm(dim=1, keepdim=True) * torch.rand(20000, 1, generator=gen, dtype=D)
    assert float((cand @ G.T).min(dim=1).values.max()) <= primal + 1e-9


def test_cagrad_rescale_conventions():
    G = conflicting(T=3, P=5, seed=6)
    d0 = CAGrad(c=0.5, rescale=0)(G)
    assert torch.allclose(CAGrad(c=0.5, rescale=1)(G), d0 / 1.25)
    assert torch.allclose(CAGrad(c=0.5, rescale=2)(G), d0 / 1.5)
    row = G[:1]
    assert torch.allclose(CAGrad(c=0.5, rescale=2)(row), row[0])


# ----------------------------------------------------------------------------- IMTL-G
def test_imtl_hand_computed():
    G = t([[1.0, 0.0], [0.0, 2.0]])
    # d = a g1 + (1 - a) g2 = [a, 2 - 2a]; equal projections on e1, e2 -> a = 2/3
    w = IMTLG().weights(G @ G.T)
    assert torch.allclose(w, t([2 / 3, 1 / 3]))
    assert torch.allclose(IMTLG()(G), t([2 / 3, 2 / 3]))


def test_imtl_equal_projections_and_paper_formula():
    G = conflicting(T=4, P=9, seed=8)
    w = IMTLG().weights(G @ G.T)
    assert abs(float(w.sum()) - 1) < 1e-12
    d = w @ G
    u = G / G.norm(dim=1, keepdim=True)
    proj = u @ d
    assert torch.allclose(proj, proj[0].expand(4), atol=1e-10)
    # the paper's asymmetric closed form: a_{2:T} = g1 U^T (D U^T)^{-1}
    Dm = G[0] - G[1:]
    Um = u[0] - u[1:]
    a = (G[0] @ Um.T) @ torch.linalg.inv(Dm @ Um.T)
    assert torch.allclose(w, torch.cat([1 - a.sum().reshape(1), a]), atol=1e-10)


# ----------------------------------------------------------------------------- Nash-MTL
def test_nash_solves_bargaining_equation():
    G = conflicting(T=4, P=8, seed=9)
    K = G @ G.T
    agg = NashMTL(max_norm=None)
    w = agg.weights(K)
    assert bool((w > 0).all())
    assert torch.allclose(K @ w, 1 / w, rtol=1e-8)
    d = agg(G)
    assert abs(float(d.norm()) - 2.0) < 1e-8  # ||d|| = sqrt(T)
    assert abs(float(NashMTL(max_norm=1.0)(G).norm()) - 1.0) < 1e-10


def test_nash_max_norm_from_the_gramian():
    """``max_norm`` clips ``||alpha @ G||`` computed as ``sqrt(alpha^T K alpha)`` from the
    Gramian: on float32 rows written into G's row 0 (the engine's ``out``) the result equals
    the unclipped direction rescaled by its own norm, and a direction within ``max_norm`` is
    left bit for bit as the unclipped one."""
    G = conflicting(T=3, P=50, seed=4).float() * 3.0
    free = NashMTL(max_norm=None)(G.clone())
    norm = float(free.double().norm())
    assert norm > 1.5
    buf = G.clone()
    clipped = NashMTL(max_norm=1.5)(buf, gramian=gramian64(G), out=buf[0])
    assert clipped.data_ptr() == buf.data_ptr()
    assert torch.allclose(clipped.double(), free.double() * (1.5 / norm), rtol=1e-6, atol=0)
    assert abs(float(clipped.double().norm()) - 1.5) < 1e-5
    assert torch.equal(NashMTL(max_norm=norm * 1.01)(G.clone()), free)


def test_nash_orthogonal_hand_computed():
    G = t([[2.0, 0.0], [0.0, 1.0]])
    agg = NashMTL(max_norm=None)
    assert torch.allclose(agg.weights(G @ G.T), t([0.5, 1.0]))
    assert torch.allclose(NashMTL(max_norm=None)(G), t([1.0, 1.0]))


def test_nash_update_every_reuses_alpha_and_state_round_trip():
    G1, G2, G3 = (conflicting(T=3, P=5, seed=s) for s in (10, 11, 12))
    agg = NashMTL(update_weights_every=2, max_norm=None)
    agg(G1)
    a1 = agg.alpha.clone()
    agg(G2)  # reuses alpha
    assert torch.equal(agg.alpha, a1)
    sd = _roundtrip(agg.state_dict())
    fresh = NashMTL(update_weights_every=2, max_norm=None)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(G3), agg(G3))
    assert not torch.equal(agg.alpha, a1)  # third call recomputed


# ----------------------------------------------------------------------------- Aligned-MTL
def test_aligned_mtl_orthogonal_equal_norm_is_sum_or_mean():
    G = t([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, -2.0]])
    assert torch.allclose(AlignedMTL()(G), G.sum(0))
    assert torch.allclose(AlignedMTL(reduction="mean")(G), G.mean(0))


def test_aligned_mtl_gramian_of_aligned_rows_is_scaled_identity():
    G = conflicting(T=3, P=6, seed=13)
    K = G @ G.T
    B = alignment_matrix(K)
    lam_min = float(torch.linalg.eigvalsh(K).min())
    assert torch.allclose(B @ K @ B, lam_min * torch.eye(3, dtype=D), atol=1e-10)
    assert torch.allclose(AlignedMTL()(G), (B @ G).sum(0), atol=1e-10)
    # rank-deficient rows (g3 = g1 + g2): identity on the range
    G2 = torch.stack([G[0], G[1], G[0] + G[1]])
    B2 = alignment_matrix(G2 @ G2.T)
    ev = torch.linalg.eigvalsh(B2 @ G2 @ G2.T @ B2)
    assert ev[0].abs() < 1e-9 and torch.allclose(ev[1:], ev[1:].max().expand(2), rtol=1e-8)


# ----------------------------------------------------------------------------- UPGrad
def _cone_projection_bruteforce(x, G):
    """Projection of x onto {y : G y >= 0} by enumerating active sets (small T)."""
    best = None
    T = G.shape[0]
    for r in range(T + 1):
        for S in itertools.combinations(range(T), r):
            if S:
                A = G[list(S)]
                y = x - A.T @ torch.linalg.lstsq(A @ A.T, (A @ x).unsqueeze(-1)).solution.squeeze(-1)
            else:
                y = x.clone()
            if bool((G @ y >= -1e-10).all()):
                dist = float((y - x).norm())
                if best is None or dist < best[0]:
                    best = (dist, y)
    return best[1]


def test_upgrad_is_mean_of_dual_cone_projections():
    G = conflicting(T=3, P=3, seed=14)
    d = UPGrad()(G)
    assert bool((G @ d >= -1e-10).all())  # non-conflicting with every row
    proj = torch.stack([_cone_projection_bruteforce(G[i], G) for i in range(3)])
    assert torch.allclose(d, proj.mean(0), atol=1e-9)
    K = G @ G.T
    for i in range(3):
        v = dual_cone_projection_weights(K, torch.eye(3, dtype=D)[i])
        assert torch.allclose(v @ G, proj[i], atol=1e-9)


def test_upgrad_non_conflicting_rows_give_mean():
    G = t([[1.0, 0.2, 0.0], [0.5, 1.0, 0.1], [0.0, 0.3, 2.0]])
    assert bool((G @ G.T >= 0).all())
    assert torch.allclose(UPGrad()(G), G.mean(0), atol=1e-12)


# ----------------------------------------------------------------------------- DualProj
def _nearest_nonconflicting_by_scipy(x, G):
    """``argmin ||y - x||  s.t.  G y >= 0`` by SLSQP on the primal (independent of the
    Gramian dual the aggregator solves)."""
    scipy_opt = pytest.importorskip("scipy.optimize")
    import numpy as np
    xn, Gn = x.numpy(), G.numpy()
    res = scipy_opt.minimize(lambda y: 0.5 * float((y - xn) @ (y - xn)), xn, jac=lambda y: y - xn,
                             constraints=[dict(type="ineq", fun=lambda y: Gn @ y, jac=lambda y: Gn)],
                             method="SLSQP", options=dict(ftol=1e-15, maxiter=500))
    assert res.success, res.message
    return torch.as_tensor(np.asarray(res.x), dtype=D)


@pytest.mark.parametrize("seed", [14, 30, 31])
def test_dualproj_is_the_projection_of_the_mean_onto_the_dual_cone(seed):
    G = conflicting(T=3, P=3, seed=seed)
    d = DualProj()(G)
    assert bool((G @ d >= -1e-10).all())  # non-conflicting with every row
    ref = _cone_projection_bruteforce(G.mean(0), G)  # exact: enumerates the active sets
    assert torch.allclose(d, ref, atol=1e-9)
    assert torch.allclose(d, _nearest_nonconflicting_by_scipy(G.mean(0), G), atol=1e-6)
    # it is the closest non-conflicting vector to the mean: no feasible point is nearer
    g = torch.Generator().manual_seed(seed)
    for _ in range(200):
        y = d + 0.3 * torch.randn(3, generator=g, dtype=D)
        if bool((G @ y >= 0).all()):
            assert (y - G.mean(0)).norm() >= (d - G.mean(0)).norm() - 1e-12


def test_dualproj_hand_computed_two_rows():
    # g1 = [1, 0], g2 = [-1, 1]: mean m = [0, 0.5] has m.g1 = 0 >= 0 and m.g2 = 0.5: unchanged
    G = t([[1.0, 0.0], [-1.0, 1.0]])
    assert torch.allclose(DualProj()(G), t([0.0, 0.5]), atol=1e-12)
    # g1 = [1, 0], g2 = [-2, 1]: m = [-0.5, 0.5] conflicts with g1 (m.g1 = -0.5) and not with
    # g2 (1.5): project onto {y1 >= 0}: [0, 0.5], which has (0, 0.5) . g2 = 0.5 >= 0
    G = t([[1.0, 0.0], [-2.0, 1.0]])
    assert torch.allclose(DualProj()(G), t([0.0, 0.5]), atol=1e-12)
    # the weights: v = u + x with x >= 0 on the violated row only
    w = DualProj().weights(G @ G.T)
    assert torch.allclose(w @ G, t([0.0, 0.5]), atol=1e-12) and bool((w >= t([0.5, 0.5]) - 1e-12).all())


def test_dualproj_non_conflicting_is_mean_and_pref_vector():
    G = t([[1.0, 0.2, 0.0], [0.5, 1.0, 0.1], [0.0, 0.3, 2.0]])
    assert torch.allclose(DualProj()(G), G.mean(0), atol=1e-12)
    assert torch.allclose(DualProj(pref_vector=[1.0, 0.0, 0.0])(G), G[0], atol=1e-12)
    G = conflicting(T=3, P=3, seed=14)
    u = t([0.2, 0.5, 0.3])
    assert torch.allclose(DualProj(pref_vector=u.tolist())(G),
                          _cone_projection_bruteforce(u @ G, G), atol=1e-9)
    with pytest.raises(MTLConfigError, match="dualproj: reg_eps=-1"):
        build_aggregator(dict(type="dualproj", reg_eps=-1))
    with pytest.raises(ValueError, match="pref_vector has 2 entries but grads has 3 rows"):
        DualProj(pref_vector=[0.5, 0.5])(G)


# ----------------------------------------------------------------------------- GradVac
def test_gradvac_target0_orthogonal_unchanged():
    G = t([[1.0, 0.0], [0.0, 3.0]])
    assert torch.allclose(GradVac()(G), G.sum(0))


def test_gradvac_raises_similarity_to_target():
    G = t([[1.0, 0.0], [-0.6, 0.8]])  # cos = -0.6
    agg = GradVac(beta=0.0)
    agg.targets = torch.full((1, 2, 2), 0.3, dtype=D)
    coeff = agg.group_coefficients((G @ G.T).unsqueeze(0))[0]
    mod = coeff @ G
    for i, j in ((0, 1), (1, 0)):
        cos = float(mod[i] @ G[j] / (mod[i].norm() * G[j].norm()))
        assert abs(cos - 0.3) < 1e-12
    # the norm along the orthogonal complement of g_j is kept
    assert torch.allclose(mod[0] - (mod[0] @ G[1]) * G[1], G[0] - (G[0] @ G[1]) * G[1])


def test_gradvac_ema_hand_checked():
    G = t([[1.0, 0.0], [0.6, 0.8]])  # cos = 0.6 >= 0: no change, targets move
    agg = GradVac(beta=0.01)
    assert torch.allclose(agg(G), G.sum(0))
    assert torch.allclose(agg.targets[0], t([[0.0, 0.006], [0.006, 0.0]]))
    agg(G)
    assert torch.allclose(agg.targets[0], t([[0.0, 0.99 * 0.006 + 0.006], [0.99 * 0.006 + 0.006, 0.0]]))


def test_gradvac_beta0_is_pcgrad_and_groups_are_independent():
    G = conflicting(T=4, P=6, seed=15)
    assert torch.allclose(GradVac(beta=0.0, seed=3)(G), PCGrad(seed=3)(G), atol=1e-12)
    grouped = GradVac(group_sizes=[2, 4], seed=1)(G)
    parts = torch.cat([GradVac(seed=1)(G[:, :2]), GradVac(seed=1)(G[:, 2:])])
    assert torch.allclose(grouped, parts, atol=1e-12)
    with pytest.raises(ValueError, match="group_sizes"):
        GradVac(group_sizes=[2, 3])(G)


def test_gradvac_takes_the_callers_block_gramians_and_checks_their_shape():
    """``block_gramians`` (the engine forms them once) give the same direction as GradVac's
    own; a stack of the wrong shape is refused, naming the shape expected."""
    G = conflicting(T=4, P=6, seed=15)
    blocks = torch.stack([gramian64(G[:, :2]), gramian64(G[:, 2:])])
    own = GradVac(group_sizes=[2, 4], seed=1)(G)
    given = GradVac(group_sizes=[2, 4], seed=1)(G, block_gramians=blocks)
    assert torch.allclose(given, own, atol=1e-12)
    with pytest.raises(ValueError, match=r"block_gramians has shape \(1, 4, 4\); expected "
                                         r"\[2, 4, 4\]"):
        GradVac(group_sizes=[2, 4])(G, block_gramians=blocks[:1])


# ----------------------------------------------------------------------------- GradDrop
def test_graddrop_all_positive_keeps_everything_and_leak_one_is_sum():
    G = t([[1.0, 2.0, 0.0], [3.0, 0.5, 4.0]])
    assert torch.allclose(GradDrop()(G), G.sum(0))
    assert torch.allclose(GradDrop()(-G), -G.sum(0))
    H = conflicting(T=3, P=50, seed=16)
    assert torch.allclose(GradDrop(leak=1.0)(H), H.sum(0))
    assert torch.allclose(GradDrop(leak=[1.0, 1.0, 1.0], reduction="mean")(H), H.mean(0))


def test_graddrop_keeps_one_sign_per_element_with_purity_probability():
    P = 20000
    G = torch.stack([torch.full((P,), 3.0, dtype=D), torch.full((P,), -1.0, dtype=D)])  # P = 0.75
    out = GradDrop(seed=5)(G)
    assert bool(((out == 3.0) | (out == -1.0)).all())
    frac_pos = float((out == 3.0).double().mean())
    assert abs(frac_pos - 0.75) < 0.015


def test_graddrop_batch_size_decides_per_feature():
    # rows are flattened [batch=2, features=2] activation gradients
    Gb = t([[1.0, 1.0, -3.0, -3.0], [-0.5, 1.0, 1.0, 1.0]])
    # feature 0, batch-summed: task sums (-2, 0.5) -> P = 0.2; kept values over the batch
    # are (1, 1) if the positive side wins, (-0.5, -3) otherwise - never a mix
    seen, mixed = set(), False
    for seed in range(40):
        f0 = GradDrop(batch_size=2, seed=seed)(Gb).view(2, 2)[:, 0]
        seen.add(tuple(f0.tolist()))
        f0_elem = GradDrop(seed=seed)(Gb).view(2, 2)[:, 0]
        mixed |= tuple(f0_elem.tolist()) in {(1.0, -3.0), (-0.5, 1.0)}
    assert seen == {(1.0, 1.0), (-0.5, -3.0)}
    assert mixed  # per-element decisions do mix
    with pytest.raises(ValueError, match="batch_size"):
        GradDrop(batch_size=3)(Gb)


def test_graddrop_zero_columns_no_nan():
    G = t([[0.0, 1.0], [0.0, -1.0]])
    out = GradDrop()(G)
    assert torch.isfinite(out).all() and out[0] == 0


@pytest.mark.parametrize("leak", [0.0, 0.3, [1.0, 0.0, 0.5]])
@pytest.mark.parametrize("batch_size", [None, 2])
def test_graddrop_into_row_zero_equals_a_fresh_output(leak, batch_size):
    """``out=grads[0]`` (the engine's direction buffer) gives the same update as a fresh
    output, bit for bit, from the same draws; ``out`` aliasing another row is refused."""
    G = conflicting(T=3, P=40, seed=8).float()
    fresh = GradDrop(leak=leak, batch_size=batch_size, seed=2, reduction="mean")(G.clone())
    buf = G.clone()
    into = GradDrop(leak=leak, batch_size=batch_size, seed=2, reduction="mean")(buf, out=buf[0])
    assert into.data_ptr() == buf.data_ptr() and torch.equal(into, fresh)
    assert torch.equal(buf[1:], G[1:])
    with pytest.raises(ValueError, match="row 0"):
        GradDrop()(buf, out=buf[1])


# ----------------------------------------------------------------------------- invariances
PERM_INVARIANT = ["mean", "sum", "mgda", "imtl", "cagrad", "nashmtl", "upgrad", "aligned_mtl",
                  "dualproj"]


@pytest.mark.parametrize("name", PERM_INVARIANT)
def test_permutation_invariance(name):
    G = conflicting(T=4, P=7, seed=17)
    perm = torch.tensor([2, 0, 3, 1])
    d = build_aggregator(name)(G)
    dp = build_aggregator(name)(G[perm])
    assert torch.allclose(d, dp, atol=1e-9)
    assert build_aggregator(name).deterministic


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_zero_rows_dtypes_and_t1(name):
    for dtype in (torch.float32, torch.float64):
        G = conflicting(T=3, P=6, seed=18, dtype=dtype)
        G[1] = 0.0
        out = build_aggregator(name)(G)
        assert out.dtype == dtype and out.shape == (6,) and torch.isfinite(out).all()
        zero = build_aggregator(name)(torch.zeros(3, 6, dtype=dtype))
        assert torch.isfinite(zero).all() and not bool(zero.any())
    row = t([[3.0, -4.0]])
    one = build_aggregator(name)(row)
    expected = {"cagrad": row[0] * 1.5 / 1.25, "nashmtl": row[0] / 5.0}.get(name, row[0])
    assert torch.allclose(one, expected), (name, one)


@pytest.mark.parametrize("name", [n for n, c in AGGREGATORS.items() if issubclass(c, GramianWeighting)])
def test_forward_equals_gramian_weighting(name):
    G = conflicting(T=3, P=5, seed=19)
    a, b = build_aggregator(name), build_aggregator(name)
    assert torch.allclose(a(G), b.weights(G @ G.T) @ G, atol=1e-10)


def test_non_finite_gradients_raise():
    G = t([[1.0, float("nan")], [0.0, 1.0]])
    with pytest.raises(FloatingPointError, match="NaN"):
        MGDA()(G)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_cuda_matches_cpu(name):
    G = conflicting(T=3, P=64, seed=20, dtype=torch.float32)
    cpu = build_aggregator(name)(G)
    gpu = build_aggregator(name)(G.cuda())
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    if name != "graddrop":  # its draws come from the device's generator
        assert torch.allclose(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- state
def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda: PCGrad(seed=3),
        lambda: GradVac(seed=3, beta=0.3),
        lambda: GradDrop(seed=3),
        lambda: NashMTL(update_weights_every=3),
    ],
    ids=["pcgrad", "gradvac", "graddrop", "nashmtl"],
)
def test_state_dict_round_trip_reproduces_next_output(make):
    G = [conflicting(T=4, P=64, seed=s) for s in (21, 22, 23)]
    agg = make()
    agg(G[0])
    agg(G[1])
    fresh = make()
    fresh.load_state_dict(_roundtrip(copy.deepcopy(agg.state_dict())))
    assert torch.equal(fresh(G[2]), agg(G[2]))
    assert torch.equal(fresh(G[0]), agg(G[0]))


def test_rng_advances_between_steps():
    G = conflicting(T=4, P=64, seed=24)
    agg = GradDrop(seed=0)
    assert not torch.equal(agg(G), agg(G))


# ----------------------------------------------------------------------------- registry
def test_build_aggregator_forms():
    assert isinstance(build_aggregator("pcgrad"), PCGrad)
    assert isinstance(build_aggregator("Nash-MTL"), NashMTL)
    assert isinstance(build_aggregator("imtl_g"), IMTLG)
    cfg = dict(type="cagrad", c=0.4)
    agg = build_aggregator(cfg)
    assert isinstance(agg, CAGrad) and agg.c == 0.4 and cfg == dict(type="cagrad", c=0.4)
    assert build_aggregator(cfg, rescale=2).rescale == 2
    assert build_aggregator(agg) is agg
    assert build_aggregator("cagrad", c=0.1).c == 0.1


def test_build_aggregator_errors():
    with pytest.raises(MTLConfigError) as exc:
        build_aggregator("pcgard")
    msg = str(exc.value)
    assert "aggregator" in msg and "'pcgard'" in msg and "pcgrad" in msg and "upgrad" in msg
    with pytest.raises(MTLConfigError, match=r"unknown argument\(s\) \['alpha'\].*accepted"):
        build_aggregator(dict(type="cagrad", alpha=0.4))
    with pytest.raises(MTLConfigError, match="missing key 'type'"):
        build_aggregator(dict(c=0.4))
    with pytest.raises(MTLConfigError, match="c=-1"):
        build_aggregator("cagrad", c=-1)
    with pytest.raises(MTLConfigError, match="rescale=3"):
        CAGrad(rescale=3)
    with pytest.raises(MTLConfigError, match="normalization='l1'"):
        MGDA(normalization="l1")
    with pytest.raises(MTLConfigError, match="leak"):
        GradDrop(leak=1.5)
    with pytest.raises(MTLConfigError, match="expected a name"):
        build_aggregator(3)


def test_every_aggregator_documents_its_paper():
    for cls in AGGREGATORS.values():
        doc = cls.__doc__ or ""
        if cls in (Mean, Sum):
            continue
        assert any(str(y) in doc for y in range(2018, 2025)), cls
        assert isinstance(cls.deterministic, bool)


# ----------------------------------------------------------------------------- float64 Gramian


@pytest.mark.parametrize("name", ["aligned_mtl", "mgda", "upgrad", "imtl", "dualproj"])
def test_float32_rows_give_the_float64_result(name):
    """The Gramian is accumulated in float64 from float32 rows (issue 11): the direction equals
    the one computed from the same rows held in float64, to 1e-6 relative."""
    G = nearly_collinear()
    d32 = build_aggregator(name)(G)
    assert d32.dtype == torch.float32
    ref = build_aggregator(name)(G.double())
    assert float((d32.double() - ref).norm() / ref.norm()) < 1e-6


def test_gramian64_is_exact_on_float32_entries_in_chunks():
    G = nearly_collinear(P=1000)
    ref = G.double() @ G.double().T
    assert torch.allclose(gramian64(G, chunk=300), ref, rtol=1e-15, atol=0)
    assert gramian64(G).dtype == torch.float64


def test_gramian64_and_combine64_use_one_scratch_buffer_for_every_chunk():
    """A caller's ``work`` buffer (``work_buffer``) serves every chunk of the Gramian and of
    the chunked products (a row of G other than the first, float64 on cancellation): the
    same results as the float64 reference; a buffer of the wrong kind is refused, naming
    what it wants."""
    from mtl_plugins.core.aggregation._utils import combine64, gramian64, work_buffer
    G = nearly_collinear(P=1000)
    ref = G.double() @ G.double().T
    work = work_buffer(3, 1000, G.device, chunk=300)
    assert work.shape == (4, 300) and work.dtype == torch.float64
    assert torch.allclose(gramian64(G, work=work), ref, rtol=1e-15, atol=0)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    wc = torch.tensor([1e3, 2e3, 0.0], dtype=torch.float64)  # cancels: the float64 path
    for weights in (w, wc):
        want = weights @ G.double()
        scale = float(want.abs().max())
        for row in (0, 2):  # row 0: in-place GEMV (float32) or chunks; row 2: chunks
            for buffer in (work, None):
                inplace = G.clone()
                got = combine64(weights, inplace, gramian64(G), out=inplace[row], work=buffer)
                assert got.data_ptr() == inplace[row].data_ptr()
                assert float((got.double() - want).abs().max()) < 1e-6 * scale, (row, buffer)
    one = G[:1].clone()  # a single row: the direction is w_0 times it, in place
    assert torch.equal(combine64(w[:1], one, out=one[0], cancels=False), G[0] * 0.5)
    bad_work = (torch.empty(4, 300), torch.empty(3, 300, dtype=torch.float64),
                torch.empty(300, 4, dtype=torch.float64).t())
    for bad in bad_work:
        with pytest.raises(ValueError, match=r"work: expected a float64 \[4, chunk\] buffer"):
            gramian64(G, work=bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_combine64_into_a_row_of_g_in_every_float_dtype(dtype):
    """The direction written into a row of G itself (the first: in-place GEMV; another: chunks
    through the scratch's last row reinterpreted in G's dtype) matches the float64 product to
    G's precision."""
    from mtl_plugins.core.aggregation._utils import combine64, work_buffer
    g = torch.Generator().manual_seed(3)
    G = torch.randn(3, 700, generator=g).to(dtype)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    want = w @ G.double()
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-6}[dtype]
    for row in (0, 1, 2):
        inplace = G.clone()
        got = combine64(w, inplace, out=inplace[row], cancels=False,
                        work=work_buffer(3, 700, G.device, chunk=256))
        assert got.dtype == dtype
        assert float((got.double() - want).abs().max()) <= tol * float(want.abs().max()), row


def test_combine64_into_g_keeps_a_nan_and_refuses_an_overlapping_out():
    """A zero first weight still propagates a NaN of the first row (0 * NaN), as the product
    does; an ``out`` that overlaps G without being one of its rows is refused."""
    from mtl_plugins.core.aggregation._utils import combine64
    G = torch.randn(3, 10)
    G[0, 3] = float("nan")
    w = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
    assert torch.isnan(combine64(w, G.clone(), cancels=False)[3])
    inplace = G.clone()
    assert torch.isnan(combine64(w, inplace, out=inplace[0], cancels=False)[3])
    H = torch.randn(3, 10)
    with pytest.raises(ValueError, match="out: shares memory with grads .* not one of its rows"):
        combine64(w, H, out=H.view(-1)[1:11], cancels=False)


def test_dualproj_reachable_from_the_controller_config():
    from mtl_plugins.core.controller import MTLController
    ctl = MTLController(["a", "b"], aggregator=dict(type="dualproj"))
    assert isinstance(ctl.aggregator, DualProj) and isinstance(build_aggregator("DualProj"), DualProj)


def test_cancellation_is_decided_per_block_in_one_batched_call():
    """``cancels64`` on ``[B, T]`` weights and ``[B, T, T]`` Gramians (GradVac's blocks)
    gives each block's own decision (a cancelling block, a plain one, zero weights), those of
    one call per block; combined block by block with them (GradVac's loop), the cancelling
    block is accurate to float64's product."""
    from mtl_plugins.core.aggregation._utils import cancels64, combine64
    plain = torch.randn(3, 4000, generator=torch.Generator().manual_seed(1))
    C = nearly_collinear(P=4000)
    blocks = torch.stack([gramian64(C), gramian64(plain), gramian64(plain)])
    w = torch.tensor([[1e3, 2e3, 0.0], [0.5, 0.3, 0.2], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert cancels64(w, blocks).tolist() == [True, False, False]
    assert [bool(cancels64(w[b], blocks[b])) for b in range(3)] == [True, False, False]
    # one block is decided in Python floats: the batched form's decisions, NaN -> cancels
    nan = torch.tensor([0.5, float("nan"), 0.2], dtype=torch.float64)
    assert cancels64(nan[None], blocks[1:2]).tolist() == [True] and bool(cancels64(nan, blocks[1]))
    G = torch.cat([C, plain], dim=1)
    ref = torch.cat([w[0] @ C.double(), w[1] @ plain.double()])
    out = torch.empty(8000)
    for b, (blk, piece) in enumerate(zip(torch.split(G, [4000, 4000], 1), out.split(4000))):
        combine64(w[b], blk, out=piece, cancels=bool(cancels64(w[b], blocks[b])))
    assert float((out[:4000].double() - ref[:4000]).norm() / ref[:4000].norm()) < 1e-6


def test_combine64_takes_the_float32_product_only_without_cancellation():
    """``w @ G`` stays a float32 GEMV when the Gramian shows no cancellation, and is
    accumulated in float64 when it does (nearly collinear rows, opposite-sign weights)."""
    from mtl_plugins.core.aggregation._utils import combine64, gramian64
    g = torch.Generator().manual_seed(0)
    G = torch.randn(3, 5000, generator=g)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    assert torch.equal(combine64(w, G, gramian64(G)), w.float() @ G)  # the plain product
    C = nearly_collinear(P=5000)
    wc = torch.tensor([1e3, 2e3, 0.0], dtype=torch.float64)  # rows b and -b/2: cancels
    ref = wc @ C.double()
    fast = wc.float() @ C
    exact = combine64(wc, C, gramian64(C))
    assert float((exact.double() - ref).norm() / ref.norm()) < 1e-6
    assert float((fast.double() - ref).norm() / ref.norm()) > 1e-5  # what float32 would give
    for weights, rows in ((w, G), (wc, C)):  # both paths write into a caller's buffer,
        want = combine64(weights, rows, gramian64(rows))
        buf = torch.full((rows.shape[1],), float("nan"))
        assert combine64(weights, rows, gramian64(rows), out=buf) is buf
        assert torch.equal(buf, want)
        inplace = rows.clone()  # or into a row of G itself, chunk by chunk
        kept = gramian64(inplace)
        assert combine64(weights, inplace, kept, out=inplace[0], chunk=700) is not None
        assert torch.allclose(inplace[0], want, rtol=1e-6, atol=1e-7)
