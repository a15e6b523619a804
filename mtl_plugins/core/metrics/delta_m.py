"""Δm: one number for a multi-task model against single-task (or other) baselines.

Four variants are in use in the papers this package implements; they differ in which metrics
enter, how they are averaged, and whether changes are relative or raw. With ``M`` the
multi-task model's value, ``B`` the baseline's, and ``s = +1`` when higher is better,
``s = −1`` when lower is better (``(−1)^{l}`` in the papers):

(a) ``"main_metric"`` — one main metric per task, relative, mean over tasks.
    ``Δm = (1/T) Σ_t s_t (M_t − B_t) / B_t × 100``.
    Maninis et al. 2019 (ASTMT); survey 003 Eq. 10 (``Δ_MTL``, Table V: seg mIoU, depth rmse,
    normals mErr, saliency IoU, edge odsF, human-parts mIoU); GradSplit (paper 000 §4.1:
    ReID mAP, attribute MA, pose PCKh, parsing mIoU); the MTAN and Auto-Lambda READMEs.
(b) ``"flat"`` — every metric counts once, relative, mean over all K metrics.
    ``Δm = (1/K) Σ_k s_k (M_k − B_k) / B_k × 100``.
    CAGrad / Nash-MTL / FAMO code (``delta_fn``), e.g. Nash-MTL Table 2 (NYUv2, 9 metrics)
    and Table 3 (Cityscapes, 4 metrics). Those papers print the **negated** value (a drop,
    lower is better): pass ``convention="drop"`` to get their sign.
(c) ``"task_mean"`` — relative changes averaged within each task, then over tasks.
    ``Δm_t = (1/K_t) Σ_{k∈t} s_k (M_k − B_k)/B_k``, ``Δm = (1/T) Σ_t Δm_t × 100``.
    Recon (paper 004 §5.1 "Relative task improvement", Tables 1–5, 13, 15, 16); LibMTL's
    ``count_improvement`` (Δp), whose default baseline is the run's own epoch-0 result.
(d) ``"raw_diff"`` — **signed raw differences** in each metric's own units, flat mean over
    the selected metrics, **no division by the baseline and no ×100**:
    ``ΔMTL = (1/K) Σ_k s_k (M_k − B_k)``.
    Paper 001 (STA/ISTA) says its ΔMTL is computed "as [MTI-Net]" (i.e. (a)), but every
    ΔMTL it prints in Tables 1, 2, 3, 5, 6, 7 (one metric per task: depth RMSE in m or
    disparity L1 in px, and seg mIoU in %) and Table 4 COCO (the four AP columns) is
    reproduced by this formula, not by (a) (notes seed-sta-gradsplit.md A.11). The result
    depends on the metrics' units: mIoU must be in percent to match the paper. Its Table 4
    Cityscapes values match no formula on the printed columns.

Sign convention: every function returns an **improvement** (higher is better, positive =
better than the baseline) unless ``convention="drop"``, which negates the result.

When every task has exactly one selected metric, (a), (b) and (c) coincide.

Directions come from, in order: ``directions["task/metric"]``, ``directions["metric"]``,
:data:`HIGHER_IS_BETTER` (exact key, then case-insensitive). A metric found nowhere raises
:class:`~mtl_plugins.core.tasks.MTLConfigError`.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from typing import Any, Mapping, Optional, Sequence, Union

from ..tasks import MTLConfigError

__all__ = [
    "HIGHER_IS_BETTER",
    "VARIANTS",
    "MetricTable",
    "metric_direction",
    "check_metric_table",
    "load_baseline",
    "signed_changes",
    "delta_m",
    "delta_m_main_metric",
    "delta_m_flat",
    "delta_m_task_mean",
    "delta_m_raw_diff",
    "format_delta_table",
]

#: ``{task: {metric: value}}``
MetricTable = Mapping[str, Mapping[str, Any]]

#: Known metric directions: True = higher is better, False = lower is better.
HIGHER_IS_BETTER: dict[str, bool] = {
    # semantic segmentation, human parts, saliency (SegmentationMeter keys and table names)
    "mIoU": True,
    "pixel_acc": True,
    "PixAcc": True,
    "mean_acc": True,
    "fwIoU": True,
    "IoU": True,
    "maxF": True,
    # edges (survey 003)
    "odsF": True,
    # depth / disparity (DepthMeter keys and table names)
    "abs_err": False,
    "AbsErr": False,
    "rel_err": False,
    "RelErr": False,
    "rmse": False,
    "log_rmse": False,
    "sq_rel": False,
    "l1": False,
    "delta1": True,
    "delta2": True,
    "delta3": True,
    # surface normals (NormalMeter keys): angular errors and "within t°" shares
    "mean": False,
    "median": False,
    "mErr": False,
    "11.25": True,
    "22.5": True,
    "30": True,
    # detection / instance segmentation (detectron2 COCOEvaluator keys)
    "AP": True,
    "AP50": True,
    "AP75": True,
    "APs": True,
    "APm": True,
    "APl": True,
    # human analysis (paper 000): ReID mAP / Rank-1, attribute mean accuracy, pose PCKh
    "mAP": True,
    "rank1": True,
    "Rank-1": True,
    "MA": True,
    "PCKh": True,
    "PCKh@0.5": True,
    # classification
    "acc": True,
    "accuracy": True,
    "top1": True,
    "error": False,
    "avg_error": False,
}

_LOWER = {k.lower(): v for k, v in HIGHER_IS_BETTER.items()}

#: variant name -> canonical name (aliases name the papers that use them)
VARIANTS: dict[str, str] = {
    "main_metric": "main_metric",
    "maninis": "main_metric",
    "survey": "main_metric",
    "flat": "flat",
    "nash": "flat",
    "cagrad": "flat",
    "task_mean": "task_mean",
    "recon": "task_mean",
    "libmtl": "task_mean",
    "raw_diff": "raw_diff",
    "sta": "raw_diff",
}

_VARIANT_TITLES = {
    "main_metric": "(a) main metric per task, relative (Maninis 2019 / survey 003 Eq. 10)",
    "flat": "(b) flat mean over all metrics, relative (CAGrad / Nash-MTL)",
    "task_mean": "(c) mean within task, then over tasks, relative (Recon / LibMTL Δp)",
    "raw_diff": "(d) mean of signed raw differences (paper 001 ΔMTL)",
}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _as_number(x: Any) -> Any:
    """numpy / torch scalars (0-d) -> float; anything else unchanged."""
    if isinstance(x, bool) or _is_number(x):
        return x
    if isinstance(x, numbers.Real):
        return float(x)
    if hasattr(x, "item") and getattr(x, "ndim", None) == 0:
        v = x.item()
        return float(v) if _is_number(v) else x
    return x


def metric_direction(
    task: str, metric: str, directions: Optional[Mapping[str, bool]] = None
) -> bool:
    """Return True if higher is better for ``metric`` of ``task``.

    Looks up ``directions[f"{task}/{metric}"]``, then ``directions[metric]``, then
    :data:`HIGHER_IS_BETTER` (exact, then case-insensitive). Raises ``MTLConfigError`` naming
    the metric when none knows it.
    """
    if directions:
        for key in (f"{task}/{metric}", metric):
            if key in directions:
                val = directions[key]
                if not isinstance(val, bool):
                    raise MTLConfigError(
                        f"directions[{key!r}]={val!r}: expected True (higher is better) or "
                        "False (lower is better)"
                    )
                return val
    if metric in HIGHER_IS_BETTER:
        return HIGHER_IS_BETTER[metric]
    if metric.lower() in _LOWER:
        return _LOWER[metric.lower()]
    raise MTLConfigError(
        f"metric {metric!r} of task {task!r} has no known direction: expected it in "
        f"directions (e.g. directions={{{metric!r}: True}} if higher is better, False if "
        f"lower is better, or {{'{task}/{metric}': ...}} for this task only) or a known "
        f"metric name {sorted(HIGHER_IS_BETTER)}"
    )


def check_metric_table(table: Any, name: str = "results") -> dict[str, dict[str, Any]]:
    """Validate a ``{task: {metric: value}}`` table and return it as plain dicts.

    Top-level keys starting with ``"_"`` are metadata (e.g. ``"_source"``) and are dropped.
    Numeric values must be finite; non-numeric values (e.g. per-class lists) are kept but
    never enter Δm.
    """
    if not isinstance(table, Mapping):
        raise MTLConfigError(
            f"{name}: expected a mapping {{task: {{metric: value}}}}, got {type(table).__name__}"
        )
    out: dict[str, dict[str, Any]] = {}
    for task, metrics in table.items():
        if not isinstance(task, str) or not task:
            raise MTLConfigError(f"{name}: task key {task!r}: expected a non-empty string")
        if task.startswith("_"):
            continue
        if not isinstance(metrics, Mapping) or not metrics:
            raise MTLConfigError(
                f"{name}[{task!r}]={metrics!r}: expected a non-empty mapping {{metric: value}}"
            )
        row: dict[str, Any] = {}
        for metric, value in metrics.items():
            value = _as_number(value)
            if not isinstance(metric, str) or not metric:
                raise MTLConfigError(f"{name}[{task!r}]: metric key {metric!r}: expected a string")
            if isinstance(value, bool) or value is None:
                raise MTLConfigError(
                    f"{name}[{task!r}][{metric!r}]={value!r}: expected a finite number"
                )
            if _is_number(value) and not math.isfinite(value):
                raise MTLConfigError(
                    f"{name}[{task!r}][{metric!r}]={value!r}: expected a finite number"
                )
            row[metric] = float(value) if _is_number(value) else value
        out[task] = row
    if not out:
        raise MTLConfigError(f"{name}: no task found (expected {{task: {{metric: value}}}})")
    return out


def load_baseline(path: Union[str, os.PathLike]) -> dict[str, dict[str, float]]:
    """Load a baseline JSON file ``{task: {metric: value}}`` and validate it.

    Every value must be a finite number (booleans, strings, lists are rejected); top-level
    keys starting with ``"_"`` (e.g. ``"_source": "Nash-MTL Table 2, STL row"``) are
    ignored. Errors are ``MTLConfigError`` naming the file, task and metric.
    """
    p = os.fspath(path)
    try:
        with open(p, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise MTLConfigError(f"baseline file {p!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise MTLConfigError(f"baseline file {p!r} is not valid JSON: {e}") from None
    table = check_metric_table(raw, name=f"baseline file {p!r}")
    for task, metrics in table.items():
        for metric, value in metrics.items():
            if not _is_number(value):
                raise MTLConfigError(
                    f"baseline file {p!r}: [{task!r}][{metric!r}]={value!r}: expected a number"
                )
    return table  # type: ignore[return-value]


def _selection(
    results: dict[str, dict[str, Any]],
    select: Optional[Mapping[str, Sequence[str]]],
) -> list[tuple[str, list[str]]]:
    if select is None:
        sel = [(t, [m for m, v in ms.items() if _is_number(v)]) for t, ms in results.items()]
    else:
        if not isinstance(select, Mapping) or not select:
            raise MTLConfigError(
                f"select={select!r}: expected a non-empty mapping {{task: [metric, ...]}}"
            )
        sel = []
        for t, ms in select.items():
            if isinstance(ms, str):
                ms = [ms]
            ms = list(ms)
            if not ms:
                raise MTLConfigError(f"select[{t!r}] is empty: expected at least one metric")
            sel.append((t, ms))
    for t, ms in sel:
        if t not in results:
            raise MTLConfigError(
                f"results have no task {t!r}; expected one of {sorted(results)}"
            )
        if not ms:
            raise MTLConfigError(f"results[{t!r}] has no numeric metric to compare")
        for m in ms:
            if m not in results[t] or not _is_number(results[t][m]):
                raise MTLConfigError(
                    f"results[{t!r}] has no numeric metric {m!r}; it has {sorted(results[t])}"
                )
    return sel


def _rows(
    results: MetricTable,
    baseline: MetricTable,
    select: Optional[Mapping[str, Sequence[str]]],
    directions: Optional[Mapping[str, bool]],
    relative: bool,
) -> list[tuple[str, str, bool, float, float, float]]:
    """``(task, metric, higher_is_better, value, base, signed change)`` for every selected pair."""
    res = check_metric_table(results, "results")
    base = check_metric_table(baseline, "baseline")
    rows = []
    for task, metrics in _selection(res, select):
        if task not in base:
            raise MTLConfigError(
                f"baseline has no task {task!r}: expected it among the baseline's tasks "
                f"{sorted(base)} (add the single-task result for {task!r})"
            )
        for m in metrics:
            if m not in base[task]:
                raise MTLConfigError(
                    f"baseline[{task!r}] has no metric {m!r}: expected one of "
                    f"{sorted(base[task])}; add it to the baseline or leave it out with "
                    f"select={{{task!r}: [...]}}"
                )
            b = base[task][m]
            if not _is_number(b):
                raise MTLConfigError(f"baseline[{task!r}][{m!r}]={b!r}: expected a number")
            hib = metric_direction(task, m, directions)
            v = float(res[task][m])
            s = 1.0 if hib else -1.0
            if relative:
                if b == 0:
                    raise MTLConfigError(
                        f"baseline[{task!r}][{m!r}] is 0: a relative change is undefined; "
                        "use variant='raw_diff' or another baseline"
                    )
                change = s * (v - b) / b * 100.0
            else:
                change = s * (v - b)
            rows.append((task, m, hib, v, float(b), change))
    return rows


def _sign(convention: str) -> float:
    if convention == "improvement":
        return 1.0
    if convention == "drop":
        return -1.0
    raise MTLConfigError(
        f"convention={convention!r}: expected 'improvement' (higher is better) or 'drop' "
        "(lower is better, as printed by CAGrad / Nash-MTL / FAMO)"
    )


def signed_changes(
    results: MetricTable,
    baseline: MetricTable,
    select: Optional[Mapping[str, Sequence[str]]] = None,
    directions: Optional[Mapping[str, bool]] = None,
    relative: bool = True,
) -> dict[str, dict[str, float]]:
    """Per task and metric: ``s (M − B) / B × 100`` (``relative``) or ``s (M − B)`` (raw).

    Positive means better than the baseline. ``select`` maps tasks to the metrics to use
    (default: every numeric metric of every task in ``results``).
    """
    out: dict[str, dict[str, float]] = {}
    for task, m, _, _, _, change in _rows(results, baseline, select, directions, relative):
        out.setdefault(task, {})[m] = change
    return out


def _main_select(
    results: MetricTable, main_metrics: Optional[Mapping[str, str]]
) -> dict[str, list[str]]:
    res = check_metric_table(results, "results")
    if main_metrics is not None:
        if not isinstance(main_metrics, Mapping) or not main_metrics:
            raise MTLConfigError(
                f"main_metrics={main_metrics!r}: expected a mapping {{task: metric}}"
            )
        sel = {}
        for t, m in main_metrics.items():
            if not isinstance(m, str):
                raise MTLConfigError(
                    f"main_metrics[{t!r}]={m!r}: expected one metric name (variant (a) uses "
                    "one metric per task; use variant='task_mean' for several)"
                )
            sel[t] = [m]
        return sel
    sel = {}
    for t, ms in res.items():
        nums = [m for m, v in ms.items() if _is_number(v)]
        if len(nums) != 1:
            raise MTLConfigError(
                f"task {t!r} has metrics {nums}: variant 'main_metric' needs main_metrics="
                f"{{{t!r}: <metric>}} (survey 003 uses seg mIoU, depth rmse, normals mean, "
                "edge odsF, saliency/parts mIoU)"
            )
        sel[t] = nums
    return sel


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _aggregate(rows: list, how: str) -> tuple[float, dict[str, float]]:
    per_task: dict[str, list[float]] = {}
    for task, _, _, _, _, change in rows:
        per_task.setdefault(task, []).append(change)
    task_means = {t: _mean(v) for t, v in per_task.items()}
    if how == "flat":
        return _mean([r[5] for r in rows]), task_means
    return _mean(list(task_means.values())), task_means


def delta_m_main_metric(
    results: MetricTable,
    baseline: MetricTable,
    main_metrics: Optional[Mapping[str, str]] = None,
    directions: Optional[Mapping[str, bool]] = None,
    convention: str = "improvement",
) -> float:
    """Variant (a): ``(1/T) Σ_t s_t (M_t − B_t)/B_t × 100`` over one main metric per task.

    Maninis et al. 2019; survey 003 Eq. 10; GradSplit (paper 000 §4.1). ``main_metrics``
    maps every task to its metric; it may be omitted when each task has exactly one numeric
    metric in ``results``. In percent; higher is better unless ``convention="drop"``.
    """
    sel = _main_select(results, main_metrics)
    rows = _rows(results, baseline, sel, directions, relative=True)
    return _sign(convention) * _aggregate(rows, "task")[0]


def delta_m_flat(
    results: MetricTable,
    baseline: MetricTable,
    select: Optional[Mapping[str, Sequence[str]]] = None,
    directions: Optional[Mapping[str, bool]] = None,
    convention: str = "improvement",
) -> float:
    """Variant (b): ``(1/K) Σ_k s_k (M_k − B_k)/B_k × 100`` over all K selected metrics.

    CAGrad / Nash-MTL / FAMO (Nash-MTL Tables 2–3 print ``convention="drop"`` values:
    lower is better). Default selection: every numeric metric in ``results``.
    """
    rows = _rows(results, baseline, select, directions, relative=True)
    return _sign(convention) * _aggregate(rows, "flat")[0]


def delta_m_task_mean(
    results: MetricTable,
    baseline: MetricTable,
    select: Optional[Mapping[str, Sequence[str]]] = None,
    directions: Optional[Mapping[str, bool]] = None,
    convention: str = "improvement",
) -> float:
    """Variant (c): relative changes averaged within each task, then over tasks (×100).

    Recon (paper 004 §5.1, "relative task improvement" Δm_{T_j} and Δm); LibMTL Δp.
    Default selection: every numeric metric in ``results``.
    """
    rows = _rows(results, baseline, select, directions, relative=True)
    return _sign(convention) * _aggregate(rows, "task")[0]


def delta_m_raw_diff(
    results: MetricTable,
    baseline: MetricTable,
    select: Optional[Mapping[str, Sequence[str]]] = None,
    directions: Optional[Mapping[str, bool]] = None,
    convention: str = "improvement",
) -> float:
    """Variant (d), paper 001's printed ΔMTL: ``(1/K) Σ_k s_k (M_k − B_k)`` in metric units.

    No division by the baseline and no ×100, so the value depends on the units (mIoU in %,
    RMSE in m, disparity L1 in px, AP in %). Flat mean over the selected metrics (paper 001
    Tables 1–3, 5–7 use one metric per task; Table 4 COCO the four AP columns).
    """
    rows = _rows(results, baseline, select, directions, relative=False)
    return _sign(convention) * _aggregate(rows, "flat")[0]


def _canonical(variant: str) -> str:
    if variant not in VARIANTS:
        raise MTLConfigError(
            f"variant={variant!r}: expected one of {sorted(set(VARIANTS.values()))} "
            f"(aliases: {sorted(k for k in VARIANTS if VARIANTS[k] != k)})"
        )
    return VARIANTS[variant]


def _variant_rows(
    results: MetricTable,
    baseline: MetricTable,
    variant: str,
    select: Optional[Mapping[str, Sequence[str]]],
    main_metrics: Optional[Mapping[str, str]],
    directions: Optional[Mapping[str, bool]],
) -> tuple[str, list, float, dict[str, float]]:
    v = _canonical(variant)
    if select is not None and main_metrics is not None:
        raise MTLConfigError("pass either select= or main_metrics=, not both")
    if v == "main_metric":
        if select is not None and main_metrics is None:
            main_metrics = {}
            for t, ms in select.items():
                ms = [ms] if isinstance(ms, str) else list(ms)
                if len(ms) != 1:
                    raise MTLConfigError(
                        f"select[{t!r}]={ms}: variant 'main_metric' takes one metric per task"
                    )
                main_metrics[t] = ms[0]
        sel: Optional[Mapping[str, Sequence[str]]] = _main_select(results, main_metrics)
    else:
        if main_metrics is not None:
            sel = {t: [m] for t, m in main_metrics.items()}
        else:
            sel = select
    rows = _rows(results, baseline, sel, directions, relative=(v != "raw_diff"))
    value, task_means = _aggregate(rows, "flat" if v in ("flat", "raw_diff") else "task")
    return v, rows, value, task_means


def delta_m(
    results: MetricTable,
    baseline: MetricTable,
    variant: str = "main_metric",
    select: Optional[Mapping[str, Sequence[str]]] = None,
    main_metrics: Optional[Mapping[str, str]] = None,
    directions: Optional[Mapping[str, bool]] = None,
    convention: str = "improvement",
) -> float:
    """Δm of ``results`` against ``baseline`` in one of :data:`VARIANTS` (see module doc).

    ``select`` ({task: [metrics]}) picks the metrics; ``main_metrics`` ({task: metric}) is the
    one-metric-per-task shorthand (required by ``"main_metric"`` when a task has several).
    """
    _, _, value, _ = _variant_rows(results, baseline, variant, select, main_metrics, directions)
    return _sign(convention) * value


def _fmt(x: float, digits: int) -> str:
    return f"{x:.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:.{digits}g}"


def format_delta_table(
    results: MetricTable,
    baseline: MetricTable,
    variant: str = "main_metric",
    select: Optional[Mapping[str, Sequence[str]]] = None,
    main_metrics: Optional[Mapping[str, str]] = None,
    directions: Optional[Mapping[str, bool]] = None,
    convention: str = "improvement",
    title: Optional[str] = None,
    digits: int = 4,
) -> str:
    """A printable text table: per task and metric the direction, result, baseline and signed
    change (relative % or raw), the per-task mean where it matters, and the final Δm."""
    v, rows, value, task_means = _variant_rows(
        results, baseline, variant, select, main_metrics, directions
    )
    sign = _sign(convention)
    change_hdr = "raw diff" if v == "raw_diff" else "change %"
    header = ["task", "metric", "dir", "result", "baseline", change_hdr]
    cd = digits if v == "raw_diff" else 2  # raw differences keep the metrics' precision
    body = [
        [t, m, "↑" if hib else "↓", _fmt(val, digits), _fmt(b, digits), f"{sign * ch:+.{cd}f}"]
        for t, m, hib, val, b, ch in rows
    ]
    if v == "task_mean":
        for t, mean in task_means.items():
            body.append([t, "(task mean)", "", "", "", f"{sign * mean:+.2f}"])
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    unit = "" if v == "raw_diff" else " %"
    conv = "higher is better" if sign > 0 else "lower is better (drop)"
    out = []
    if title:
        out.append(title)
    out.append(f"Δm variant {_VARIANT_TITLES[v]}; {conv}")
    out.append(line(header))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in body)
    out.append(f"Δm = {sign * value:+.2f}{unit}")
    return "\n".join(out)
