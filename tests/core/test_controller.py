"""Allocation, balancing and aggregation composed by MTLController; its state round-trips."""
import io

import pytest
import torch

from mtl_plugins.core.allocation import masked_task_mean
from mtl_plugins.core.backward import split_parameters
from mtl_plugins.core.controller import MTLController
from mtl_plugins.core.tasks import MTLConfigError

from ._engine_models import TASKS, TinyMTL, batch


def _per_sample(model, x, y):
    z, out = model(x)
    return z, {t: (o - y[:, i]) ** 2 for i, (t, o) in enumerate(out.items())}


def _step(controller, model, opt, x, y):
    n = controller.start_batch(x.shape[0])
    for _ in range(n):
        mask = controller.next_mask()
        z, per = _per_sample(model, x, y)
        losses = {t: masked_task_mean(per[t], mask[:, i]) for i, t in enumerate(TASKS)
                  if mask[:, i].any()}
        shared, heads = split_parameters(model.encoder, model.heads)
        result = controller.backward(losses, shared, heads, features=z)
        if not result.found_inf:
            opt.step()
        opt.zero_grad(set_to_none=True)
        controller.after_step(losses)
    return n


def test_uncertainty_with_pcgrad_under_sta_gives_the_hand_gradient():
    model = TinyMTL()
    ctl = MTLController(TASKS, allocation=dict(mode="sta", k=1, seed=0), balancer="uncertainty",
                        aggregator="pcgrad")
    x, y = batch(n=16)
    ctl.start_batch(16)
    mask = ctl.next_mask()
    z, per = _per_sample(model, x, y)
    losses = {t: masked_task_mean(per[t], mask[:, i]) for i, t in enumerate(TASKS)}
    shared, heads = split_parameters(model.encoder, model.heads)
    ctl.backward(losses, shared, heads)
    s = ctl.balancer.log_vars.detach()
    # d/ds [0.5 exp(-s) L + 0.5 s] = 0.5 - 0.5 exp(-s) L  (regression form)
    expected = torch.stack([0.5 - 0.5 * torch.exp(-s[i]) * losses[t].detach()
                            for i, t in enumerate(TASKS)])
    assert torch.allclose(ctl.balancer.log_vars.grad, expected, atol=1e-6)
    head = heads["depth"][0]
    w = 0.5 * torch.exp(-s[1])
    ref, = torch.autograd.grad(w * masked_task_mean(_per_sample(model, x, y)[1]["depth"], mask[:, 1]),
                               [head])
    assert torch.allclose(head.grad, ref, atol=1e-6)


def test_task_reduction_mean_divides_by_T():
    x, y = batch()
    grads = {}
    for reduction in ("sum", "mean"):
        model = TinyMTL()
        ctl = MTLController(TASKS, aggregator="mean", task_reduction=reduction)
        z, per = _per_sample(model, x, y)
        losses = {t: v.mean() for t, v in per.items()}
        shared, heads = split_parameters(model.encoder, model.heads)
        ctl.backward(losses, shared, heads)
        grads[reduction] = model.heads["seg"][0].weight.grad.clone()
    assert torch.allclose(grads["mean"] * 3, grads["sum"], atol=1e-7)


def test_gradnorm_with_surgery_updates_and_renormalises_its_weights():
    model = TinyMTL()
    ctl = MTLController(TASKS, balancer=dict(type="gradnorm", alpha=1.5), aggregator="mgda")
    opt = torch.optim.SGD(list(model.parameters()) + list(ctl.parameters()), lr=0.05)
    x, y = batch()
    before = ctl.balancer.raw_weights.clone()
    for _ in range(3):
        _step(ctl, model, opt, x, y)
    after = ctl.balancer.raw_weights
    assert not torch.allclose(before, after)
    assert after.sum().item() == pytest.approx(3.0, abs=1e-5)


@pytest.mark.parametrize("aggregator,level", [("pcgrad", "parameter"), ("mgda", "representation")])
def test_state_round_trip_reproduces_the_next_steps(aggregator, level):
    x, y = batch(n=8)

    def make():
        model = TinyMTL()
        ctl = MTLController(TASKS, allocation=dict(mode="ista", k=1, seed=3),
                            balancer="uncertainty", aggregator=aggregator, level=level,
                            amp=dict(init_scale=256.0, growth_interval=2))
        opt = torch.optim.SGD(list(model.parameters()) + list(ctl.parameters()), lr=0.05)
        return model, ctl, opt

    model, ctl, opt = make()
    _step(ctl, model, opt, x, y)
    # stop in the middle of the next ISTA batch
    ctl.start_batch(8)
    ctl.next_mask()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "ctl": ctl.state_dict(), "opt": opt.state_dict()}, buf)
    saved_scale = ctl.loss_scaler.scale
    rest = [ctl.next_mask(), ctl.next_mask()]
    _step(ctl, model, opt, x, y)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model2, ctl2, opt2 = make()
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2.load_state_dict(saved["model"])
    ctl2.load_state_dict(saved["ctl"])
    opt2.load_state_dict(saved["opt"])
    assert ctl2.loss_scaler.scale == saved_scale != 256.0
    assert torch.equal(ctl2.next_mask(), rest[0]) and torch.equal(ctl2.next_mask(), rest[1])
    _step(ctl2, model2, opt2, x, y)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert torch.equal(ctl2.balancer.log_vars, ctl.balancer.log_vars)


def test_nan_loss_and_bad_config_are_named():
    model = TinyMTL()
    ctl = MTLController(TASKS, aggregator="pcgrad")
    x, y = batch()
    _, per = _per_sample(model, x, y)
    losses = {t: v.mean() for t, v in per.items()}
    losses["seg"] = losses["seg"] * float("nan")
    shared, heads = split_parameters(model.encoder, model.heads)
    with pytest.raises(FloatingPointError, match="'seg'"):
        ctl.backward(losses, shared, heads)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(MTLConfigError, match=r"allocation: unknown key\(s\) \['size'\]"):
        MTLController(TASKS, allocation=dict(mode="sta", size=1))
    with pytest.raises(MTLConfigError, match="task_reduction='avg'"):
        MTLController(TASKS, task_reduction="avg")
