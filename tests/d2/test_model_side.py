"""ModelSideMTLRCNN: the MTL step inside the model, trained by detectron2's own SimpleTrainer.

The reference is MTLTrainer (the trainer-side step, tested in test_trainer.py): on the same
weights, batch, allocation seed and RNG, one optimizer step of both must give the same
parameters — for the plain balanced sum and for gradient surgery through the surrogate term.
"""
import pytest
import torch

from .conftest import load_script, make_cfg


def _models(cfg, dataset, reference=True):
    """(ModelSideMTLRCNN, MTLGeneralizedRCNN with the same weights or None, a batch, cfg)."""
    from detectron2.data import build_detection_train_loader
    from detectron2.modeling import build_model

    cfg.DATASETS.TRAIN = (dataset,)
    cfg.MODEL.META_ARCHITECTURE = "ModelSideMTLRCNN"
    torch.manual_seed(0)
    side = build_model(cfg)
    if not reference:
        return side, None, next(iter(build_detection_train_loader(cfg))), cfg
    cfg = cfg.clone()
    cfg.MODEL.META_ARCHITECTURE = "MTLGeneralizedRCNN"
    ref = build_model(cfg)
    missing = ref.load_state_dict(side.state_dict(), strict=False)
    assert not missing.missing_keys
    assert all(k.startswith("mtl_controller.") for k in missing.unexpected_keys)
    batch = next(iter(build_detection_train_loader(cfg)))
    return side, ref, batch, cfg


def _sgd(model, lr=0.01):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()
            if not k.startswith("mtl_controller.")}


def _run(trainer, iterations):
    from detectron2.utils.events import EventStorage

    with EventStorage(0) as storage:
        trainer.storage = storage
        for it in range(iterations):
            storage.iter = it
            torch.manual_seed(it)  # ROI sampling draws from the global generator
            trainer.run_step()
    return storage


def _simple(model, data, iterations, lr=0.01):
    from detectron2.engine import SimpleTrainer

    return _run(SimpleTrainer(model, data, _sgd(model, lr)), iterations)


def _mtl(model, data, cfg, iterations):
    from mtl_plugins.d2 import MTLTrainer, build_mtl_controller, task_loss_mapping

    trainer = MTLTrainer(model, data, _sgd(model), build_mtl_controller(cfg, rank=0),
                         task_loss_mapping(cfg))
    _run(trainer, iterations)
    return trainer


@pytest.mark.parametrize("mtl", [{"ALLOCATION.MODE": "sta", "BALANCER": "uncertainty"},
                                 {"AGGREGATOR": "pcgrad"},
                                 {"AGGREGATOR": "mgda", "LEVEL": "representation"}],
                         ids=["sta-uncertainty", "pcgrad", "mgda-representation"])
def test_simple_trainer_step_equals_mtl_trainer_step(shapes_dataset, mtl):
    side, ref, batch, cfg = _models(make_cfg(**mtl), shapes_dataset)
    before = _params(ref)
    storage = _simple(side, [batch], 1)
    trainer = _mtl(ref, [batch], cfg, 1)
    got, want = _params(side), _params(ref)
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert sum(not torch.equal(before[k], v) for k, v in want.items()) > 10  # it trained
    keys = storage.latest()
    assert {"mtl/loss/detection", "mtl/loss/mask", "loss_cls", "loss_mask"} <= set(keys)
    if "AGGREGATOR" in mtl:
        assert "loss_mtl_surrogate" in keys and "mtl/cos/detection-mask" in keys
        assert keys["loss_mtl_surrogate"][0] == 0.0
    if mtl.get("BALANCER") == "uncertainty":  # the log-variances trained like the weights
        side_w = side.mtl_controller.balancer.state_dict()
        ref_w = trainer.controller.balancer.state_dict()
        for k in side_w:
            torch.testing.assert_close(side_w[k], ref_w[k])
            assert not torch.equal(side_w[k], torch.zeros_like(side_w[k]))


def test_ista_holds_the_batch_for_its_sub_steps(shapes_dataset):
    side, _, batch, cfg = _models(make_cfg(**{"ALLOCATION.MODE": "ista"}), shapes_dataset)
    other = [dict(d, image=d["image"].flip(-1)) for d in batch]
    seen = []
    side.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    storage = _simple(side, [batch, other, other, batch], 4, lr=1e-6)  # (random init)
    # sub-steps 1-2 train `batch`, the loader's second batch is skipped, 3-4 train `other`
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[2], seen[3])
    assert not torch.equal(seen[0], seen[2])
    assert torch.equal(seen[2], seen[0].flip(-1))
    det = [v for v, _ in storage.history("mtl/images/detection").values()]
    mask = [v for v, _ in storage.history("mtl/images/mask").values()]
    for s in (0, 2):  # every (image, task) trained once over a batch's two sub-steps
        assert det[s] + det[s + 1] == mask[s] + mask[s + 1] == 2.0
        assert det[s] + mask[s] == 2.0


@pytest.mark.parametrize("mode,gap,order", [("ista", 1, [0, 0, 2, 2]), ("gap", 2, [0, 1, 0, 1])])
def test_iterations_are_optimizer_and_scheduler_steps(shapes_dataset, mode, gap, order):
    """Issue 11, item 1, model side: under detectron2's SimpleTrainer with its LRScheduler
    hook, N iterations are N optimizer steps and N scheduler steps; held batches replace the
    trainer's (ISTA: the batch's two sub-steps; gap 2: batches 0, 1, then 0, 1 again)."""
    from detectron2.engine import SimpleTrainer, hooks

    cfg = make_cfg(**{"ALLOCATION.MODE": mode, "ALLOCATION.GAP": gap})
    side, _, batch, _ = _models(cfg, shapes_dataset, reference=False)
    loader = [[dict(d, tag=i) for d in batch] for i in range(4)]
    seen = []
    preprocess = side.preprocess_image
    side.preprocess_image = lambda inputs: (seen.append(inputs[0]["tag"]), preprocess(inputs))[1]
    optimizer = _sgd(side, lr=1e-6)
    steps = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    trainer = SimpleTrainer(side, iter(loader), optimizer)
    trainer.register_hooks([hooks.LRScheduler(optimizer, scheduler)])
    torch.manual_seed(0)
    trainer.train(0, 4)
    assert len(steps) == 4 and scheduler.last_epoch == 4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6 / 16)
    assert seen == order  # which loader batch each step trained


def test_state_survives_detection_checkpointer(shapes_dataset, tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    cfg = make_cfg(**{"ALLOCATION.MODE": "ista", "BALANCER": "uncertainty"})
    side, _, batch, cfg = _models(cfg, shapes_dataset)
    _simple(side, [batch], 1)  # mid-batch: one of two ISTA sub-steps done
    DetectionCheckpointer(side, str(tmp_path)).save("model")
    cfg.MODEL.META_ARCHITECTURE = "ModelSideMTLRCNN"
    cfg.MTL.ALLOCATION.SEED = 7
    fresh = build_model(cfg)
    DetectionCheckpointer(fresh, str(tmp_path)).load(str(tmp_path / "model.pth"))
    want = side.mtl_controller.state_dict()
    got = fresh.mtl_controller.state_dict()
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(got[k], v)
    a, b = side.mtl_controller.allocator, fresh.mtl_controller.allocator
    assert a.state_dict()["queue"] == b.state_dict()["queue"] == [[1, 0, 0]]
    assert a.batches == b.batches == 1 and b.held_batches == [0]
    # the restored plan has a sub-step left, but its batch was not checkpointed: dropped,
    # and the trainer's batch starts the next plan (batch 1, one of two sub-steps done)
    _simple(fresh, [batch], 1)
    assert fresh.mtl_controller.allocator.state_dict()["queue"] == [[1, 0, 1]]


@pytest.mark.parametrize("mtl", [{}, {"AGGREGATOR": "pcgrad"}], ids=["plain", "pcgrad"])
def test_step_without_any_task_leaves_every_weight_alone(shapes_dataset, mtl):
    """Under detectron2's SimpleTrainer (momentum, weight decay): a batch annotated for no
    task gives no parameter a gradient, the MTL bookkeeping still runs, roaming does not."""
    from detectron2.engine import SimpleTrainer

    side, _, batch, _ = _models(make_cfg(**mtl), shapes_dataset, reference=False)
    optimizer = torch.optim.SGD([p for p in side.parameters() if p.requires_grad], lr=0.01,
                                momentum=0.9, weight_decay=1e-4)
    before = {}

    def batches():
        yield batch
        before.update(_params(side))
        yield [dict(d, mtl_tasks=()) for d in batch]

    storage = _run(SimpleTrainer(side, batches(), optimizer), 2)
    after = _params(side)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    images = [v for v, _ in storage.history("mtl/images/mask").values()]
    assert images == [2.0, 0.0]
    side.state_dict()  # flushes the last step's bookkeeping
    assert side.mtl_controller.allocator.batches == 2 and side._pending is None


def test_surrogate_carries_scaled_gradients():
    from mtl_plugins.d2.model_side import GradientCarrier

    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    out = GradientCarrier.apply([torch.tensor([1.0, 2.0, 3.0]), None], p, q)
    assert out.item() == 0.0
    (out * 4.0).backward()
    assert p.grad.tolist() == [4.0, 8.0, 12.0] and q.grad is None
    # a GradScaler scale above the limit: non-finite gradients, so GradScaler backs off
    from mtl_plugins.d2.model_side import SCALE_LIMIT

    p.grad = None
    out = GradientCarrier.apply([torch.tensor([1.0, 0.0, -1.0])], p)
    (out * (SCALE_LIMIT * 2)).backward()
    assert not torch.isfinite(p.grad).any()
    with pytest.raises(RuntimeError, match="twice"):
        GradientCarrier.backward(type("Ctx", (), {"grads": None})(), torch.tensor(1.0))


def test_errors_name_the_problem(shapes_dataset):
    from mtl_plugins.core.tasks import MTLConfigError

    side, _, batch, _ = _models(make_cfg(AGGREGATOR="pcgrad"), shapes_dataset)
    side.train()
    with pytest.raises(MTLConfigError, match="mtl_alloc"):
        side([dict(batch[0], mtl_alloc=("mask",))])
    side.mtl_controller.loss_scaler = object()  # as amp=True: needs autocast
    with pytest.raises(MTLConfigError, match="model.mtl.amp"):
        side(batch)


def test_dwa_needs_a_period_and_then_moves_its_weights(shapes_dataset):
    """No silent no-op (defect 5): DWA without a period in iterations is refused on both
    model-side paths (yacs and the ``model.mtl`` dict); with one, its weights leave 1."""
    from detectron2.modeling import build_model

    from mtl_plugins.core.tasks import MTLConfigError
    from mtl_plugins.d2.lazy import build_mtl_from_dict

    cfg = make_cfg(BALANCER="dwa")
    cfg.MODEL.META_ARCHITECTURE = "ModelSideMTLRCNN"
    with pytest.raises(MTLConfigError, match=r"MTL.BALANCER='dwa' without a period"):
        build_model(cfg)
    with pytest.raises(MTLConfigError, match=r"model\.mtl\.balancer='dwa' without a period.*"
                                             r"model\.mtl\.balancer\.period"):
        build_mtl_from_dict(dict(balancer="dwa"), key="model.mtl")
    side, _, batch, _ = _models(make_cfg(BALANCER="dwa", BALANCER_ARGS={"period": 1}),
                                shapes_dataset, reference=False)
    _simple(side, [batch] * 3, 3, lr=1e-5)
    side.state_dict()  # flushes the last step's bookkeeping
    weights = side.mtl_controller.current_weights()
    assert all(abs(w - 1.0) > 1e-6 for w in weights.values()), weights


# --------------------------------------------------------------------------- upstream script
UPSTREAM = "share/detectron2/tools/lazyconfig_train_net.py"
CONFIG = "configs/d2/lazy/mask_rcnn_R_50_FPN_synthetic_cpu_model_side.py"


def _upstream_main():
    """detectron2's own tools/lazyconfig_train_net.py, unchanged (installed by the setup)."""
    import sys
    from pathlib import Path

    path = Path(sys.prefix) / UPSTREAM
    if not path.exists():
        pytest.skip(f"{path} is not installed (tools/install_detectron2.py copies it)")
    return load_script(path, "upstream_lazyconfig_train_net")


def _train_upstream(out, *opts, resume=False, evaluate=True):
    """One run of the upstream script; a checkpoint only at its end (``model_final.pth``, what
    ``--resume`` continues from); ``evaluate=False``: without the evaluation after training
    (its ``do_test``), for the runs whose metrics no assertion reads."""
    from detectron2.engine import default_argument_parser

    script = _upstream_main()
    if not evaluate:
        script.do_test = lambda cfg, model: None
    argv = ["--config-file", CONFIG] + (["--resume"] if resume else []) + [
        f"train.output_dir={out}", "train.checkpointer.period=1000", *opts]
    script.main(default_argument_parser().parse_args(argv))


def _saved_allocator(path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import LazyConfig, instantiate

    model = instantiate(LazyConfig.load(CONFIG).model)
    DetectionCheckpointer(model).load(str(path))
    return model.mtl_controller.allocator.state_dict()


def test_upstream_lazyconfig_script_trains_evaluates_and_resumes(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("MTL_D2_SYNTHETIC_ROOT", str(tmp_path / "data"))
    lr = "optimizer.lr=0.000001"  # random init: keep the few steps finite
    _train_upstream(tmp_path / "full", "train.max_iter=2", lr)
    _train_upstream(tmp_path / "part", "train.max_iter=1", lr, evaluate=False)
    fresh = _saved_allocator(tmp_path / "part/model_final.pth")  # after 1 iteration
    assert fresh["batches"] == 1
    _train_upstream(tmp_path / "part", "train.max_iter=2", lr, resume=True, evaluate=False)
    rows = [json.loads(line) for line in (tmp_path / "full/metrics.json").read_text().splitlines()]
    train_rows = [r for r in rows if "mtl/cos/detection-mask" in r or "loss_mtl_surrogate" in r]
    assert len(train_rows) == 2 and all(r["loss_mtl_surrogate"] == 0.0 for r in train_rows)
    assert any("bbox/AP" in r and "segm/AP" in r for r in rows)  # COCOEvaluator ran
    # resuming restored the allocation RNG: 1 + 1 iterations end where 2 do
    full = _saved_allocator(tmp_path / "full/model_final.pth")
    part = _saved_allocator(tmp_path / "part/model_final.pth")
    assert full["batches"] == part["batches"] == 2  # the position in every rank's stream
    assert full["plan"] == part["plan"] == []  # STA: no batch held between steps


# --------------------------------------------------------------------------- DDP
#: (id, model-side?, MTL keys) of the DDP runs, all in one 2-process launch (:func:`ddp_runs`)
DDP_RUNS = [
    ("model-side-pcgrad", True, {"AGGREGATOR": "pcgrad"}),
    ("MTLTrainer-pcgrad", False, {"AGGREGATOR": "pcgrad"}),
    ("MTLTrainer-roaming-recon", False,
     {"ROAMING.LAYERS": ["backbone.bottom_up.res5.0.conv1"], "ROAMING.P": 0.5,
      "RECON.MODULES": ["backbone.bottom_up.res5.2.conv3"]})]


def _ddp_run(rank, world, out_dir, model_side, mtl):
    """Two steps of one DDP run (each run builds its own model and loader from seed 0)."""
    import os

    from detectron2.data import build_detection_train_loader
    from detectron2.engine import SimpleTrainer
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage
    from torch.nn.parallel import DistributedDataParallel

    cfg = make_cfg(**{"ALLOCATION.MODE": "sta", "ALLOCATION.SEED": 1, **mtl})
    if model_side:
        cfg.MODEL.META_ARCHITECTURE = "ModelSideMTLRCNN"
    cfg.DATASETS.TRAIN = ("ddp_shapes",)
    cfg.SOLVER.IMS_PER_BATCH = world  # one image per rank: ranks train different tasks
    torch.manual_seed(0)
    model = build_model(cfg)
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    loader = build_detection_train_loader(cfg)  # a different batch on each rank
    if model_side:
        trainer = SimpleTrainer(ddp, loader, _sgd(model, lr=1e-5))
    else:
        from mtl_plugins.d2 import MTLTrainer, build_mtl_controller, task_loss_mapping

        trainer = MTLTrainer(ddp, loader, _sgd(model, lr=1e-5), build_mtl_controller(cfg),
                             task_loss_mapping(cfg))
    with EventStorage(0) as storage:
        trainer.storage = storage
        for it in range(2):
            storage.iter = it
            trainer.run_step()
    result = (model if model_side else trainer).last_result
    os.makedirs(out_dir, exist_ok=True)
    torch.save({"params": {k: v.detach() for k, v in model.named_parameters()},
                "gramian": None if result is None else result.gramian},
               os.path.join(out_dir, f"{rank}.pt"))


def _ddp_worker(rank, world, init_file, out_dir, dataset_files):
    """Every run of :data:`DDP_RUNS` in turn, into ``<out_dir>/<id>/<rank>.pt``."""
    import os

    import torch.distributed as dist
    from detectron2.data.datasets import register_coco_instances

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    register_coco_instances("ddp_shapes", {}, *dataset_files)
    try:
        for name, model_side, mtl in DDP_RUNS:
            _ddp_run(rank, world, os.path.join(out_dir, name), model_side, mtl)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """:data:`DDP_RUNS` in one launch of 2 gloo processes; ``ddp_runs(id)``: both ranks'
    saved results of that run (the test fails if a rank did not write its own)."""
    import torch.multiprocessing as mp

    from mtl_plugins.data.synthetic_shapes import write_coco_shapes

    tmp_path = tmp_path_factory.mktemp("ddp")
    paths = write_coco_shapes(tmp_path / "data", num_images=8, size=(128, 160))
    files = (str(paths["json_file"]), str(paths["image_root"]))
    try:
        mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), files),
                 nprocs=2, join=True)
        failure = None
    except Exception as e:  # the runs before the failed one still have their results
        failure = e

    def results(name):
        files = [tmp_path / name / f"{r}.pt" for r in range(2)]
        if not all(f.exists() for f in files):
            pytest.fail(f"DDP run {name} did not finish: {failure}")
        return [torch.load(f) for f in files]

    return results


@pytest.mark.parametrize("name,mtl", [(name, mtl) for name, _, mtl in DDP_RUNS],
                         ids=[name for name, _, _ in DDP_RUNS])
def test_ddp_keeps_ranks_identical(ddp_runs, name, mtl):
    a, b = ddp_runs(name)
    if "AGGREGATOR" in mtl:  # the engine all-reduced the task gradients: the same G
        torch.testing.assert_close(a["gramian"], b["gramian"])
    for k in a["params"]:
        torch.testing.assert_close(a["params"][k], b["params"][k], atol=1e-6, rtol=0, msg=k)


# --------------------------------------------------------------------------- AMP
def _amp_step(model, batch, grad_scaler=None):
    """AMPTrainer's step (autocast forward, GradScaler backward/step), on CPU in bfloat16."""
    from detectron2.utils.events import EventStorage

    optimizer = _sgd(model, lr=1e-3)
    with EventStorage(0):
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sum(model(batch).values())
        optimizer.zero_grad()
        if grad_scaler is None:
            loss.backward()
            optimizer.step()
        else:
            grad_scaler.scale(loss).backward()
            grad_scaler.step(optimizer)
            grad_scaler.update()


def test_amp_surrogate_is_unscaled_by_grad_scaler_and_overflow_skips(shapes_dataset):
    from mtl_plugins.core.amp import DynamicLossScaler

    cfg = make_cfg(AGGREGATOR="pcgrad")
    cfg.SOLVER.AMP.ENABLED = True  # the controller's own loss scaler for the task backwards
    side, _, batch, cfg = _models(cfg, shapes_dataset)
    start = _params(side)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _amp_step(side, batch, scaler)  # (the carrier scales by 1024: test_surrogate_carries...)
    moved = _params(side)
    assert scaler.get_scale() == 1024.0  # GradScaler found the unscaled gradients finite
    assert sum(not torch.equal(start[k], v) for k, v in moved.items()) > 10
    assert side.last_result.loss_scale > 1.0 and not side.last_result.found_inf
    # task gradients that overflow the controller's scale: GradScaler skips the step
    ctl = side.mtl_controller
    ctl.loss_scaler = ctl.engine.loss_scaler = DynamicLossScaler(init_scale=2.0 ** 127)
    _amp_step(side, batch, scaler)
    assert side.last_result.found_inf
    assert all(torch.equal(moved[k], v) for k, v in _params(side).items())
    assert ctl.loss_scaler.scale < 2.0 ** 127 and scaler.get_scale() == 512.0  # backed off


# --------------------------------------------------------------------------- structure
def test_roaming_and_recon_copies_train_model_side(shapes_dataset):
    """Maximum Roaming steps once per optimizer step (right after it: the model's optimizer
    step post-hook, on every rank); Recon copies are task parameters of the surrogate's
    aggregate."""
    from mtl_plugins.core.tasks import MTLConfigError

    conv = "backbone.bottom_up.res5.2.conv3"
    cfg = make_cfg(AGGREGATOR="pcgrad", **{"ROAMING.LAYERS": ["backbone.bottom_up.res5.0.conv1"],
                                           "ROAMING.P": 0.5, "RECON.MODULES": [conv]})
    side, _, batch, _ = _models(cfg, shapes_dataset, reference=False)
    copies = {t: side.get_submodule(f"{conv}.copies.{t}").weight for t in ("detection", "mask")}
    before = {t: w.detach().clone() for t, w in copies.items()}
    _simple(side, [batch, batch], 2, lr=1e-4)
    assert int(side.roaming.num_updates) == 2  # each right after its optimizer step
    assert int(side.state_dict()["roaming.num_updates"]) == 2  # in the checkpoint too
    assert all(not torch.equal(before[t], w) for t, w in copies.items())
    cfg.MTL.LEVEL = "representation"
    with pytest.raises(MTLConfigError, match="representation"):
        _models(cfg, shapes_dataset, reference=False)

