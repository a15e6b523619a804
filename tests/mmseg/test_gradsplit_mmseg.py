"""GradSplit through the mmseg adapter: the example config splits every conv of the
backbone's last stage (paper 000 §3.1), DropGrad and separate per-task optimizer states
(paper 000 §4.1) from ``optim_wrapper.mtl.gradsplit``, checkpointed with the optimizer."""
import copy
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from torch import nn

import mtl_plugins.mmseg  # noqa: F401  (registers everything)
from mtl_plugins.core.structure import GradSplit
from mtl_plugins.core.structure.separate_optim import STATE_KEY

from .test_segmentor import _batch, _build

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "mmseg" / "synthetic"


def _wrapper(model, path, optimizer="Adam"):
    from mmseg.registry import OPTIM_WRAPPERS

    cfg = Config.fromfile(str(CONFIGS / path))
    wrapper = dict(cfg.optim_wrapper)
    opt = dict(wrapper.pop("optimizer"))
    opt.pop("type")
    wrapper["optimizer"] = getattr(torch.optim, optimizer)(model.parameters(), **opt)
    return OPTIM_WRAPPERS.build(wrapper), cfg


def _step(model, wrapper, alloc=None):
    data = model.data_preprocessor(_batch(alloc=alloc), training=True)
    losses, _ = model.parse_losses(model(**data, mode="loss"))
    wrapper.update_params(losses)


@pytest.mark.parametrize("path", ["mtl_gradsplit.py", "mtl_dropgrad.py"])
def test_example_splits_every_conv_of_layer4(path):
    model = _build()
    wrapper, cfg = _wrapper(model, path)
    _step(model, wrapper)
    agg = wrapper.controller.aggregator
    assert isinstance(agg, GradSplit) and agg.record_task_rows
    want = {f"backbone.layer4.{n}" for n, m in model.backbone.layer4.named_modules()
            if isinstance(m, nn.Conv2d)}
    assert len(want) == 2 * 2 + 1  # conv1, conv2 of 2 basic blocks + the downsample conv
    assert set(agg.layout.modules) == want
    assert (agg.drop_rate is not None) == (path == "mtl_dropgrad.py")


def test_separate_optimizer_states_per_task_and_resume():
    model = _build()
    model.decode_heads.eval()
    wrapper, _ = _wrapper(model, "mtl_gradsplit.py")
    _step(model, wrapper)                          # every task
    _step(model, wrapper, alloc=[("depth",)] * 4)  # depth only: only depth's optimizer steps
    opt = wrapper.optimizer
    params = dict(model.named_parameters())
    conv = opt.state[params["backbone.layer4.1.conv2.weight"]][STATE_KEY]
    assert {t: int(conv[t]["step"]) for t in conv} == {"seg": 1, "depth": 2, "normal": 1}
    head = [n for n in params if n.startswith("decode_heads.seg.")][0]
    assert set(opt.state[params[head]][STATE_KEY]) == {"seg"}
    # the per-task states are in the optimizer's state dict: a fresh wrapper resumes them
    state = copy.deepcopy(wrapper.state_dict())  # (tensors are shared otherwise)
    model2 = _build()
    model2.load_state_dict(model.state_dict())
    model2.decode_heads.eval()
    wrapper2, _ = _wrapper(model2, "mtl_gradsplit.py")
    wrapper2.load_state_dict(state)
    params2 = dict(model2.named_parameters())
    conv2 = wrapper2.optimizer.state[params2["backbone.layer4.1.conv2.weight"]][STATE_KEY]
    torch.testing.assert_close(conv2["depth"]["exp_avg"], conv["depth"]["exp_avg"])
    _step(model, wrapper, alloc=[("seg",)] * 4)
    _step(model2, wrapper2, alloc=[("seg",)] * 4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, params2[n], msg=n)
