"""Cost of the float64 Gramian and direction (issue 11) against the float32 forms they replace.

For a float32 ``G`` of shape ``[T, P]`` it times, min over ``--repeats`` runs:

- ``f32``: ``G @ G.T`` in float32 then cast, and ``w @ G`` in float32 (the former code);
- ``f64``: :func:`gramian64` and :func:`combine64` (float64 accumulation, chunked);
- ``fused``: :func:`fused_gramian64`, the same float64 Gramian from one compiled pass over
  ``G`` (the engine's ``gramian_kernel="fused"``; built before timing);
- ``c``: :func:`c_gramian64`, the same Gramian by the C kernel (``gramian_kernel="c"``, what
  ``"auto"`` takes on a CPU; ``torch.get_num_threads()`` threads; ``-`` where it cannot be
  built or ``G`` is not on a CPU).

Usage: ``python tools/bench_gramian.py [--tasks 3] [--params 4000000] [--device cpu]``.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from mtl_plugins.core.aggregation import c_gramian
from mtl_plugins.core.aggregation._utils import combine64, gramian64
from mtl_plugins.core.aggregation.fused_gramian import fused_gramian64


def _min_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--params", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device={device} T={args.tasks} repeats={args.repeats} (min over repeats, ms)")
    print("P           gramian_f32  gramian_f64  gramian_fused  gramian_c  combine_f32  "
          "combine_f64")
    for p in args.params:
        g = torch.randn(args.tasks, p, device=device)
        w = torch.rand(args.tasks, dtype=torch.float64)
        fused_gramian64(g)  # the kernel's build is not timed
        times = [
            _min_time(lambda: (g @ g.T).double(), args.repeats, device),
            _min_time(lambda: gramian64(g), args.repeats, device),
            _min_time(lambda: fused_gramian64(g), args.repeats, device),
            _min_time(lambda: c_gramian.c_gramian64(g), args.repeats, device)
            if c_gramian.supports(g) and not c_gramian.unavailable() else float("nan"),
            _min_time(lambda: w.to(device=device, dtype=g.dtype) @ g, args.repeats, device),
            _min_time(lambda: combine64(w, g), args.repeats, device),
        ]
        print(f"{p:<11d} " + "  ".join(f"{1e3 * t:{width}.2f}"
                                       for t, width in zip(times, (11, 11, 13, 9, 11, 11))))


if __name__ == "__main__":
    main()
