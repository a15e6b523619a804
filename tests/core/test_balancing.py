"""Loss balancers: hand-computed checks of every method, absent tasks, and state round-trips."""
from __future__ import annotations

import io
import math

import pytest
import torch

from mtl_plugins.core.balancing import (
    BALANCERS,
    FAMO,
    DynamicTaskPrioritization,
    DynamicWeightAverage,
    FixedWeights,
    GeometricLossStrategy,
    GradNorm,
    LossBalancer,
    RandomLossWeighting,
    UncertaintyWeighting,
    build_balancer,
)
from mtl_plugins.core.tasks import MTLConfigError

TASKS = ("seg", "depth", "normal")


def _losses(values, requires_grad=False, dtype=torch.float32):
    return {
        t: torch.tensor(v, dtype=dtype, requires_grad=requires_grad) for t, v in values.items()
    }


# --------------------------------------------------------------------------- registry / build
def test_registry_names():
    assert set(BALANCERS) == {"fixed", "uncertainty", "gradnorm", "dwa", "dtp", "rlw", "gls", "famo"}
    for name, cls in BALANCERS.items():
        b = build_balancer(name, TASKS)
        assert isinstance(b, cls) and isinstance(b, LossBalancer)
        assert b.task_names == TASKS


def test_build_from_dict_and_none():
    b = build_balancer(dict(type="dwa", temperature=3.0), TASKS)
    assert isinstance(b, DynamicWeightAverage) and b.temperature == 3.0
    assert isinstance(build_balancer(None, TASKS), FixedWeights)
    assert isinstance(build_balancer("GradNorm", TASKS), GradNorm)
    built = UncertaintyWeighting(TASKS)
    assert build_balancer(built, TASKS) is built
    with pytest.raises(MTLConfigError, match="built for tasks"):
        build_balancer(built, ("seg",))


def test_build_errors_name_key_value_and_choices():
    with pytest.raises(MTLConfigError) as err:
        build_balancer("magic", TASKS)
    msg = str(err.value)
    assert "balancer" in msg and "'magic'" in msg and "uncertainty" in msg and "famo" in msg
    with pytest.raises(MTLConfigError, match="balancer.*unknown option.*'temp'.*temperature"):
        build_balancer(dict(type="dwa", temp=2.0), TASKS)
    with pytest.raises(MTLConfigError, match="missing key 'type'"):
        build_balancer(dict(temperature=2.0), TASKS)
    with pytest.raises(MTLConfigError, match=r"balancer.alpha=-1"):
        build_balancer(dict(type="gradnorm", alpha=-1), TASKS)
    with pytest.raises(MTLConfigError, match=r"balancer.temperature='2'"):
        build_balancer(dict(type="dwa", temperature="2"), TASKS)
    with pytest.raises(MTLConfigError, match="balancer"):
        build_balancer(3, TASKS)


# --------------------------------------------------------------------------- fixed
def test_fixed_weights_default_dict_list():
    losses = _losses({"seg": 2.0, "depth": 3.0, "normal": 4.0})
    out = FixedWeights(TASKS)(losses)
    assert {t: float(v) for t, v in out.items()} == {"seg": 2.0, "depth": 3.0, "normal": 4.0}
    b = FixedWeights(TASKS, {"seg": 1.0, "depth": 0.5, "normal": 10})
    out = b(losses)
    assert float(out["depth"]) == 1.5 and float(out["normal"]) == 40.0
    assert b.current_weights() == {"seg": 1.0, "depth": 0.5, "normal": 10.0}
    assert FixedWeights(TASKS, [1, 2, 0]).current_weights()["normal"] == 0.0
    assert FixedWeights(TASKS).state_dict() == {}  # config, not checkpoint state


@pytest.mark.parametrize(
    "weights, pattern",
    [
        ({"seg": 1, "depth": 1, "normal": 1, "edge": 2}, r"balancer.weights: unknown task.*'edge'"),
        ({"seg": 1, "depth": 1}, r"balancer.weights=.*missing task.*'normal'"),
        ({"seg": 1, "depth": -0.5, "normal": 1}, r"balancer.weights\['depth'\]=-0.5.*>= 0"),
        ({"seg": float("nan"), "depth": 1, "normal": 1}, r"balancer.weights\['seg'\]=nan.*finite"),
        ({"seg": float("inf"), "depth": 1, "normal": 1}, r"balancer.weights\['seg'\]=inf"),
        ({"seg": "1", "depth": 1, "normal": 1}, r"balancer.weights\['seg'\]='1'"),
        ([1.0, 2.0], r"balancer.weights=\[1.0, 2.0\].*expected 3 values"),
    ],
)
def test_fixed_weights_validation(weights, pattern):
    with pytest.raises(MTLConfigError, match=pattern):
        FixedWeights(TASKS, weights)


def test_unknown_task_in_losses_raises():
    with pytest.raises(MTLConfigError, match="losses.*'edge'"):
        FixedWeights(TASKS)(_losses({"edge": 1.0}))


# --------------------------------------------------------------------------- uncertainty
def test_uncertainty_log_variance_gradient_by_hand():
    b = UncertaintyWeighting(("seg", "depth"), init_log_var={"seg": 0.3, "depth": -0.2},
                             classification_tasks=["seg"])
    losses = _losses({"seg": 2.0, "depth": 0.5}, requires_grad=True)
    out = b(losses)
    total = sum(out.values())
    s_seg, s_depth = 0.3, -0.2
    # classification form exp(-s) L + s/2 ; regression form 0.5 exp(-s) L + s/2
    expected = math.exp(-s_seg) * 2.0 + s_seg / 2 + 0.5 * math.exp(-s_depth) * 0.5 + s_depth / 2
    assert float(total.detach()) == pytest.approx(expected, rel=1e-6)
    total.backward()
    grad = b.log_vars.grad
    assert float(grad[0]) == pytest.approx(-math.exp(-s_seg) * 2.0 + 0.5, rel=1e-6)
    assert float(grad[1]) == pytest.approx(-0.5 * math.exp(-s_depth) * 0.5 + 0.5, rel=1e-6)
    assert float(losses["seg"].grad) == pytest.approx(math.exp(-s_seg), rel=1e-6)
    assert float(losses["depth"].grad) == pytest.approx(0.5 * math.exp(-s_depth), rel=1e-6)
    w = b.current_weights()
    assert w["seg"] == pytest.approx(math.exp(-s_seg), rel=1e-6)
    assert w["depth"] == pytest.approx(0.5 * math.exp(-s_depth), rel=1e-6)


def test_uncertainty_forms_are_kendalls_likelihoods():
    """Regression: 0.5 e^{-s} L + 0.5 s is the Gaussian NLL (Kendall Eq. 7) up to the constant
    0.5 log(2 pi); classification: e^{-s} L + 0.5 s is Kendall Eq. 10's ``L / sigma^2 + log
    sigma`` and, at sigma = 1 (s = 0, where the paper's approximation is exact), the
    scaled-softmax NLL ``-log Softmax(y, f / sigma^2)``."""
    y, f, s = 1.3, 0.4, 0.7
    sigma = math.exp(s / 2)
    b = UncertaintyWeighting(("reg", "cls"), init_log_var=s, classification_tasks=["cls"])
    nll = -torch.distributions.Normal(f, sigma).log_prob(torch.tensor(y)).item()
    out = b({"reg": torch.tensor((y - f) ** 2), "cls": torch.tensor(2.0)})
    assert float(out["reg"]) == pytest.approx(nll - 0.5 * math.log(2 * math.pi), rel=1e-6)
    assert float(out["cls"]) == pytest.approx(2.0 / sigma ** 2 + math.log(sigma), rel=1e-6)
    assert float(out["cls"]) != pytest.approx(math.exp(-s) * 2.0 + s, rel=1e-3)
    logits, label = torch.tensor([0.2, 1.5, -0.3]), 1
    ce = -torch.log_softmax(logits, 0)[label]
    b0 = UncertaintyWeighting(("cls",), init_log_var=0.0, classification_tasks=True)
    assert float(b0({"cls": ce})["cls"]) == pytest.approx(float(ce), rel=1e-6)


def test_uncertainty_regression_default_and_errors():
    b = UncertaintyWeighting(TASKS)
    # default s = -0.5 (MTAN's and LibMTL's initial log-variance): weight 0.5 e^{0.5}
    assert b.current_weights() == pytest.approx({t: 0.5 * math.exp(0.5) for t in TASKS}, rel=1e-6)
    assert b.classification_tasks == ()
    assert UncertaintyWeighting(TASKS, classification_tasks=True, init_log_var=0.0
                                ).current_weights()["seg"] == 1.0
    with pytest.raises(MTLConfigError, match="classification_tasks.*'edge'"):
        UncertaintyWeighting(TASKS, classification_tasks=["edge"])
    with pytest.raises(MTLConfigError, match="classification_tasks='seg'"):
        UncertaintyWeighting(TASKS, classification_tasks="seg")


# --------------------------------------------------------------------------- GradNorm
def _gradnorm_model():
    """Shared W in R^2; L_seg = W.u (||grad|| = 5), L_depth = 0.5 (W.v)^2 (grad (W.v) v)."""
    W = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    u = torch.tensor([3.0, 4.0])
    v = torch.tensor([1.0, 0.0])

    def losses():
        return {"seg": (W * u).sum(), "depth": 0.5 * (W * v).sum() ** 2}

    return W, losses


def test_gradnorm_weight_gradient_by_hand():
    W, make = _gradnorm_model()
    b = GradNorm(("seg", "depth"), alpha=1.5)
    # step 1: L(0) recorded -> r = 1; G = w * ||grad L|| = [5, 1], G_bar = 3 -> targets [3, 3]
    l_grad = b.balance_grads(make(), [W])
    assert float(l_grad) == pytest.approx(4.0)
    assert b.weight_grad.tolist() == pytest.approx([5.0, -1.0])
    assert b.initial_losses.tolist() == pytest.approx([11.0, 0.5])

    # step 2 at new W and new weights; grad accumulates into .grad unless zeroed
    b.weight_grad = None
    with torch.no_grad():
        W.copy_(torch.tensor([0.5, 1.0]))
        b.raw_weights.copy_(torch.tensor([1.2, 0.8]))
    losses = make()  # L = [5.5, 0.125], ||grad L|| = [5, 0.5]
    l_grad = b.balance_grads(losses, [W])
    lt = [5.5 / 11.0, 0.125 / 0.5]
    r = [x / (sum(lt) / 2) for x in lt]
    G = [1.2 * 5.0, 0.8 * 0.5]
    g_bar = sum(G) / 2
    target = [g_bar * ri**1.5 for ri in r]
    expected_l = sum(abs(g - tg) for g, tg in zip(G, target))
    expected_grad = [math.copysign(5.0, G[0] - target[0]), math.copysign(0.5, G[1] - target[1])]
    assert float(l_grad) == pytest.approx(expected_l, rel=1e-5)
    assert b.weight_grad.tolist() == pytest.approx(expected_grad, rel=1e-6)
    # accumulate semantics
    b.balance_grads(make(), [W])
    assert b.weight_grad.tolist() == pytest.approx([2 * g for g in expected_grad])
    # the network loss uses the weights as constants: the balancer has no parameter at all
    assert list(b.parameters()) == []
    W.grad = None
    sum(b(make()).values()).backward()
    assert W.grad.tolist() == pytest.approx((1.2 * torch.tensor([3.0, 4.0]) + 0.8 * 0.5 * torch.tensor([1.0, 0.0])).tolist())


def test_gradnorm_create_graph_equivalence():
    """Our w-gradient equals differentiating ||grad_W(w_t L_t)|| built with create_graph."""
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(4, 3))
    x = torch.randn(5, 3)
    heads = [torch.randn(4), torch.randn(4)]

    def make():
        h = torch.tanh(x @ W.T)
        return {"seg": (h @ heads[0]).pow(2).mean(), "depth": (h @ heads[1]).abs().mean()}

    b = GradNorm(("seg", "depth"), alpha=0.7, init_weights=[1.3, 0.7])
    b.balance_grads(make(), [W])  # records L(0)
    b.weight_grad = None
    with torch.no_grad():
        W.add_(0.1)
    losses = make()
    b.balance_grads(losses, [W])
    ours = b.weight_grad.clone()

    w = b.raw_weights.detach().clone().requires_grad_(True)
    G = []
    for i, t in enumerate(("seg", "depth")):
        (g,) = torch.autograd.grad(w[i] * losses[t], W, retain_graph=True, create_graph=True)
        G.append(g.norm())
    G = torch.stack(G)
    lt = torch.stack([losses[t].detach() for t in ("seg", "depth")]) / b.initial_losses
    r = lt / lt.mean()
    target = (G.mean() * r.pow(0.7)).detach()
    (ref,) = torch.autograd.grad((G - target).abs().sum(), w)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-7)


def test_gradnorm_renormalize_after_optimizer_step():
    W, make = _gradnorm_model()
    b = GradNorm(("seg", "depth"), init_weights=[3.0, 1.0], lr=0.1, optimizer="sgd")
    assert float(b.raw_weights.sum()) == pytest.approx(2.0)
    for _ in range(5):
        b.balance_grads(make(), [W])
        b.after_step({})  # the weights' own SGD step, then the renormalisation
        assert b.weight_grad is None
        assert float(b.raw_weights.sum()) == pytest.approx(2.0, rel=1e-6)
        assert bool((b.raw_weights > 0).all())
    # forward uses normalised weights even if renormalize_ was skipped
    with torch.no_grad():
        b.raw_weights.mul_(3.0)
    assert sum(b.current_weights().values()) == pytest.approx(2.0)


def test_gradnorm_weights_have_their_own_optimizer_and_learning_rate():
    """Issue 11: the weights step with ``balancer.lr`` (Adam by default), not with the model's
    optimizer, learning rate, schedule or weight decay; checked against a hand-computed
    Adam step and a plain SGD step."""
    W, make = _gradnorm_model()
    model_opt = torch.optim.SGD([W], lr=0.5, weight_decay=0.1)  # the model's: other lr
    b = GradNorm(("seg", "depth"), alpha=1.5, lr=0.01)
    assert list(b.parameters()) == []  # nothing a framework optimizer could pick up
    b.balance_grads(make(), [W])  # weight gradient [5, -1] (test above)
    sum(b(make()).values()).backward()
    model_opt.step()
    b.after_step({})
    # Adam's first step is lr * sign(g) (bias-corrected m / sqrt(v) = g / |g|), then w -> 2w/sum
    raw = [1.0 - 0.01 * (5.0 / (5.0 + 1e-8)), 1.0 + 0.01 * (1.0 / (1.0 + 1e-8))]
    expected = [2 * r / sum(raw) for r in raw]
    assert b.raw_weights.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(b.num_updates) == 1.0
    # SGD: w - lr * g exactly
    W, make = _gradnorm_model()
    c = GradNorm(("seg", "depth"), alpha=1.5, lr=0.01, optimizer="sgd")
    c.balance_grads(make(), [W])
    c.after_step({})
    raw = [1.0 - 0.01 * 5.0, 1.0 + 0.01 * 1.0]
    assert c.raw_weights.tolist() == pytest.approx([2 * r / sum(raw) for r in raw], rel=1e-6)
    # a non-finite gradient (AMP overflow) is dropped: weights and Adam state unchanged
    before = {k: v.clone() for k, v in b.state_dict().items()}
    b.weight_grad = torch.tensor([float("inf"), 1.0])
    b.after_step({})
    assert all(torch.equal(before[k], v) or (k == "initial_losses") for k, v in b.state_dict().items())
    with pytest.raises(MTLConfigError, match=r"balancer.lr=0"):
        GradNorm(("seg", "depth"), lr=0)
    with pytest.raises(MTLConfigError, match=r"balancer.optimizer='rmsprop'"):
        GradNorm(("seg", "depth"), optimizer="rmsprop")


def test_gradnorm_resume_restores_the_weights_optimizer():
    """The weights and their Adam moments are buffers: a state_dict round trip mid-run makes
    the next steps identical to the uninterrupted run."""
    def run(b, steps, W, make):
        for i in range(steps):
            with torch.no_grad():
                W.mul_(0.9)
            b.balance_grads(make(), [W])
            b.after_step({})

    W1, make1 = _gradnorm_model()
    a = GradNorm(("seg", "depth"), lr=0.05)
    run(a, 3, W1, make1)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    assert {"raw_weights", "exp_avg", "exp_avg_sq", "num_updates", "initial_losses"} <= set(a.state_dict())
    W2, make2 = _gradnorm_model()
    with torch.no_grad():
        W2.copy_(W1)
    r = GradNorm(("seg", "depth"), lr=0.05)
    r.load_state_dict(torch.load(buf))
    run(a, 2, W1, make1)
    run(r, 2, W2, make2)
    assert torch.equal(a.raw_weights, r.raw_weights) and float(r.num_updates) == 5.0
    fresh = GradNorm(("seg", "depth"), lr=0.05)  # without the moments the path differs
    fresh.load_state_dict({**a.state_dict(), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2),
                           "num_updates": torch.zeros(())})
    W3, make3 = _gradnorm_model()
    with torch.no_grad():
        W3.copy_(W1)
    run(a, 1, W1, make1)
    run(fresh, 1, W3, make3)
    assert not torch.equal(a.raw_weights, fresh.raw_weights)


class _Reordered(torch.nn.Module):
    """Registration order differs from computation order: ``late`` (registered first) is
    computed last, after ``early``; a residual block around ``mid``; two heads."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.late = torch.nn.Linear(4, 4)
        self.mid = torch.nn.Linear(4, 4)
        self.early = torch.nn.Linear(3, 4)
        self.heads = torch.nn.ModuleList([torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)])

    def forward(self, x):
        h = torch.relu(self.early(x))
        h = h + torch.relu(self.mid(h))  # identity shortcut around mid
        z = torch.tanh(self.late(h))
        return {t: head(z).pow(2).mean() for t, head in zip(("seg", "depth"), self.heads)}


def test_gradnorm_last_shared_layer_follows_the_autograd_graph():
    from mtl_plugins.core.balancing.gradnorm import last_shared_layer
    m = _Reordered()
    shared = [p for n, p in m.named_parameters() if not n.startswith("heads")]
    assert shared[-1] is m.early.bias and [p for p in shared if p.dim() > 1][-1] is m.early.weight
    losses = m(torch.randn(5, 3))
    assert last_shared_layer(losses, shared) == [m.late.weight]
    # parallel last layers (an FPN's output convs): both are kept
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    trunk = torch.nn.Linear(3, 3)
    h = trunk(x)
    par = {"seg": a(h).sum(), "depth": (b(h) + a(h)).sum()}
    assert last_shared_layer(par, [b.weight, trunk.weight, a.weight]) == [b.weight, a.weight]
    with pytest.raises(ValueError, match="no task loss depends on a shared weight"):
        last_shared_layer({"seg": torch.ones((), requires_grad=True) * 2}, shared)


def test_controller_gives_gradnorm_the_graph_last_layer():
    from mtl_plugins.core.controller import MTLController
    m = _Reordered()
    ctl = MTLController(("seg", "depth"), balancer=dict(type="gradnorm", lr=0.01))
    shared = [p for n, p in m.named_parameters() if not n.startswith("heads")]
    heads = {"seg": list(m.heads[0].parameters()), "depth": list(m.heads[1].parameters())}
    x = torch.randn(5, 3)
    losses = m(x)
    ctl.backward(losses, shared, heads)
    assert ctl.gradnorm_layer == [m.late.weight]
    # the weight gradient is the one of W = late.weight (not early.weight, registered last)
    ref = GradNorm(("seg", "depth"))
    ref.balance_grads(m(x), [m.late.weight])
    assert torch.allclose(ctl.balancer.weight_grad, ref.weight_grad)
    ctl.after_step({t: v.detach() for t, v in losses.items()})
    assert ctl.balancer.weight_grad is None and float(ctl.balancer.num_updates) == 1.0
    # the chosen layer is in the checkpoint: a resumed controller measures the same one, even
    # if its first step has one task only (which could make another layer look last)
    resumed = MTLController(("seg", "depth"), balancer=dict(type="gradnorm", lr=0.01))
    resumed.load_state_dict(ctl.state_dict())
    resumed.backward({"seg": m(x)["seg"]}, shared, heads)
    assert resumed.gradnorm_layer == [m.late.weight]


def test_a_skipped_step_moves_no_gradnorm_weight():
    """An AMP overflow or an empty step skips the optimizer: GradNorm's own step is dropped
    too (its weights and Adam state stay where they were)."""
    from mtl_plugins.core.controller import MTLController
    m = _Reordered()
    ctl = MTLController(("seg", "depth"), balancer=dict(type="gradnorm", lr=0.01))
    shared = [p for n, p in m.named_parameters() if not n.startswith("heads")]
    heads = {"seg": list(m.heads[0].parameters()), "depth": list(m.heads[1].parameters())}
    losses = m(torch.randn(5, 3))
    ctl.backward(losses, shared, heads)
    before = {k: v.clone() for k, v in ctl.balancer.state_dict().items()}
    ctl.after_step({t: v.detach() for t, v in losses.items()}, stepped=False)
    assert ctl.balancer.weight_grad is None
    for k, v in ctl.balancer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_gradnorm_absent_and_zero_loss_tasks():
    W, make = _gradnorm_model()
    b = GradNorm(("seg", "depth", "normal"))
    l = make()
    l_grad = b.balance_grads({"seg": l["seg"]}, [W])  # one task: target = G -> no gradient
    assert float(l_grad) == 0.0
    assert b.weight_grad.tolist() == [0.0, 0.0, 0.0]
    assert math.isnan(float(b.initial_losses[1]))
    # a zero loss (STA's empty-task guard) is left out; normal absent
    b.weight_grad = None
    l = make()
    b.balance_grads({"seg": l["seg"], "depth": 0.0 * l["depth"]}, [W])
    assert b.weight_grad.tolist() == [0.0, 0.0, 0.0]
    assert math.isnan(float(b.initial_losses[1]))
    b.weight_grad = None
    l = make()
    b.balance_grads(l, [W])
    g = b.weight_grad
    assert float(g[2]) == 0.0 and torch.isfinite(g).all() and float(g[0]) != 0.0


# --------------------------------------------------------------------------- DWA
def test_dwa_weights_after_two_epochs_by_hand():
    b = DynamicWeightAverage(("seg", "depth"), temperature=2.0)
    # epoch 0: seg mean 3, depth mean 1
    for s, d in [(2.0, 1.0), (4.0, 1.0)]:
        assert b.current_weights() == {"seg": 1.0, "depth": 1.0}
        b.after_step(_losses({"seg": s, "depth": d}))
    b.on_epoch_end()
    assert b.current_weights() == {"seg": 1.0, "depth": 1.0}  # still epoch <= 1
    # epoch 1: seg mean 1.5, depth mean 0.9 (depth absent from one step)
    b.after_step(_losses({"seg": 1.0, "depth": 0.9}))
    b.after_step(_losses({"seg": 2.0}))
    b.on_epoch_end()
    r = [1.5 / 3.0, 0.9 / 1.0]
    e = [math.exp(x / 2.0) for x in r]
    expected = [2 * x / sum(e) for x in e]
    w = b.current_weights()
    assert [w["seg"], w["depth"]] == pytest.approx(expected, rel=1e-6)
    assert sum(w.values()) == pytest.approx(2.0)
    out = b(_losses({"seg": 1.0, "depth": 1.0}))
    assert float(out["depth"]) == pytest.approx(expected[1], rel=1e-6)
    b.on_epoch_end()  # an empty epoch changes nothing
    assert b.current_weights() == w


def test_dwa_period_mode_and_absent_task():
    b = DynamicWeightAverage(TASKS, period=2)
    for s in [2.0, 4.0, 1.0, 2.0]:
        b.after_step(_losses({"seg": s, "depth": 1.0}))  # normal never present
    b.on_epoch_end()  # no-op in period mode
    r = [1.5 / 3.0, 1.0, 1.0]  # normal: no average -> neutral ratio 1
    e = [math.exp(x / 2.0) for x in r]
    assert list(b.current_weights().values()) == pytest.approx([3 * x / sum(e) for x in e])
    with pytest.raises(MTLConfigError, match="balancer.period=0"):
        DynamicWeightAverage(TASKS, period=0)


# --------------------------------------------------------------------------- DTP
def test_dtp_weights_by_hand_and_ema():
    b = DynamicTaskPrioritization(TASKS, gamma={"seg": 1.0, "depth": 2.0}, alpha=0.5)
    assert b.current_weights() == {t: 1.0 for t in TASKS}  # no KPI yet
    b.update_kpis({"seg": 0.8, "depth": 0.3})
    w = b.current_weights()
    assert w["seg"] == pytest.approx(-(1 - 0.8) * math.log(0.8), rel=1e-6)
    assert w["depth"] == pytest.approx(-((1 - 0.3) ** 2) * math.log(0.3), rel=1e-6)
    assert w["normal"] == 1.0
    b.update_kpis({"seg": 0.4})  # EMA: 0.5 * 0.4 + 0.5 * 0.8 = 0.6
    assert b.current_weights()["seg"] == pytest.approx(-(0.4) * math.log(0.6), rel=1e-6)
    assert b.current_weights()["seg"] < w["depth"]  # harder task gets more weight
    b.update_kpis({"normal": torch.tensor(1.0)})  # clipped to 1 - eps: finite, ~0
    assert 0.0 <= b.current_weights()["normal"] < 1e-6
    out = b(_losses({"depth": 2.0}))
    assert float(out["depth"]) == pytest.approx(2 * w["depth"], rel=1e-6)


@pytest.mark.parametrize("kpi", [1.5, -0.1, float("nan"), "0.5"])
def test_dtp_kpi_range_errors(kpi):
    b = DynamicTaskPrioritization(TASKS)
    with pytest.raises(ValueError, match=r"kpis\['seg'\].*\[0, 1\]"):
        b.update_kpis({"seg": kpi})
    with pytest.raises(MTLConfigError, match="kpis.*'edge'"):
        b.update_kpis({"edge": 0.5})


# --------------------------------------------------------------------------- RLW
@pytest.mark.parametrize("distribution", ["normal", "uniform", "dirichlet"])
def test_rlw_simplex_and_reproducible(distribution):
    b = RandomLossWeighting(TASKS, distribution=distribution, seed=3)
    draws = []
    for _ in range(4):
        b(_losses({"seg": 1.0, "depth": 1.0, "normal": 1.0}))
        w = torch.tensor(list(b.current_weights().values()))
        assert bool((w >= 0).all()) and float(w.sum()) == pytest.approx(1.0, abs=1e-6)
        draws.append(w)
    assert not torch.allclose(draws[0], draws[1])  # redrawn every step
    state = b.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    later = [b.sample().clone() for _ in range(3)]
    c = RandomLossWeighting(TASKS, distribution=distribution, seed=99)
    c.load_state_dict(torch.load(buf))
    assert torch.allclose(c.task_weights(), draws[-1])
    assert all(torch.equal(c.sample(), x) for x in later)
    # same seed, same sequence; the global RNG is not consumed
    torch.manual_seed(0)
    g0 = torch.get_rng_state()
    d = RandomLossWeighting(TASKS, distribution=distribution, seed=3)
    d(_losses({"seg": 1.0}))
    assert torch.equal(torch.get_rng_state(), g0)
    assert torch.allclose(d.task_weights(), draws[0])


# --------------------------------------------------------------------------- GLS
def test_gls_gradient_equals_geometric_mean_autograd():
    torch.manual_seed(0)
    theta = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def make():
        return {"seg": theta[0].exp() + 0.5, "depth": (theta[1] ** 2 + 0.1), "normal": torch.sigmoid(theta.sum())}

    losses = make()
    out = GeometricLossStrategy(TASKS)(losses)
    total = sum(out.values())
    (ours,) = torch.autograd.grad(total, theta)
    ref_losses = make()
    gm = torch.stack(list(ref_losses.values())).prod() ** (1.0 / 3.0)
    (ref,) = torch.autograd.grad(gm, theta)
    assert float(total.detach()) == pytest.approx(float(gm.detach()), rel=1e-12)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-14)


def test_gls_absent_task_uses_last_known_loss():
    b = GeometricLossStrategy(TASKS)
    b(_losses({"seg": 2.0, "depth": 4.0, "normal": 1.0}))
    x = torch.tensor([3.0, 5.0], dtype=torch.float64, requires_grad=True)
    out = b({"seg": x[0], "depth": x[1]})  # normal absent: its last loss 1.0 is a constant
    (ours,) = torch.autograd.grad(sum(out.values()), x)
    gm = (x[0] * x[1] * 1.0) ** (1.0 / 3.0)
    (ref,) = torch.autograd.grad(gm, x)
    assert torch.allclose(ours.double(), ref, rtol=1e-6)
    # a zero loss (empty-task guard) gets weight 0, nothing is NaN
    out = b(_losses({"seg": 0.0, "depth": 2.0}, requires_grad=True))
    assert float(out["seg"].detach()) == 0.0 and math.isfinite(float(out["depth"].detach()))


# --------------------------------------------------------------------------- FAMO
def test_famo_one_step_by_hand_sgd_and_adam():
    old = {"seg": 2.0, "depth": 0.5}
    new = {"seg": 1.0, "depth": 0.4}
    delta = [math.log(old[t]) - math.log(new[t]) for t in ("seg", "depth")]
    z = [0.5, 0.5]
    zd = sum(a * b for a, b in zip(z, delta))
    grad = [z[i] * (delta[i] - zd) for i in range(2)]  # J_z^T delta at xi = 0
    for opt in ("sgd", "adam"):
        b = FAMO(("seg", "depth"), lr=0.025, weight_decay=1e-3, optimizer=opt)
        losses = _losses(old, requires_grad=True)
        out = b(losses)
        sum(out.values()).backward()
        c = 1.0 / (z[0] / old["seg"] + z[1] / old["depth"])
        assert float(losses["seg"].grad) == pytest.approx(c * z[0] / old["seg"], rel=1e-5)
        assert float(losses["depth"].grad) == pytest.approx(c * z[1] / old["depth"], rel=1e-5)
        assert float(sum(out.values()).detach()) == pytest.approx(c, rel=1e-5)
        b.after_step(_losses(new))
        if opt == "sgd":
            expected = [-0.025 * g for g in grad]  # decay term is 0 at xi = 0
        else:  # Adam's first step: lr * g / (|g| + eps) after bias correction
            expected = [-0.025 * g / (abs(g) + 1e-8) for g in grad]
        assert b.logits.tolist() == pytest.approx(expected, rel=1e-5)
        w = b.current_weights()
        assert w["seg"] < 0.5 < w["depth"]  # seg improved faster -> less weight


def test_famo_second_step_decay_and_next_forward_mode():
    a = FAMO(("seg", "depth"), optimizer="sgd", weight_decay=0.1)
    a(_losses({"seg": 2.0, "depth": 0.5}))
    a.after_step(_losses({"seg": 1.0, "depth": 0.4}))
    xi = a.logits.clone()
    a(_losses({"seg": 1.0, "depth": 0.4}))
    a.after_step(_losses({"seg": 1.0, "depth": 0.4}))  # no change in losses: decay only
    assert torch.allclose(a.logits, xi - 0.025 * 0.1 * xi)
    # next_forward: the update uses consecutive forward calls
    b = FAMO(("seg", "depth"), optimizer="sgd", update="next_forward")
    assert not b.needs_post_step_losses
    c = FAMO(("seg", "depth"), optimizer="sgd")
    assert c.needs_post_step_losses
    b(_losses({"seg": 2.0, "depth": 0.5}))
    b.after_step(_losses({"seg": 2.0, "depth": 0.5}))  # no-op in this mode
    b(_losses({"seg": 1.0, "depth": 0.4}))
    c(_losses({"seg": 2.0, "depth": 0.5}))
    c.after_step(_losses({"seg": 1.0, "depth": 0.4}))
    assert torch.allclose(b.logits, c.logits)


def test_famo_rejects_pre_step_losses():
    b = FAMO(("seg", "depth"))
    losses = _losses({"seg": 2.0, "depth": 0.5}, requires_grad=True)
    b(losses)
    with pytest.raises(RuntimeError, match="same loss tensors"):
        b.after_step({t: l.detach() for t, l in losses.items()})


def test_famo_absent_task():
    b = FAMO(TASKS, optimizer="sgd")
    b(_losses({"seg": 2.0, "depth": 1.0, "normal": 4.0}))
    b.after_step(_losses({"seg": 1.0, "depth": 1.0}))  # normal absent: delta_normal = 0
    assert torch.isfinite(b.logits).all()
    losses = _losses({"depth": 0.5}, requires_grad=True)
    out = b(losses)
    out["depth"].backward()
    z = torch.softmax(b.logits, 0).tolist()
    # c uses the last known losses of the absent tasks (seg 2.0, normal 4.0)
    c = 1.0 / (z[0] / 2.0 + z[1] / 0.5 + z[2] / 4.0)
    assert float(losses["depth"].grad) == pytest.approx(c * z[1] / 0.5, rel=1e-5)


# --------------------------------------------------------------------------- all balancers
def _prime(b: LossBalancer, full: dict) -> None:
    """Run a few steps through every hook so the balancer has non-trivial state."""
    W = torch.nn.Parameter(torch.ones(3))
    for step in range(3):
        losses = {t: v * (1.0 + 0.1 * step) * (W * (i + 1)).sum() / 3 for i, (t, v) in enumerate(full.items())}
        if b.needs_shared_grads:
            b.balance_grads(losses, [W])
        out = b(losses)
        sum(out.values()).backward()
        post = {t: l.detach() * 0.9 for t, l in losses.items()}
        b.after_step(post)
        b.update_kpis({t: 0.5 + 0.1 * i for i, t in enumerate(full)})
        b.on_epoch_end()
    if isinstance(b, UncertaintyWeighting):
        with torch.no_grad():
            for p in b.parameters():
                p.add_(torch.linspace(0.1, 0.3, p.numel()))


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_absent_task_every_balancer(name):
    b = build_balancer(name, TASKS)
    _prime(b, {"seg": 1.0, "depth": 2.0, "normal": 3.0})
    W = torch.nn.Parameter(torch.ones(2))
    losses = {"depth": (W * 2).sum()}
    if b.needs_shared_grads:
        b.balance_grads(losses, [W])
    out = b(losses)
    assert set(out) == {"depth"}
    assert torch.isfinite(out["depth"])
    out["depth"].backward()
    assert torch.isfinite(W.grad).all() and float(W.grad.abs().sum()) > 0
    b.after_step({"depth": out["depth"].detach() * 0.5})
    b.on_epoch_end()
    assert all(math.isfinite(v) for v in b.current_weights().values())
    assert b({}) == {}


STATEFUL = ["uncertainty", "gradnorm", "dwa", "dtp", "rlw", "gls", "famo"]


@pytest.mark.parametrize("name", STATEFUL)
def test_state_dict_round_trip(name):
    full = {"seg": 1.0, "depth": 2.0, "normal": 3.0}
    a = build_balancer(name, TASKS)
    _prime(a, full)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = build_balancer(name, TASKS)
    b.load_state_dict(torch.load(buf))  # weights_only loading works
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and len(sa) > 0
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.allclose(sa[k], sb[k], equal_nan=True), k
    assert a.current_weights() == b.current_weights()
    # and they keep evolving identically
    x = {t: torch.tensor(v * 0.7) for t, v in full.items()}
    oa, ob = a(dict(x)), b(dict(x))
    assert all(torch.allclose(oa[t], ob[t]) for t in x)
    a.after_step({t: v * 0.5 for t, v in x.items()})
    b.after_step({t: v * 0.5 for t, v in x.items()})
    a.on_epoch_end()
    b.on_epoch_end()
    assert a.current_weights() == pytest.approx(b.current_weights())
