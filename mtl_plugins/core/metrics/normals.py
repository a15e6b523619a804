"""Surface-normal metrics: angular error in degrees, streamed over a dataset.

For every valid pixel the prediction ``n̂`` and the ground truth ``n`` are both L2-normalised
and the angle between them is ``atan2(‖n̂ × n‖, n̂ · n)`` in degrees — the same angle as the
usual ``arccos(clip(n̂ · n, −1, 1))`` of MTAN / LibMTL / the survey (paper 003 §4.1.1), but
accurate for small angles. A prediction of zero norm has no direction and is scored 90°.

Reported (keys of :meth:`NormalMeter.compute`; direction in brackets):

- ``mean`` (lower): mean angular error ("Mean", "mErr").
- ``median`` (lower): median angular error.
- ``rmse`` (lower): root mean squared angular error (reported by the survey's code).
- ``"11.25"``, ``"22.5"``, ``"30"`` (higher): share of pixels with error **strictly below**
  the threshold, in percent by default (``error < t`` as in MTAN's ``normal_error``).

Valid pixels: the ground truth is finite and its norm exceeds ``gt_eps`` (the MTAN NYUv2
data marks missing normals with the zero vector), and an optional ``mask`` is true.

Median, streamed (``median=`` option, ``"pixel"`` reduction):

- ``"exact"`` (default): every valid pixel's error is stored as float32 on
  ``storage_device`` (CPU by default; 4 bytes per valid pixel, e.g. ~290 MB for the 654
  NYUv2 test images at 288×384), and the median is the exact order statistic over the whole
  dataset with numpy's convention (mean of the two middle values when the count is even).
  This is LibMTL's ``NormalMetric`` (``np.median`` over the concatenated errors).
- ``"histogram"``: a fixed histogram of ``bins_per_degree`` bins per degree over [0°, 180°]
  (int64 counts on the input device, 18 001 bins at the default 100), with linear
  interpolation inside the bin: the median is within ``1 / bins_per_degree`` degrees of the
  exact value. Use it for very large sets or when syncing across ranks must stay cheap. The
  mean, RMSE and threshold shares stay exact in both modes (float64 sums, int64 counts).

Averaging (``reduction=``): ``"pixel"`` pools all valid pixels of the dataset (default; the
survey and LibMTL); ``"batch"`` computes every metric per ``update()`` call and averages the
calls without weights (exactly the MTAN / CAGrad / Nash-MTL evaluation loop, whose reported
median is a mean of per-batch medians); ``"image"`` does the same per image (dim 0).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from ..distributed import world_size
from .segmentation import _all_reduce_sum_, _sync_device

__all__ = ["NormalMeter", "angular_error_deg", "threshold_key"]


def threshold_key(t: float) -> str:
    """Metric key of a threshold: 11.25 -> ``"11.25"``, 30.0 -> ``"30"``."""
    return f"{float(t):g}"


def angular_error_deg(
    pred: torch.Tensor, gt: torch.Tensor, channel_dim: int = 1
) -> torch.Tensor:
    """Per-pixel angle in degrees between ``pred`` and ``gt`` (both normalised here), float64.

    The channel dimension (size 3) is removed from the result. Zero-norm predictions give 90°.
    Ground-truth validity is not checked here (see :class:`NormalMeter`).
    """
    p = pred.movedim(channel_dim, -1).double()
    g = gt.movedim(channel_dim, -1).to(p.device).double()
    if p.shape != g.shape or p.shape[-1] != 3:
        raise ValueError(
            f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} must have the same shape with "
            f"3 channels at channel_dim={channel_dim}"
        )
    pn = torch.linalg.vector_norm(p, dim=-1, keepdim=True)
    gn = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    p = p / pn.clamp_min(1e-300)
    g = g / gn.clamp_min(1e-300)
    cross = torch.linalg.vector_norm(torch.linalg.cross(p, g, dim=-1), dim=-1)
    dot = (p * g).sum(-1)
    ang = torch.rad2deg(torch.atan2(cross, dot))
    return torch.where(pn.squeeze(-1) > 0, ang, torch.full_like(ang, 90.0))


def _numpy_median_sorted(sorted_vals: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row-wise median of the first ``counts[i]`` entries of each sorted row (mean of middles)."""
    c = counts.clamp_min(1)
    lo = ((c - 1) // 2).unsqueeze(1)
    hi = (c // 2).unsqueeze(1)
    return 0.5 * (sorted_vals.gather(1, lo) + sorted_vals.gather(1, hi)).squeeze(1)


class NormalMeter:
    """Streaming angular-error metrics; see the module docstring for conventions.

    Args:
        channel_dim: dimension of the 3 normal components (1 for ``[N, 3, H, W]``).
        thresholds: the "within t°" thresholds (default 11.25, 22.5, 30).
        median: ``"exact"`` (store errors) or ``"histogram"``; only used by ``"pixel"``.
        bins_per_degree: histogram resolution (median error <= 1 / bins_per_degree degrees).
        reduction: ``"pixel"`` (default), ``"image"`` or ``"batch"``.
        gt_eps: ground truth with norm <= gt_eps is invalid.
        storage_device: where ``"exact"`` keeps the per-pixel errors (default CPU).
        percent: threshold shares ×100 (default True).
    """

    def __init__(
        self,
        channel_dim: int = 1,
        thresholds: Sequence[float] = (11.25, 22.5, 30.0),
        median: str = "exact",
        bins_per_degree: int = 100,
        reduction: str = "pixel",
        gt_eps: float = 1e-6,
        storage_device: Optional[torch.device | str] = "cpu",
        percent: bool = True,
    ):
        if median not in ("exact", "histogram"):
            raise ValueError(f"median={median!r}: expected 'exact' or 'histogram'")
        if reduction not in ("pixel", "image", "batch"):
            raise ValueError(f"reduction={reduction!r}: expected 'pixel', 'image' or 'batch'")
        if int(bins_per_degree) < 1:
            raise ValueError(f"bins_per_degree={bins_per_degree!r}: expected an int >= 1")
        self.thresholds = tuple(float(t) for t in thresholds)
        if any(not (0 < t <= 180) for t in self.thresholds):
            raise ValueError(f"thresholds={thresholds!r}: expected values in (0, 180]")
        self.channel_dim = channel_dim
        self.median_mode = median
        self.bins_per_degree = int(bins_per_degree)
        self.reduction = reduction
        self.gt_eps = float(gt_eps)
        self.storage_device = storage_device
        self.percent = percent
        self.reset()

    @property
    def _nbins(self) -> int:
        return 180 * self.bins_per_degree + 1  # the last bin holds exactly 180°

    def reset(self) -> None:
        # pixel: _count int64 [], _sums f64 [2] (sum, sum sq), _hits int64 [K], then either
        # _errors (list of float32 tensors) or _hist (int64 [nbins]).
        # image/batch: _count int64 [] units, _sums f64 [3 + K] of per-unit mean/median/rmse/shares
        self._count: Optional[torch.Tensor] = None
        self._sums: Optional[torch.Tensor] = None
        self._hits: Optional[torch.Tensor] = None
        self._hist: Optional[torch.Tensor] = None
        self._errors: list[torch.Tensor] = []

    def _init_state(self, device: torch.device) -> None:
        k = len(self.thresholds)
        self._count = torch.zeros((), dtype=torch.int64, device=device)
        if self.reduction == "pixel":
            self._sums = torch.zeros(2, dtype=torch.float64, device=device)
            self._hits = torch.zeros(k, dtype=torch.int64, device=device)
            if self.median_mode == "histogram":
                self._hist = torch.zeros(self._nbins, dtype=torch.int64, device=device)
        else:
            self._sums = torch.zeros(3 + k, dtype=torch.float64, device=device)

    def _fixed_state(self) -> list[torch.Tensor]:
        return [t for t in (self._count, self._sums, self._hits, self._hist) if t is not None]

    def valid_mask(self, gt: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-pixel validity (channel dimension removed)."""
        g = gt.movedim(self.channel_dim, -1)
        valid = torch.isfinite(g).all(-1) & (torch.linalg.vector_norm(
            torch.nan_to_num(g.double()), dim=-1) > self.gt_eps)
        if mask is not None:
            m = mask.to(device=gt.device, dtype=torch.bool)
            if m.shape != valid.shape:
                m = m.reshape(valid.shape)
            valid &= m
        return valid

    @torch.no_grad()
    def update(self, pred: torch.Tensor, gt: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Add one batch of predicted and ground-truth normals (same shape, 3 channels at
        ``channel_dim``). ``mask``: optional validity, shaped like one channel."""
        if pred.shape != gt.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != gt shape {tuple(gt.shape)}")
        valid = self.valid_mask(gt, mask)
        gt_safe = torch.where(valid.unsqueeze(self.channel_dim % gt.dim()), gt, torch.ones_like(gt))
        err = angular_error_deg(pred, gt_safe, self.channel_dim)
        if self._count is None:
            self._init_state(err.device)
        if self.reduction == "pixel":
            e = err[valid]
            self._count += e.numel()
            self._sums += torch.stack([e.sum(), (e * e).sum()]).to(self._sums.device)
            self._hits += torch.stack([(e < t).sum() for t in self.thresholds]).to(self._hits.device)
            if self.median_mode == "exact":
                dev = self.storage_device if self.storage_device is not None else e.device
                self._errors.append(e.float().to(dev))
            else:
                idx = (e * self.bins_per_degree).floor().long().clamp_(0, self._nbins - 1)
                self._hist += torch.bincount(idx, minlength=self._nbins).to(self._hist.device)
            return
        n = err.shape[0] if (self.reduction == "image" and err.dim() > 0) else 1
        e = err.reshape(n, -1)
        v = valid.reshape(n, -1)
        cnt = v.sum(1)
        has = cnt > 0
        c = cnt.clamp_min(1).double()
        ez = torch.where(v, e, torch.zeros_like(e))
        mean = ez.sum(1) / c
        rmse = ((ez * ez).sum(1) / c).sqrt()
        srt = torch.where(v, e, torch.full_like(e, math.inf)).sort(1).values
        med = _numpy_median_sorted(srt, cnt)
        shares = [((e < t) & v).sum(1).double() / c for t in self.thresholds]
        per_unit = torch.stack([mean, med, rmse] + shares, 1)
        per_unit = torch.where(has.unsqueeze(1), per_unit, torch.zeros_like(per_unit))
        self._count += has.sum()
        self._sums += per_unit.sum(0).to(self._sums.device)

    def merge(self, other: "NormalMeter") -> None:
        """Add the state of ``other`` (same configuration) into this meter."""
        same = (other.reduction, other.median_mode, other.thresholds, other.bins_per_degree) == (
            self.reduction, self.median_mode, self.thresholds, self.bins_per_degree)
        if not same:
            raise ValueError("cannot merge NormalMeters with different configurations")
        if other._count is None:
            return
        if self._count is None:
            self._init_state(other._count.device)
        for mine, theirs in zip(self._fixed_state(), other._fixed_state()):
            mine += theirs.to(mine.device)
        dev = self.storage_device
        self._errors.extend(e.to(dev) if dev is not None else e.clone() for e in other._errors)

    def sync(self, group: Any = None) -> None:
        """Combine the state of all ranks (every rank must call it; no-op without a group).

        Fixed-size state is all-reduced; in ``"exact"`` median mode the stored errors are
        all-gathered (padded to the largest rank), which costs 4 bytes per valid pixel per rank.
        """
        if world_size() == 1:
            return
        dev = _sync_device(group)
        if self._count is None:
            self._init_state(dev)
        _all_reduce_sum_(self._fixed_state(), group)
        if self.reduction != "pixel" or self.median_mode != "exact":
            return
        dist = torch.distributed
        local = (torch.cat(self._errors) if self._errors else torch.zeros(0)).float().to(dev)
        world = dist.get_world_size(group)
        size = torch.tensor([local.numel()], dtype=torch.int64, device=dev)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=group)
        sizes_l = [int(s) for s in sizes]
        m = max(sizes_l)
        padded = torch.zeros(m, dtype=torch.float32, device=dev)
        padded[: local.numel()] = local
        bufs = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(bufs, padded, group=group)
        out_dev = self.storage_device if self.storage_device is not None else dev
        self._errors = [b[:s].to(out_dev) for b, s in zip(bufs, sizes_l)]

    @property
    def num_valid(self) -> int:
        """Valid pixels (``"pixel"``) or counted images / batches (other reductions) so far."""
        return 0 if self._count is None else int(self._count)

    def _median(self, n: int) -> float:
        lo_rank, hi_rank = (n - 1) // 2, n // 2  # 0-based ranks of the middle values
        if self.median_mode == "exact":
            x = torch.cat(self._errors).flatten()
            lo = float(torch.kthvalue(x.cpu(), lo_rank + 1).values)
            hi = lo if hi_rank == lo_rank else float(torch.kthvalue(x.cpu(), hi_rank + 1).values)
            return 0.5 * (lo + hi)
        hist = self._hist.cpu()
        cum = hist.cumsum(0)

        def at_rank(r: int) -> float:
            b = int(torch.searchsorted(cum, torch.tensor(r, dtype=cum.dtype), right=True))
            before = int(cum[b - 1]) if b > 0 else 0
            frac = (r - before + 0.5) / int(hist[b])
            return min((b + frac) / self.bins_per_degree, 180.0)

        return 0.5 * (at_rank(lo_rank) + at_rank(hi_rank))

    def compute(self) -> dict[str, float]:
        """Return ``mean``, ``median``, ``rmse`` and one share per threshold (``"11.25"``...)."""
        if self._count is None or int(self._count) == 0:
            raise ValueError(
                "NormalMeter.compute(): no valid ground-truth normal was accumulated "
                f"(validity: finite with norm > {self.gt_eps}, and the mask)"
            )
        n = int(self._count)
        s = self._sums.cpu().tolist()
        scale = 100.0 if self.percent else 1.0
        keys = [threshold_key(t) for t in self.thresholds]
        if self.reduction == "pixel":
            h = self._hits.cpu().tolist()
            out = {"mean": s[0] / n, "median": self._median(n), "rmse": math.sqrt(s[1] / n)}
            out.update({k: h[i] / n * scale for i, k in enumerate(keys)})
            return out
        out = {"mean": s[0] / n, "median": s[1] / n, "rmse": s[2] / n}
        out.update({k: s[3 + i] / n * scale for i, k in enumerate(keys)})
        return out
