"""GradSplit, Maximum Roaming and Recon through the mmseg adapter: from a config, through the
MTL optimizer wrapper and the segmentor, and end to end through mmseg's tools/train.py
(checkpoint, --resume)."""
import copy
import json

import pytest
import torch

import mtl_plugins.mmseg  # noqa: F401  (registers everything)
from mtl_plugins.core.structure import ConflictRecorder, GradSplit, MaximumRoaming
from mtl_plugins.core.tasks import MTLConfigError

from .test_segmentor import _batch, _build, _model_cfg, _wrapper
from .test_train_tools import CONFIGS, SMALL, _run, _tool

TASKS = ("seg", "depth", "normal")
CONV = "backbone.layer4.1.conv2"  # 128 filters: 42 per task, 2 shared


def _step(model, wrapper, alloc=None, grads=None):
    """One train step; ``grads``: a dict filled with the .grad of every parameter just before
    the optimizer step (the wrapper zeroes them after)."""
    if grads is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        original = wrapper.step

        def recording_step(**kwargs):
            for p in model.parameters():
                if p.grad is not None:
                    grads[names[id(p)]] = p.grad.detach().clone()
            original(**kwargs)
        wrapper.step = recording_step
    data = model.data_preprocessor(_batch(alloc=alloc), training=True)
    losses, _ = model.parse_losses(model(**data, mode="loss"))
    wrapper.update_params(losses)
    return losses


# --------------------------------------------------------------------------- GradSplit
RELATION = [[1, 0, 1], [0, 1, 1], [1, 1, 1]]  # seg's filters ignore depth's loss and v.v.


def _gradsplit_grad(alloc=None, relation=RELATION):
    model = _build()
    model.decode_heads.eval()
    wrapper = _wrapper(model, gradsplit=dict(modules=[CONV], relation=relation))
    grads = {}
    _step(model, wrapper, alloc, grads)
    return wrapper, grads[f"{CONV}.weight"]


def test_gradsplit_from_config_masks_the_excluded_groups():
    wrapper, full = _gradsplit_grad()
    agg = wrapper.controller.aggregator
    assert isinstance(agg, GradSplit) and wrapper.controller.engine.aggregator is agg
    assert [e.name for e in agg.layout.entries] == [f"{CONV}.weight"]
    assert torch.equal(agg.relation, torch.tensor(RELATION, dtype=torch.float32))
    seg, depth, normal = slice(0, 42), slice(42, 84), slice(84, 126)
    # depth's loss alone: seg's filter group gets nothing, depth's and normal's groups do
    _, only_depth = _gradsplit_grad(alloc=[("depth",)] * 4)
    assert torch.count_nonzero(only_depth[seg]) == 0
    assert torch.count_nonzero(only_depth[depth]) > 0
    assert torch.count_nonzero(only_depth[normal]) > 0
    # with every task present, seg's group holds exactly the seg + normal gradient
    _, seg_normal = _gradsplit_grad(alloc=[("seg", "normal")] * 4)
    torch.testing.assert_close(full[seg], seg_normal[seg], rtol=1e-5, atol=1e-8)
    assert not torch.allclose(full[depth], seg_normal[depth])
    # relation=None is the identity: each group is trained by its own task only
    _, ident = _gradsplit_grad(alloc=[("depth",)] * 4, relation=None)
    assert torch.count_nonzero(ident[normal]) == 0 and torch.count_nonzero(ident[depth]) > 0


def test_gradsplit_config_errors_name_key_and_value():
    model = _build()
    wrapper = _wrapper(model, gradsplit=dict(modules=["backbone.nope.*"]))
    with pytest.raises(MTLConfigError, match=r"gradsplit.modules=\['backbone.nope.\*'\]"):
        _step(model, wrapper)
    with pytest.raises(MTLConfigError, match="gradsplit.relation"):
        _wrapper(model, gradsplit=dict(modules=[CONV], relation=[[1, 0], [0, 1]]))
    with pytest.raises(MTLConfigError, match=r"gradsplit: unknown key\(s\) \['module'\]"):
        _wrapper(model, gradsplit=dict(module=[CONV]))


# --------------------------------------------------------------------------- Maximum Roaming
def test_roaming_masks_each_task_forward_and_steps_once_per_optimizer_step():
    model = _build(_model_cfg(roaming=dict(layers=["backbone.layer4.*.bn*"], p=0.5,
                                           interval=2)))
    roaming = model.roaming
    assert isinstance(roaming, MaximumRoaming)
    assert roaming.layer_names == ["backbone.layer4.0.bn1", "backbone.layer4.0.bn2",
                                   "backbone.layer4.1.bn1", "backbone.layer4.1.bn2"]
    assert any(k.startswith("roaming.masks.0.mask") for k in model.state_dict())
    seen = []
    handle = model.get_submodule("backbone.layer4.1.bn2").register_forward_hook(
        lambda m, a, out: seen.append(out.detach().abs().sum(dim=(0, 2, 3)) > 0))
    wrapper = _wrapper(model)
    mask0 = roaming.layer_mask("backbone.layer4.1.bn2").mask.clone()
    losses = _step(model, wrapper)
    handle.remove()
    assert losses.per_task_features and losses.features is None
    # one masked backbone pass per task, each with that task's channels
    assert len(seen) == 3
    for t in range(3):
        assert not seen[t][~mask0[t]].any()
    assert not torch.equal(mask0[0], mask0[1]) and not torch.equal(mask0[1], mask0[2])
    assert int(roaming.num_updates) == 1 and torch.equal(
        roaming.layer_mask("backbone.layer4.1.bn2").mask, mask0)  # interval 2: no swap yet
    _step(model, wrapper)
    assert int(roaming.num_updates) == 2
    mask2 = roaming.layer_mask("backbone.layer4.1.bn2").mask
    assert ((mask2 ^ mask0).sum(1) == 2).all()  # one channel swapped per task

    # the state survives a checkpoint: masks, visited, counter and RNG (next swaps equal)
    other = _build(_model_cfg(roaming=dict(layers=["backbone.layer4.*.bn*"], p=0.5,
                                           interval=2)))
    other.load_state_dict(copy.deepcopy(model.state_dict()))
    for a, b in zip(roaming.masks, other.roaming.masks):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.visited, b.visited)
    roaming.update_masks()
    other.roaming.update_masks()
    for a, b in zip(roaming.masks, other.roaming.masks):
        assert torch.equal(a.mask, b.mask)

    # inference runs once per task too
    model.eval()
    with torch.no_grad():
        out = model(**model.data_preprocessor(_batch(n=1), training=False), mode="predict")
    assert out[0].pred_depth_map.data.shape == (1, 32, 32)

    with pytest.raises(MTLConfigError, match="level='representation'"):
        model.train()
        _step(model, _wrapper(model, aggregator="mgda", level="representation"))
    with pytest.raises(MTLConfigError, match=r"model.roaming .*'backbone.nope'"):
        _build(_model_cfg(roaming=dict(layers=["backbone.nope"], p=0.5)))


def _masked_outputs(model, layer):
    """One train step; the output of ``layer`` (looked up now) in each task's forward."""
    seen = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda m, a, out: seen.append(out.detach().abs().sum(dim=(0, 2, 3)) > 0))
    _step(model, _wrapper(model))
    handle.remove()
    return seen


@pytest.mark.parametrize("direction", ["revert", "convert"])
def test_roaming_masks_act_after_the_runners_batchnorm_conversions(direction):
    """mmengine's Runner replaces the BN modules after the model is built: SyncBN -> BN on a
    single process (``revert_sync_batchnorm``), BN -> SyncBN under DDP (``sync_bn``). The
    masks must follow the replacement modules (issue 10, defect 3). SyncBN's forward needs a
    GPU once a process group exists, so the converted model runs here without one (SyncBN
    then normalises like BN); the hooks are what is under test."""
    from mmengine.model import convert_sync_batchnorm, revert_sync_batchnorm

    layers = ["backbone.layer4.*.bn*"]
    if direction == "revert":
        cfg = _model_cfg(roaming=dict(layers=layers, p=0.5, interval=1))
        cfg.backbone.norm_cfg = dict(type="SyncBN", requires_grad=True)
        model = _build(cfg)
        assert type(model.get_submodule("backbone.layer4.1.bn2")).__name__ == "SyncBatchNorm"
        model = revert_sync_batchnorm(model)
        new_type = "_BatchNormXd"
    else:
        model = _build(_model_cfg(roaming=dict(layers=layers, p=0.5, interval=1)))
        model = convert_sync_batchnorm(model)
        new_type = "SyncBatchNorm"
    layer = "backbone.layer4.1.bn2"
    assert type(model.get_submodule(layer)).__name__ == new_type
    mask = model.roaming.layer_mask(layer).mask.clone()
    seen = _masked_outputs(model, layer)
    assert len(seen) == 3
    for t in range(3):  # masked channels are exactly zero in task t's forward
        assert not seen[t][~mask[t]].any() and seen[t][mask[t]].any()


def _example_roaming_cfg():
    from mmengine.config import Config

    return dict(Config.fromfile(str(CONFIGS / "mtl_roaming.py")).model.roaming)


def test_example_config_masks_every_shared_conv_after_its_norm():
    """Paper 002 (~l. 339): "applied to every shared convolutional layer in the network"; the
    mask sits on the output of the BN that follows each conv (eq. 2)."""
    import torch.nn as nn

    cfg = _example_roaming_cfg()
    assert cfg["interval_epochs"] == 0.1 and "interval" not in cfg  # the paper's Δ
    model = _build(_model_cfg(roaming=cfg))
    follows = {"conv1": "bn1", "conv2": "bn2", "0": "1", "3": "4", "6": "7"}
    convs = [n for n, m in model.backbone.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 22
    expected = []
    for n in convs:
        head, _, last = n.rpartition(".")
        expected.append(f"backbone.{head}.{follows[last]}")
    assert model.roaming.layer_names == expected
    wrapper = _wrapper(model)
    model.roaming.set_steps_per_epoch(10.0)  # Δ = 0.1 epoch = 1 step
    _step(model, wrapper)  # the norm check passes: no mask feeds a norm
    assert int(model.roaming.num_updates) == 1 and model.roaming._norm_check_done


def test_roaming_refuses_a_masked_conv_whose_output_enters_a_norm():
    model = _build(_model_cfg(roaming=dict(layers=[CONV], p=0.5)))
    with pytest.raises(MTLConfigError, match=r"model.roaming.layers: the masked output of "
                       r"'backbone.layer4.1.conv2' goes straight into the normalisation layer "
                       r"'backbone.layer4.1.bn2' \(BatchNorm2d\)"):
        _step(model, _wrapper(model))


@pytest.mark.parametrize("mode,expected", [("ft", 25), ("ista", 75), (None, 25)])
def test_mtl_hook_converts_roaming_interval_from_epochs(mode, expected):
    """Δ = 0.1 epoch (the default) of 1000 samples in batches of 4: 250 optimizer steps per
    epoch, Δ = 25 steps; ISTA with k = 1 and 3 tasks makes 3 optimizer steps per batch."""
    import logging
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    from mtl_plugins.core.allocation import TaskAllocator
    from mtl_plugins.mmseg.hooks import MTLHook

    model = _build(_model_cfg(roaming=dict(layers=["backbone.layer4.*.bn*"], p=0.5)))
    assert model.roaming.interval is None and model.roaming.interval_epochs == 0.1
    wrapper = SimpleNamespace(_accumulative_counts=1)
    if mode is not None:
        wrapper.controller = SimpleNamespace(allocator=TaskAllocator(TASKS, mode=mode, k=1))
    runner = SimpleNamespace(model=model, optim_wrapper=wrapper, logger=logging.getLogger(),
                             train_dataloader=DataLoader(list(range(1000)), batch_size=4))
    MTLHook._set_roaming_interval(runner)
    assert model.roaming.interval == expected
    wrapper._accumulative_counts = 5  # 50 optimizer steps per epoch (x3 for ISTA)
    MTLHook._set_roaming_interval(runner)
    assert model.roaming.interval == expected // 5


def test_roaming_interval_both_forms_refused():
    with pytest.raises(MTLConfigError, match=r"model.roaming.interval=2 and "
                                             r"model.roaming.interval_epochs=0.1: expected one"):
        _build(_model_cfg(roaming=dict(layers=["backbone.layer4.*.bn*"], p=0.5, interval=2,
                                       interval_epochs=0.1)))


def test_roaming_check_refuses_a_mask_that_did_not_act():
    """A masked layer that does not run (here: a layer the forward bypasses) makes the first
    training forward raise, naming the key, instead of training without the mask."""
    model = _build(_model_cfg(roaming=dict(layers=["backbone.layer4.1.bn2"], p=0.5, interval=1)))
    model.backbone.layer4[1].bn2 = torch.nn.Identity()  # now bypassed by the forward...
    model.roaming._hooked["backbone.layer4.1.bn2"][1].remove()
    model.roaming._hooked["backbone.layer4.1.bn2"] = (model.backbone.layer4[1].bn2, None)
    model.roaming._attach = lambda root: None  # ...and not re-hooked
    with pytest.raises(MTLConfigError, match=r"model.roaming.layers: .*backbone.layer4.1.bn2"):
        _step(model, _wrapper(model))


def test_a_deep_copy_of_the_model_uses_its_own_masks():
    """EMA hooks and model soups deep-copy the model: the copy's forward must use the copy's
    masks (hooks are not closures over the original)."""
    model = _build(_model_cfg(roaming=dict(layers=["backbone.layer4.1.bn2"], p=0.5, interval=1)))
    twin = copy.deepcopy(model)
    twin.roaming.masks[0].mask[:] = True  # the copy uses every channel; the original does not
    twin.roaming.masks[0]._scale.clear()
    layer = "backbone.layer4.1.bn2"
    mask = model.roaming.layer_mask(layer).mask.clone()  # the step swaps in place
    seen_twin, seen_model = _masked_outputs(twin, layer), _masked_outputs(model, layer)
    assert all(s.all() for s in seen_twin)
    assert all(not s[~mask[t]].any() for t, s in enumerate(seen_model))


# --------------------------------------------------------------------------- Recon
def test_recon_search_records_conflicts_and_its_counts_survive_resume(tmp_path):
    model = _build()
    wrapper = _wrapper(model, aggregator="pcgrad",
                       recon_search=dict(modules=["backbone.layer4"], S=0.0))
    _step(model, wrapper)
    rec = wrapper.conflict_recorder
    assert isinstance(rec, ConflictRecorder) and wrapper.controller.engine.aggregator is rec
    assert rec.base.__class__.__name__.lower() == "pcgrad"
    assert all(n.startswith("backbone.layer4.") for n in rec.layer_names)
    assert int(rec.iterations) == 1
    state = copy.deepcopy(wrapper.state_dict())
    assert "aggregator.counts" in state["mtl"]
    # resume before the first step: applied once the recorder is built
    other = _wrapper(model, aggregator="pcgrad",
                     recon_search=dict(modules=["backbone.layer4"], S=0.0))
    other.load_state_dict(state)
    assert other.conflict_recorder is None
    _step(model, other)
    assert int(other.conflict_recorder.iterations) == 2
    assert int(other.conflict_recorder.counts.sum()) >= int(rec.counts.sum())
    path = tmp_path / "ranking.json"
    other.conflict_recorder.to_json(str(path))
    with pytest.raises(MTLConfigError, match="recon_search .*'backbone.nope'"):
        _step(_build(), _wrapper(_build(), recon_search=dict(modules=["backbone.nope"])))

    # stage 2 from the ranking: the top-2 layers become per-task copies
    top = [r["module"] for r in json.loads(path.read_text())["ranking"][:2]]
    model2 = _build(_model_cfg(recon=dict(ranking=str(path), topk=2)))
    assert model2.recon.converted == sorted(top, key=[n for n, _ in model.named_modules()].index)
    assert model2.recon.param_increase > 0
    with pytest.raises(MTLConfigError, match="model.recon.ranking="):
        _build(_model_cfg(recon=dict(ranking=str(tmp_path / "missing.json"), topk=2)))


def _recon_grads(alloc=None):
    model = _build(_model_cfg(recon=dict(modules=[CONV])))
    model.decode_heads.eval()
    wrapper = _wrapper(model, aggregator="pcgrad")
    grads = {}
    losses = _step(model, wrapper, alloc, grads)
    return model, losses, grads


def test_recon_copies_are_task_parameters_trained_by_their_task_only():
    model, losses, full = _recon_grads()
    copies = {t: model.get_submodule(f"{CONV}.copies.{t}").weight for t in TASKS}
    shared_ids = {id(p) for p in losses.shared_params}
    for t in TASKS:
        assert id(copies[t]) not in shared_ids
        assert any(copies[t] is p for p in losses.task_params[t])
        assert all(copies[t] is not p for o in TASKS if o != t for p in losses.task_params[o])
    assert all(f"{CONV}.copies.{t}.weight" in full for t in TASKS)
    # the seg copy's gradient is the seg loss's alone: same as a step where only seg trains
    _, _, only_seg = _recon_grads(alloc=[("seg",)] * 4)
    torch.testing.assert_close(full[f"{CONV}.copies.seg.weight"],
                               only_seg[f"{CONV}.copies.seg.weight"], rtol=1e-5, atol=1e-8)
    assert f"{CONV}.copies.depth.weight" not in only_seg  # depth absent: its copy untouched


# --------------------------------------------------------------------------- end to end
def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_tools_train_runs_each_method_with_checkpoint_and_resume(tmp_path):
    opts = ["train_cfg.max_iters=2", "train_cfg.val_interval=100",
            "default_hooks.checkpoint.interval=2"] + SMALL
    # GradSplit
    work = tmp_path / "gradsplit"
    _run([_tool("train.py"), str(CONFIGS / "mtl_gradsplit.py"), "--work-dir", str(work),
          "--cfg-options", *opts], tmp_path)
    mtl = _ckpt(work / "iter_2.pth")["optimizer"]["mtl"]
    assert mtl["aggregator.relation"].tolist() == RELATION

    # Recon stage 1, then stage 2 on its ranking
    work = tmp_path / "search"
    _run([_tool("train.py"), str(CONFIGS / "mtl_recon_search.py"), "--work-dir", str(work),
          "--cfg-options", *opts], tmp_path)
    ranking = json.loads((work / "recon_ranking.json").read_text())
    assert ranking["iterations"] == 2 and len(ranking["ranking"]) > 2
    assert int(_ckpt(work / "iter_2.pth")["optimizer"]["mtl"]["aggregator.iterations"]) == 2
    top = [r["module"] for r in ranking["ranking"][:2]]
    work2 = tmp_path / "recon"
    log = _run([_tool("train.py"), str(CONFIGS / "mtl_recon.py"), "--work-dir", str(work2),
                "--cfg-options", f"model.recon.ranking={work / 'recon_ranking.json'}",
                *opts], tmp_path)
    assert "Recon: 2 module(s) made task-specific" in log
    state = _ckpt(work2 / "iter_2.pth")["state_dict"]
    for name in top:
        assert any(k.startswith(f"{name}.copies.normal.") for k in state), name

    # Maximum Roaming: Δ = 0.25 epoch of 16 samples in batches of 4 = 1 optimizer step (the
    # hook converts it), so one swap per step; --resume continues from the masks
    work = tmp_path / "roaming"
    ropts = ["model.roaming.interval_epochs=0.25", "default_hooks.checkpoint.interval=2"] + SMALL
    log = _run([_tool("train.py"), str(CONFIGS / "mtl_roaming.py"), "--work-dir", str(work),
                "--cfg-options", "train_cfg.max_iters=2", "train_cfg.val_interval=100", *ropts],
               tmp_path)
    assert "Δ = 0.25 epoch = 1 optimizer steps (4 per epoch)" in log
    s2 = _ckpt(work / "iter_2.pth")["state_dict"]
    assert int(s2["roaming.num_updates"]) == 2
    log = _run([_tool("train.py"), str(CONFIGS / "mtl_roaming.py"), "--work-dir", str(work),
                "--resume", "--cfg-options", "train_cfg.max_iters=3",
                "train_cfg.val_interval=100", "default_hooks.checkpoint.interval=3",
                *ropts[:1], *SMALL], tmp_path)
    assert "resumed" in log.lower()
    s3 = _ckpt(work / "iter_3.pth")["state_dict"]
    assert int(s3["roaming.num_updates"]) == 3
    for k in (k for k in s2 if k.startswith("roaming.masks.") and k.endswith(".mask")):
        # exactly one swap per task since the checkpoint: the resumed run started from it
        assert ((s3[k] ^ s2[k]).sum(1) == 2).all(), k
        visited = k[:-len("mask")] + "visited"
        assert (s3[visited] | s2[visited]).equal(s3[visited])
        swaps = k[:-len("mask")] + "swaps"
        assert (s3[swaps] == s2[swaps] + 1).all()


def test_recon_copies_stay_identical_through_the_runners_init_weights(tmp_path):
    """Paper 004 (Sec. 4): "θ_1^cf, …, θ_T^cf will all be initialized with θ_sh^cf". Training
    from scratch, mmengine's init_weights (Kaiming on the convs, constants on the BNs, run by
    Runner.train) must not give every copy its own draw: the copies equal one another and the
    weights the un-converted model gets from the same seed."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    block = "backbone.layer3.0"  # a whole BasicBlock (convs, BNs, downsample)

    def initialised(name, recon):
        cfg = Config.fromfile(str(CONFIGS / "mtl_recon.py"))
        cfg.work_dir = str(tmp_path / name)
        cfg.experiment_name = name
        cfg.model.pop("recon")
        if recon is not None:
            cfg.model.recon = recon
        runner = Runner.from_cfg(cfg)
        runner._init_model_weights()  # what Runner.train() does before the first step
        return runner.model

    plain = initialised("plain", None).state_dict()
    model = initialised("copy", dict(modules=[CONV, block], init="copy"))
    state = model.state_dict()
    for name in (CONV, block):
        keys = [k[len(name) + 1:] for k in plain if k.startswith(name + ".")]
        assert keys
        for k in keys:
            for t in TASKS:
                assert torch.equal(state[f"{name}.copies.{t}.{k}"], plain[f"{name}.{k}"]), (t, k)
    others = [k for k in plain if not k.startswith((CONV + ".", block + "."))]
    assert all(torch.equal(state[k], plain[k]) for k in others)  # same draws elsewhere too
    # init='reset': each copy its own initialisation, as that option means
    reset = initialised("reset", dict(modules=[CONV], init="reset")).state_dict()
    assert not torch.equal(reset[f"{CONV}.copies.seg.weight"], reset[f"{CONV}.copies.depth.weight"])
