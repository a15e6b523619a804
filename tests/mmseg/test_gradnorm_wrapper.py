"""GradNorm through MTLOptimWrapper: ``optim_wrapper.mtl.balancer=dict(type='gradnorm', lr=...)``
steps the weights with their own optimizer (not mmengine's, so no LR schedule or weight
decay), on the last shared layer of the graph, and the wrapper's checkpoint resumes it."""
import copy

import pytest
import torch

from .test_segmentor import _build, _train_step, _wrapper


def test_wrapper_gradnorm_own_lr_layer_and_resume():
    model = _build()
    wrapper = _wrapper(model, balancer=dict(type="gradnorm", lr=0.02))
    balancer = wrapper.controller.balancer
    optimized = {id(p) for g in wrapper.optimizer.param_groups for p in g["params"]}
    assert len(wrapper.optimizer.param_groups) == 1  # no extra group: nothing to add
    assert not any(id(t) in optimized for t in balancer.buffers())
    before = balancer.raw_weights.clone()
    _train_step(model, wrapper)
    layer = wrapper.controller.gradnorm_layer
    names = {id(p): n for n, p in model.named_parameters()}
    assert layer and all(names[id(p)].startswith("backbone.") for p in layer)
    assert float(balancer.num_updates) == 1.0
    assert float((balancer.raw_weights - before).abs().max()) == pytest.approx(0.02, rel=0.5)
    state = copy.deepcopy(wrapper.state_dict())
    assert {"balancer.raw_weights", "balancer.exp_avg", "balancer.exp_avg_sq",
            "balancer.num_updates"} <= set(state["mtl"])
    other_model = _build()
    other_model.load_state_dict(model.state_dict())
    other = _wrapper(other_model, balancer=dict(type="gradnorm", lr=0.02))
    other.load_state_dict(state)
    _train_step(model, wrapper)
    _train_step(other_model, other)
    assert torch.allclose(other.controller.balancer.raw_weights, balancer.raw_weights, atol=1e-6)
    assert torch.equal(other.controller.balancer.num_updates, balancer.num_updates)
