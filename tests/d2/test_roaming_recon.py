"""Maximum Roaming (paper 002) and Recon stage 2 (paper 004) in detectron2's Mask R-CNN
(MTL.ROAMING.*, MTL.RECON.*): per-task backbone forwards, per-branch features, the roaming
step per optimizer step, per-task copies, checkpoint / resume and pretrained weights."""
import pickle

import pytest
import torch

from mtl_plugins.core.tasks import MTLConfigError

from .conftest import make_cfg, run_train_net
from .test_allocation_losses import _batch

CONV = "backbone.bottom_up.res5.2.conv3"
ROAMING = {"ROAMING.LAYERS": ["backbone.bottom_up.res5.*.conv[123]"], "ROAMING.P": 0.5}
RECON = {"RECON.MODULES": [CONV]}


def _model(**mtl):
    from detectron2.modeling import build_model

    cfg = make_cfg(**mtl)
    cfg.MODEL.RESNETS.NORM = "BN"  # random init: normalised activations
    torch.manual_seed(0)
    return build_model(cfg)


def _losses(model, batch):
    from detectron2.utils.events import EventStorage

    model.train()
    with EventStorage(0):
        return model(batch)


def _grad(loss, param):
    (g,) = torch.autograd.grad(loss, [param], retain_graph=True, allow_unused=True)
    return torch.zeros_like(param) if g is None else g


def _backbone_tasks(model):
    """Records the active task of every backbone forward."""
    seen = []
    model.backbone.register_forward_hook(lambda *_: seen.append(model.task_context.task))
    return seen


def test_each_loss_reads_only_its_tasks_channels(shapes_dataset):
    model = _model(**ROAMING)
    losses = _losses(model, _batch())
    weight = dict(model.named_parameters())[f"{CONV}.weight"]
    masks = model.roaming.layer_mask(CONV).mask  # [tasks, channels]
    assert not torch.equal(masks[0], masks[1])
    detection = sum(v for k, v in losses.items() if k != "loss_mask")
    for task, loss in (("detection", detection), ("mask", losses["loss_mask"])):
        rows = _grad(loss, weight).flatten(1).abs().sum(1)
        on = masks[model.mtl_tasks.index(task)]
        assert torch.all(rows[~on] == 0), task  # switched-off filters: exactly no gradient
        assert torch.all(rows[on] > 0), task


def test_features_per_task_in_training(shapes_dataset):
    model = _model(**ROAMING, **{"ALLOCATION.MODE": "sta"})
    seen = _backbone_tasks(model)
    batch = _batch()
    _losses(model, [dict(d, mtl_alloc=("detection",)) for d in batch])
    assert seen == ["detection"]  # no image trains mask: only the RPN/box task is forwarded
    seen.clear()
    _losses(model, [dict(batch[0], mtl_alloc=("mask",)), dict(batch[1], mtl_alloc=("detection",))])
    assert seen == ["detection", "mask"]  # the RPN's proposals serve the mask images too


def test_inference_masks_come_from_the_mask_tasks_features():
    """Boxes from the detection features; masks from the mask task's at those boxes: switching
    the mask task's masks changes the masks and not the boxes."""
    model = _model(**ROAMING)
    model.roi_heads.box_predictor.test_score_thresh = 0.0
    model.roi_heads.box_predictor.test_topk_per_image = 5
    model.eval()
    seen = _backbone_tasks(model)
    inputs = [{k: v for k, v in d.items() if k != "instances"} for d in _batch(n=1)]

    def run():
        with torch.no_grad():
            return model(inputs)[0]["instances"]

    before = run()
    assert seen == ["detection", "mask"] and len(before) > 0
    for layer in model.roaming.masks:
        layer.mask[1] = ~layer.mask[1]
        layer._scale.clear()
    after = run()
    assert torch.equal(before.pred_boxes.tensor, after.pred_boxes.tensor)
    assert not torch.equal(before.pred_masks, after.pred_masks)


def test_recon_copy_gets_only_its_tasks_gradient(shapes_dataset):
    from mtl_plugins.d2 import split_task_parameters

    model = _model(**RECON)
    losses = _losses(model, _batch())
    detection = sum(v for k, v in losses.items() if k != "loss_mask")
    copies = model.recon.routers[CONV].copies
    for task, loss in (("detection", detection), ("mask", losses["loss_mask"])):
        for t, copy in copies.items():
            g = _grad(loss, copy.weight)
            assert bool(g.abs().sum() > 0) == (t == task), (task, t)
    shared, task_params = split_task_parameters(model, model.mtl_task_losses)
    for t in model.mtl_tasks:
        assert all(any(p is q for q in task_params[t]) for p in copies[t].parameters())
    assert not any(p is q for p in shared for c in copies.values() for q in c.parameters())


def test_no_roaming_step_after_a_skipped_optimizer_step(shapes_dataset):
    """An AMP overflow skips the optimizer step, and so the roaming step."""
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import DefaultTrainer

    from mtl_plugins.d2 import MTLTrainer, build_mtl_controller, task_loss_mapping

    cfg = make_cfg(**ROAMING)
    cfg.DATASETS.TRAIN = (shapes_dataset,)
    model = _model(**ROAMING)
    trainer = MTLTrainer(model, build_detection_train_loader(cfg),
                         DefaultTrainer.build_optimizer(cfg, model), build_mtl_controller(cfg),
                         task_loss_mapping(cfg))
    backward = trainer.controller.backward

    def overflowing(*args, **kwargs):
        result = backward(*args, **kwargs)
        result.found_inf = True
        return result

    trainer.controller.backward = overflowing
    trainer.train(0, 1)
    assert int(model.roaming.num_updates) == 0


def test_config_errors_name_the_key(shapes_dataset):
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import DefaultTrainer

    from mtl_plugins.d2 import MTLTrainer, build_mtl_controller, check_mtl_config, \
        task_loss_mapping

    with pytest.raises(MTLConfigError, match=r"MTL.LEVEL='representation' with MTL.ROAMING"):
        check_mtl_config(make_cfg(**ROAMING, LEVEL="representation"))
    with pytest.raises(MTLConfigError, match=r"MTL.RECON.TOPK=3: only with MTL.RECON.RANKING"):
        check_mtl_config(make_cfg(**RECON, **{"RECON.TOPK": 3}))
    with pytest.raises(MTLConfigError, match=r"MTL.ROAMING \(MTL.ROAMING.LAYERS=.*p=1.5"):
        _model(**{**ROAMING, "ROAMING.P": 1.5})
    with pytest.raises(MTLConfigError, match=r"MTL.RECON.*\['roi_heads.box_head.fc1'\] are not "
                                             r"backbone modules"):
        _model(**{"RECON.MODULES": ["roi_heads.box_head.fc1"]})
    with pytest.raises(MTLConfigError, match=r"MTL.RECON.RANKING='/nope.json': cannot read"):
        _model(**{"RECON.RANKING": "/nope.json", "RECON.TOPK": 2})
    # the constructor kwargs (LazyConfig) and the trainer's own check
    model = _model(**RECON)
    cfg = make_cfg(LEVEL="representation")
    cfg.DATASETS.TRAIN = (shapes_dataset,)
    with pytest.raises(MTLConfigError, match=r"MTL.LEVEL='representation' with Maximum Roaming"):
        MTLTrainer(model, build_detection_train_loader(cfg),
                   DefaultTrainer.build_optimizer(cfg, model), build_mtl_controller(cfg),
                   task_loss_mapping(cfg))


def test_constructor_kwargs(shapes_dataset):
    from detectron2.modeling import build_model

    from mtl_plugins.d2 import MTLGeneralizedRCNN

    cfg = make_cfg()
    kwargs = MTLGeneralizedRCNN.from_config(cfg)
    assert kwargs["mtl_roaming"] is None and kwargs["mtl_recon"] is None
    conv2 = "backbone.bottom_up.res5.2.conv2"
    kwargs.update(mtl_roaming=dict(layers=[conv2], p=0.5), mtl_recon=dict(modules=[CONV]),
                  mtl_config_source="kwargs")
    model = MTLGeneralizedRCNN(**kwargs)
    assert model.roaming.layer_names == [conv2] and model.recon.converted == [CONV]
    with pytest.raises(MTLConfigError, match=r"mtl_roaming.p is missing"):
        MTLGeneralizedRCNN(**dict(kwargs, mtl_recon=None, mtl_roaming=dict(layers=[conv2])))
    assert build_model(cfg).task_context is None  # no roaming/recon: one backbone pass


def test_roaming_steps_and_checkpoint_resume(shapes_dataset, tmp_path):
    """ISTA with K=1: 2 optimizer steps per batch, so 2 roaming steps (Δ=1: each task swaps
    one filter per layer per step); masks, visited sets, counters, RNG and Recon's copies
    survive DetectionCheckpointer's checkpoint and resume_or_load(resume=True)."""
    from mtl_plugins.d2.trainer import MTLCheckpointer, MTLDefaultTrainer

    cfg = make_cfg(**ROAMING, **RECON, **{"ROAMING.INTERVAL": 1, "ALLOCATION.MODE": "ista"})
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.DATASETS.TRAIN = (shapes_dataset,)
    cfg.DATASETS.TEST = ()
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.SOLVER.MAX_ITER = 2  # iterations are optimizer steps: one batch, its two sub-steps
    cfg.SOLVER.BASE_LR = 1e-6
    trained = MTLDefaultTrainer(cfg)
    assert isinstance(trained.checkpointer, MTLCheckpointer)  # also in the checkpoint hook
    assert any(getattr(h, "checkpointer", None) is trained.checkpointer for h in trained._hooks)
    model = trained.model
    visited = [int(m.visited.sum()) for m in model.roaming.masks]
    trained.train()
    assert int(model.roaming.num_updates) == 2
    assert [int(m.visited.sum()) for m in model.roaming.masks] == [v + 4 for v in visited]
    fresh = MTLDefaultTrainer(cfg)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    fresh.resume_or_load(resume=True)
    after, want = fresh.model.state_dict(), model.state_dict()
    assert after.keys() == want.keys()
    for key in want:
        assert torch.equal(after[key], want[key]), key
    changed = [k for k in want if "roaming.masks" in k and not torch.equal(before[k], want[k])]
    assert changed, "the masks moved during training (else resume proves nothing)"
    got, ref = fresh.model.roaming, model.roaming
    assert torch.equal(got._generator.get_state(), ref._generator.get_state())
    assert got.update_masks() == ref.update_masks() and all(
        torch.equal(a.mask, b.mask) for a, b in zip(got.masks, ref.masks))


@pytest.mark.parametrize("fmt", ["pth", "pkl"])
def test_pretrained_weights_load_into_every_copy(tmp_path, fmt):
    from mtl_plugins.d2 import MTLCheckpointer

    pretrained = _model().state_dict()
    path = tmp_path / f"weights.{fmt}"
    if fmt == "pth":
        torch.save({"model": pretrained}, path)
    else:  # detectron2 model-zoo format: numpy arrays, loaded by name-matching heuristics
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in pretrained.items()},
                         "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}, f)
    torch.manual_seed(1)
    model = _model(**RECON)
    for copy in model.recon.routers[CONV].copies.values():
        torch.nn.init.zeros_(copy.weight)
    MTLCheckpointer(model).load(str(path))
    for t, copy in model.recon.routers[CONV].copies.items():
        assert torch.equal(copy.weight, pretrained[f"{CONV}.weight"]), t
        assert torch.equal(copy.norm.running_mean, pretrained[f"{CONV}.norm.running_mean"]), t
    assert torch.equal(model.backbone.bottom_up.stem.conv1.weight,
                       pretrained["backbone.bottom_up.stem.conv1.weight"])


def _train_net(tmp_path, monkeypatch, config, *opts):
    out, results = run_train_net(tmp_path, monkeypatch, config, "SOLVER.MAX_ITER", "1", *opts)
    assert set(results["bbox"]) >= {"AP", "AP50"} and set(results["segm"]) >= {"AP", "AP50"}
    assert (out / "inference" / "coco_instances_results.json").exists()
    return torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]


def test_train_net_roaming_with_coco_evaluator(tmp_path, monkeypatch):
    state = _train_net(tmp_path, monkeypatch, "mask_rcnn_R_50_FPN_synthetic_cpu_roaming.yaml")
    assert int(state["roaming.num_updates"]) == 1


def test_train_net_recon_with_coco_evaluator(tmp_path, monkeypatch):
    state = _train_net(tmp_path, monkeypatch, "mask_rcnn_R_50_FPN_synthetic_cpu_recon.yaml")
    assert {k for k in state if k.startswith(f"{CONV}.") and k.endswith(".weight")} == {
        f"{CONV}.copies.detection.weight", f"{CONV}.copies.mask.weight",
        f"{CONV}.copies.detection.norm.weight", f"{CONV}.copies.mask.norm.weight"}


def test_a_roaming_mask_that_did_not_act_stops_training(shapes_dataset, monkeypatch):
    """A masked layer replaced behind roaming's back (its re-attachment defeated here) runs
    unmasked: the training forward raises instead of training without the masks."""
    import copy

    model = _model(**ROAMING)
    _losses(model, _batch())  # masks act
    monkeypatch.setattr(model.roaming, "_attach", lambda root: None)
    parent = model.get_submodule(CONV.rsplit(".", 1)[0])
    fresh = copy.deepcopy(parent.conv3)
    fresh._forward_hooks.clear()  # a module the framework built anew: no roaming hook
    setattr(parent, "conv3", fresh)
    with pytest.raises(MTLConfigError, match=r"MTL\.ROAMING\.layers: the Maximum Roaming masks of "
                       r"\['backbone\.bottom_up\.res5\.2\.conv3'\] were not applied"):
        _losses(model, _batch())


def test_roaming_interval_in_epochs_from_dataset_length(shapes_dataset, tmp_path):
    """Δ in epochs (paper 002) becomes optimizer steps at the first optimizer step:
    len(DATASETS.TRAIN) / SOLVER.IMS_PER_BATCH, times ceil(T/k) ISTA sub-steps."""
    from detectron2.modeling import build_model

    from mtl_plugins.d2 import MTLGeneralizedRCNN
    from mtl_plugins.d2.config import roaming_steps_per_epoch

    def cfg_with(**mtl):
        cfg = make_cfg(**ROAMING, **mtl)
        cfg.MODEL.RESNETS.NORM = "BN"
        cfg.DATASETS.TRAIN = (shapes_dataset,)
        return cfg

    cfg = cfg_with()  # neither INTERVAL nor INTERVAL_EPOCHS: the paper's Δ = 0.1 epoch
    assert roaming_steps_per_epoch(cfg) == 4 / 2  # 4 images, IMS_PER_BATCH 2
    cfg.DATASETS.TRAIN = ("not_registered",)
    model = build_model(cfg)  # no training data needed to build (evaluation-only runs)
    assert model.roaming.interval_epochs == 0.1 and model.roaming.interval is None
    model = build_model(cfg_with())
    assert model.after_optimizer_step() > 0 and model.roaming.interval == 1  # max(1, 0.2)
    cfg = cfg_with(**{"ROAMING.INTERVAL_EPOCHS": 1.5, "ALLOCATION.MODE": "ista"})
    assert roaming_steps_per_epoch(cfg) == 4 / 2 * 2  # ISTA, K=1, 2 tasks: 2 steps per batch
    gap = cfg_with(**{"ROAMING.INTERVAL_EPOCHS": 1.5, "ALLOCATION.MODE": "gap",
                      "ALLOCATION.GAP": 2})
    assert roaming_steps_per_epoch(gap) == 4 / 2 * 2  # gap: ISTA's sub-steps, interleaved
    model = build_model(cfg)
    swaps = [model.after_optimizer_step() for _ in range(12)]
    assert model.roaming.interval == 6 and [i for i, n in enumerate(swaps, 1) if n] == [6, 12]
    cfg = cfg_with(**{"ROAMING.INTERVAL": 3})
    assert roaming_steps_per_epoch(cfg) is None and build_model(cfg).roaming.interval == 3
    with pytest.raises(MTLConfigError, match=r"MTL.ROAMING.INTERVAL=3 and "
                                             r"MTL.ROAMING.INTERVAL_EPOCHS=0.5: expected one"):
        build_model(cfg_with(**{"ROAMING.INTERVAL": 3, "ROAMING.INTERVAL_EPOCHS": 0.5}))
    # keyword construction: a number, or nothing (then a step in epochs is refused)
    kwargs = MTLGeneralizedRCNN.from_config(cfg_with())
    kwargs.update(mtl_config_source="kwargs", mtl_roaming=dict(
        layers=["backbone.bottom_up.res5.0.conv1"], p=0.5))
    assert MTLGeneralizedRCNN(**dict(kwargs, mtl_steps_per_epoch=40.0)).roaming.interval == 4
    with pytest.raises(MTLConfigError, match=r"interval_epochs=0.1: .*steps per epoch"):
        MTLGeneralizedRCNN(**dict(kwargs, mtl_steps_per_epoch=None)).after_optimizer_step()
