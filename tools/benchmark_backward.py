"""Per-step time and peak memory of every MTL backward method on one dense multi-task model.

The model (``DenseMTLModel``) is the anchors' reference model (../shared/notes/anchors-mtl.md,
appendix): a ResNet-18 trunk (conv1 to layer3, 2.78 M shared parameters) and three 2-conv heads
for 13-class segmentation, depth and surface normals at 128x128, batch 4. Every method runs a
full optimizer step (forward, backward, SGD step) on the same batch.

Rows: the plain summed-loss step; the floor (forward + T ``autograd.grad`` through the trunk,
no aggregation); every aggregator of ``mtl_plugins.core.aggregation`` at parameter and at
representation level; STA and ISTA allocation (ISTA: per optimizer step, i.e. per sub-step);
and, when installed, LibMTL's and TorchJD's implementations of the same methods on the same
model. Time is the median over interleaved rounds, as a ratio to the plain step of the same
round. Memory is the peak resident set size of a separate process that runs only that method
(``--memory``), beside the plain step's; the budget is the plain step plus T task gradients.

    python tools/benchmark_backward.py                      # time table
    python tools/benchmark_backward.py --memory             # time and memory tables
    python tools/benchmark_backward.py --methods plain pcgrad:parameter mgda:parameter:batched
    python tools/benchmark_backward.py --device cuda        # on a GPU (memory: CUDA peak)

Anchors (optional): ``pip install --no-deps libmtl==1.1.5 torchjd==0.18.0``.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import types
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

TASKS = ("seg", "depth", "normal")
Step = Callable[[], None]


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

    def floor(self) -> Step:
        def step() -> None:
            _, losses = self.forward()
            for i, t in enumerate(TASKS):
                torch.autograd.grad(losses[t], self.shared + self.heads[t], retain_graph=i < 2)
            self._finish()
        return step

    # ---- ours
    def ours(self, method: str, level: str, vjp: str = "sequential") -> Step:
        from mtl_plugins.core.aggregation import build_aggregator
        from mtl_plugins.core.backward import TaskBackward

        engine = TaskBackward(TASKS, build_aggregator(method).to(self.device), level=level,
                              vjp=vjp)

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


def import_libmtl():
    """Import LibMTL 1.1.5, which needs ``torchvision.models.utils`` (gone in torchvision 0.29)."""
    if "torchvision.models.utils" not in sys.modules:
        shim = types.ModuleType("torchvision.models.utils")
        shim.load_state_dict_from_url = torch.hub.load_state_dict_from_url
        sys.modules["torchvision.models.utils"] = shim
    import LibMTL

    return LibMTL


def available_methods() -> List[str]:
    from mtl_plugins.core.aggregation import AGGREGATORS

    names = ["plain", "floor"]
    for level in ("parameter", "representation"):
        names += [f"{a}:{level}" for a in AGGREGATORS if a != "sum"]
    names += ["pcgrad:parameter:batched", "mgda:parameter:batched", "sta", "ista"]
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
    if name in ("plain", "floor"):
        return getattr(bench, name)()
    if name in ("sta", "ista", "ft"):
        return bench.allocation(name)
    prefix, _, arg = name.partition(":")
    if prefix == "libmtl":
        return bench.libmtl(arg)
    if prefix == "torchjd":
        return bench.torchjd(arg)
    level, _, vjp = arg.partition(":")
    return bench.ours(prefix, level or "parameter", vjp or "sequential")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_methods(names: List[str], args) -> Dict[str, List[float]]:
    """Median-of-rounds ratio to the plain step of the same round, per method."""
    bench = Bench(args.batch, args.size, args.device)
    steps = {n: build_step(bench, n) for n in names}
    for n, fn in steps.items():
        for _ in range(args.warmup):
            fn()
    _sync(args.device)
    ratios: Dict[str, List[float]] = {n: [] for n in names}
    seconds: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        round_times = {}
        order = names if r % 2 == 0 else list(reversed(names))
        for n in order:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[n]()
            _sync(args.device)
            round_times[n] = (time.perf_counter() - t0) / args.steps
        for n in names:
            seconds[n].append(round_times[n])
            ratios[n].append(round_times[n] / round_times["plain"])
        print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    return {n: [statistics.median(seconds[n]), statistics.median(ratios[n]),
                min(ratios[n]), max(ratios[n])] for n in names}


def peak_memory_mib(name: str, args) -> float:
    """Peak memory of a fresh process that runs only ``name`` for a few steps."""
    cmd = [sys.executable, __file__, "--child-memory", name, "--batch", str(args.batch),
           "--size", str(args.size), "--device", args.device, "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


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


def child_memory(name: str, args) -> None:
    """Peak memory over 5 steps, after set-up: importing torch's CUDA libraries has a larger
    transient peak than a CPU step, so the peak counter is reset once the model is built."""
    bench = Bench(args.batch, args.size, args.device)
    step = build_step(bench, name)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
    for _ in range(5):
        step()
    if args.device.startswith("cuda"):
        print(torch.cuda.max_memory_allocated() / 2 ** 20)
    else:
        print(_peak_rss_mib())


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="*", help="subset of methods (default: all available)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per method per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory", action="store_true", help="also measure peak memory per method")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child_memory:
        child_memory(args.child_memory, args)
        return
    names = args.methods or available_methods()
    if "plain" not in names:
        names = ["plain"] + names
    bench_probe = Bench(args.batch, args.size, args.device)
    n_shared = sum(p.numel() for p in bench_probe.shared)
    grads_mib = len(TASKS) * n_shared * 4 / 2 ** 20
    del bench_probe
    print(f"model: ResNet-18 trunk ({n_shared / 1e6:.2f} M shared parameters), 3 heads, "
          f"{args.size}x{args.size}, batch {args.batch}, device {args.device}, "
          f"{args.threads} threads; T task gradients = {grads_mib:.1f} MiB", flush=True)
    results = time_methods(names, args)
    memory: Dict[str, float] = {}
    if args.memory:
        for n in names:
            memory[n] = peak_memory_mib(n, args)
    header = f"{'method':<28} {'ms/step':>8} {'ratio':>6} {'min':>6} {'max':>6}"
    if memory:
        header += f" {'peak MiB':>9} {'vs plain':>9}"
    print(header)
    print("-" * len(header))
    for n in names:
        sec, ratio, lo, hi = results[n]
        line = f"{n:<28} {sec * 1e3:8.1f} {ratio:6.2f} {lo:6.2f} {hi:6.2f}"
        if memory:
            line += f" {memory[n]:9.0f} {memory[n] - memory['plain']:+9.0f}"
        print(line)
    if memory:
        print(f"memory budget: plain + T task gradients = {memory['plain'] + grads_mib:.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"time": results, "memory_mib": memory, "grads_mib": grads_mib}, f, indent=1)


if __name__ == "__main__":
    main()
