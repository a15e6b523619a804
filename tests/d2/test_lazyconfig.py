"""tools/lazyconfig_train_net.py and mtl_plugins.d2.lazy: the LazyConfig MTL trainer.

The script runs in-process (``main(args)``) on the synthetic CPU configs of
``configs/d2/lazy/`` (learning rate 1e-5: random-init Mask R-CNN diverges at 1e-3 after a few
steps), 1-2 iterations, with res5 frozen too (FPN + heads trained: cheaper).
"""
import json
import math
from pathlib import Path

import pytest
import torch

from .conftest import ROOT, load_script

CONFIGS = ROOT / "configs" / "d2" / "lazy"


@pytest.fixture(scope="module")
def tool():
    return load_script(ROOT / "tools" / "lazyconfig_train_net.py", "mtl_d2_lazyconfig_train_net")


@pytest.fixture
def run(tool, tmp_path_factory, monkeypatch):
    """``run(variant, out, *overrides, flags=(), evaluate=False, save_files=False)``: what
    ``main`` returns. Without ``evaluate`` the evaluation is skipped; without ``save_files``
    the checkpoints are not written (300 MB each: slow disk), their names go to ``run.saved``."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.engine import default_argument_parser

    monkeypatch.setenv("MTL_D2_SYNTHETIC_ROOT", str(tmp_path_factory.getbasetemp() / "shapes"))
    do_test, save = tool.do_test, DetectionCheckpointer.save

    def _run(variant, out, *overrides, flags=(), evaluate=False, save_files=False):
        monkeypatch.setattr(tool, "do_test", do_test if evaluate else lambda cfg, model: None)
        monkeypatch.setattr(DetectionCheckpointer, "save", save if save_files else
                            lambda self, name, **extra: _run.saved.append(name))
        config = CONFIGS / f"mask_rcnn_R_50_FPN_synthetic_cpu{variant}.py"
        args = default_argument_parser().parse_args([
            "--config-file", str(config), *flags, f"train.output_dir={out}",
            "train.max_iter=1", "train.checkpointer.period=100",
            "model.backbone.bottom_up.freeze_at=5", *overrides])
        return tool.main(args)

    _run.saved = []
    return _run


@pytest.fixture
def optimizer_steps():
    """The list of optimizer steps made while the test runs (one entry per ``step()``)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps = []
    handle = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: steps.append(1))
    yield steps
    handle.remove()


def _metrics(out: Path) -> dict:
    metrics = {}
    for line in (out / "metrics.json").read_text().splitlines():
        metrics.update(json.loads(line))
    return metrics


def test_ft_trains_then_eval_only(run, tmp_path, optimizer_steps):
    out = tmp_path / "ft"
    trainer = run("", out)
    assert len(optimizer_steps) == 1
    metrics = _metrics(out)
    assert metrics["mtl/images/detection"] == metrics["mtl/images/mask"] == 2.0
    assert trainer.controller.allocator.mode == "ft"
    assert run.saved == ["model_final"]
    # random init, seeded: default_setup draws a random seed without train.seed, and some
    # draws give no detection above the score threshold (AP NaN)
    results = run("", out, "train.seed=0", flags=("--eval-only",), evaluate=True)
    # COCOEvaluator ran (pycocotools' reference evaluation: detectron2._C is a placeholder)
    # on the predicted boxes and masks (AP is NaN when there are no predictions)
    assert set(results) == {"bbox", "segm"}
    assert math.isfinite(results["bbox"]["AP"]) and math.isfinite(results["segm"]["AP"])
    assert (out / "inference" / "coco_instances_results.json").exists()


def test_ista_iterations_are_optimizer_and_scheduler_steps(run, tmp_path, optimizer_steps):
    """Issue 11, item 1: ``train.max_iter`` and ``lr_multiplier`` count optimizer steps; 4
    ISTA iterations are the two sub-steps of two batches, every (image, task) pair once."""
    from detectron2.engine import hooks

    out = tmp_path / "ista"
    trainer = run("_ista", out, "train.max_iter=4")
    assert len(optimizer_steps) == 4  # one real optimizer step per sub-step
    scheduler = next(h for h in trainer._hooks if isinstance(h, hooks.LRScheduler)).scheduler
    assert scheduler.last_epoch == 4
    # the synthetic schedule: x0.1 after 3 of max_iter = 4 steps
    lrs = [v for v, _ in trainer.storage.history("lr").values()]
    assert lrs == pytest.approx([1e-5, 1e-5, 1e-5, 1e-6])
    alloc = trainer.controller.allocator
    assert alloc.batches == 2 and alloc.held_batches == []
    det = [v for v, _ in trainer.storage.history("mtl/images/detection").values()]
    mask = [v for v, _ in trainer.storage.history("mtl/images/mask").values()]
    for s in (0, 2):  # k = 1 per image per sub-step; each pair once over the batch
        assert det[s] + mask[s] == det[s + 1] + mask[s + 1] == 2.0
        assert det[s] + det[s + 1] == mask[s] + mask[s + 1] == 2.0
    assert set(_metrics(out)) >= {"mtl/loss/detection", "mtl/loss/mask", "total_loss"}


def test_gap_mode_from_the_lazy_dict(run, tmp_path, optimizer_steps):
    """``train.mtl.allocation=dict(mode='gap', gap=2)``: batches 0, 1, 0, 1 (paper 001,
    Table 7), four optimizer steps."""
    trainer = run("_ista", tmp_path / "gap", "train.max_iter=4",
                  "train.mtl.allocation.mode=gap", "train.mtl.allocation.gap=2")
    alloc = trainer.controller.allocator
    assert len(optimizer_steps) == 4 and alloc.mode == "gap" and alloc.gap == 2
    assert alloc.batches == 2 and alloc.held_batches == []


def test_sta_checkpoint_and_resume_restore_the_mtl_state(run, tmp_path):
    from mtl_plugins.core.allocation import TaskAllocator

    uncertainty = "train.mtl.balancer=uncertainty"  # adds a parameter group to the optimizer
    out = tmp_path / "sta"
    first = run("_sta", out, uncertainty, save_files=True)
    saved = torch.load(out / "model_final.pth", map_location="cpu",
                       weights_only=False)["trainer"]["mtl"]
    assert saved["_extra_state"]["allocator"]["mode"] == "sta"
    for key, value in first.controller.state_dict().items():  # incl. the uncertainty weights
        if isinstance(value, torch.Tensor):
            assert torch.equal(saved[key], value), key
    resumed = run("_sta", out, uncertainty, "train.max_iter=2", flags=("--resume",))
    assert resumed.start_iter == 1 and resumed.iter == 2
    # the uncertainty weights are the optimizer's last group (the checkpoint's optimizer loaded)
    learnable = {id(p) for p in resumed.controller.parameters() if p.requires_grad}
    assert learnable and {id(p) for p in resumed.optimizer.param_groups[-1]["params"]} == learnable
    # the allocation RNG went on from the checkpoint: the state of 2 batches from the seed
    reference = TaskAllocator(["detection", "mask"], mode="sta", k=1, seed=0)
    for _ in range(2):
        reference.start_batch(2)
        reference.next_mask()
    expected, got = reference.state_dict(), resumed.controller.allocator.state_dict()
    assert got == expected and got["batches"] == 2


def test_pcgrad_with_the_recon_search(run, tmp_path, optimizer_steps):
    out = tmp_path / "pcgrad"
    trainer = run("_pcgrad", out, "train.mtl.recon_search={S:-0.02}")
    assert len(optimizer_steps) == 1
    cos = _metrics(out)["mtl/cos/detection-mask"]
    assert -1.0 <= cos <= 1.0
    assert trainer.last_result.tasks == ["detection", "mask"]
    ranking = json.loads((out / "recon_ranking.json").read_text())
    assert ranking  # written by the ranking hook at the end of training


def test_script_config_error_names_the_key(run, tmp_path):
    from mtl_plugins.core.tasks import MTLConfigError

    with pytest.raises(MTLConfigError, match=r"train\.mtl\.gradsplit\.modules=\['nope\.\*'\]"):
        run("", tmp_path / "bad", "train.mtl.gradsplit={modules:['nope.*']}")


@pytest.mark.parametrize("mtl,match", [
    (dict(alloc=dict(mode="sta")), r"train\.mtl: unknown key\(s\) \['alloc'\]"),
    (dict(allocation=dict(mode="xta")), r"train\.mtl\.allocation\.mode='xta': expected one of"),
    (dict(allocation=dict(k=3)), r"train\.mtl\.allocation\.k=3: expected an integer in \[1, 2\]"),
    (dict(allocation=dict(seed="0")), r"train\.mtl\.allocation\.seed='0'"),
    (dict(allocation=dict(K=1)), r"train\.mtl\.allocation: unknown key\(s\) \['K'\]"),
    (dict(allocation=dict(mode="ista", gap=2)),
     r"train\.mtl\.allocation\.gap=2 with allocation mode 'ista': only mode='gap'"),
    (dict(allocation=dict(mode="gap", gap=0)),
     r"train\.mtl\.allocation\.gap=0: expected an integer >= 1"),
    (dict(tasks="detection"), r"train\.mtl\.tasks='detection': expected a list"),
    (dict(task_losses=["detection:loss_cls"]), r"train\.mtl\.task_losses=\[.*expected None"),
    (dict(task_losses=dict(detection=["loss_cls"])),
     r"train\.mtl\.task_losses: task\(s\) \['mask'\] of train\.mtl\.tasks"),
    (dict(task_losses=dict(segm=["loss_mask"], detection=["loss_cls"])),
     r"train\.mtl\.task_losses: segm:loss_mask names task 'segm'"),
    (dict(level="pixel"), r"train\.mtl\.level='pixel': expected one of"),
    (dict(task_reduction="max"), r"train\.mtl\.task_reduction='max'"),
    (dict(gramian_kernel="gemm"), r"train\.mtl\.gramian_kernel='gemm': expected one of"),
    (dict(gramian_kernel="fused"), r"train\.mtl: train\.mtl\.gramian_kernel='fused' with no "
                                   r"aggregator"),
    (dict(aggregator="pcgard"), r"train\.mtl\.aggregator='pcgard'"),
    (dict(balancer=dict(kind="dwa")), r"train\.mtl\.balancer=\{'kind': 'dwa'\}.*'type'"),
    (dict(gradsplit=dict(relation=None)), r"train\.mtl\.gradsplit\.modules is missing"),
    (dict(recon_search=dict(s=-0.1)), r"train\.mtl\.recon_search: unknown key\(s\) \['s'\]"),
    (dict(balancer="dwa"), r"train\.mtl\.balancer='dwa' without a period.*expected "
                           r"train\.mtl\.balancer\.period=<iterations per period>"),
    (dict(balancer=dict(type="dtp")), r"train\.mtl\.balancer='dtp'.*no KPI source"),
    (dict(balancer=dict(type="famo", update="after_step")),
     r"train\.mtl\.balancer=\{'type': 'famo'.*update='next_forward'"),
])
def test_build_mtl_from_dict_errors_name_the_key(mtl, match):
    from mtl_plugins.core.tasks import MTLConfigError
    from mtl_plugins.d2.lazy import build_mtl_from_dict

    with pytest.raises(MTLConfigError, match=match):
        build_mtl_from_dict(mtl)


def test_build_mtl_from_dict_amp_rank_and_omegaconf():
    from omegaconf import OmegaConf

    from mtl_plugins.d2.lazy import build_mtl_from_dict

    mtl = OmegaConf.create(dict(tasks=["detection", "mask"], allocation=dict(mode="ista", seed=3),
                                task_losses=dict(detection=["loss_cls", "loss_box_reg",
                                                            "loss_rpn_cls", "loss_rpn_loc"],
                                                 mask="loss_mask"),
                                recon_search=dict(S=-0.1)))
    parts = build_mtl_from_dict(mtl, amp=True, rank=2)
    assert parts.controller.loss_scaler is not None  # replaces AMPTrainer's GradScaler
    alloc = parts.controller.allocator
    assert (alloc.seed, alloc.rank) == (3, 2)  # base seed, this process's stream
    assert parts.task_losses["mask"] == ("loss_mask",)
    assert parts.recon_search == dict(S=-0.1, out="recon_ranking.json")
    assert parts.gradsplit is None
    assert build_mtl_from_dict({}).controller.loss_scaler is None
    fused = build_mtl_from_dict(dict(aggregator="pcgrad", gramian_kernel="fused"))
    assert fused.controller.engine.gramian_kernel == "fused"


def test_check_model_needs_the_mtl_modules_and_the_same_losses():
    from torch import nn

    from mtl_plugins.core.tasks import MTLConfigError
    from mtl_plugins.d2.lazy import build_mtl_from_dict, check_model

    sta = build_mtl_from_dict(dict(allocation=dict(mode="sta")))
    with pytest.raises(MTLConfigError, match=r"mode='sta' needs a model .*MTLGeneralizedRCNN"):
        check_model(nn.Linear(1, 1), sta)
    check_model(nn.Linear(1, 1), build_mtl_from_dict({}))  # FT: every loss on every image
    model = nn.Linear(1, 1)
    model.mtl_task_losses = {"detection": ("loss_cls",), "mask": ("loss_mask",)}
    with pytest.raises(MTLConfigError, match=r"model\.mtl_task_losses=.*train\.mtl\.task_losses"):
        check_model(model, sta)


@pytest.mark.parametrize("mode", ["ft", "sta", "ista"])
def test_coco_configs_paper_001(mode):
    from detectron2.config import LazyConfig

    from mtl_plugins.d2 import MTLGeneralizedRCNN, MTLRPN, MTLStandardROIHeads
    from mtl_plugins.d2.lazy import build_mtl_from_dict

    cfg = LazyConfig.load(str(CONFIGS / f"mask_rcnn_R_50_FPN_1x_coco_{mode}.py"))
    parts = build_mtl_from_dict(cfg.train.mtl)
    assert parts.controller.allocator.mode == mode and parts.controller.allocator.k == 1
    assert cfg.model._target_ is MTLGeneralizedRCNN
    assert cfg.model.proposal_generator._target_ is MTLRPN
    assert cfg.model.roi_heads._target_ is MTLStandardROIHeads
    assert {t: tuple(k) for t, k in cfg.model.mtl_task_losses.items()} == parts.task_losses
    # the model zoo's 1x schedule, untouched
    assert cfg.train.max_iter == 90000 and cfg.optimizer.lr == 0.02
    assert cfg.dataloader.train.total_batch_size == 16
    assert cfg.train.init_checkpoint.endswith("ImageNetPretrained/MSRA/R-50.pkl")


def test_ista_with_maximum_roaming_steps_the_masks(run, tmp_path, optimizer_steps):
    roaming = "{layers:['backbone.bottom_up.res5.0.conv1'],p:0.5,interval:1}"  # hydra syntax
    trainer = run("_ista", tmp_path / "roam", f"model.mtl_roaming={roaming}",
                  "train.max_iter=2")  # one batch: its two sub-steps
    model = trainer.model
    assert len(optimizer_steps) == 2 and int(model.roaming.num_updates) == 2


def test_model_side_config_runs_under_a_plain_trainer(run, tmp_path, optimizer_steps):
    from detectron2.engine import SimpleTrainer

    trainer = run("_model_side", tmp_path / "side")
    assert type(trainer) is SimpleTrainer and len(optimizer_steps) == 1
    assert _metrics(tmp_path / "side")["loss_mtl_surrogate"] == 0.0
