"""GradNorm under detectron2's R50-FPN: the last shared layer found in the autograd graph (the
FPN output convolutions, not the last registered ``bottom_up.res5.2.conv3``), its own learning
rate from ``MTL.BALANCER_ARGS`` and its own optimizer (not the trainer's)."""
import pytest
import torch

from .conftest import make_cfg
from .test_trainer import _trainer


def test_gradnorm_on_r50_fpn_picks_the_fpn_outputs_and_steps_its_own_weights(shapes_dataset):
    cfg = make_cfg(BALANCER="gradnorm", BALANCER_ARGS={"lr": 0.01})
    trainer, steps = _trainer(cfg, shapes_dataset)
    model, ctl = trainer.model, trainer.controller
    names = {id(p): n for n, p in model.named_parameters()}
    shared_weights = [names[id(p)] for p in trainer.shared_params if p.dim() > 1]
    assert shared_weights[-1] == "backbone.bottom_up.res5.2.conv3.weight"  # the old choice
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(t) in optimized for t in ctl.balancer.buffers())
    assert ctl.balancer.lr == 0.01 and list(ctl.balancer.parameters()) == []
    before = ctl.balancer.raw_weights.clone()
    trainer.train(0, 1)
    assert len(steps) == 1
    picked = [names[id(p)] for p in ctl.gradnorm_layer]
    assert picked == [f"backbone.fpn_output{k}.weight" for k in (2, 3, 4, 5)]
    # one Adam step of lr 0.01 on the weights (then renormalised), whatever the model's LR
    assert float(ctl.balancer.num_updates) == 1.0
    moved = (ctl.balancer.raw_weights - before).abs()
    assert float(moved.max()) == pytest.approx(0.01, rel=0.05) and cfg.SOLVER.BASE_LR == 0.001
    assert float(ctl.balancer.raw_weights.sum()) == pytest.approx(2.0, rel=1e-6)


def test_gradnorm_lr_error_names_the_d2_key():
    from mtl_plugins.core.tasks import MTLConfigError
    from mtl_plugins.d2 import build_mtl_controller

    with pytest.raises(MTLConfigError, match=r"MTL.BALANCER_ARGS.lr=-1"):
        build_mtl_controller(make_cfg(BALANCER="gradnorm", BALANCER_ARGS={"lr": -1}))


def test_model_side_gradnorm_equals_the_trainer_side_step(shapes_dataset):
    """ModelSideMTLRCNN under detectron2's SimpleTrainer: GradNorm's weights (buffers, not in
    the SimpleTrainer's optimizer) take the same step as with MTLTrainer; the model-side step
    finishes at the next forward or when the state is read (checkpoint)."""
    from .test_model_side import _models, _mtl, _params, _simple

    side, ref, batch, cfg = _models(make_cfg(BALANCER="gradnorm", BALANCER_ARGS={"lr": 0.01}),
                                    shapes_dataset)
    _simple(side, [batch], 1)
    trainer = _mtl(ref, [batch], cfg, 1)
    got, want = _params(side), _params(ref)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-6, msg=name)
    side_state = {k[len("mtl_controller.balancer."):]: v for k, v in side.state_dict().items()
                  if k.startswith("mtl_controller.balancer.")}
    ref_state = trainer.controller.balancer.state_dict()
    assert float(ref_state["num_updates"]) == 1.0
    for k, v in ref_state.items():
        torch.testing.assert_close(side_state[k], v, rtol=1e-5, atol=1e-7, msg=k)
