"""The main job: single-task baselines and an ISTA + uncertainty multi-task model on
synthetic scenes, trained and evaluated with MMSegmentation's own tools/train.py and
tools/test.py (unmodified, from the installed package), on CPU, in a few minutes.

    python tools/demo.py [--out demo_out] [--iters 300]

Steps, each printed as it runs:
1. train the single-task baselines (seg, depth, normal) and the multi-task model
   (configs/mmseg/synthetic/); ISTA sees the same batches as each single-task run (so it
   makes three optimizer steps per batch, one per task);
2. evaluate each with tools/test.py; the single-task results form the Δm baseline file;
3. print every task's metrics and the Δm table (survey 003's main-metric variant);
4. save a plot of the training losses and the learned task weights (``curves.png``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "mmseg" / "synthetic"
RUNS = [("stl_seg", "seg"), ("stl_depth", "depth"), ("stl_normal", "normal"),
        ("mtl_ista_uncertainty", None)]


def mmseg_tool(name: str) -> Path:
    import mmseg

    path = Path(mmseg.__file__).parent / ".mim" / "tools" / name
    if not path.exists():
        raise SystemExit(f"demo: mmseg's {name} not found at {path}; is mmsegmentation "
                         "installed from its wheel (make setup)?")
    return path


def run(cmd: List[str], log: Path) -> None:
    """Run a command, echoing mmengine's iteration lines as progress."""
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            if "Iter(train)" in line or "Iter(val)" in line and "] " in line:
                print("    " + line.strip().split(" - mmengine - INFO - ")[-1][:150], flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"demo: command failed ({proc.returncode}); see {log}\n"
                             + " ".join(cmd))
    print(f"    done in {time.time() - t0:.0f} s (log: {log})", flush=True)


def train_and_test(name: str, out: Path, iters: int, extra: List[str]) -> Dict[str, Dict[str, float]]:
    cfg = CONFIGS / f"{name}.py"
    work = out / name
    opts = [f"train_cfg.max_iters={iters}", f"train_cfg.val_interval={iters}",
            f"param_scheduler.0.end={iters}", f"default_hooks.checkpoint.interval={iters}"] + extra
    print(f"[demo] training {name} ({iters} optimizer steps)", flush=True)
    run([sys.executable, str(mmseg_tool("train.py")), str(cfg), "--work-dir", str(work),
         "--cfg-options", *opts], work.with_suffix(".train.log"))
    dump = work / "test_metrics.json"
    print(f"[demo] testing {name}", flush=True)
    run([sys.executable, str(mmseg_tool("test.py")), str(cfg), str(work / f"iter_{iters}.pth"),
         "--work-dir", str(work), "--cfg-options", f"test_evaluator.dump_file={dump}", *extra],
        work.with_suffix(".test.log"))
    return json.loads(dump.read_text())


def plot(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_w) = plt.subplots(1, 2, figsize=(11, 4))
    for name, _ in RUNS:
        scalars = sorted((out / name).glob("*/vis_data/scalars.json"))
        if not scalars:
            continue
        rows = [json.loads(line) for line in scalars[-1].read_text().splitlines() if line.strip()]
        train = [r for r in rows if "loss" in r and "step" in r]
        for key in sorted({k for r in train for k in r if k.endswith(".loss")}):
            ax_loss.plot([r["step"] for r in train if key in r], [r[key] for r in train if key in r],
                         label=f"{name}: {key}")
        weights = sorted({k for r in train for k in r if k.startswith("mtl_weight/")})
        for key in weights if len(weights) > 1 else []:  # single-task runs: weight 1
            ax_w.plot([r["step"] for r in train if key in r], [r[key] for r in train if key in r],
                      label=f"{name}: {key.split('/', 1)[1]}")
    ax_loss.set(title="training loss per task", xlabel="optimizer step", yscale="log")
    ax_w.set(title="task weights (uncertainty)", xlabel="optimizer step")
    for ax in (ax_loss, ax_w):
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "demo_out"))
    p.add_argument("--iters", type=int, default=300,
                   help="optimizer steps per single-task run (ISTA: 3x, the same batches)")
    p.add_argument("--cfg-options", nargs="*", default=[], help="extra options for every run")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    baseline: Dict[str, Dict[str, float]] = {}
    for name, task in RUNS[:-1]:
        baseline[task] = train_and_test(name, out, args.iters, args.cfg_options)[task]
    baseline_file = out / "stl_baseline.json"
    baseline_file.write_text(json.dumps(baseline, indent=1))
    # ISTA makes ceil(T/k) = 3 optimizer steps per batch: give it the same number of batches
    # (epochs) as each single-task run, as paper 001 compares them
    mtl_name = RUNS[-1][0]
    mtl = train_and_test(mtl_name, out, 3 * args.iters,
                         args.cfg_options + [f"test_evaluator.baseline_file={baseline_file}"])

    from mtl_plugins.core.metrics import delta_m, format_delta_table

    main_metrics = {"seg": "mIoU", "depth": "abs_err", "normal": "mean"}
    print("\n[demo] per-task metrics (single-task baselines vs ISTA + uncertainty)")
    print(f"{'task':<7} {'metric':<10} {'single-task':>12} {'multi-task':>12}")
    for task in ("seg", "depth", "normal"):
        for metric, value in mtl[task].items():
            print(f"{task:<7} {metric:<10} {baseline[task][metric]:12.3f} {value:12.3f}")
    print()
    print(format_delta_table(mtl, baseline, variant="main_metric", main_metrics=main_metrics,
                             title="Δm of ISTA + uncertainty against the single-task models"))
    (out / "summary.json").write_text(json.dumps({
        "baseline": baseline, "multi_task": mtl,
        "delta_m": delta_m(mtl, baseline, variant="main_metric", main_metrics=main_metrics)},
        indent=1))
    print(f"\n[demo] curves: {plot(out)}; summary: {out / 'summary.json'}; "
          f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
