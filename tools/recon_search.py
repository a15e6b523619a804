#!/usr/bin/env python
"""Recon stage 1: rank the shared layers by S-conflict score (paper 004, Algorithm 1).

Prints the ranking and, for making the top-K layers task-specific, the two sizes paper 004
reports (~l. 193: "Recon increases the model size by 0.52% to 57.25%. Recon turns 1.42%, ...
shared parameters to task-specific"): the increase of the whole model, and the % of the
shared parameters θ_sh (the ranking file's ``shared_params``) turned task-specific.

Config mode (``--config``): trains a detectron2 ``.yaml`` config (``MTLDefaultTrainer``) or an
mmseg ``.py`` config (mmengine ``Runner``) with the Recon search switched on
(``MTL.RECON_SEARCH`` / ``optim_wrapper.mtl.recon_search`` + ``MTLHook``), no evaluation,
then reads the ranking JSON the training wrote, measures the increase on the trained model and
prints the stage-2 config keys. Trailing overrides: ``KEY VALUE`` pairs (detectron2) or
``key=value`` (mmseg, as ``--cfg-options``)::

    python tools/recon_search.py --config configs/d2/mask_rcnn_R_50_FPN_synthetic_cpu.yaml \
        --steps 20 --topk 5 --work-dir out/search SOLVER.BASE_LR 0.00001
    python tools/recon_search.py --config configs/mmseg/synthetic/mtl_recon_search.py \
        --steps 30 --topk 2 train_dataloader.batch_size=4

Toy mode (no ``--config``): ``--steps`` joint-training steps (the engine with a
ConflictRecorder wrapping the plain sum). Without ``--model`` it uses a small built-in conv net
with two tasks on random data (a smoke test of the pipeline). ``--model pkg.module:factory``
imports ``factory()``, which must return a dict::

    shared:  nn.Module            # the shared trunk (its parameters are scored)
    heads:   {task: nn.Module}    # head t maps shared(x) to task t's output
    batch:   callable() -> (x, {task: target})
    loss:    callable(task, output, target) -> scalar tensor

    python tools/recon_search.py --steps 200 --S -0.02 --topk 10 --json ranking.json
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mtl_plugins.core.backward import TaskBackward
from mtl_plugins.core.structure.recon import ConflictRecorder, recon_param_report

TOY_STEPS, TOY_S, TOY_LR, TOY_BATCH = 50, -0.02, 0.01, 16
TOY_ONLY = ("model", "lr", "batch")  # options of the toy mode
MTIME_SLACK_S = 2.0  # coarse file-system clocks: a ranking this much older still counts as new


def builtin(seed: int = 0, batch_size: int = TOY_BATCH) -> Dict[str, Any]:
    """The built-in toy model: a small conv trunk, a 5-class and a 2-d regression head."""
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
    """The dict returned by the ``--model`` factory ``package.module:factory``."""
    mod, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"--model {spec!r}: expected 'package.module:factory'")
    return getattr(importlib.import_module(mod), attr)()


# --------------------------------------------------------------------------- report
def num_params(model: nn.Module) -> int:
    """Parameters of ``model`` (each tensor once)."""
    return sum({id(p): p.numel() for p in model.parameters()}.values())


def report(data: Dict[str, Any], model: nn.Module, topk: int, of: str) -> List[str]:
    """Print a ranking (``ConflictRecorder.to_dict`` / its JSON) and the parameter increase of
    converting its top ``topk`` layers of ``model``; returns those layers. ``of`` names what
    the relative increase is relative to."""
    tasks, ranking = data["tasks"], data["ranking"]
    print(f"Recon search: {data['iterations']} iterations, S = {data['S']}, tasks = {tasks}, "
          f"task pairs counted = {data['pairs_counted']}")
    print(f"{'rank':>4}  {'score':>6}  {'params':>9}  layer")
    for i, row in enumerate(ranking, 1):
        print(f"{i:>4}  {row['score']:>6}  {row['params']:>9}  {row['module'] or '<root>'}")
    top = [row["module"] for row in ranking[:topk]]
    converted = recon_param_report(model, top, len(tasks)).converted if top else 0
    inc = (len(tasks) - 1) * converted
    total = num_params(model)
    print(f"\ntop-{topk}: {top}")
    print(f"parameter increase: +{inc} (+{100.0 * inc / max(total, 1):.2f}% of the "
          f"{total} {of} parameters)")
    shared = data.get("shared_params")
    if shared is None:
        print("shared parameters turned task-specific: unknown (the ranking file has no "
              "'shared_params'; it predates this tool's version)")
    else:
        print(f"shared parameters turned task-specific: {converted} of {shared} "
              f"({100.0 * converted / max(shared, 1):.2f}%)")
    return top


# --------------------------------------------------------------------------- toy mode
def run_toy(args: argparse.Namespace) -> int:
    """Stage 1 on the built-in or ``--model`` trunk with plain SGD."""
    batch = TOY_BATCH if args.batch is None else args.batch
    spec = load(args.model) if args.model else builtin(batch_size=batch)
    steps = TOY_STEPS if args.steps is None else args.steps
    lr = TOY_LR if args.lr is None else args.lr
    shared: nn.Module = spec["shared"]
    heads = nn.ModuleDict(spec["heads"])
    tasks = list(heads)
    params = [p for p in shared.parameters() if p.requires_grad]
    rec = ConflictRecorder(shared, S=TOY_S if args.S is None else args.S, shared_params=params,
                           task_names=tasks)
    engine = TaskBackward(tasks, rec)
    trained = [p for p in list(shared.parameters()) + list(heads.parameters()) if p.requires_grad]
    for _ in range(steps):
        x, targets = spec["batch"]()
        z = shared(x)
        losses = {t: spec["loss"](t, heads[t](z), targets[t]) for t in tasks}
        for p in trained:
            p.grad = None
        engine(losses, params, {t: list(heads[t].parameters()) for t in tasks})
        with torch.no_grad():  # plain SGD: the search only needs a joint-training trajectory
            for p in trained:
                if p.grad is not None:
                    p -= lr * p.grad
    report(rec.to_dict(), shared, args.topk, "shared")
    if args.json:
        rec.to_json(args.json)
        print(f"written: {args.json}")
    return 0


# --------------------------------------------------------------------------- config mode
# A trainer: (config path, args) -> (trained model, ranking JSON path, stage-2 keys template)
Trainer = Callable[[str, argparse.Namespace], Tuple[nn.Module, str, str]]


def train_d2(config: str, args: argparse.Namespace) -> Tuple[nn.Module, str, str]:
    """Train a detectron2 yacs config with ``MTL.RECON_SEARCH`` on (no evaluation)."""
    from detectron2.config import get_cfg
    from detectron2.engine import default_setup

    from mtl_plugins.d2 import MTLDefaultTrainer, add_mtl_config, merge_config_file
    from mtl_plugins.d2.data import register_if_named

    if len(args.opts) % 2:
        raise SystemExit(f"overrides {args.opts}: expected KEY VALUE pairs for a detectron2 "
                         "config")
    cfg = get_cfg()
    add_mtl_config(cfg)
    merge_config_file(cfg, config)
    cfg.merge_from_list(args.opts)
    cfg.MTL.RECON_SEARCH.ENABLED = True
    if args.S is not None:
        cfg.MTL.RECON_SEARCH.S = args.S
    if args.steps is not None:
        cfg.SOLVER.MAX_ITER = args.steps
    if args.work_dir:
        cfg.OUTPUT_DIR = args.work_dir
    cfg.DATASETS.TEST = ()  # the search needs no evaluation
    cfg.freeze()
    default_setup(cfg, args)
    register_if_named(cfg.DATASETS.TRAIN)
    trainer = MTLDefaultTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return (trainer.model, os.path.join(cfg.OUTPUT_DIR, cfg.MTL.RECON_SEARCH.OUT),
            "MTL.RECON.RANKING {ranking} MTL.RECON.TOPK {k}")


def train_mmseg(config: str, args: argparse.Namespace) -> Tuple[nn.Module, str, str]:
    """Train an mmseg config with ``optim_wrapper.mtl.recon_search`` and ``MTLHook`` (no val
    loop); ``args.opts`` are ``--cfg-options`` (``key=value``)."""
    from mmengine.config import Config, DictAction
    from mmengine.runner import Runner
    from mmseg.utils import register_all_modules

    import mtl_plugins.mmseg  # noqa: F401  (registers the MTL modules)

    register_all_modules(init_default_scope=False)
    cfg = Config.fromfile(config)
    if args.opts:  # key=value overrides, parsed as mmseg's train.py parses --cfg-options
        options = argparse.ArgumentParser(prog="overrides")
        options.add_argument("--cfg-options", nargs="+", action=DictAction)
        cfg.merge_from_dict(options.parse_args(["--cfg-options", *args.opts]).cfg_options)
    if cfg.optim_wrapper.get("type") != "MTLOptimWrapper":
        raise SystemExit(f"optim_wrapper.type={cfg.optim_wrapper.get('type')!r}: expected "
                         "'MTLOptimWrapper' (the Recon search is its mtl.recon_search)")
    mtl = cfg.optim_wrapper.setdefault("mtl", {})
    search = dict(modules=None, S=-0.02, out="recon_ranking.json")
    search.update(mtl.get("recon_search") or {})
    if args.S is not None:
        search["S"] = args.S
    mtl["recon_search"] = search
    hooks = cfg.setdefault("custom_hooks", [])
    if not any(h.get("type") == "MTLHook" for h in hooks):
        hooks.append(dict(type="MTLHook"))
    if args.steps is not None:
        cfg.train_cfg.max_iters = args.steps
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None  # no validation
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or os.path.join(
        "work_dirs", Path(config).stem)
    runner = Runner.from_cfg(cfg)
    model = runner.train()
    out = search["out"]
    return (model, out if os.path.isabs(out) else os.path.join(cfg.work_dir, out),
            "--cfg-options model.recon.ranking={ranking} model.recon.topk={k}  "
            "(model=dict(..., recon=dict(ranking='{ranking}', topk={k})))")


TRAINERS: Dict[str, Trainer] = {".yaml": train_d2, ".yml": train_d2, ".py": train_mmseg}


def run_config(args: argparse.Namespace) -> int:
    """Train ``--config`` with the search on, then report its ranking."""
    config = args.config
    trainer = TRAINERS.get(Path(config).suffix)
    if trainer is None:
        raise SystemExit(f"--config {config!r}: expected a detectron2 .yaml or an mmseg .py "
                         "config")
    if not os.path.isfile(config):
        raise SystemExit(f"--config {config!r}: no such file")
    start = time.time()
    model, ranking, stage2 = trainer(config, args)
    if not os.path.isfile(ranking) or os.path.getmtime(ranking) < start - MTIME_SLACK_S:
        raise SystemExit(f"Recon search: the training did not write its ranking {ranking!r} "
                         "(expected the search's JSON after at least one iteration)")
    with open(ranking) as fh:
        data = json.load(fh)
    top = report(data, model, args.topk, "model")
    if args.json:
        shutil.copyfile(ranking, args.json)
        print(f"written: {args.json}")
    print(f"ranking: {ranking}")
    print("stage 2: " + stage2.format(ranking=args.json or ranking, k=len(top)))
    return 0


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="detectron2 .yaml or mmseg .py config to train the "
                    "search with (default: toy mode)")
    ap.add_argument("--model", help="toy mode: 'package.module:factory' (default: built-in)")
    ap.add_argument("--steps", type=int, help=f"search iterations I (toy: {TOY_STEPS}; "
                    "config: SOLVER.MAX_ITER / train_cfg.max_iters, default the config's)")
    ap.add_argument("--S", type=float, help=f"severity threshold S in (-1, 0] (default: the "
                    f"config's, {TOY_S} in toy mode)")
    ap.add_argument("--topk", type=int, default=5, help="K layers to convert")
    ap.add_argument("--lr", type=float, help=f"toy mode: plain SGD learning rate ({TOY_LR})")
    ap.add_argument("--batch", type=int, help="toy mode: batch size of the built-in model "
                    f"({TOY_BATCH})")
    ap.add_argument("--work-dir", help="config mode: OUTPUT_DIR / work_dir (default: the "
                    "config's)")
    ap.add_argument("--json", help="write (copy) the ranking to this file")
    ap.add_argument("opts", nargs="*", help="config mode: overrides, 'KEY VALUE' (detectron2) "
                    "or 'key=value' (mmseg)")
    args = ap.parse_intermixed_args(argv)
    if args.config is None and (args.opts or args.work_dir):
        ap.error(f"overrides {args.opts} / --work-dir need --config")
    if args.config is not None:
        toy = [f"--{k}" for k in TOY_ONLY if getattr(args, k) is not None]
        if toy:
            ap.error(f"{', '.join(toy)}: toy-mode option(s), not used with --config")
    if args.topk < 0:
        ap.error(f"--topk {args.topk}: expected a number of layers >= 0")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    return run_toy(args) if args.config is None else run_config(args)


if __name__ == "__main__":
    sys.exit(main())
