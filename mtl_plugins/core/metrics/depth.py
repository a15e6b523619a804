"""Depth (or disparity) regression metrics over valid pixels, streamed over a dataset.

Per valid pixel with prediction ``d`` and ground truth ``d* > 0``:

==============  ===============================================  =========  ==================
key             definition                                       direction  used by
==============  ===============================================  =========  ==================
``abs_err``     ``|d − d*|``                                     lower      MTAN, CAGrad, Nash-MTL, LibMTL, Recon ("Abs Err")
``rel_err``     ``|d − d*| / d*``                                lower      same ("Rel Err")
``rmse``        ``sqrt(mean (d − d*)²)``                         lower      survey 003 / MTI-Net, paper 001 Tables 1–2
``log_rmse``    ``sqrt(mean (ln d − ln d*)²)`` (optional)        lower      Eigen et al.; survey code
``delta1..3``   share of pixels with ``max(d/d*, d*/d) < 1.25^k``  higher   Eigen et al. (k = 1, 2, 3)
==============  ===============================================  =========  ==================

Valid pixels: ``gt`` finite and ``gt > min_depth`` (default 0, so 0 marks "no depth" as in
the MTAN NYUv2 / Cityscapes data), optionally ``gt <= max_depth``, ``gt != invalid_value``
(e.g. 255 in Vandenhende's NYUD loader) and an explicit ``mask``. Predictions are used as
given for ``abs_err`` / ``rel_err`` / ``rmse``; for ``log_rmse`` and the δ ratios they are
clamped to ``>= eps`` (the survey's evaluation clamps to 1e-9).

Averaging, the point on which the lineages differ (``reduction``):

- ``"pixel"`` (default): every average is over **all valid pixels of the dataset pooled**
  (RMSE = square root of the pooled mean squared error). This is the survey's / MTI-Net's
  depth RMSE (paper 003 §4.1.1; a deliberate change from ASTMT, which averaged per image),
  LibMTL's (per-batch means weighted by their valid-pixel counts), and what the MTAN /
  CAGrad / Nash-MTL per-batch pixel means converge to when all test batches hold the same
  number of valid pixels.
- ``"batch"``: the pooled value of every ``update()`` call, then the unweighted mean over
  calls. This is exactly what the MTAN code (``lorenmt/mtan`` ``depth_error``, reused by
  CAGrad and Nash-MTL) reports for ``abs_err`` / ``rel_err``: it needs the same test batch
  size to reproduce their numbers.
- ``"image"``: every metric per image (dim 0 of the inputs is the image index), then the
  mean over images that have at least one valid pixel (per-image RMSE, then mean — the
  KITTI / ASTMT convention).

δ values are in percent by default (``percent=False``: fractions).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ..distributed import world_size
from .segmentation import _all_reduce_sum_, _sync_device

__all__ = ["DepthMeter", "REDUCTIONS"]

REDUCTIONS = ("pixel", "image", "batch")


def _align(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Return ``pred`` viewed with ``gt``'s shape ([N,1,H,W] vs [N,H,W] is accepted)."""
    if pred.shape == gt.shape:
        return pred
    if pred.numel() == gt.numel() and pred.dim() >= 1 and gt.dim() >= 1 and pred.shape[0] == gt.shape[0]:
        return pred.reshape(gt.shape)
    raise ValueError(
        f"pred shape {tuple(pred.shape)} does not match gt shape {tuple(gt.shape)}"
    )


class DepthMeter:
    """Streaming depth metrics; see the module docstring for definitions and conventions.

    Args:
        reduction: ``"pixel"`` (pooled over the dataset, default), ``"image"`` or ``"batch"``.
        min_depth: ground truth ``<= min_depth`` is invalid (default 0.0).
        max_depth: ground truth ``> max_depth`` is invalid (default: no cap).
        invalid_value: an extra ground-truth value meaning "no label" (e.g. 255).
        log_rmse: also compute ``log_rmse``.
        eps: lower clamp of the prediction inside logs and ratios.
        percent: δ accuracies ×100 (default True).
    """

    def __init__(
        self,
        reduction: str = "pixel",
        min_depth: float = 0.0,
        max_depth: Optional[float] = None,
        invalid_value: Optional[float] = None,
        log_rmse: bool = False,
        eps: float = 1e-9,
        percent: bool = True,
    ):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction={reduction!r}: expected one of {REDUCTIONS}")
        if max_depth is not None and max_depth <= min_depth:
            raise ValueError(f"max_depth={max_depth!r} must be > min_depth={min_depth!r}")
        self.reduction = reduction
        self.min_depth = float(min_depth)
        self.max_depth = None if max_depth is None else float(max_depth)
        self.invalid_value = invalid_value
        self.log_rmse = bool(log_rmse)
        self.eps = float(eps)
        self.percent = percent
        self.reset()

    # state: pixel mode -> _count (int64 []), _sums (f64 [4]: abs, rel, sq, logsq),
    #        _hits (int64 [3]); unit modes -> _units (int64 []), _sums (f64 [7]) of per-unit values
    def reset(self) -> None:
        self._count: Optional[torch.Tensor] = None
        self._sums: Optional[torch.Tensor] = None
        self._hits: Optional[torch.Tensor] = None

    def _state(self) -> list[torch.Tensor]:
        return [t for t in (self._count, self._sums, self._hits) if t is not None]

    def _init_state(self, device: torch.device) -> None:
        self._count = torch.zeros((), dtype=torch.int64, device=device)
        if self.reduction == "pixel":
            self._sums = torch.zeros(4, dtype=torch.float64, device=device)
            self._hits = torch.zeros(3, dtype=torch.int64, device=device)
        else:
            self._sums = torch.zeros(7, dtype=torch.float64, device=device)
            self._hits = None

    def valid_mask(self, gt: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Boolean mask of the ground-truth pixels that count."""
        valid = torch.isfinite(gt) & (gt > self.min_depth)
        if self.max_depth is not None:
            valid &= gt <= self.max_depth
        if self.invalid_value is not None:
            valid &= gt != self.invalid_value
        if mask is not None:
            valid &= mask.reshape(gt.shape).to(device=gt.device, dtype=torch.bool)
        return valid

    @torch.no_grad()
    def update(self, pred: torch.Tensor, gt: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Add one batch. ``pred`` and ``gt`` share their shape (``[N,1,H,W]`` vs ``[N,H,W]`` is
        accepted); in ``"image"`` mode dim 0 indexes images. ``mask``: optional extra validity."""
        pred = _align(pred, gt)
        if self._count is None:
            self._init_state(gt.device)
        valid = self.valid_mask(gt, mask)
        if self.reduction == "image":
            n = gt.shape[0] if gt.dim() else 1
            g = gt.reshape(n, -1).double()
            p = pred.reshape(n, -1).to(g.device).double()
            v = valid.reshape(n, -1)
        else:
            g = gt.reshape(1, -1).double()
            p = pred.reshape(1, -1).to(g.device).double()
            v = valid.reshape(1, -1)
        # invalid pixels (whatever they hold, NaN included) become 1 vs 1 and are masked below
        g = torch.where(v, g, torch.ones_like(g))
        p = torch.where(v, p, torch.ones_like(p))
        vf = v.double()
        diff = p - g
        ad = diff.abs()
        pc = p.clamp_min(self.eps)
        ratio = torch.maximum(pc / g, g / pc)
        logsq = (torch.log(pc) - torch.log(g)) ** 2 if self.log_rmse else torch.zeros_like(g)
        cnt = v.sum(1)  # [U] int64
        s_abs = (ad * vf).sum(1)
        s_rel = (ad / g * vf).sum(1)
        s_sq = (diff * diff * vf).sum(1)
        s_log = (logsq * vf).sum(1)
        hits = torch.stack([((ratio < 1.25**k) & v).sum(1) for k in (1, 2, 3)], 1)  # [U, 3]
        if self.reduction == "pixel":
            self._count += cnt.sum()
            self._sums += torch.stack([s_abs, s_rel, s_sq, s_log], 1).sum(0).to(self._sums.device)
            self._hits += hits.sum(0).to(self._hits.device)
            return
        has = cnt > 0
        c = cnt.clamp_min(1).double()
        per_unit = torch.stack(
            [s_abs / c, s_rel / c, (s_sq / c).sqrt(), (s_log / c).sqrt()]
            + [hits[:, k].double() / c for k in range(3)],
            1,
        )  # [U, 7]
        self._count += has.sum()
        self._sums += (per_unit * has.double().unsqueeze(1)).sum(0).to(self._sums.device)

    def merge(self, other: "DepthMeter") -> None:
        """Add the state of ``other`` (same configuration) into this meter."""
        if (other.reduction, other.log_rmse) != (self.reduction, self.log_rmse):
            raise ValueError("cannot merge DepthMeters with different reduction / log_rmse")
        if other._count is None:
            return
        if self._count is None:
            self._init_state(other._count.device)
        for mine, theirs in zip(self._state(), other._state()):
            mine += theirs.to(mine.device)

    def sync(self, group: Any = None) -> None:
        """Sum the state over all ranks (every rank must call it; no-op without a process group)."""
        if world_size() == 1:
            return
        if self._count is None:
            self._init_state(_sync_device(group))
        _all_reduce_sum_(self._state(), group)

    @property
    def num_valid(self) -> int:
        """Valid pixels (``"pixel"``) or counted images / batches (other reductions) so far."""
        return 0 if self._count is None else int(self._count)

    def compute(self) -> dict[str, float]:
        """Return ``abs_err``, ``rel_err``, ``rmse``, [``log_rmse``], ``delta1``..``delta3``."""
        if self._count is None or int(self._count) == 0:
            raise ValueError(
                "DepthMeter.compute(): no valid ground-truth pixel was accumulated "
                f"(validity: finite, > {self.min_depth}, max_depth={self.max_depth}, "
                f"invalid_value={self.invalid_value})"
            )
        n = float(self._count)
        s = self._sums.double().cpu().tolist()
        scale = 100.0 if self.percent else 1.0
        if self.reduction == "pixel":
            h = self._hits.cpu().tolist()
            out = {"abs_err": s[0] / n, "rel_err": s[1] / n, "rmse": math.sqrt(s[2] / n)}
            if self.log_rmse:
                out["log_rmse"] = math.sqrt(s[3] / n)
            for k in range(3):
                out[f"delta{k + 1}"] = h[k] / n * scale
            return out
        out = {"abs_err": s[0] / n, "rel_err": s[1] / n, "rmse": s[2] / n}
        if self.log_rmse:
            out["log_rmse"] = s[3] / n
        for k in range(3):
            out[f"delta{k + 1}"] = s[4 + k] / n * scale
        return out
