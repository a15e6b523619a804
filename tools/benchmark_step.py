"""End-to-end training iterations through detectron2 and MMSegmentation, as ratios to upstream.

What users feel is the framework's iteration, not the engine alone. Two tables, one per
framework, each measured in one run with the robust statistics of
``tools/benchmark_backward.py`` (shuffled round-robin blocks, ratio of minima beside the median
ratio, CPU time, busy-machine warnings, ``--repeat-runs``; see its docstring):

- ``d2``: one Mask R-CNN R50-FPN iteration on 2 synthetic 128x160 images
  (``configs/d2/mask_rcnn_R_50_FPN_synthetic_cpu.yaml``, data of
  ``mtl_plugins.d2.data.register_synthetic_shapes``): detectron2's own ``SimpleTrainer`` on
  its own ``GeneralizedRCNN`` (``upstream``) vs the project's ``MTLTrainer`` with FT, STA,
  ISTA (per optimizer step), STA + uncertainty, PCGrad at parameter level (with the default
  Gramian kernel, ``auto``, and with ``blas`` and ``fused``: ``MTL.GRAMIAN_KERNEL``), MGDA at
  representation level, and the model-side path (``ModelSideMTLRCNN`` under upstream's
  ``SimpleTrainer``, STA).
- ``mmseg``: one iteration of the synthetic-scenes segmentor
  (``configs/mmseg/synthetic/mtl_ft.py``: ResNet-18 tiny, seg + depth + normals, 64x64,
  batch 8): ``model.train_step`` with a plain ``OptimWrapper`` (``upstream``) vs
  ``MTLOptimWrapper`` with the same methods (allocation masks set as ``MTLIterBasedTrainLoop``
  sets them).

``floor`` is forward + one ``autograd.grad`` per task (shared + that task's parameters) + the
optimizer step, no aggregation: the least any parameter-level method can cost. Every row
trains on one fixed batch (no data loading in the timing). Targets (issue 12): allocation and
balancing <= 1.03 x upstream; representation level <= 1.25 x; parameter level <= floor + 0.05
(all on ``x med``, the median of the paired ratios). Peak memory: one fresh process per row
(peak RSS and the tensors' peak on CPU, ``torch.cuda.max_memory_allocated`` on a GPU;
``benchmark_backward.tensor_peak_mib``), skipped with
``--no-memory``; ``--memory-jobs N`` runs N of them at once (each reports its own peak).

    python tools/benchmark_step.py                              # both tables, CPU
    python tools/benchmark_step.py --frameworks mmseg --repeat-runs 2
    python tools/benchmark_step.py --device cuda                # on a GPU
    python tools/benchmark_step.py --quick --no-memory          # smoke run
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))
from benchmark_backward import (Stats, Step, add_timing_args, check_timing_args,  # noqa: E402
                                child_peak_mib, child_peaks, compare_runs, floor_grads,
                                format_table, memory_cells, print_warnings, run_tables,
                                use_steady_malloc)

D2_CONFIG = ROOT / "configs" / "d2" / "mask_rcnn_R_50_FPN_synthetic_cpu.yaml"
MMSEG_CONFIG = ROOT / "configs" / "mmseg" / "synthetic" / "mtl_ft.py"

#: row -> (MTL settings, target category); settings are the framework's own config keys
#: (d2: cfg.MTL.* keys; mmseg: optim_wrapper.mtl); None = a reference row
ROWS: Dict[str, Tuple[Optional[dict], str]] = {
    "upstream": (None, "reference"),
    "floor": (None, "floor"),
    "ft": (dict(mode="ft"), "allocation"),
    "sta": (dict(mode="sta"), "allocation"),
    "ista": (dict(mode="ista"), "allocation"),
    "sta+uncertainty": (dict(mode="sta", balancer="uncertainty"), "balancing"),
    "pcgrad:parameter": (dict(mode="ft", aggregator="pcgrad", level="parameter"), "parameter"),
    "pcgrad:parameter:blas": (dict(mode="ft", aggregator="pcgrad", level="parameter",
                                   gramian_kernel="blas"), "parameter"),
    "pcgrad:parameter:fused": (dict(mode="ft", aggregator="pcgrad", level="parameter",
                                    gramian_kernel="fused"), "parameter"),
    "mgda:representation": (dict(mode="ft", aggregator="mgda", level="representation"),
                            "representation"),
    "model_side:sta": (dict(mode="sta"), "allocation"),
}
FRAMEWORK_ROWS = {"d2": list(ROWS), "mmseg": [r for r in ROWS if not r.startswith("model_side")]}
#: target on ``x med``: a bound on the ratio to upstream, or ("floor", margin)
TARGETS = {"allocation": 1.03, "balancing": 1.03, "representation": 1.25,
           "parameter": ("floor", 0.05)}


def _counting(optimizer: torch.optim.Optimizer) -> List[int]:
    """Count ``optimizer.step`` calls (ISTA makes several per batch)."""
    count = [0]
    step = optimizer.step

    def counted(*args, **kwargs):
        count[0] += 1
        return step(*args, **kwargs)

    optimizer.step = counted
    return count


def _per_optimizer_step(run: Callable[[], None], count: List[int]) -> Step:
    def step() -> int:
        before = count[0]
        run()
        return max(count[0] - before, 1)
    return step


# ---------------------------------------------------------------------- detectron2
class D2Bench:
    """One synthetic batch and the config of ``configs/d2/*synthetic_cpu.yaml``."""

    def __init__(self, device: str, data_root: str) -> None:
        from detectron2.config import get_cfg
        from detectron2.data import build_detection_train_loader

        from mtl_plugins.d2 import add_mtl_config
        from mtl_plugins.d2.config import merge_config_file
        from mtl_plugins.d2.data import register_synthetic_shapes

        register_synthetic_shapes(data_root)
        cfg = get_cfg()
        add_mtl_config(cfg)
        merge_config_file(cfg, str(D2_CONFIG))
        cfg.MODEL.DEVICE = device
        self.cfg = cfg
        self.batch = next(iter(build_detection_train_loader(cfg)))

    def _cfg(self, settings: Optional[dict], arch: str):
        cfg = self.cfg.clone()
        settings = dict(settings or {})
        cfg.MODEL.META_ARCHITECTURE = arch
        if arch == "GeneralizedRCNN":  # detectron2's own model, no MTL modules
            cfg.MODEL.PROPOSAL_GENERATOR.NAME = "RPN"
            cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
        cfg.MTL.ALLOCATION.MODE = settings.pop("mode", "ft")
        cfg.MTL.BALANCER = settings.pop("balancer", "")
        cfg.MTL.AGGREGATOR = settings.pop("aggregator", "")
        cfg.MTL.LEVEL = settings.pop("level", "parameter")
        cfg.MTL.GRAMIAN_KERNEL = settings.pop("gramian_kernel", "auto")
        assert not settings, settings
        return cfg

    def _model(self, cfg):
        from detectron2.engine import DefaultTrainer
        from detectron2.modeling import build_model

        torch.manual_seed(0)
        model = build_model(cfg)
        model.train()
        return model, DefaultTrainer.build_optimizer(cfg, model)

    def step(self, row: str) -> Step:
        from detectron2.engine import SimpleTrainer
        from detectron2.utils.events import EventStorage

        from mtl_plugins.d2 import MTLTrainer, build_mtl_controller, task_loss_mapping
        from mtl_plugins.d2.config import group_task_losses
        from mtl_plugins.d2.inputs import allocate_inputs
        from mtl_plugins.d2.trainer import split_task_parameters

        settings, _ = ROWS[row]
        data = itertools.repeat(self.batch)
        storage = EventStorage(0)  # one per row: the trainers log the same keys differently
        if row == "upstream":
            model, opt = self._model(self._cfg(None, "GeneralizedRCNN"))
            trainer = SimpleTrainer(model, data, opt)
        elif row.startswith("model_side"):
            model, opt = self._model(self._cfg(settings, "ModelSideMTLRCNN"))
            trainer = SimpleTrainer(model, data, opt)
        elif row == "floor":
            cfg = self._cfg(None, "MTLGeneralizedRCNN")
            model, opt = self._model(cfg)
            mapping = task_loss_mapping(cfg)
            shared, task_params = split_task_parameters(model, mapping)
            tasks = list(mapping)
            inputs = allocate_inputs(self.batch, torch.ones(len(self.batch), len(tasks),
                                                            dtype=torch.bool), tasks)

            def floor() -> None:
                with storage:  # the R-CNN logs its training statistics
                    losses = group_task_losses(model(inputs), mapping)
                for i, t in enumerate(tasks):
                    floor_grads(losses[t], shared + task_params[t], i < len(tasks) - 1)
                opt.step()
                opt.zero_grad(set_to_none=True)
            return floor
        else:
            cfg = self._cfg(settings, "MTLGeneralizedRCNN")
            model, opt = self._model(cfg)
            trainer = MTLTrainer(model, data, opt, build_mtl_controller(cfg),
                                 task_loss_mapping(cfg))
        count = _counting(opt)
        trainer.iter = 0

        def run() -> None:
            with storage:
                trainer.run_step()
        return _per_optimizer_step(run, count)


# ---------------------------------------------------------------------- mmseg
class MMSegBench:
    """One batch of the synthetic scenes and the model of ``configs/mmseg/synthetic/``."""

    def __init__(self, device: str, batch: int) -> None:
        from mmengine.config import Config
        from mmengine.dataset import pseudo_collate
        from mmseg.registry import DATASETS
        from mmseg.utils import register_all_modules

        import mtl_plugins.mmseg  # noqa: F401  (registers the segmentor, wrapper, datasets)

        register_all_modules(init_default_scope=True)
        self.cfg = Config.fromfile(str(MMSEG_CONFIG))
        self.device = device
        dataset = DATASETS.build(self.cfg.train_dataloader.dataset)
        self.batch = pseudo_collate([dataset[i] for i in range(batch)])
        self.tasks = list(self.cfg.model.tasks)

    def _model(self):
        from mmseg.registry import MODELS

        torch.manual_seed(0)
        model = MODELS.build(copy.deepcopy(self.cfg.model)).to(self.device)
        model.train()
        return model

    def _wrapper(self, model, settings: Optional[dict]):
        from mmengine.optim import build_optim_wrapper

        optimizer = copy.deepcopy(self.cfg.optim_wrapper.optimizer)
        if settings is None:
            return build_optim_wrapper(model, dict(type="OptimWrapper", optimizer=optimizer))
        settings = dict(settings)
        mtl = dict(tasks=self.tasks, allocation=dict(mode=settings.pop("mode"), k=1, seed=0))
        mtl.update(settings)
        return build_optim_wrapper(model, dict(type="MTLOptimWrapper", optimizer=optimizer,
                                               mtl=mtl))

    def step(self, row: str) -> Step:
        from mtl_plugins.mmseg.loops import available_tasks, set_allocation

        settings, _ = ROWS[row]
        model = self._model()
        batch = copy.deepcopy(self.batch)  # allocation metainfo is set on its samples
        if row == "floor":
            wrapper = self._wrapper(model, None)
            opt = wrapper.optimizer

            def floor() -> None:
                data = model.data_preprocessor(batch, True)
                losses, _ = model.parse_losses(model._run_forward(data, mode="loss"))
                tasks = list(losses)
                for i, t in enumerate(tasks):
                    floor_grads(losses[t], losses.shared_params + losses.task_params[t],
                                i < len(tasks) - 1)
                opt.step()
                opt.zero_grad(set_to_none=True)
            return floor
        wrapper = self._wrapper(model, settings)
        count = _counting(wrapper.optimizer)
        ctl = getattr(wrapper, "controller", None)
        if ctl is None or ctl.allocator.mode == "ft":
            return _per_optimizer_step(lambda: model.train_step(batch, wrapper), count)
        samples = batch["data_samples"]

        def allocated() -> None:  # as MTLIterBasedTrainLoop.run_iter
            for _ in range(ctl.start_batch(available_tasks(samples, self.tasks))):
                set_allocation(samples, ctl.next_mask(), self.tasks)
                model.train_step(batch, wrapper)
        return _per_optimizer_step(allocated, count)


# ---------------------------------------------------------------------- tables
def build_bench(framework: str, args):
    if framework == "d2":
        return D2Bench(args.device, args.data_root)
    return MMSegBench(args.device, args.mmseg_batch)


def target_cells(stats: Dict[str, Stats]) -> Dict[str, List[str]]:
    """``target`` and ``pass`` columns of every row (on ``x med``, the paired median)."""
    out = {}
    for row, s in stats.items():
        category = ROWS[row][1]
        target = TARGETS.get(category)
        if target is None:
            out[row] = [category, "-"]
            continue
        if isinstance(target, tuple):
            if "floor" not in stats:
                out[row] = ["floor+0.05", "no floor"]
                continue
            bound = stats["floor"].ratio_med + target[1]
            label = f"<={bound:.2f}"
        else:
            bound, label = target, f"<={target:.2f}"
        # decided on the printed (2-decimal) values, so that a row never reads "1.26 <=1.26 FAIL"
        out[row] = [label, "pass" if round(s.ratio_med, 2) <= round(bound, 2) else "FAIL"]
    return out


def child_memory(spec: str, args) -> None:
    framework, _, row = spec.partition(":")
    # (the first iteration's allocations are part of set-up for the peak RSS)
    print(*child_peaks(lambda: build_bench(framework, args).step(row), args.device, steps=3,
                       warm=True))


def memory_mib(framework: str, row: str, args) -> List[float]:
    return child_peak_mib(__file__, [
        "--child-memory", f"{framework}:{row}", "--device", args.device,
        "--threads", str(args.threads), "--mmseg-batch", str(args.mmseg_batch),
        "--data-root", args.data_root])


def run_framework(framework: str, args) -> dict:
    rows = [r for r in (args.rows or FRAMEWORK_ROWS[framework]) if r in FRAMEWORK_ROWS[framework]]
    if "upstream" not in rows:
        rows = ["upstream"] + rows
    bench = build_bench(framework, args)
    steps = {r: bench.step(r) for r in rows}
    title = f"benchmark_step {framework}"
    runs = run_tables(steps, "upstream", args, title)
    peaks = {}
    if args.memory:
        # each child reports its own process's peak, so children may run side by side
        with ThreadPoolExecutor(max_workers=args.memory_jobs) as pool:
            peaks = dict(zip(rows, pool.map(lambda r: memory_mib(framework, r, args), rows)))
    memory = {r: v[0] for r, v in peaks.items()}
    tensors = {r: v[1] for r, v in peaks.items() if len(v) > 1}
    extra, memory_header = memory_cells({"peak MiB": memory, "tensor MiB": tensors},
                                        "upstream", "up")
    header = ["target", "pass"] + memory_header
    what = {"d2": "detectron2 Mask R-CNN R50-FPN iteration, 2 images 128x160",
            "mmseg": f"mmseg MultiTaskSegmentor iteration, {args.mmseg_batch} images 64x64"}
    for k, stats in enumerate(runs, start=1):
        cells = target_cells(stats)
        for r in extra:
            cells[r] += extra[r]
        print(f"\n{what[framework]}, device {args.device}, {args.threads} thread(s), "
              f"malloc {args.malloc}: "
              f"run {k}/{len(runs)} (ratios per optimizer step to 'upstream')")
        print("\n".join(format_table(stats, cells, header)))
        print_warnings(stats, "upstream", args.device)
    if len(runs) > 1:
        print("\n".join(compare_runs(runs)))
    return {"runs": [{n: asdict(s) for n, s in r.items()} for r in runs],
            "targets": [target_cells(r) for r in runs], "memory_mib": memory,
            "tensor_mib": tensors}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frameworks", nargs="+", default=["d2", "mmseg"], choices=["d2", "mmseg"])
    p.add_argument("--rows", nargs="+", help=f"subset of rows (default all): {list(ROWS)}")
    p.add_argument("--mmseg-batch", type=int, default=None, help="default 8 (--quick: 2)")
    p.add_argument("--data-root", default=os.path.join(tempfile.gettempdir(),
                                                      "mtl_plugins_bench_shapes"),
                   help="where the synthetic detectron2 images are written on first use")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory processes")
    p.add_argument("--memory-jobs", type=int, default=1,
                   help="peak-memory processes run at once (each reports its own peak; "
                        "more than 1 only where cores and device memory allow)")
    add_timing_args(p, rounds=10, steps=1)
    p.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.mmseg_batch = args.mmseg_batch or (2 if args.quick else 8)
    check_timing_args(p, args)
    if args.memory_jobs < 1:
        p.error(f"--memory-jobs: expected a positive integer, got {args.memory_jobs}")
    use_steady_malloc(args, argv)
    unknown = [r for r in args.rows or [] if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {unknown}; expected names from {list(ROWS)}")
    torch.set_num_threads(args.threads)
    if args.child_memory:
        child_memory(args.child_memory, args)
        return
    results = {fw: run_framework(fw, args) for fw in args.frameworks}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
