"""MultiTaskSegmentor, MTLOptimWrapper and MultiTaskMetric through mmseg's registries."""
import copy
import shutil

import pytest
import torch
from mmengine.config import Config, ConfigDict
from mmengine.structures import PixelData

import mtl_plugins.mmseg  # noqa: F401  (registers everything)
from mtl_plugins.core.tasks import MTLConfigError
from mtl_plugins.mmseg.fields import ALLOC_KEY, IGNORE_VALUES, TASKS_KEY

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL_CFG = ROOT / "configs" / "mmseg" / "_base_" / "models" / "resnet18_tiny_heads.py"


def _model_cfg(**changes):
    cfg = copy.deepcopy(Config.fromfile(str(MODEL_CFG)).model)
    cfg.update(changes)
    return cfg


def _build(cfg=None):
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    torch.manual_seed(0)
    return MODELS.build(ConfigDict(cfg or _model_cfg()))


def _batch(n=4, size=32, alloc=None, flip=False):
    from mmseg.structures import SegDataSample

    g = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for i in range(n):
        inputs.append(torch.randint(0, 255, (3, size, size), generator=g, dtype=torch.uint8))
        ds = SegDataSample()
        ds.gt_sem_seg = PixelData(data=torch.randint(0, 5, (1, size, size), generator=g))
        ds.set_data({"gt_depth_map": PixelData(data=torch.rand(1, size, size, generator=g) + 0.5),
                     "gt_normal_map": PixelData(data=torch.nn.functional.normalize(
                         torch.randn(3, size, size, generator=g), dim=0))})
        meta = dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size),
                    padding_size=[0, 0, 0, 0], flip=flip, flip_direction="horizontal",
                    **{TASKS_KEY: ("seg", "depth", "normal")})
        if alloc is not None:
            meta[ALLOC_KEY] = alloc[i]
        ds.set_metainfo(meta)
        samples.append(ds)
    return dict(inputs=inputs, data_samples=samples)


def test_heads_must_match_tasks_and_seg_loss_must_average_non_ignored():
    with pytest.raises(MTLConfigError, match=r"missing: \['normal'\]"):
        cfg = _model_cfg()
        del cfg.decode_heads["normal"]
        _build(cfg)
    with pytest.raises(MTLConfigError, match=r"unknown task name\(s\) \['edges'\]"):
        _build(_model_cfg(tasks=["seg", "edges"]))
    cfg = _model_cfg()
    cfg.decode_heads.seg.loss_decode.avg_non_ignore = False
    with pytest.raises(MTLConfigError, match="avg_non_ignore=True"):
        _build(cfg)


def test_parse_losses_groups_by_task_and_splits_parameters():
    model = _build()
    data = model.data_preprocessor(_batch(), training=True)
    losses = model(**data, mode="loss")
    assert all(k.split(".")[0] in ("seg", "depth", "normal") for k in losses)
    task_losses, log_vars = model.parse_losses(losses)
    assert set(task_losses) == {"seg", "depth", "normal"}
    assert log_vars["loss"].item() == pytest.approx(task_losses.total().item(), rel=1e-6)
    shared, task_params = task_losses.shared_params, task_losses.task_params
    ids = [id(p) for p in shared] + [id(p) for ps in task_params.values() for p in ps]
    assert len(ids) == len(set(ids)) == len([p for p in model.parameters() if p.requires_grad])
    assert {id(p) for p in model.backbone.parameters()} <= {id(p) for p in shared}
    assert len(task_losses.features) == 1 and task_losses.features[0].requires_grad


def test_allocation_masks_labels_so_losses_pool_over_allocated_samples():
    model = _build()
    model.decode_heads.eval()  # batch-norm statistics of a subset differ from the batch's
    alloc = [("seg",), ("depth", "normal"), ("seg", "depth"), ("normal",)]
    data = model.data_preprocessor(_batch(alloc=alloc), training=True)
    losses = model(**data, mode="loss")
    # reference: each head's loss on the allocated samples only
    x = model.extract_feat(data["inputs"])
    for task, key, idx in (("seg", "loss_ce", [0, 2]), ("depth", "loss_depth", [1, 2]),
                           ("normal", "loss_normal", [1, 3])):
        sub = [data["data_samples"][i] for i in idx]
        ref = model.decode_heads[task].loss([f[idx] for f in x], sub, None)[key]
        assert losses[f"{task}.{key}"].item() == pytest.approx(ref.item(), rel=1e-5), task
    # the masked copies share the samples' metainfo and leave the samples as they were
    samples = data["data_samples"]
    before = [(dict(ds.metainfo), ds.gt_depth_map.data.clone()) for ds in samples]
    masked = model._masked_samples(samples, "depth", [False, True, True, False])
    assert masked[1] is samples[1] and masked[0] is not samples[0]
    assert dict(masked[0].metainfo) == before[0][0]
    assert torch.equal(masked[0].gt_sem_seg.data, samples[0].gt_sem_seg.data)
    assert (masked[0].gt_depth_map.data == IGNORE_VALUES["depth"]).all()
    assert (masked[3].gt_depth_map.data == IGNORE_VALUES["depth"]).all()
    for ds, (meta, depth) in zip(samples, before):
        assert dict(ds.metainfo) == meta and torch.equal(ds.gt_depth_map.data, depth)
    # a task allocated to no sample is absent from the losses
    data = model.data_preprocessor(_batch(alloc=[("seg",)] * 4), training=True)
    task_losses, _ = model.parse_losses(model(**data, mode="loss"))
    assert set(task_losses) == {"seg"}


def test_predict_fills_every_task_and_undoes_flips():
    model = _build().eval()
    data = model.data_preprocessor(_batch(n=2), training=False)
    flipped = model.data_preprocessor(_batch(n=2, flip=True), training=False)
    with torch.no_grad():
        out = model(**data, mode="predict")
        preds = model.encode_decode(flipped["inputs"], [d.metainfo for d in flipped["data_samples"]])
        restored = model.postprocess_multi(preds, None, [d.metainfo for d in flipped["data_samples"]])
    assert out[0].pred_sem_seg.data.shape == (1, 32, 32)
    assert out[0].pred_depth_map.data.shape == (1, 32, 32)
    normals = out[0].pred_normal_map.data
    assert normals.shape == (3, 32, 32)
    assert torch.allclose(normals.norm(dim=0), torch.ones(32, 32), atol=1e-4)
    raw = torch.nn.functional.normalize(preds["normal"][0], dim=0)
    assert torch.allclose(restored[0].pred_normal_map.data[0], -raw[0].flip(-1), atol=1e-5)
    assert torch.allclose(restored[0].pred_normal_map.data[1], raw[1].flip(-1), atol=1e-5)


def _wrapper(model, **mtl):
    from mmseg.registry import OPTIM_WRAPPERS

    mtl.setdefault("tasks", ["seg", "depth", "normal"])
    return OPTIM_WRAPPERS.build(dict(type="MTLOptimWrapper", mtl=mtl,
                                     optimizer=torch.optim.SGD(model.parameters(), lr=0.01)))


def _train_step(model, wrapper, alloc=None):
    data = model.data_preprocessor(_batch(alloc=alloc), training=True)
    losses, _ = model.parse_losses(model(**data, mode="loss"))
    wrapper.update_params(losses)
    return losses


def test_wrapper_trains_uncertainty_with_pcgrad_and_checkpoints_its_state():
    model = _build()
    wrapper = _wrapper(model, balancer="uncertainty", aggregator="pcgrad")
    log_vars = wrapper.controller.balancer.log_vars
    assert any(log_vars is p for g in wrapper.optimizer.param_groups for p in g["params"])
    before = model.backbone.stem[0].weight.detach().clone()
    _train_step(model, wrapper)
    assert not torch.equal(before, model.backbone.stem[0].weight)
    assert not torch.equal(log_vars.detach(), torch.zeros(3))
    assert all(p.grad is None for p in model.parameters())
    state = wrapper.state_dict()
    assert "mtl" in state
    other = _wrapper(_build(), balancer="uncertainty", aggregator="pcgrad")
    other.load_state_dict(copy.deepcopy(state))
    assert torch.equal(other.controller.balancer.log_vars, log_vars)
    assert wrapper.last_result.cosines().shape == (3, 3)


def test_wrapper_divides_the_task_losses_by_the_loss_factor_only_under_accumulation():
    """With ``accumulative_counts=2`` (plain summed loss: gradients accumulate) each task's
    loss is halved, as mmengine's ``scale_loss`` halves a summed loss, so two micro-batches
    give the gradient of their mean; with 1 the losses go to the controller as they are (no
    ``loss / 1`` op per task)."""
    from mmseg.registry import OPTIM_WRAPPERS

    seen = []
    for counts in (1, 2):
        model = _build()
        wrapper = OPTIM_WRAPPERS.build(dict(
            type="MTLOptimWrapper", mtl=dict(tasks=["seg", "depth", "normal"]),
            accumulative_counts=counts,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.01)))
        backward = wrapper.controller.backward

        def record(losses, *args, _backward=backward, **kwargs):
            seen.append({t: float(v) for t, v in losses.items()})
            return _backward(losses, *args, **kwargs)

        wrapper.controller.backward = record
        raw = {t: float(v) for t, v in _train_step(model, wrapper).items()}
        assert seen[-1] == pytest.approx({t: v / counts for t, v in raw.items()}, rel=1e-6)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_wrapper_fused_gramian_kernel_gives_the_blas_step():
    """``optim_wrapper.mtl.gramian_kernel='fused'`` reaches the engine and acts (its Gramian
    comes from the compiled kernel) with the same update as the default BLAS kernel."""
    weights = {}
    for kernel in ("blas", "fused"):
        model = _build()
        wrapper = _wrapper(model, aggregator="pcgrad", gramian_kernel=kernel)
        assert wrapper.controller.engine.gramian_kernel == kernel
        _train_step(model, wrapper)
        weights[kernel] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, w in weights["blas"].items():
        assert torch.allclose(weights["fused"][n], w, rtol=1e-5, atol=1e-7), n
    with pytest.raises(MTLConfigError, match=r"optim_wrapper\.mtl\.gramian_kernel='gemm': "
                                             r"expected one of \['auto', 'blas', 'c', 'fused'\]"):
        _wrapper(_build(), aggregator="pcgrad", gramian_kernel="gemm")
    with pytest.raises(MTLConfigError, match=r"optim_wrapper\.mtl\.gramian_kernel='fused' "
                                             r"with no aggregator"):
        _wrapper(_build(), gramian_kernel="fused")


def test_wrapper_config_errors_name_the_key():
    model = _build()
    with pytest.raises(MTLConfigError, match=r"optim_wrapper.mtl: unknown key\(s\) \['aggregate'\]"):
        _wrapper(model, aggregate="pcgrad")
    with pytest.raises(MTLConfigError, match="update='next_forward'"):
        _wrapper(model, balancer="famo")
    wrapper = _wrapper(model, tasks=["seg", "depth"])
    with pytest.raises(MTLConfigError, match="does not match the model's tasks"):
        _train_step(model, wrapper)
    wrapper = _wrapper(model, allocation=dict(mode="sta"))
    with pytest.raises(MTLConfigError, match="MTLIterBasedTrainLoop"):
        _train_step(model, wrapper)
    with pytest.raises(MTLConfigError, match="MultiTaskSegmentor"):
        _wrapper(model).update_params(torch.tensor(1.0, requires_grad=True))


def test_nan_loss_is_named_and_weights_untouched():
    model = _build()
    wrapper = _wrapper(model, aggregator="mgda")
    data = model.data_preprocessor(_batch(), training=True)
    losses, _ = model.parse_losses(model(**data, mode="loss"))
    losses["depth"] = losses["depth"] * float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="'depth'"):
        wrapper.update_params(losses)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_joint_decoder_trains_its_auxiliary_tasks_through_the_wrapper():
    """PAD-Net on a ResNet-18 (all four stages): final seg + depth, auxiliary normals."""
    cfg = _model_cfg()
    del cfg["decode_heads"]
    cfg.tasks = ["seg", "depth"]
    cfg.backbone.out_indices = (0, 1, 2, 3)
    cfg.decoder = dict(type="PADNetHead", tasks=("seg", "depth"), aux_tasks=("normal",),
                       num_classes=5, in_channels=(16, 32, 64, 128), in_index=(0, 1, 2, 3),
                       channels=8, head_planes=4)
    model = _build(cfg)
    assert model.tasks == ("seg", "depth") and set(model.loss_tasks) == {"seg", "depth", "normal"}
    with pytest.raises(MTLConfigError, match="does not match the model's tasks"):
        _train_step(model, _wrapper(model, tasks=["seg", "depth"]))
    model.zero_grad(set_to_none=True)
    wrapper = _wrapper(model, tasks=list(model.loss_tasks), aggregator="mgda")
    losses = _train_step(model, wrapper)
    assert set(losses) == {"seg", "depth", "normal"}
    assert wrapper.last_result.tasks == list(model.loss_tasks)
    model.eval()
    with torch.no_grad():
        out = model(**model.data_preprocessor(_batch(n=1), training=False), mode="predict")
    assert "pred_normal_map" not in out[0] and out[0].pred_depth_map.data.shape == (1, 32, 32)
