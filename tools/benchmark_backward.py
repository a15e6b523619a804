"""Per-step time and peak memory of every MTL backward method on one dense multi-task model.

The model (``DenseMTLModel``) is the anchors' reference model (../shared/notes/anchors-mtl.md,
appendix): a ResNet-18 trunk (conv1 to layer3, 2.78 M shared parameters) and three 2-conv heads
for 13-class segmentation, depth and surface normals at 128x128, batch 4. Every method runs a
full optimizer step (forward, backward, SGD step) on the same batch.

Rows: the plain summed-loss step; the floor (forward + T ``autograd.grad`` through the trunk,
no aggregation); every aggregator of ``mtl_plugins.core.aggregation`` at parameter and at
representation level; STA and ISTA allocation (ISTA: per optimizer step, i.e. per sub-step);
the Gramian methods also with the BLAS and with the fused Gramian kernel
(``METHOD:parameter:blas`` / ``:fused``; the plain ``METHOD:parameter`` rows take the
default, ``gramian_kernel="auto"``: the C kernel on a CPU where it builds); and, when
installed, LibMTL's and TorchJD's implementations of the same methods on the same model (the
same run, the same rounds).

Timing (``measure``, shared with ``tools/benchmark_step.py``): ``--rounds`` rounds; in each
round every method runs one short block of ``--steps`` steps, in an order shuffled per round
by a fixed seed (``--seed``), with a block of the plain step before the first method and
after every method (``plain m1 plain m2 ... plain``): each method's block is paired with the
plain blocks on both sides of it. Per block the wall time (``perf_counter``) and the CPU time
are recorded: ``time.thread_time`` with one thread (``--threads 1``, the default: the calling
thread does all the work, and time spent waiting for a core is not counted), else the
process CPU time (``time.process_time``, all threads). Per method the table shows

- ``x med``: the median over rounds of the paired ratio (the block over the mean of the two
  plain blocks around it). A drift of the machine moves both sides of a pair alike, so this
  is the statistic that reproduces from run to run; the targets and the run-to-run agreement
  use it;
- ``x min``: the method's fastest block over the plain step's fastest block (wall): robust to
  added load, but one extreme block on either side moves it (shown for reference);
- ``cpu x``: ``x med`` on CPU time;
- ``disp``: the dispersion of the paired ratios, (Q3 - Q1) / median.

A warning is printed when the spread says the machine was busy (``busy_warnings``): the
plain step's median block is more than ``BUSY_MEDIAN_OVER_MIN`` (1.15) times its fastest
block, or a method's dispersion exceeds ``BUSY_DISPERSION`` (0.10), or (one thread, CPU) the
plain step's median wall time is more than ``BUSY_WALL_OVER_CPU`` (1.10) times its CPU time
(the thread waited for a core). ``--repeat-runs 2`` measures the whole table twice in the
same process and prints, per ratio, the difference between the runs (the issue's agreement
criterion: every ``x med`` within +-0.03).

Memory (``--memory``): a separate process runs only that method and reports its peak
resident set size and, on a CPU, the peak of the bytes its tensors held
(:func:`tensor_peak_mib`, the counterpart of ``torch.cuda.max_memory_allocated``; exact,
where the peak RSS moves by a few MiB between processes); each beside the plain step's.
The budget is the plain step plus T task gradients.
``--profile METHOD`` prints torch.profiler's top operators (self CPU time) of that method's
step instead of the tables; ``--pieces`` times, on this model's task gradients, each piece
of work the parameter-level engine adds to the floor (the write of G, the exact Gramian by
each kernel, ``w @ G``) as a fraction of the plain step.

    python tools/benchmark_backward.py                      # time table
    python tools/benchmark_backward.py --repeat-runs 2      # twice, with the differences
    python tools/benchmark_backward.py --memory             # time and memory tables
    python tools/benchmark_backward.py --methods plain pcgrad:parameter mgda:parameter:batched
    python tools/benchmark_backward.py --methods plain floor pcgrad:parameter pcgrad:parameter:blas
    python tools/benchmark_backward.py --profile pcgrad:parameter
    python tools/benchmark_backward.py --pieces             # what the engine adds to the floor
    python tools/benchmark_backward.py --device cuda        # on a GPU (memory: CUDA peak)
    python tools/benchmark_backward.py --quick              # smoke run: tiny sizes, 3 rounds

Anchors (optional): ``pip install --no-deps libmtl==1.1.5 torchjd==0.18.0``; without them
their rows are left out (a note says so).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import types
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

TASKS = ("seg", "depth", "normal")
#: one step of a method; it may return the number of optimizer steps it made (None: one)
Step = Callable[[], Optional[int]]

#: busy-machine thresholds (``busy_warnings``; docs/benchmarks.md)
BUSY_MEDIAN_OVER_MIN = 1.15
BUSY_DISPERSION = 0.10
BUSY_WALL_OVER_CPU = 1.10
#: the issue's agreement criterion between two runs on the same machine
AGREEMENT = 0.03


class DenseMTLModel(nn.Module):
    """ResNet-18 conv1..layer3 trunk + three 2-conv heads (seg 13, depth 1, normals 3)."""

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        r = torchvision.models.resnet18(weights=None)
        self.trunk = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3)
        out = {"seg": 13, "depth": 1, "normal": 3}
        self.heads = nn.ModuleDict({
            t: nn.Sequential(nn.Conv2d(256, 128, 3, padding=1), nn.ReLU(inplace=True),
                             nn.Conv2d(128, c, 1)) for t, c in out.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def head_outputs(self, z: torch.Tensor, size) -> Dict[str, torch.Tensor]:
        return {t: F.interpolate(h(z), size=size, mode="bilinear", align_corners=False)
                for t, h in self.heads.items()}


def make_batch(batch: int, size: int, device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    seg = torch.randint(0, 13, (batch, size, size), generator=g)
    depth = torch.rand(batch, 1, size, size, generator=g) + 0.5
    normal = F.normalize(torch.randn(batch, 3, size, size, generator=g), dim=1)
    return [t.to(device) for t in (x, seg, depth, normal)]


def per_sample_losses(out: Dict[str, torch.Tensor], seg, depth, normal) -> Dict[str, torch.Tensor]:
    """``{task: [B]}`` per-sample mean losses."""
    return {
        "seg": F.cross_entropy(out["seg"], seg, reduction="none").mean((1, 2)),
        "depth": (out["depth"] - depth).abs().mean((1, 2, 3)),
        "normal": (1 - F.cosine_similarity(F.normalize(out["normal"], dim=1), normal, dim=1)).mean((1, 2)),
    }


class Bench:
    """Holds the model, batch and optimizer; builds one step function per method."""

    def __init__(self, batch: int, size: int, device: str) -> None:
        torch.manual_seed(0)
        self.device = device
        self.model = DenseMTLModel().to(device)
        self.x, self.seg, self.depth, self.normal = make_batch(batch, size, device)
        self.size = (size, size)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)
        self.shared = list(self.model.trunk.parameters())
        self.heads = {t: list(m.parameters()) for t, m in self.model.heads.items()}

    def forward(self, mask: Optional[torch.Tensor] = None):
        z = self.model.features(self.x)
        out = self.model.head_outputs(z, self.size)
        per = per_sample_losses(out, self.seg, self.depth, self.normal)
        if mask is None:
            losses = {t: v.mean() for t, v in per.items()}
        else:
            from mtl_plugins.core.allocation import masked_task_mean

            losses = {t: masked_task_mean(per[t], mask[:, i]) for i, t in enumerate(TASKS)}
        return z, losses

    def _finish(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    # ---- plain and floor
    def plain(self) -> Step:
        def step() -> None:
            _, losses = self.forward()
            sum(losses.values()).backward()
            self._finish()
        return step

    def floor(self, update: bool = True) -> Step:
        """Forward + one ``autograd.grad`` per task through the trunk and the task's head,
        then (``update``) the optimizer step on those gradients (the trunk gets the last
        task's: no aggregation). Without ``update`` it is the anchors' appendix floor
        (``floor:nostep``), which leaves out the optimizer step every method makes."""
        def step() -> None:
            _, losses = self.forward()
            for i, t in enumerate(TASKS):
                floor_grads(losses[t], self.shared + self.heads[t], retain=i < 2, update=update)
            self._finish()
        return step

    # ---- ours
    def ours(self, method: str, level: str, vjp: str = "sequential",
             gramian_kernel: str = "auto") -> Step:
        from mtl_plugins.core.aggregation import build_aggregator
        from mtl_plugins.core.backward import TaskBackward

        engine = TaskBackward(TASKS, build_aggregator(method).to(self.device), level=level,
                              vjp=vjp, gramian_kernel=gramian_kernel)

        def step() -> None:
            z, losses = self.forward()
            engine(losses, self.shared, self.heads, features=z)
            self._finish()
        return step

    def allocation(self, mode: str) -> Step:
        from mtl_plugins.core.allocation import TaskAllocator

        alloc = TaskAllocator(TASKS, mode=mode, k=1, seed=0)
        batch = self.x.shape[0]

        def step() -> None:  # one optimizer step (an ISTA sub-step)
            if alloc.wants_batch:
                alloc.start_batch(batch)
            mask = alloc.next_mask().to(self.device)
            _, losses = self.forward(mask)
            sum(losses.values()).backward()
            self._finish()
        return step

    # ---- anchors
    def libmtl(self, method: str) -> Step:
        import importlib

        import_libmtl()
        cls = getattr(importlib.import_module(f"LibMTL.weighting.{method}"), method)
        bench = self

        class Holder(cls):  # LibMTL's weighting classes are mixins over the model
            def __init__(self) -> None:
                super().__init__()
                self.task_num, self.task_name = len(TASKS), list(TASKS)
                self.device, self.rep_grad = torch.device(bench.device), False

            def get_share_params(self):
                return bench.shared

            def zero_grad_share_params(self) -> None:  # LibMTL rewrites .grad.data later
                for p in bench.shared:
                    if p.grad is not None:
                        p.grad.zero_()

        holder = Holder()
        holder.init_param()
        kwargs = {"PCGrad": {}, "MGDA": {"mgda_gn": "none"},
                  "CAGrad": {"calpha": 0.5, "rescale": 1}}[method]

        def step() -> None:
            _, losses = self.forward()
            holder.backward([losses[t] for t in TASKS], **kwargs)
            self._finish()
        return step

    def torchjd(self, method: str) -> Step:
        import torchjd.aggregation as A
        from torchjd.autojac import jac_to_grad, mtl_backward

        aggregator = {"PCGrad": A.PCGrad, "MGDA": A.MGDA, "Mean": A.Mean}[method]()

        def step() -> None:
            z, losses = self.forward()
            mtl_backward([losses[t] for t in TASKS], features=z)
            jac_to_grad(self.shared, aggregator)
            self._finish()
        return step


def floor_grads(loss: torch.Tensor, params: List[torch.Tensor], retain: bool,
                update: bool = True) -> None:
    """One task's ``autograd.grad`` of a floor row; with ``update`` set as ``.grad`` so that
    the optimizer step that follows updates the weights (the shared ones with the last task's
    gradient: no aggregation)."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    if update:
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g


def import_libmtl():
    """Import LibMTL 1.1.5, which needs ``torchvision.models.utils`` (gone in torchvision 0.29)."""
    if "torchvision.models.utils" not in sys.modules:
        shim = types.ModuleType("torchvision.models.utils")
        shim.load_state_dict_from_url = torch.hub.load_state_dict_from_url
        sys.modules["torchvision.models.utils"] = shim
    import LibMTL

    return LibMTL


#: the Gramian methods also timed with the BLAS and the fused Gramian kernels
#: (``METHOD:parameter:blas``, ``METHOD:parameter:fused``)
KERNEL_ROWS = ("pcgrad", "mgda", "cagrad", "upgrad", "nashmtl", "aligned_mtl", "gradvac")


def available_methods() -> List[str]:
    from mtl_plugins.core.aggregation import AGGREGATORS

    names = ["plain", "floor", "floor:nostep"]
    for level in ("parameter", "representation"):
        names += [f"{a}:{level}" for a in AGGREGATORS if a != "sum"]
    names += ["pcgrad:parameter:batched", "mgda:parameter:batched", "sta", "ista"]
    names += [f"{a}:parameter:{k}" for k in ("blas", "fused") for a in KERNEL_ROWS]
    try:
        import_libmtl()
    except ImportError:
        pass
    else:
        names += ["libmtl:PCGrad", "libmtl:MGDA", "libmtl:CAGrad"]
    try:
        import torchjd  # noqa: F401
    except ImportError:
        pass
    else:
        names += ["torchjd:PCGrad", "torchjd:MGDA", "torchjd:Mean"]
    return names


def build_step(bench: Bench, name: str) -> Step:
    from mtl_plugins.core.aggregation.gramian_kernels import GRAMIAN_KERNELS

    if name in ("plain", "floor"):
        return getattr(bench, name)()
    if name == "floor:nostep":
        return bench.floor(update=False)
    if name in ("sta", "ista", "ft"):
        return bench.allocation(name)
    prefix, _, arg = name.partition(":")
    if prefix == "libmtl":
        return bench.libmtl(arg)
    if prefix == "torchjd":
        return bench.torchjd(arg)
    level, *options = arg.split(":")
    vjp = [o for o in options if o in ("sequential", "batched")]
    kernel = [o for o in options if o in GRAMIAN_KERNELS]
    if len(vjp) + len(kernel) != len(options) or len(vjp) > 1 or len(kernel) > 1:
        raise ValueError(f"method {name!r}: expected METHOD:LEVEL[:sequential|batched]"
                         f"[:{'|'.join(GRAMIAN_KERNELS)}]")
    return bench.ours(prefix, level or "parameter", (vjp or ["sequential"])[0],
                      (kernel or ["auto"])[0])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cpu_clock(device: str) -> Callable[[], float]:
    """``time.thread_time`` with one intra-op thread on CPU (all the work is on the calling
    thread), else ``time.process_time`` (every thread of the process)."""
    if device == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time
    return time.process_time


def cpu_clock_name(device: str) -> str:
    return "thread" if cpu_clock(device) is time.thread_time else "process"


@dataclass
class Samples:
    """Per-block seconds per optimizer step of one method, one entry per block.

    ``pair_wall`` / ``pair_cpu``: for each block, the reference's time around it (the mean of
    the reference blocks just before and just after it, :func:`measure`; the reference's own
    blocks are their own pairs)."""

    wall: List[float]
    cpu: List[float]
    pair_wall: List[float]
    pair_cpu: List[float]


def measure(steps: Dict[str, Step], *, rounds: int, block: int, warmup: int, seed: int,
            device: str, reference: str, progress: bool = True) -> Dict[str, Samples]:
    """Time every step in ``rounds`` rounds. In each round the methods run in an order
    shuffled by ``random.Random(seed)``, one short block (``block`` calls) each, with a block
    of ``reference`` before the first and after every method (``R m1 R m2 R ... mk R``): each
    method's block is paired with the reference blocks on both sides of it, so that a drift
    of the machine (frequency, another process, the allocator) moves both alike. A step that
    returns an int made that many optimizer steps (an ISTA batch): its block time is divided
    by them."""
    clock = cpu_clock(device)
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    rng = random.Random(seed)
    others = [n for n in steps if n != reference]
    out = {n: Samples([], [], [], []) for n in steps}

    def run_block(fn: Step):
        made = 0
        c0, t0 = clock(), time.perf_counter()
        for _ in range(block):
            k = fn()
            made += 1 if k is None else k
        _sync(device)
        return (time.perf_counter() - t0) / made, (clock() - c0) / made

    for r in range(rounds):
        order = others[:]
        rng.shuffle(order)
        sequence = [reference] + [n for m in order for n in (m, reference)]
        blocks = [(n, *run_block(steps[n])) for n in sequence]
        for i, (n, wall, cpu) in enumerate(blocks):
            s = out[n]
            s.wall.append(wall)
            s.cpu.append(cpu)
            if n == reference:
                s.pair_wall.append(wall)
                s.pair_cpu.append(cpu)
            else:
                s.pair_wall.append((blocks[i - 1][1] + blocks[i + 1][1]) / 2)
                s.pair_cpu.append((blocks[i - 1][2] + blocks[i + 1][2]) / 2)
        if progress:
            print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return out


def _quartiles(values: Sequence[float]):
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def median_ci(values: Sequence[float], z: float = 1.96) -> float:
    """Half-width of the distribution-free ~95 % confidence interval of the median of
    ``values``: between the order statistics whose 1-based ranks are the integers nearest to
    ``(n - z sqrt(n)) / 2`` and ``1 + (n + z sqrt(n)) / 2`` (the normal approximation of the
    binomial; clamped to 1..n, so that below ~6 values it is the range and covers less); NaN
    for a single value."""
    n = len(values)
    if n < 2:
        return float("nan")
    v = sorted(values)
    spread = z * math.sqrt(n)
    lo = min(max(1, math.floor((n - spread) / 2 + 0.5)), n)
    hi = max(min(n, math.floor(1 + (n + spread) / 2 + 0.5)), 1)
    return (v[hi - 1] - v[lo - 1]) / 2


@dataclass
class Stats:
    """One row of the time table (see the module docstring for the columns)."""

    ms_min: float
    ms_med: float
    ratio_min: float
    ratio_med: float
    cpu_ratio: float
    dispersion: float
    wall_over_cpu: float
    ratio_ci: float = float("nan")


def summarize(samples: Dict[str, Samples], reference: str) -> Dict[str, Stats]:
    """Ratios of every method to ``reference`` (the plain / upstream step): ``ratio_min`` of
    the minima; ``ratio_med`` and ``cpu_ratio`` the medians of the paired ratios (each block
    over the reference around it, wall and CPU time); ``dispersion`` of the paired ratios;
    ``ratio_ci`` the half-width of ``ratio_med``'s 95 % interval (:func:`median_ci`)."""
    ref = samples[reference]
    out = {}
    for n, s in samples.items():
        per_block = [w / r for w, r in zip(s.wall, s.pair_wall)]
        med = statistics.median(per_block)
        q1, q3 = _quartiles(per_block)
        out[n] = Stats(
            ms_min=min(s.wall) * 1e3, ms_med=statistics.median(s.wall) * 1e3,
            ratio_min=min(s.wall) / min(ref.wall), ratio_med=med,
            cpu_ratio=statistics.median(c / max(r, 1e-12) for c, r in zip(s.cpu, s.pair_cpu)),
            dispersion=(q3 - q1) / med if med > 0 else float("inf"),
            wall_over_cpu=statistics.median(s.wall) / max(statistics.median(s.cpu), 1e-12),
            ratio_ci=median_ci(per_block))
    return out


def busy_warnings(stats: Dict[str, Stats], reference: str, clock: str, device: str
                  ) -> List[str]:
    """The warnings that say the machine was busy during the run (thresholds above)."""
    warnings = []
    ref = stats[reference]
    if ref.ms_med > BUSY_MEDIAN_OVER_MIN * ref.ms_min:
        warnings.append(
            f"'{reference}' median block {ref.ms_med:.1f} ms is {ref.ms_med / ref.ms_min:.2f}x "
            f"its fastest {ref.ms_min:.1f} ms (threshold {BUSY_MEDIAN_OVER_MIN})")
    noisy = [f"{n} {s.dispersion:.2f}" for n, s in stats.items()
             if s.dispersion > BUSY_DISPERSION]
    if noisy:
        warnings.append(f"paired-ratio dispersion (Q3-Q1)/median above {BUSY_DISPERSION}: "
                        + ", ".join(noisy))
    if clock == "thread" and device == "cpu" and ref.wall_over_cpu > BUSY_WALL_OVER_CPU:
        warnings.append(
            f"'{reference}' wall time is {ref.wall_over_cpu:.2f}x its thread CPU time "
            f"(threshold {BUSY_WALL_OVER_CPU}): the thread waited for a core")
    return warnings


def format_table(stats: Dict[str, Stats], extra: Optional[Dict[str, List[str]]] = None,
                 extra_header: Sequence[str] = ()) -> List[str]:
    """Lines of the time table; ``extra`` adds columns per row (memory, target, pass)."""
    header = (f"{'method':<28} {'ms min':>8} {'ms med':>8} {'x min':>6} {'x med':>6} "
              f"{'ci95':>5} {'cpu x':>6} {'disp':>5}")
    for h in extra_header:
        header += f" {h:>10}"
    lines = [header, "-" * len(header)]
    for n, s in stats.items():
        line = (f"{n:<28} {s.ms_min:8.1f} {s.ms_med:8.1f} {s.ratio_min:6.2f} "
                f"{s.ratio_med:6.2f} {s.ratio_ci:5.2f} {s.cpu_ratio:6.2f} {s.dispersion:5.2f}")
        for cell in (extra or {}).get(n, []):
            line += f" {cell:>10}"
        lines.append(line)
    return lines


def compare_runs(runs: List[Dict[str, Stats]]) -> List[str]:
    """Lines of the per-ratio differences of every later run to the first one, then the
    largest difference of the ratio of minima and the verdict on the paired medians
    (``x med``, the statistic the targets use): the issue's +-0.03."""
    lines = []
    first = runs[0]
    for k, run in enumerate(runs[1:], start=2):
        header = f"{'method':<28} {'d x min':>8} {'d x med':>8} {'d cpu x':>8}"
        lines += [f"run {k} - run 1:", header, "-" * len(header)]
        worst_min = worst_med = 0.0
        for n, s in run.items():
            d = (s.ratio_min - first[n].ratio_min, s.ratio_med - first[n].ratio_med,
                 s.cpu_ratio - first[n].cpu_ratio)
            worst_min, worst_med = max(worst_min, abs(d[0])), max(worst_med, abs(d[1]))
            lines.append(f"{n:<28} {d[0]:+8.3f} {d[1]:+8.3f} {d[2]:+8.3f}")
        verdict = "yes" if worst_med <= AGREEMENT else "NO"
        # a difference beyond both runs' own 95 % intervals is the machine changing between
        # the runs, not too few rounds
        shifted = [n for n, s in run.items()
                   if abs(s.ratio_med - first[n].ratio_med)
                   > math.hypot(s.ratio_ci, first[n].ratio_ci)]
        lines.append("'x med' differences beyond the runs' combined 95 % intervals "
                     f"(sqrt(ci1^2 + ci2^2)): {', '.join(shifted) if shifted else 'none'}")
        lines.append(f"max |d x min| = {worst_min:.3f} (ratio of minima, for reference)")
        lines.append(f"max |d x med| = {worst_med:.3f}; every 'x med' within +-{AGREEMENT}: "
                     f"{verdict}")
    return lines


def profile_step(step: Step, device: str, steps: int = 3, rows: int = 25) -> str:
    """torch.profiler's table of ``steps`` calls of ``step`` (after one warm-up call), top
    ``rows`` operators by self CPU time (and CUDA time on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    step()
    _sync(device)
    with profile(activities=activities, profile_memory=True) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def pieces_clock(device: str) -> Callable[[], float]:
    """The clock of :func:`engine_pieces`: CPU time on a CPU (:func:`cpu_clock`), wall time
    around synchronised kernels on a GPU (whose work no CPU clock sees)."""
    return cpu_clock(device) if device == "cpu" else time.perf_counter


def engine_pieces(bench: Bench, rounds: int) -> Dict[str, float]:
    """Median seconds (:func:`pieces_clock`) of each piece of work the parameter-level engine
    does on top of the floor, timed in isolation on this model's real task gradients, and of
    the plain step, interleaved over ``rounds`` rounds:

    - ``write of G``: G zeroed and the T task gradients added into their rows (the engine's
      backward passes accumulate them there as they arrive; the floor lets autograd's fresh
      tensors go). An upper bound: in the step the adds replace the writes of autograd's
      fresh gradient tensors, which the floor pays and this piece does not subtract;
    - ``exact Gramian``: :func:`~mtl_plugins.core.aggregation._utils.gramian64` (float64
      accumulation, issue 11; ``gramian_kernel="blas"``) with the engine's scratch buffer;
    - ``C exact Gramian``: the same Gramian by the C kernel
      (:func:`~mtl_plugins.core.aggregation.c_gramian.c_gramian64`, ``gramian_kernel="c"``,
      what ``"auto"`` takes on a CPU; left out, with a note, where it cannot be built);
    - ``w @ G into row 0``: :func:`~mtl_plugins.core.aggregation._utils.combine64`, the
      direction written into G's first row as the engine does;
    - ``fused exact Gramian``: the same Gramian from one compiled pass over G
      (:func:`~mtl_plugins.core.aggregation.fused_gramian.fused_gramian64`, the engine's
      ``gramian_kernel="fused"``; left out, with a note, where torch.compile cannot build it);
    - ``task rows: C Gramian`` and ``task rows: w @ G``: what the engine does instead on a CPU
      with the C kernel (:class:`~mtl_plugins.core.aggregation.c_gramian.SegmentedRows`, the
      default there): the Gramian and the direction (into the first task's tensors) from the
      task gradients as autograd made them, with no write of G at all (left out without the
      C kernel);
    - ``float32 Gramian``: ``G @ G.T`` in float32, for reference (the engine does not use it).
    """
    from mtl_plugins.core.aggregation import c_gramian
    from mtl_plugins.core.aggregation._utils import combine64, gramian64, work_buffer
    from mtl_plugins.core.aggregation.fused_gramian import fused_gramian64
    from mtl_plugins.core.tasks import MTLConfigError

    _, losses = bench.forward()
    grads = [torch.autograd.grad(losses[t], bench.shared, retain_graph=i < len(TASKS) - 1)
             for i, t in enumerate(TASKS)]
    sizes = [p.numel() for p in bench.shared]
    numel = sum(sizes)
    G = torch.empty(len(TASKS), numel, device=bench.device)
    rows = [list(torch.split(G[i], sizes)) for i in range(len(TASKS))]
    sources = [[g.reshape(-1) for g in task] for task in grads]
    work = work_buffer(len(TASKS), numel, G.device)
    task_rows = [[g.clone() for g in task] for task in grads]  # (its w @ G writes row 0)

    def write() -> None:
        G.zero_()
        for dst, src in zip(rows, sources):
            torch._foreach_add_(dst, src)

    write()
    gramian = gramian64(G, work=work)
    weights = torch.full((len(TASKS),), 1.0 / len(TASKS), dtype=torch.float64)
    pieces: Dict[str, Callable[[], object]] = {
        "plain step": bench.plain(),
        "write of G": write,
        "exact Gramian": lambda: gramian64(G, work=work),
        "C exact Gramian": lambda: c_gramian.c_gramian64(G),
        "w @ G into row 0": lambda: combine64(weights, G, gramian, out=G[0], work=work),
        "fused exact Gramian": lambda: fused_gramian64(G),
        "task rows: C Gramian": lambda: c_gramian.SegmentedRows(task_rows, sizes).gramian(),
        "task rows: w @ G": lambda: c_gramian.SegmentedRows(task_rows, sizes).combine(weights),
        "float32 Gramian": lambda: G @ G.T,
    }
    if not c_gramian.supports(G) or c_gramian.unavailable():
        why = c_gramian.unavailable() or f"G on {G.device.type}"
        print(f"note: 'C exact Gramian' and the task rows left out: {why}")
        for name in ("C exact Gramian", "task rows: C Gramian", "task rows: w @ G"):
            del pieces[name]
    try:
        fused_gramian64(G)
    except MTLConfigError as err:
        print(f"note: 'fused exact Gramian' left out: {err}")
        del pieces["fused exact Gramian"]
    clock = pieces_clock(bench.device)
    times: Dict[str, List[float]] = {k: [] for k in pieces}
    for fn in pieces.values():
        fn()
    for _ in range(rounds):
        for name, fn in pieces.items():
            _sync(bench.device)
            start = clock()
            fn()
            _sync(bench.device)
            times[name].append(clock() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def format_pieces(pieces: Dict[str, float]) -> List[str]:
    """The table of :func:`engine_pieces`: ms and fraction of the plain step, and the sum of
    what the engine adds to the floor."""
    plain = pieces["plain step"]
    added = ("write of G", "exact Gramian", "w @ G into row 0")
    lines = [f"{'piece':<28}{'ms':>9}{'x plain':>9}", "-" * 46]
    for name, sec in pieces.items():
        lines.append(f"{name:<28}{sec * 1e3:9.2f}{sec / plain:9.3f}")
    total = sum(pieces[k] for k in added)
    lines.append(f"{'engine above the floor':<28}{total * 1e3:9.2f}{total / plain:9.3f}"
                 "   (write of G + exact Gramian + w @ G)")
    for kernel in ("C", "fused"):
        if f"{kernel} exact Gramian" in pieces:
            sub = total - pieces["exact Gramian"] + pieces[f"{kernel} exact Gramian"]
            lines.append(f"{'... with the ' + kernel + ' kernel':<28}{sub * 1e3:9.2f}"
                         f"{sub / plain:9.3f}   (write of G + {kernel} exact Gramian + w @ G)")
    if "task rows: C Gramian" in pieces:
        rows = pieces["task rows: C Gramian"] + pieces["task rows: w @ G"]
        lines.append(f"{'... on the task rows':<28}{rows * 1e3:9.2f}{rows / plain:9.3f}"
                     "   (task rows: C Gramian + w @ G; the CPU default)")
    return lines


def memory_cells(columns: Dict[str, Dict[str, float]], reference: str, label: str
                 ) -> Tuple[Dict[str, List[str]], List[str]]:
    """Table cells and headers of the memory columns: for each non-empty column (name ->
    {row: MiB}) the value and its difference from the ``reference`` row (header ``vs
    <label>``); tensor peaks to 0.1 MiB (they are exact), the others to 1 MiB."""
    cells: Dict[str, List[str]] = {}
    header: List[str] = []
    for name, values in columns.items():
        if not values:
            continue
        digits = 1 if name.startswith("tensor") else 0
        header += [name, f"vs {label}"]
        for row, v in values.items():
            cells.setdefault(row, []).extend(
                [f"{v:.{digits}f}", f"{v - values[reference]:+.{digits}f}"])
    return cells, header


def child_peak_mib(script: str, argv: List[str]) -> List[float]:
    """The peaks reported by a fresh process ``python script *argv`` (the numbers of its last
    line: :func:`child_peaks`), under glibc's default allocator settings (what a training run
    sees; the steady settings of the timing would keep freed pages)."""
    env = {k: v for k, v in os.environ.items() if k not in STEADY_MALLOC}
    out = subprocess.run([sys.executable, script, *argv, "--malloc", "default"], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {argv} failed:\n{out.stderr[-3000:]}")
    return [float(v) for v in out.stdout.strip().splitlines()[-1].split()]


def peak_memory_mib(name: str, args) -> List[float]:
    """Peak memory of a fresh process that runs only ``name`` for a few steps:
    :func:`child_peaks`."""
    return child_peak_mib(__file__, [
        "--child-memory", name, "--batch", str(args.batch), "--size", str(args.size),
        "--device", args.device, "--threads", str(args.threads)])


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_peak_mib(step: Step, device: str, steps: int = 5) -> float:
    """Peak memory over ``steps`` calls of ``step``, counted from after set-up: importing
    torch's CUDA libraries has a larger transient peak than a CPU step, so the counter is
    reset once the model is built. CPU: peak RSS (VmHWM); CUDA: ``max_memory_allocated``."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return _peak_rss_mib()


def tensor_peak_mib(build: Callable[[], Step], steps: int) -> float:
    """The most memory CPU tensors held at once while ``build()`` made a step and ``steps``
    calls ran it: the peak of torch's CPU allocator, the counterpart of
    ``torch.cuda.max_memory_allocated``, with none of the process's other memory (libraries,
    the Python heap, the allocator's free pages) that the peak RSS also counts and that moves
    it by several MiB from one process to the next. Read from ``torch.profiler`` with
    ``profile_memory=True``: each allocation event carries the allocator's total at that
    moment, counted from the start of the profile, so ``build`` must make every tensor the
    step uses. The same number in every run (NaN where this torch's profiler has no event
    tree)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step = build()
        for _ in range(steps):
            step()
    try:
        from torch._C._profiler import _EventType
        pending = list(prof.profiler.kineto_results.experimental_event_tree())
    except (ImportError, AttributeError):
        return float("nan")
    peak = 0
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            peak = max(peak, event.extra_fields.total_allocated)
    return peak / 2 ** 20


def child_peaks(build: Callable[[], Step], device: str, steps: int, warm: bool = False
                ) -> List[float]:
    """``[peak]`` on a GPU (:func:`step_peak_mib`: ``max_memory_allocated``); on a CPU
    ``[peak RSS, tensor peak]`` (:func:`step_peak_mib`, then :func:`tensor_peak_mib` on a
    second build). ``warm``: one untimed call first (the RSS counter is reset after it)."""
    step = build()
    if warm:
        step()
    peaks = [step_peak_mib(step, device, steps=steps)]
    del step
    if not device.startswith("cuda"):
        peaks.append(tensor_peak_mib(build, steps + warm))
    return peaks


def child_memory(name: str, args) -> None:
    print(*child_peaks(lambda: build_step(Bench(args.batch, args.size, args.device), name),
                       args.device, steps=5))


#: glibc's allocator settings of ``--malloc steady`` (read by glibc at start-up, hence the
#: re-execution): no ``mmap`` per large tensor and no trimming of freed memory, so that a step
#: reuses the pages of the previous one instead of faulting fresh ones in. With glibc's
#: defaults a plain step of the engine benchmark takes ~4900 page faults and ~12 ms of system
#: time (6 %), and how many depends on glibc's adaptive threshold, i.e. on what ran before:
#: a drift between runs that is the allocator's, not the method's.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 36),
                 "MALLOC_TOP_PAD_": str(1 << 28)}


def use_steady_malloc(args, argv: Optional[List[str]]) -> None:
    """Re-execute this script under :data:`STEADY_MALLOC` (``--malloc steady``, the default)
    unless it already runs under it; ``--malloc default`` keeps glibc's own settings (what a
    training run sees without a tuned allocator). Only when run as a script (``argv`` None:
    the command line is ``sys.argv``)."""
    if argv is not None or args.malloc != "steady" or not sys.platform.startswith("linux"):
        return
    if all(os.environ.get(k) == v for k, v in STEADY_MALLOC.items()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **STEADY_MALLOC})


def add_timing_args(p: argparse.ArgumentParser, rounds: int, steps: int) -> None:
    """The timing options shared with tools/benchmark_step.py."""
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: CPU time is the calling thread's)")
    p.add_argument("--rounds", type=int, default=rounds, help="rounds of one block per method")
    p.add_argument("--steps", type=int, default=steps, help="steps per block")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-round method order")
    p.add_argument("--repeat-runs", type=int, default=1,
                   help="measure the whole table this many times and print the differences")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny sizes, 3 rounds of 1 step, 1 warm-up step")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--malloc", choices=("steady", "default"), default="steady",
                   help="glibc allocator settings: 'steady' (re-executes with STEADY_MALLOC: "
                        "no page faults per step) or glibc's 'default'")


def check_timing_args(p: argparse.ArgumentParser, args) -> None:
    """Apply ``--quick``; refuse values that would give no table."""
    if args.quick:
        args.rounds, args.steps, args.warmup = 3, 1, 1
    for key in ("rounds", "steps", "repeat_runs", "threads"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')}={getattr(args, key)}: expected an integer >= 1")
    if args.warmup < 0:
        p.error(f"--warmup={args.warmup}: expected an integer >= 0")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        p.error(f"--device={args.device!r}: expected 'cpu' or 'cuda[:N]'")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device={args.device!r}: torch sees no CUDA device")


def run_tables(steps: Dict[str, Step], reference: str, args, title: str
               ) -> List[Dict[str, Stats]]:
    """``--repeat-runs`` measurements of ``steps``; prints each run's warnings; returns the
    runs' statistics (the caller prints the tables)."""
    runs = []
    clock = cpu_clock_name(args.device)
    for k in range(args.repeat_runs):
        print(f"{title}: run {k + 1}/{args.repeat_runs}: {args.rounds} rounds x {args.steps} "
              f"step(s) per block, order shuffled per round (seed {args.seed}), "
              f"CPU clock: {clock}", file=sys.stderr, flush=True)
        samples = measure(steps, rounds=args.rounds, block=args.steps, warmup=args.warmup,
                          seed=args.seed + k, device=args.device, reference=reference)
        runs.append(summarize(samples, reference))
    return runs


def print_warnings(stats: Dict[str, Stats], reference: str, device: str) -> None:
    for w in busy_warnings(stats, reference, cpu_clock_name(device), device):
        print(f"WARNING: machine busy? {w}")


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="*", help="subset of methods (default: all available)")
    p.add_argument("--batch", type=int, default=None, help="default 4 (--quick: 2)")
    p.add_argument("--size", type=int, default=None, help="default 128 (--quick: 32)")
    add_timing_args(p, rounds=20, steps=1)
    p.add_argument("--memory", action="store_true", help="also measure peak memory per method")
    p.add_argument("--profile", metavar="METHOD",
                   help="print torch.profiler's top operators of METHOD's step and exit")
    p.add_argument("--pieces", action="store_true",
                   help="time the pieces of parameter-level work above the floor (write of G, "
                        "exact Gramian, w @ G) against the plain step and exit")
    p.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch = args.batch or (2 if args.quick else 4)
    args.size = args.size or (32 if args.quick else 128)
    check_timing_args(p, args)
    use_steady_malloc(args, argv)
    torch.set_num_threads(args.threads)
    if args.child_memory:
        child_memory(args.child_memory, args)
        return
    known = available_methods()
    if args.profile:
        if args.profile not in known:
            p.error(f"--profile={args.profile!r}: expected one of {known}")
        bench = Bench(args.batch, args.size, args.device)
        print(f"profile of {args.profile}: batch {args.batch}, {args.size}x{args.size}, "
              f"device {args.device}, {args.threads} threads, 3 steps")
        print(profile_step(build_step(bench, args.profile), args.device))
        return
    if args.pieces:
        bench = Bench(args.batch, args.size, args.device)
        clock = "wall" if args.device != "cpu" else cpu_clock_name(args.device) + " CPU"
        print(f"engine pieces: batch {args.batch}, {args.size}x{args.size}, device "
              f"{args.device}, {args.threads} thread(s), malloc {args.malloc}, median of "
              f"{args.rounds} rounds ({clock} time)")
        print("\n".join(format_pieces(engine_pieces(bench, args.rounds))))
        return
    names = args.methods or known
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"--methods: unknown or not installed {unknown}; expected names from {known}")
    if "plain" not in names:
        names = ["plain"] + names
    missing = [a for a in ("libmtl", "torchjd") if not any(k.startswith(a + ":") for k in known)]
    bench = Bench(args.batch, args.size, args.device)
    n_shared = sum(p.numel() for p in bench.shared)
    grads_mib = len(TASKS) * n_shared * 4 / 2 ** 20
    print(f"model: ResNet-18 trunk ({n_shared / 1e6:.2f} M shared parameters), 3 heads, "
          f"{args.size}x{args.size}, batch {args.batch}, device {args.device}, "
          f"{args.threads} thread(s), malloc {args.malloc}; T task gradients = "
          f"{grads_mib:.1f} MiB", flush=True)
    if missing:
        print(f"note: anchors not installed, rows left out: {missing} "
              "(pip install --no-deps libmtl==1.1.5 torchjd==0.18.0)")
    steps = {n: build_step(bench, n) for n in names}
    runs = run_tables(steps, "plain", args, "benchmark_backward")
    peaks = {n: peak_memory_mib(n, args) for n in names} if args.memory else {}
    memory = {n: v[0] for n, v in peaks.items()}
    tensors = {n: v[1] for n, v in peaks.items() if len(v) > 1}
    extra, header = memory_cells({"peak MiB": memory, "tensor MiB": tensors}, "plain", "plain")
    for k, stats in enumerate(runs, start=1):
        print(f"run {k}/{len(runs)}:")
        print("\n".join(format_table(stats, extra, header)))
        print_warnings(stats, "plain", args.device)
    if len(runs) > 1:
        print("\n".join(compare_runs(runs)))
    if memory:
        budget = f"{memory['plain'] + grads_mib:.0f} MiB"
        if tensors:
            budget += f" (peak); tensors: {tensors['plain'] + grads_mib:.1f} MiB"
        print(f"memory budget: plain + T task gradients = {budget}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": [{n: asdict(s) for n, s in r.items()} for r in runs],
                       "memory_mib": memory, "tensor_mib": tensors, "grads_mib": grads_mib},
                      f, indent=1)


if __name__ == "__main__":
    main()
