"""No silent no-op (issue 10): a configured method that does not act stops the run."""
import pytest
import torch

from mtl_plugins.core.allocation import masked_task_mean
from mtl_plugins.core.backward import split_parameters
from mtl_plugins.core.controller import MTLController
from mtl_plugins.core.tasks import MTLConfigError

from ._engine_models import TASKS, TinyMTL, batch


def _losses(model, x, y):
    _, out = model(x)
    mask = torch.ones(x.shape[0], len(TASKS), dtype=torch.bool)
    return {t: masked_task_mean((o - y[:, i]) ** 2, mask[:, i]) for i, (t, o) in enumerate(out.items())}


def _train(ctl, steps, *, bypass=False, balancer_in_optimizer=True, stepped=True, seed=0):
    """``steps`` optimizer steps of TinyMTL; ``bypass``: an adapter that balances the losses
    but runs one summed backward itself (never the controller's engine)."""
    torch.manual_seed(seed)
    model = TinyMTL()
    params = list(model.parameters())
    if balancer_in_optimizer:
        params += [p for p in ctl.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    for i in range(steps):
        x, y = batch(n=8, seed=i)
        losses = _losses(model, x, y)
        shared, heads = split_parameters(model.encoder, model.heads)
        if bypass:
            sum(ctl.balanced_losses(losses, shared).values()).backward()
        else:
            ctl.backward(losses, shared, heads)
        if stepped:
            opt.step()
        opt.zero_grad(set_to_none=True)
        ctl.after_step({t: v.detach() for t, v in losses.items()}, stepped=stepped)
    return model


def test_an_aggregator_that_the_step_bypasses_stops_the_run_at_the_deadline():
    ctl = MTLController(TASKS, aggregator="pcgrad", check_exercised=3)
    ctl.config_keys = {"balancer": "MTL.BALANCER", "aggregator": "MTL.AGGREGATOR",
                       "check_exercised": "MTL.CHECK_EXERCISED"}
    _train(ctl, 2, bypass=True)  # before the deadline: nothing yet
    with pytest.raises(MTLConfigError, match=r"first 3 optimizer steps.*MTL\.AGGREGATOR=PCGrad: "
                       r"the backward engine never aggregated.*MTL\.CHECK_EXERCISED=0"):
        _train(ctl, 1, bypass=True)


def test_an_aggregator_that_acts_passes_and_is_not_checked_again():
    ctl = MTLController(TASKS, aggregator="pcgrad", check_exercised=3)
    _train(ctl, 3)
    assert not ctl.exercise.pending
    _train(ctl, 3, bypass=True)  # past the window: no check any more


def test_learnable_weights_that_no_optimizer_updates_stop_the_run():
    ctl = MTLController(TASKS, balancer="uncertainty", check_exercised=2)
    with pytest.raises(MTLConfigError, match=r"balancer=UncertaintyWeighting: its learnable "
                       r"weights did not change; no optimizer updated them"):
        _train(ctl, 2, balancer_in_optimizer=False)
    ok = MTLController(TASKS, balancer="uncertainty", check_exercised=2)
    _train(ok, 4)


def test_frozen_learnable_weights_are_checked_as_computed_weights():
    ctl = MTLController(TASKS, balancer="uncertainty", check_exercised=2)
    ctl.balancer.log_vars.requires_grad_(False)
    with pytest.raises(MTLConfigError, match="its task weights did not change"):
        _train(ctl, 2)


def test_dwa_is_checked_when_its_second_period_closes():
    ctl = MTLController(TASKS, balancer=dict(type="dwa", period=3), check_exercised=2)
    _train(ctl, 6)  # weights move at step 6 = 2 periods
    assert not ctl.exercise.pending
    assert ctl.current_weights() != {t: 1.0 for t in TASKS}


def test_computed_weights_that_did_not_move_while_the_losses_moved_stop_the_run(monkeypatch):
    ctl = MTLController(TASKS, balancer=dict(type="dwa", period=1), check_exercised=1)
    monkeypatch.setattr(ctl.balancer, "_close_period", lambda: None)  # a DWA that never closes
    with pytest.raises(MTLConfigError, match=r"balancer=DynamicWeightAverage: its task weights "
                       r"did not change; expected them to move within 2 steps"):
        _train(ctl, 2)


def test_constant_losses_excuse_computed_weights():
    ctl = MTLController(TASKS, balancer=dict(type="dwa", period=1), check_exercised=1)
    losses = {t: torch.tensor(1.0) for t in TASKS}
    for _ in range(3):
        ctl.balanced_losses(losses, [])
        ctl.after_step(losses)
    assert not ctl.exercise.pending


def test_skipped_steps_do_not_count():
    ctl = MTLController(TASKS, aggregator="pcgrad", check_exercised=2)
    _train(ctl, 5, bypass=True, stepped=False)  # AMP overflow / empty steps only
    assert ctl.exercise.count == 0 and ctl.exercise.pending


@pytest.mark.parametrize("balancer", ["rlw", "gls", dict(type="famo", update="next_forward"),
                                      "gradnorm"])
def test_every_balancer_with_a_deadline_acts_in_a_normal_run(balancer):
    ctl = MTLController(TASKS, balancer=balancer, check_exercised=3)
    _train(ctl, 3)
    assert not ctl.exercise.pending


def test_the_count_survives_resume_and_old_checkpoints_are_not_rechecked():
    ctl = MTLController(TASKS, aggregator="pcgrad", check_exercised=4)
    _train(ctl, 2)
    resumed = MTLController(TASKS, aggregator="pcgrad", check_exercised=4)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.exercise.count == 2
    _train(resumed, 1, bypass=True)
    with pytest.raises(MTLConfigError, match="first 4 optimizer steps"):
        _train(resumed, 1, bypass=True)  # checked at the same step as without the resume
    state = ctl.state_dict()
    extra = state["_extra_state"]
    state["_extra_state"] = {k: v for k, v in extra.items() if k != "exercise"}
    old = MTLController(TASKS, aggregator="pcgrad", check_exercised=4)
    old.load_state_dict(state)
    _train(old, 5, bypass=True)  # a run from before the check: past any window


def test_check_exercised_must_be_a_count():
    with pytest.raises(MTLConfigError, match=r"check_exercised=-1: expected a non-negative"):
        MTLController(TASKS, check_exercised=-1)
    ctl = MTLController(TASKS, aggregator="pcgrad", check_exercised=0)
    _train(ctl, 3, bypass=True)
