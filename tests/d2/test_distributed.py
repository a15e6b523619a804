"""2-process DDP (gloo, CPU) runs of the detectron2 integration, through
:func:`~tests.d2.distributed.launch_cpu` (detectron2's ``launch`` on CPU).

Every test is bounded by a timeout that fails it (a hang is a failure, not a stuck CI job).
"""
import os
from itertools import islice

import pytest
import torch
from detectron2.engine import HookBase

from .conftest import make_cfg
from .distributed import launch_cpu

pytestmark = pytest.mark.distributed

#: (name, MTL keys, model-side?) of the runs of the empty-step test
EMPTY_STEP_RUNS = (("trainer-plain", {}, False),
                   ("trainer-pcgrad", {"AGGREGATOR": "pcgrad"}, False),
                   ("model-side-plain", {}, True),
                   ("model-side-pcgrad", {"AGGREGATOR": "pcgrad"}, True))


def _shapes(tmp_path, num_images=8):
    """A synthetic COCO dataset on disk: ``(json file, image root)``."""
    from mtl_plugins.data.synthetic_shapes import write_coco_shapes

    paths = write_coco_shapes(tmp_path / "data", num_images=num_images, size=(128, 160))
    return str(paths["json_file"]), str(paths["image_root"])


def _register(name, files):
    from detectron2.data.datasets import register_coco_instances

    register_coco_instances(name, {}, *files)


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _run_steps(trainer, iterations, after=None):
    from detectron2.utils.events import EventStorage

    with EventStorage(0) as storage:
        trainer.storage = storage
        for it in range(iterations):
            storage.iter = it
            trainer.run_step()
            if after is not None:
                after(it)


def _empty_step_worker(out_dir, files):
    """Per run: step 0 has no task on rank 0 (tasks on rank 1), step 1 no task on any
    rank; saves the weights after each step."""
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import SimpleTrainer
    from detectron2.engine.defaults import create_ddp_model
    from detectron2.modeling import build_model
    from detectron2.utils import comm

    from mtl_plugins.d2 import MTLTrainer, build_mtl_controller, task_loss_mapping

    rank = comm.get_rank()
    _register("ddp_empty_shapes", files)
    for name, mtl, model_side in EMPTY_STEP_RUNS:
        cfg = make_cfg(**mtl)
        cfg.merge_from_list(TINY)
        cfg.DATASETS.TRAIN = ("ddp_empty_shapes",)
        if model_side:
            cfg.MODEL.META_ARCHITECTURE = "ModelSideMTLRCNN"
        torch.manual_seed(0)
        model = build_model(cfg)
        batches = list(islice(build_detection_train_loader(cfg), 2))
        batches[1] = [dict(d, mtl_tasks=()) for d in batches[1]]
        if rank == 0:
            batches[0] = [dict(d, mtl_tasks=()) for d in batches[0]]
        ddp = create_ddp_model(model, broadcast_buffers=False)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                    lr=1e-4, momentum=0.9)
        if model_side:
            trainer = SimpleTrainer(ddp, batches, optimizer)
        else:
            trainer = MTLTrainer(ddp, batches, optimizer, build_mtl_controller(cfg),
                                 task_loss_mapping(cfg))
        saved = []
        _run_steps(trainer, 2, after=lambda it: saved.append(_params(model)))
        torch.save(saved, os.path.join(out_dir, f"{name}-{rank}.pt"))


def _ista_sub_steps(out_dir, files):
    """ISTA, rank 0's images annotated for detection only (1 sub-step), rank 1's for both
    tasks (2): saves this rank's optimizer steps and weights."""
    from detectron2.data import build_detection_train_loader
    from detectron2.engine.defaults import create_ddp_model
    from detectron2.modeling import build_model
    from detectron2.utils import comm

    from mtl_plugins.d2 import MTLTrainer, build_mtl_controller, task_loss_mapping

    rank = comm.get_rank()
    cfg = make_cfg(**{"ALLOCATION.MODE": "ista"})
    cfg.merge_from_list(TINY)
    cfg.DATASETS.TRAIN = ("ddp_empty_shapes",)
    torch.manual_seed(0)
    model = build_model(cfg)
    batches = list(islice(build_detection_train_loader(cfg), 2))
    if rank == 0:
        batches = [[dict(d, mtl_tasks=("detection",)) for d in b] for b in batches]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    steps = []
    step = optimizer.step
    optimizer.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
    trainer = MTLTrainer(create_ddp_model(model, broadcast_buffers=False), batches, optimizer,
                         build_mtl_controller(cfg), task_loss_mapping(cfg))
    _run_steps(trainer, 4)  # an iteration is an optimizer step: 2 batches x 2 sub-steps
    torch.save({"steps": len(steps), "params": _params(model)},
               os.path.join(out_dir, f"ista-{rank}.pt"))


def _static_graph_refused(out_dir, files):
    """DDP with ``static_graph=True`` under an aggregator (parameter level) and MGDA at
    representation level: ``MTLTrainer`` refuses the step before any forward, naming
    ``train.ddp.static_graph``; saves the message and whether the weights stayed."""
    from detectron2.data import build_detection_train_loader
    from detectron2.engine.defaults import create_ddp_model
    from detectron2.modeling import build_model
    from detectron2.utils import comm

    from mtl_plugins.core.tasks import MTLConfigError
    from mtl_plugins.d2 import MTLTrainer, build_mtl_controller, task_loss_mapping

    for name, mtl in (("parameter", {"AGGREGATOR": "pcgrad"}),
                      ("representation", {"AGGREGATOR": "mgda", "LEVEL": "representation"})):
        cfg = make_cfg(**mtl)
        cfg.merge_from_list(TINY)
        cfg.DATASETS.TRAIN = ("ddp_empty_shapes",)
        torch.manual_seed(0)
        model = build_model(cfg)
        before = _params(model)
        batches = list(islice(build_detection_train_loader(cfg), 1))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        trainer = MTLTrainer(create_ddp_model(model, broadcast_buffers=False, static_graph=True),
                             batches, optimizer, build_mtl_controller(cfg),
                             task_loss_mapping(cfg))
        try:
            _run_steps(trainer, 1)
            message = "trained"
        except MTLConfigError as err:
            message = str(err)
        unchanged = all(torch.equal(v, before[k]) for k, v in _params(model).items())
        torch.save({"message": message, "unchanged": unchanged},
                   os.path.join(out_dir, f"static-{name}-{comm.get_rank()}.pt"))


def _uneven_worker(out_dir, files):
    _empty_step_worker(out_dir, files)
    _ista_sub_steps(out_dir, files)
    _static_graph_refused(out_dir, files)


def test_ranks_with_uneven_tasks_step_together(tmp_path):
    """Defect 7: a rank whose batch has no task joins the step (no hang, the same weights on
    both ranks); a step with no task on any rank changes nothing (MTLTrainer skips the
    optimizer step; model-side: zero gradients, so plain SGD leaves the weights).
    Defect 4: ISTA makes as many sub-steps on every rank (the most of any rank's plan).
    DDP's ``static_graph=True`` (which counts its gradient hooks in the first iteration; the
    per-task passes call them once per task) is refused on every rank, naming the key,
    weights untouched, at either level."""
    launch_cpu(_uneven_worker, (str(tmp_path), _shapes(tmp_path)), timeout=120)
    for name in ("parameter", "representation"):
        for r in range(2):
            got = torch.load(tmp_path / f"static-{name}-{r}.pt")
            assert got["unchanged"], (name, r)
            assert got["message"].startswith("train.ddp.static_graph=True") \
                and "static_graph=False" in got["message"], (name, r, got["message"])
    a, b = (torch.load(tmp_path / f"ista-{r}.pt") for r in range(2))
    assert a["steps"] == b["steps"] == 4  # 2 batches x 2 sub-steps, on both ranks
    for k in a["params"]:
        torch.testing.assert_close(a["params"][k], b["params"][k], atol=1e-6, rtol=0, msg=k)
    for name, _, _ in EMPTY_STEP_RUNS:
        a, b = (torch.load(tmp_path / f"{name}-{r}.pt") for r in range(2))
        for step in range(2):
            for k in a[step]:
                torch.testing.assert_close(a[step][k], b[step][k], atol=1e-6, rtol=0,
                                           msg=f"{name} step {step}: {k}")
        moved = [k for k in a[0] if not torch.equal(a[0][k], a[1][k])]
        if not name.startswith("model-side"):  # momentum: only a skipped step keeps them
            assert not moved, f"{name}: the empty step moved {moved[:3]}"


# --------------------------------------------------------------------------- the launcher matrix
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs", "d2")
#: a tiny Mask R-CNN: R18-FPN with 64 channels, small heads, 64x80 images
TINY = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "128",
        "MODEL.ROI_MASK_HEAD.CONV_DIM", "32", "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "INPUT.MAX_SIZE_TRAIN", "80"]
#: per-rank dataset: rank r's copies of synthetic image r (every batch of a rank is its image,
#: whatever the sampler's order: N + resume + N iterations see the data of 2N)
RANK_IMAGE = "mtl_d2_rank_image"
#: options of every matrix run: no evaluation, 2 loader workers, FrozenBN (no batch-statistics
#: randomness), no flip (the loader workers' RNG is not checkpointed); the anchor and proposal
#: sampling draws from torch's generator, seeded at every iteration (:func:`_dumping_train_net`);
#: without aspect-ratio grouping the loader's iterator (which draws its workers' seed from
#: that generator) is made with the trainer, not inside the first step
COMMON = TINY + ["DATASETS.TRAIN", f"('{RANK_IMAGE}',)", "DATASETS.TEST", "()",
          "DATALOADER.NUM_WORKERS", "2", "DATALOADER.ASPECT_RATIO_GROUPING", "False",
          "MODEL.RESNETS.NORM", "FrozenBN",
          "INPUT.RANDOM_FLIP", "none", "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "1000",
          "SEED", "0"]
#: (name, config file, options, resumed?) of the matrix runs
MATRIX = (
    ("ft", "mask_rcnn_R_50_FPN_synthetic_cpu.yaml", [], True),
    ("sta-uncertainty", "mask_rcnn_R_50_FPN_synthetic_cpu_sta.yaml",
     ["MTL.BALANCER", "uncertainty"], True),
    ("sta-dwa", "mask_rcnn_R_50_FPN_synthetic_cpu_dwa.yaml",
     ["MTL.BALANCER_ARGS.period", "1"], True),
    ("ista-pcgrad", "mask_rcnn_R_50_FPN_synthetic_cpu_ista.yaml",
     ["MTL.AGGREGATOR", "pcgrad"], True),
    ("sta-gradsplit", "mask_rcnn_R_50_FPN_synthetic_cpu_sta.yaml",
     ["MTL.GRADSPLIT.MODULES", "['backbone.bottom_up.res5.*.conv2']"], False),
    ("roaming-recon", "mask_rcnn_R_50_FPN_synthetic_cpu_roaming.yaml",
     ["MTL.RECON.MODULES", "['backbone.bottom_up.res5.1.conv2']"], True),
)
N = 1  # batches before the resume (the uninterrupted runs train 2N)
#: optimizer steps (= iterations) per batch of the runs with more than one: the resume falls
#: between batches (a resume inside an ISTA batch drops its rest: test_trainer.py tests it)
STEPS_PER_BATCH = {"ista-pcgrad": 2}
#: the runs resumed in a single process too (those with the most MTL state)
SINGLE = ("sta-uncertainty", "ista-pcgrad")


def _register_rank_image(files, rank):
    """:data:`RANK_IMAGE`: four copies of synthetic image ``rank`` (process-local catalog)."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import load_coco_json

    image = load_coco_json(*files)[rank]
    if RANK_IMAGE in DatasetCatalog.list():
        DatasetCatalog.remove(RANK_IMAGE)
    DatasetCatalog.register(RANK_IMAGE, lambda: [dict(image, image_id=i) for i in range(4)])


class _SeedEveryIteration(HookBase):
    """Seeds torch's generator with the iteration (and the rank) before every step: the
    anchor / proposal sampling of iteration i is the same in a run resumed before i (the
    generator's state is not checkpointed)."""

    def before_step(self):
        from detectron2.utils import comm

        torch.manual_seed(1000 * self.trainer.iter + comm.get_rank())


def _dumping_train_net(out_dir):
    """tools/train_net.py whose trainer seeds every iteration (:class:`_SeedEveryIteration`)
    and writes, after training, this rank's state: weights, optimizer, MTL state
    (``<OUTPUT_DIR>/state-<rank>.pt``)."""
    from detectron2.utils import comm

    from .conftest import load_script

    tool = load_script(os.path.join(ROOT, "tools", "train_net.py"), "mtl_d2_train_net_ddp")
    train, build_hooks = tool.Trainer.train, tool.Trainer.build_hooks
    tool.Trainer.build_hooks = lambda self: [_SeedEveryIteration()] + build_hooks(self)

    def train_and_dump(self):
        ret = train(self)
        model = getattr(self.model, "module", self.model)
        torch.save({"model": model.state_dict(), "mtl": self.controller.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "iter": self.iter},
                   os.path.join(self.cfg.OUTPUT_DIR, f"state-{comm.get_rank()}.pt"))
        return ret

    tool.Trainer.train = train_and_dump
    return tool


def _train(tool, out, config, opts, iterations, resume=False):
    from detectron2.engine import default_argument_parser

    argv = ["--config-file", os.path.join(CONFIGS, config)] + (["--resume"] if resume else [])
    tool.main(default_argument_parser().parse_args(
        argv + COMMON + opts + ["OUTPUT_DIR", out, "SOLVER.MAX_ITER", str(iterations)]))


def _matrix(out_dir, files, rank=0, names=None):
    """The matrix runs (those in ``names``, default all): 2N iterations, and (resumed runs)
    N + resume + N."""
    _register_rank_image(files, rank)
    tool = _dumping_train_net(out_dir)
    for name, config, opts, resumed in MATRIX:
        if names is not None and name not in names:
            continue
        n = N * STEPS_PER_BATCH.get(name, 1)
        _train(tool, os.path.join(out_dir, name, "full"), config, opts, 2 * n)
        if resumed:
            part = os.path.join(out_dir, name, "part")
            _train(tool, part, config, opts, n)
            _train(tool, part, config, opts, 2 * n, resume=True)


def _matrix_worker(out_dir, files):
    from detectron2.utils import comm

    _matrix(out_dir, files, comm.get_rank())
    _union_batch_steps(out_dir, files)


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_same(a, b, where, atol=1e-6, rtol=1e-5):
    """Nested dicts/lists of tensors and numbers are equal (floats to tolerance)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}", atol, rtol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]", atol, rtol)
    elif isinstance(a, torch.Tensor) and a.is_floating_point():
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=where)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def _without_plans(mtl):
    """The MTL state but the allocator's drawn plan (each rank draws its own, by design)."""
    out = dict(mtl)
    extra = dict(out["_extra_state"])
    extra["allocator"] = {k: v for k, v in extra["allocator"].items() if k != "plan"}
    out["_extra_state"] = extra
    return out


def _check_resume(run_dir, name, rank):
    """N + resume + N == 2N: weights, optimizer (momentum), MTL state (allocation stream and
    held plans of this rank, balancer, aggregator RNG, roaming masks)."""
    full = _state(os.path.join(run_dir, "full", f"state-{rank}.pt"))
    resumed = _state(os.path.join(run_dir, "part", f"state-{rank}.pt"))
    assert full["iter"] == resumed["iter"] == 2 * N * STEPS_PER_BATCH.get(name, 1), name
    for part in ("model", "mtl", "optimizer"):
        _assert_same(full[part], resumed[part], f"{name} rank {rank} {part}")


#: (name, MTL keys) of the union-batch runs: deterministic methods
UNION_RUNS = (("ft", {}), ("pcgrad", {"AGGREGATOR": "pcgrad"}))


def _union_cfg(mtl):
    """make_cfg, :data:`TINY`, with deterministic sampling (every anchor and proposal), no flip."""
    cfg = make_cfg(**mtl)
    cfg.merge_from_list(TINY)
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 10000
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 512
    cfg.INPUT.RANDOM_FLIP = "none"
    return cfg


def _union_images(cfg, files):
    """Synthetic image 0 twice: annotated for detection only, then for both tasks.

    Mask R-CNN normalises its ROI losses by batch-level counts (the mean over the batch's
    sampled ROIs, over its foreground ROIs for the mask loss), so 2 ranks x b equals 1
    process x 2b only when every rank has the same counts, in detectron2 as without MTL: the
    two ranks see the same image, and the mask task is on rank 1 only, which tests the
    per-task rule (a task's gradient is its mean over the ranks that have it)."""
    import copy

    from detectron2.data import DatasetMapper
    from detectron2.data.datasets import load_coco_json

    image = load_coco_json(*files)[0]
    mapper = DatasetMapper(cfg, True)
    return [dict(mapper(copy.deepcopy(image)), mtl_tasks=("detection",)),
            mapper(copy.deepcopy(image))]


def _update(model, cfg, batch):
    """One MTLTrainer step with SGD(lr=1): the update ``after - before`` of every weight."""
    from mtl_plugins.d2 import MTLTrainer, build_mtl_controller, task_loss_mapping
    from mtl_plugins.d2.trainer import unwrap_ddp

    inner = unwrap_ddp(model)
    before = _params(inner)
    optimizer = torch.optim.SGD([p for p in inner.parameters() if p.requires_grad], lr=1.0)
    _run_steps(MTLTrainer(model, [batch], optimizer, build_mtl_controller(cfg),
                          task_loss_mapping(cfg)), 1)
    return {k: v - before[k] for k, v in _params(inner).items()}


def _union_batch_steps(out_dir, files):
    """Each rank: one step on its image of :func:`_union_images`."""
    from detectron2.engine.defaults import create_ddp_model
    from detectron2.modeling import build_model
    from detectron2.utils import comm

    rank = comm.get_rank()
    for name, mtl in UNION_RUNS:
        cfg = _union_cfg(mtl)
        torch.manual_seed(0)
        model = create_ddp_model(build_model(cfg), broadcast_buffers=False)
        update = _update(model, cfg, [_union_images(cfg, files)[rank]])
        torch.save(update, os.path.join(out_dir, f"union-{name}-{rank}.pt"))


def _check_union_batch(out_dir, files):
    """(b): the 2-rank update equals one process's on both images, to float tolerance (the
    sampled anchors and proposals are the same, in another order: the sums differ in
    rounding, up to ~1e-4 of a tensor's norm on the FPN outputs)."""
    from detectron2.modeling import build_model

    for name, mtl in UNION_RUNS:
        cfg = _union_cfg(mtl)
        torch.manual_seed(0)
        want = _update(build_model(cfg), cfg, _union_images(cfg, files))
        assert sum(bool(v.abs().sum() > 0) for v in want.values()) > 10, name  # it trained
        for rank in range(2):
            got = torch.load(os.path.join(out_dir, f"union-{name}-{rank}.pt"))
            for k, v in want.items():
                error = float((got[k] - v).norm() / v.norm().clamp(min=1e-20))
                assert error < 2e-4, f"{name} rank {rank}: {k} off by {error:.2e} of its norm"


def test_launcher_matrix_ranks_identical_and_resume(tmp_path, monkeypatch):
    """tools/train_net.py in 2 gloo processes, NUM_WORKERS=2, for FT, STA + uncertainty,
    STA + DWA (period in iterations: its weights leave 1), ISTA + PCGrad (parameter level),
    GradSplit and Maximum Roaming + Recon stage 2: (a) both
    ranks end with the same weights, optimizer and MTL state (but each rank's own allocation
    plan); resume: N + resume + N == 2N on every rank; (b) 2 ranks x b == 1 process x 2b
    (see :func:`test_two_ranks_equal_one_process_on_the_union_batch`); (c) bounded."""
    monkeypatch.setenv("MTL_D2_SYNTHETIC_ROOT", str(tmp_path / "synthetic"))
    files = _shapes(tmp_path)
    launch_cpu(_matrix_worker, (str(tmp_path), files), timeout=400)
    for name, _, _, resumed in MATRIX:
        a, b = (_state(tmp_path / name / "full" / f"state-{r}.pt") for r in range(2))
        for part in ("model", "optimizer"):
            _assert_same(a[part], b[part], f"{name} {part}", atol=0, rtol=0)
        _assert_same(_without_plans(a["mtl"]), _without_plans(b["mtl"]), f"{name} mtl",
                     atol=0, rtol=0)
        if resumed:
            for rank in range(2):
                _check_resume(str(tmp_path / name), name, rank)
    dwa = _state(tmp_path / "sta-dwa" / "full" / "state-0.pt")["mtl"]["balancer.weights"]
    assert (dwa - 1).abs().min() > 1e-7, dwa  # no silent no-op under DDP either
    _check_union_batch(str(tmp_path), files)


def test_single_process_resume(tmp_path, monkeypatch):
    """N + resume + N == 2N in one process (:data:`SINGLE`; the 2-rank test resumes all)."""
    monkeypatch.setenv("MTL_D2_SYNTHETIC_ROOT", str(tmp_path / "synthetic"))
    _matrix(str(tmp_path), _shapes(tmp_path), names=SINGLE)
    for name in SINGLE:
        _check_resume(str(tmp_path / name), name, 0)
