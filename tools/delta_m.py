"""Δm of one run against a baseline run, from their result files.

    python tools/delta_m.py RESULT BASELINE [--variant main_metric|flat|task_mean|raw_diff]
                            [--main seg=mIoU depth=abs_err] [--select mask=AP,AP50]

A result file is JSON in one of these forms:

- ``{task: {metric: value}}`` (``MultiTaskMetric(dump_file=...)`` of the mmseg adapter);
- detectron2's evaluation results ``{"bbox": {"AP": ...}, "segm": {...}}`` (the dict
  ``DefaultTrainer.test`` returns, e.g. saved by ``tools/train_net.py``), or its
  ``metrics.json`` log (one JSON object per line; the last line holding ``bbox/AP`` is
  used): ``bbox`` is read as task ``detection``, ``segm`` as ``mask``, ``sem_seg`` as
  ``seg``, ``keypoints`` as ``keypoint``.

Prints the table of :func:`mtl_plugins.core.metrics.format_delta_table` (docs/delta_m.md) —
e.g. paper 001's FT vs STA Mask R-CNN comparison: ``--variant raw_diff --select
detection=AP mask=AP``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

from mtl_plugins.core.metrics import format_delta_table
from mtl_plugins.core.tasks import MTLConfigError

D2_TASKS = {"bbox": "detection", "segm": "mask", "sem_seg": "seg", "keypoints": "keypoint"}


def _from_d2(flat_or_nested: dict) -> Dict[str, Dict[str, float]]:
    table: Dict[str, Dict[str, float]] = {}
    for key, value in flat_or_nested.items():
        if isinstance(value, dict):
            task = D2_TASKS.get(key, key)
            table[task] = {m: float(v) for m, v in value.items() if isinstance(v, (int, float))}
        elif "/" in key and isinstance(value, (int, float)):
            group, metric = key.split("/", 1)
            if group in D2_TASKS:
                table.setdefault(D2_TASKS[group], {})[metric] = float(value)
    return table


def load_results(path: str | Path) -> Dict[str, Dict[str, float]]:
    """``{task: {metric: value}}`` from a result file of either framework (see module doc)."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:  # detectron2 metrics.json: JSON lines
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        evals = [r for r in rows if any(k.startswith(("bbox/", "segm/")) for k in r)]
        if not evals:
            raise MTLConfigError(f"{path}: no evaluation row (bbox/..., segm/...) in the log")
        return _from_d2(evals[-1])
    if not isinstance(data, dict) or not data:
        raise MTLConfigError(f"{path}: expected a JSON object of results, got {type(data).__name__}")
    if any(k in D2_TASKS for k in data) or any("/" in k for k in data):
        return _from_d2(data)
    return {t: {m: float(v) for m, v in ms.items() if isinstance(v, (int, float))}
            for t, ms in data.items()}


def _pairs(items: Optional[List[str]], key: str) -> Optional[Dict[str, str]]:
    if not items:
        return None
    out = {}
    for item in items:
        task, sep, value = item.partition("=")
        if not sep:
            raise MTLConfigError(f"--{key} {item!r}: expected task=value")
        out[task] = value
    return out


def main(argv: Optional[List[str]] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("result")
    p.add_argument("baseline")
    p.add_argument("--variant", default="main_metric")
    p.add_argument("--main", nargs="*", help="task=metric, the main metric of each task")
    p.add_argument("--select", nargs="*", help="task=m1,m2, the metrics taken into account")
    args = p.parse_args(argv)
    select = _pairs(args.select, "select")
    table = format_delta_table(
        load_results(args.result), load_results(args.baseline), variant=args.variant,
        main_metrics=_pairs(args.main, "main"),
        select={t: v.split(",") for t, v in select.items()} if select else None,
        title=f"{args.result} vs {args.baseline}")
    print(table)
    return table


if __name__ == "__main__":
    main()
