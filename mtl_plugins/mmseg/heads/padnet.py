"""PAD-Net decoder (Xu et al. 2018) as evaluated by the survey (notes §2.6), written from the text.

Structure (HRNet-18 reference configuration: ``in_channels=[18, 36, 72, 144]``)::

    backbone maps ──(upsample to the finest map, concat: 270 ch)── 1×1 conv + BN + ReLU  (fuse)
        │
        ├── for every aux task a:  Bottleneck(270→64→256, proj) → Bottleneck(256)   = F_a
        │                          1×1 conv(F_a) = P_a^init    (deep supervision)
        │
        ├── for every final task t:  F_t^o = F_t + Σ_{a ∈ aux, a ≠ t} SA_{t←a}(F_a)
        │                            (one SA block per ordered pair, 256 → 256)
        │
        └── final head per task t:   Bottleneck(256)×2 → 1×1 conv = P_t

    loss = Σ_{a∈aux} w_a·L_a(up(P_a^init)) · deep_sup_weight + Σ_{t∈tasks} w_t·L_t(up(P_t))

All at one scale (the finest input map, 1/4 for HRNet). With a single backbone map
(``in_index`` an int, e.g. a dilated ResNet's last stage) the concat is skipped and the 1×1
fuse conv is used only if ``fuse=True`` or ``channels`` differs from the input width.

SA message (decision D3): default ``message_conv=True`` = ``conv3×3(F) ⊙ σ(conv3×3'(F))`` with a
per-channel mask, the form that produced the survey's numbers (12.16 M parameters on
NYUD with seg+depth final and normals+edges auxiliary); ``message_conv=False`` gives the
survey's Eq. 2 ``σ(W∗F) ⊙ F`` and ``mask_channels=1`` a single spatial mask.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

from mmseg.registry import MODELS
from torch import Tensor, nn

from ...core.tasks import MTLConfigError
from .base import DecoderOutput, MultiTaskDecoder, params_of, select_inputs
from .blocks import Bottleneck, ConvNormAct, SABlock, resize_concat


@MODELS.register_module()
class PADNetHead(MultiTaskDecoder):
    """PAD-Net multi-task decoder (single-scale multi-modal distillation).

    Args:
        tasks: final tasks, e.g. ``('seg', 'depth')``.
        in_channels: channels of the selected backbone maps (int or list).
        in_index: which backbone maps (int or list, same length as ``in_channels``).
        aux_tasks: tasks with initial predictions (``tasks`` always included), e.g.
            ``('seg', 'depth', 'normal', 'edge')`` for the survey's NYUD model.
        num_classes: seg classes.
        channels: width after the fuse conv (default: the concatenated input width, 270 for
            HRNet-18).
        fuse: apply the 1×1 conv + norm + ReLU after the concat (None: when several maps are
            selected or ``channels`` differs from the input width).
        head_planes: bottleneck planes of the task heads; features have ``4·head_planes``
            channels (64 → 256, survey).
        message_conv, mask_channels: SA message form (see module docstring).
        norm_cfg: norm of every conv (default BN).
        **kwargs: :class:`~.base.MultiTaskDecoder` loss options (``loss_weights``,
            ``deep_sup_weight``, ``ignore_index``, ``depth_invalid``, ``max_depth``,
            ``normal_loss``, ``edge_pos_weight``, ``align_corners``, ``init_cfg``).
    """

    def __init__(self, tasks: Sequence[str], in_channels: Union[int, Sequence[int]],
                 in_index: Union[int, Sequence[int]] = (0, 1, 2, 3),
                 aux_tasks: Optional[Sequence[str]] = None, num_classes: Optional[int] = None,
                 channels: Optional[int] = None, fuse: Optional[bool] = None,
                 head_planes: int = 64, message_conv: bool = True,
                 mask_channels: Optional[int] = None, norm_cfg: Optional[dict] = None,
                 **kwargs) -> None:
        super().__init__(tasks, aux_tasks=aux_tasks, num_classes=num_classes, **kwargs)
        in_list = [in_channels] if isinstance(in_channels, int) else list(in_channels)
        idx_list = [in_index] if isinstance(in_index, int) else list(in_index)
        if len(in_list) != len(idx_list):
            raise MTLConfigError(f"in_channels={in_channels!r} and in_index={in_index!r} must "
                                 "have the same length")
        self.in_channels = in_list
        self.in_index = in_index
        cin = sum(in_list)
        self.channels = cin if channels is None else int(channels)
        if fuse is None:
            fuse = len(in_list) > 1 or self.channels != cin
        if not fuse and self.channels != cin:
            raise MTLConfigError(f"fuse=False needs channels == input width {cin}, "
                                 f"got channels={channels!r}")
        self.fuse = ConvNormAct(cin, self.channels, 1, norm_cfg) if fuse else None
        width = head_planes * Bottleneck.expansion
        self.feat_channels = width

        self.init_feats = nn.ModuleDict({
            a: nn.Sequential(Bottleneck(self.channels, head_planes, norm_cfg),
                             Bottleneck(width, head_planes, norm_cfg))
            for a in self.aux_tasks})
        self.init_preds = nn.ModuleDict({
            a: nn.Conv2d(width, self.out_channels[a], 1) for a in self.aux_tasks})
        self.distill = nn.ModuleDict({
            t: nn.ModuleDict({a: SABlock(width, message_conv, mask_channels)
                              for a in self.aux_tasks if a != t})
            for t in self.tasks})
        self.final_feats = nn.ModuleDict({
            t: nn.Sequential(Bottleneck(width, head_planes, norm_cfg),
                             Bottleneck(width, head_planes, norm_cfg))
            for t in self.tasks})
        self.final_preds = nn.ModuleDict({
            t: nn.Conv2d(width, self.out_channels[t], 1) for t in self.tasks})

    def forward(self, inputs: Sequence[Tensor]) -> DecoderOutput:
        xs = select_inputs(inputs, self.in_index)
        x = resize_concat(xs, self.align_corners) if len(xs) > 1 else xs[0]
        if self.fuse is not None:
            x = self.fuse(x)
        feats: Dict[str, Tensor] = {a: self.init_feats[a](x) for a in self.aux_tasks}
        init = {a: self.init_preds[a](feats[a]) for a in self.aux_tasks}
        final: Dict[str, Tensor] = {}
        for t in self.tasks:
            y = feats[t]
            for a, sa in self.distill[t].items():
                y = y + sa(feats[a])
            final[t] = self.final_preds[t](self.final_feats[t](y))
        return {"final": final, "init": {"": init}}

    def task_parameters(self) -> Dict[str, List[nn.Parameter]]:
        out = {a: params_of(self.init_preds[a]) for a in self.aux_tasks}
        for t in self.tasks:
            out[t] += params_of(self.distill[t], self.final_feats[t], self.final_preds[t])
        return out
