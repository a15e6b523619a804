"""MTI-Net decoder (Vandenhende et al. 2020) per the survey notes §2.9, written from the text.

Scales ``s = 0 … S-1`` run fine → coarse (HRNet-18: C = 18/36/72/144 at strides 4/8/16/32);
processing runs coarse → fine (s = S-1 … 0). N = number of auxiliary tasks (⊇ final tasks).

(a) **Initial task prediction** ITP_s, per aux task a::

        in_a^s = x_{S-1}                                   (coarsest scale)
               = concat(x_s, up(O_a^{s+1}))                 (s < S-1; C_s + C_{s+1} ch)
        F_a^s  = BasicBlock(in → C_s, proj) → BasicBlock(C_s)
        P_a^s  = 1×1 conv(F_a^s)                            (deep supervision, every scale)

(b) **Feature propagation** FPM_s for s = S-1 … 1 (none at the finest scale)::

        X  = concat_a F_a^s                                 (N·C_s, task-major)
        g  = 1×1 conv(BasicBlock(N·C_s/4) ∘ BasicBlock(N·C_s → N·C_s/4, proj) (X))
        X' = softmax_over_tasks(g) ⊙ X
        S  = BasicBlock(N·C_s → C_s, proj)(X')
        O_a^s = SE_a(S) + F_a^s                             (one SE block per task, r = 16)

    Decision D4: by default the softmax runs, per channel and pixel, over the N tasks
    (``view(B, N, C, H, W).softmax(1)``), the module's stated intent. The reference code
    views the task-major concat as ``(B, C, N, H, W)`` and takes the softmax over groups of N
    consecutive channels; ``fpm_reference_reshape=True`` reproduces that.

(c) **Multi-modal distillation** at every scale, per final task t, on the ITP features::

        D_t^s = F_t^s + Σ_{a ∈ aux, a ≠ t} SA^s_{t←a}(F_a^s)   (PAD-Net SA block, width C_s)

(d) **Aggregation** per final task t (HRNet head): upsample ``D_t^0 … D_t^{S-1}`` to the
    finest scale, concat (270 ch), 1×1 conv + BN + ReLU, 1×1 conv → P_t.

(e) Loss: ``Σ_s Σ_a w_a·deep_sup_weight·scale_weights[s]·L_a(up(P_a^s)) + Σ_t w_t·L_t(up(P_t))``,
    keys ``f'{a}.init.s{s}.loss_x'`` and ``f'{t}.loss_x'``.

Beyond HRNet: any backbone giving S maps works; ``channels`` (per scale) adds a 1×1 conv +
norm + ReLU reduction of each backbone map (shared), e.g. ``[64, 128, 256, 512]`` for
ResNet C2–C5, to control the N² cost.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from mmseg.registry import MODELS
from torch import Tensor, nn

from ...core.tasks import MTLConfigError
from .base import DecoderOutput, MultiTaskDecoder, params_of, select_inputs
from .blocks import BasicBlock, ConvNormAct, SABlock, SEBlock, resize_concat


class FeaturePropagation(nn.Module):
    """MTI-Net FPM at one scale (see the module docstring, step (b))."""

    def __init__(self, tasks: Sequence[str], channels: int, reduction: int = 4,
                 se_reduction: int = 16, reference_reshape: bool = False,
                 norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.channels = channels
        self.reference_reshape = reference_reshape
        n = len(self.tasks)
        wide = n * channels
        hidden = max(1, wide // reduction)
        self.gate = nn.Sequential(BasicBlock(wide, hidden, norm_cfg),
                                  BasicBlock(hidden, hidden, norm_cfg),
                                  nn.Conv2d(hidden, wide, 1))
        self.summary = BasicBlock(wide, channels, norm_cfg)
        self.se = nn.ModuleDict({t: SEBlock(channels, se_reduction) for t in self.tasks})

    def task_softmax(self, g: Tensor) -> Tensor:
        """Softmax of the gate over tasks; ``g`` is ``[B, N·C, H, W]`` task-major."""
        b, _, h, w = g.shape
        n, c = len(self.tasks), self.channels
        if self.reference_reshape:
            return g.view(b, c, n, h, w).softmax(dim=2).view(b, n * c, h, w)
        return g.view(b, n, c, h, w).softmax(dim=1).view(b, n * c, h, w)

    def forward(self, feats: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        x = torch.cat([feats[t] for t in self.tasks], dim=1)
        x = self.task_softmax(self.gate(x)) * x
        s = self.summary(x)
        return {t: self.se[t](s) + feats[t] for t in self.tasks}


@MODELS.register_module()
class MTINetHead(MultiTaskDecoder):
    """MTI-Net multi-task decoder (multi-scale distillation with feature propagation).

    Args:
        tasks: final tasks, e.g. ``('seg', 'depth')``.
        in_channels: channels of the selected backbone maps, fine → coarse
            (HRNet-18: ``[18, 36, 72, 144]``).
        in_index: indices of those maps (strides must double from one to the next).
        aux_tasks: tasks with initial predictions at every scale (``tasks`` included).
        num_classes: seg classes.
        channels: per-scale width; ``None`` = ``in_channels`` (no reduction conv).
        fpm_reduction: FPM bottleneck factor (N·C → N·C/4).
        se_reduction: SE ratio in the FPM (16; hidden width at least 1).
        fpm_reference_reshape: reproduce the reference code's softmax grouping (D4).
        message_conv, mask_channels: SA message form (see ``padnet``).
        head_channels: width of the aggregation head's 1×1 conv (default: Σ channels).
        scale_weights: deep-supervision factor per scale (sequence of S, fine → coarse, or
            ``{s: w}``), default 1 everywhere.
        norm_cfg: norm of every conv (default BN).
        **kwargs: :class:`~.base.MultiTaskDecoder` loss options.
    """

    def __init__(self, tasks: Sequence[str],
                 in_channels: Sequence[int] = (18, 36, 72, 144),
                 in_index: Sequence[int] = (0, 1, 2, 3),
                 aux_tasks: Optional[Sequence[str]] = None, num_classes: Optional[int] = None,
                 channels: Optional[Sequence[int]] = None, fpm_reduction: int = 4,
                 se_reduction: int = 16, fpm_reference_reshape: bool = False,
                 message_conv: bool = True, mask_channels: Optional[int] = None,
                 head_channels: Optional[int] = None,
                 scale_weights: Union[None, Sequence[float], Mapping[int, float]] = None,
                 norm_cfg: Optional[dict] = None, **kwargs) -> None:
        super().__init__(tasks, aux_tasks=aux_tasks, num_classes=num_classes, **kwargs)
        in_channels = [int(c) for c in ([in_channels] if isinstance(in_channels, int)
                                        else in_channels)]
        in_index = [in_index] if isinstance(in_index, int) else list(in_index)
        if len(in_channels) != len(in_index) or not in_channels:
            raise MTLConfigError(f"in_channels={in_channels!r} and in_index={in_index!r} must "
                                 "be non-empty and of the same length")
        self.in_channels = in_channels
        self.in_index = in_index
        self.num_scales = S = len(in_channels)
        chans = list(in_channels) if channels is None else [int(c) for c in channels]
        if len(chans) != S:
            raise MTLConfigError(f"channels={channels!r}: expected {S} values (one per scale)")
        self.scale_channels = chans
        if scale_weights is None:
            sw = [1.0] * S
        elif isinstance(scale_weights, Mapping):
            sw = [float(scale_weights.get(s, 1.0)) for s in range(S)]
        else:
            sw = [float(w) for w in scale_weights]
        if len(sw) != S or any(w < 0 for w in sw):
            raise MTLConfigError(f"scale_weights={scale_weights!r}: expected {S} weights >= 0")
        self.scale_weights = sw

        self.reduce = nn.ModuleList([
            ConvNormAct(ci, co, 1, norm_cfg) if ci != co else nn.Identity()
            for ci, co in zip(in_channels, chans)])
        self.itp = nn.ModuleList()
        self.init_preds = nn.ModuleList()
        for s in range(S):
            cin = chans[s] if s == S - 1 else chans[s] + chans[s + 1]
            self.itp.append(nn.ModuleDict({
                a: nn.Sequential(BasicBlock(cin, chans[s], norm_cfg),
                                 BasicBlock(chans[s], chans[s], norm_cfg))
                for a in self.aux_tasks}))
            self.init_preds.append(nn.ModuleDict({
                a: nn.Conv2d(chans[s], self.out_channels[a], 1) for a in self.aux_tasks}))
        # FPM at every scale but the finest; index s (entry 0 unused -> Identity placeholder)
        self.fpm = nn.ModuleList([nn.Identity()] + [
            FeaturePropagation(self.aux_tasks, chans[s], fpm_reduction, se_reduction,
                               fpm_reference_reshape, norm_cfg) for s in range(1, S)])
        self.distill = nn.ModuleList([
            nn.ModuleDict({t: nn.ModuleDict({a: SABlock(chans[s], message_conv, mask_channels)
                                             for a in self.aux_tasks if a != t})
                           for t in self.tasks})
            for s in range(S)])
        total = sum(chans)
        hc = total if head_channels is None else int(head_channels)
        self.heads = nn.ModuleDict({
            t: nn.Sequential(ConvNormAct(total, hc, 1, norm_cfg),
                             nn.Conv2d(hc, self.out_channels[t], 1))
            for t in self.tasks})

    def init_weights_for(self, scale_key: str) -> float:
        return self.scale_weights[int(scale_key[1:])]

    def forward(self, inputs: Sequence[Tensor]) -> DecoderOutput:
        xs = [r(x) for r, x in zip(self.reduce, select_inputs(inputs, self.in_index))]
        S = self.num_scales
        feats: List[Dict[str, Tensor]] = [dict() for _ in range(S)]
        init: Dict[str, Dict[str, Tensor]] = {}
        propagated: Optional[Dict[str, Tensor]] = None
        for s in reversed(range(S)):
            x = xs[s]
            preds = {}
            for a in self.aux_tasks:
                if propagated is None:
                    inp = x
                else:
                    inp = resize_concat([x, propagated[a]], self.align_corners)
                f = self.itp[s][a](inp)
                feats[s][a] = f
                preds[a] = self.init_preds[s][a](f)
            init[f"s{s}"] = preds
            propagated = self.fpm[s](feats[s]) if s > 0 else None
        final: Dict[str, Tensor] = {}
        for t in self.tasks:
            distilled = []
            for s in range(S):
                d = feats[s][t]
                for a, sa in self.distill[s][t].items():
                    d = d + sa(feats[s][a])
                distilled.append(d)
            final[t] = self.heads[t](resize_concat(distilled, self.align_corners))
        return {"final": final, "init": {k: init[k] for k in sorted(init)}}

    def task_parameters(self) -> Dict[str, List[nn.Parameter]]:
        out = {a: params_of(*(self.init_preds[s][a] for s in range(self.num_scales)))
               for a in self.aux_tasks}
        for t in self.tasks:
            out[t] += params_of(*(self.distill[s][t] for s in range(self.num_scales)),
                                self.heads[t])
        return out
