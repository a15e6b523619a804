#!/usr/bin/env python
"""Recon stage 1: rank the shared layers by S-conflict score (paper 004, Algorithm 1).

Runs ``--steps`` joint-training steps (the engine with a ConflictRecorder wrapping the plain
sum) and prints the ranking and the parameter increase of making the top-K layers
task-specific. Without ``--model`` it uses a small built-in conv net with two tasks on random
data (a smoke test of the pipeline). ``--model pkg.module:factory`` imports ``factory()``,
which must return a dict::

    shared:  nn.Module            # the shared trunk (its parameters are scored)
    heads:   {task: nn.Module}    # head t maps shared(x) to task t's output
    batch:   callable() -> (x, {task: target})
    loss:    callable(task, output, target) -> scalar tensor

    python tools/recon_search.py --steps 200 --S -0.02 --topk 10 --json ranking.json
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mtl_plugins.core.backward import TaskBackward
from mtl_plugins.core.structure.recon import ConflictRecorder, recon_param_increase


def builtin(seed: int = 0, batch_size: int = 16) -> Dict[str, Any]:
    torch.manual_seed(seed)
    shared = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    heads = {"cls": nn.Linear(32, 5), "reg": nn.Linear(32, 2)}
    g = torch.Generator().manual_seed(seed + 1)

    def batch():
        n = batch_size
        x = torch.randn(n, 3, 16, 16, generator=g)
        return x, {"cls": torch.randint(5, (n,), generator=g), "reg": torch.randn(n, 2, generator=g)}

    def loss(task, out, target):
        return F.cross_entropy(out, target) if task == "cls" else F.mse_loss(out, target)

    return dict(shared=shared, heads=heads, batch=batch, loss=loss)


def load(spec: str) -> Dict[str, Any]:
    mod, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"--model {spec!r}: expected 'package.module:factory'")
    return getattr(importlib.import_module(mod), attr)()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="'package.module:factory' (default: built-in toy model)")
    ap.add_argument("--steps", type=int, default=50, help="search iterations I")
    ap.add_argument("--S", type=float, default=-0.02, help="severity threshold S in (-1, 0]")
    ap.add_argument("--topk", type=int, default=5, help="K layers to convert")
    ap.add_argument("--lr", type=float, default=0.01, help="plain SGD learning rate")
    ap.add_argument("--batch", type=int, default=16, help="batch size of the built-in model")
    ap.add_argument("--json", help="write the ranking to this file")
    args = ap.parse_args(argv)
    spec = load(args.model) if args.model else builtin(batch_size=args.batch)
    shared: nn.Module = spec["shared"]
    heads = nn.ModuleDict(spec["heads"])
    tasks = list(heads)
    params = [p for p in shared.parameters() if p.requires_grad]
    rec = ConflictRecorder(shared, S=args.S, shared_params=params, task_names=tasks)
    engine = TaskBackward(tasks, rec)
    trained = [p for p in list(shared.parameters()) + list(heads.parameters()) if p.requires_grad]
    for _ in range(args.steps):
        x, targets = spec["batch"]()
        z = shared(x)
        losses = {t: spec["loss"](t, heads[t](z), targets[t]) for t in tasks}
        for p in trained:
            p.grad = None
        engine(losses, params, {t: list(heads[t].parameters()) for t in tasks})
        with torch.no_grad():  # plain SGD: the search only needs a joint-training trajectory
            for p in trained:
                if p.grad is not None:
                    p -= args.lr * p.grad
    ranking = rec.ranking()
    sizes = {m.name: m.numel for m in rec.layers}
    total = sum(p.numel() for p in shared.parameters())
    print(f"Recon search: {args.steps} steps, S = {args.S}, tasks = {tasks}, "
          f"max score = {args.steps * len(tasks) * (len(tasks) - 1) // 2}")
    print(f"{'rank':>4}  {'score':>6}  {'params':>9}  layer")
    for i, (name, score) in enumerate(ranking, 1):
        print(f"{i:>4}  {score:>6}  {sizes[name]:>9}  {name or '<root>'}")
    top = [n for n, _ in ranking[:args.topk]]
    inc = recon_param_increase(shared, top, len(tasks)) if top else 0
    print(f"\ntop-{args.topk}: {top}")
    print(f"parameter increase: +{inc} (+{100.0 * inc / max(total, 1):.2f}% of the "
          f"{total} shared parameters)")
    if args.json:
        rec.to_json(args.json)
        print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
