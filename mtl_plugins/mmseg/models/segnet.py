"""SegNet as the shared trunk of a :class:`~mtl_plugins.mmseg.segmentor.MultiTaskSegmentor`.

Paper 001 (Li et al., "On Steering Multi-Annotations per Sample for Multi-Task Learning",
``/work/shared/papers/001_*.txt``, Sec. 4.1, ~line 181): "For NYUv2, we examine on two
architectures in MTL: SegNet [2] following Uncertainty weights [18] ...", and (Sec. 4.2, ~line
195) "we cluster 894 classes into 13 classes following [23] for SegNet" ([23] = MTAN, Liu et
al. 2019). The architecture details are in the paper's missing supplement, so this module is
the SegNet of Badrinarayanan et al. 2017 ([2]) in the multi-task layout that MTAN's NYUv2-13
experiments made standard (notes ``seed-sta-gradsplit.md`` A.10, ``seed-roaming-recon.md``:
"SegNet (MTAN version, 64 output maps at input resolution)"):

- **encoder**: the 13 3×3 convolutions of VGG-16 in five stages of 2, 2, 3, 3, 3 convs with
  widths ``w = (b, 2b, 4b, 8b, 8b)`` (``b = base_channels``, 64 in SegNet), each conv followed
  by BN and ReLU, and a 2×2 max pooling (stride 2) after every stage whose argmax indices are
  kept;
- **decoder** (shared by the tasks, as in MTAN's SegNet): the mirror image, deepest stage
  first. Stage ``s`` un-pools with the indices of encoder stage ``s`` (SegNet's
  "pooling indices" upsampling: no learned upsampling), then runs as many conv-BN-ReLU as
  encoder stage ``s``; its first conv maps ``w[s]`` to ``w[s-1]`` (``w[0]`` for stage 0) and the
  others keep that width;
- output: one ``b``-channel map at input resolution; the task heads (a 3×3 conv and a 1×1
  prediction conv each, configured in ``configs/mmseg/_base_/models/segnet_mt.py``) read it.

The input height and width must be multiples of ``2 ** 5 = 32`` (five poolings, exact
un-pooling); anything else is refused with the shape.

Written from the architecture description above (no code copied).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch.nn.functional as F
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import Tensor, nn

from ...core.tasks import MTLConfigError

#: convolutions per stage of VGG-16's 13-conv feature extractor (SegNet's encoder)
VGG16_STAGE_CONVS: Tuple[int, ...] = (2, 2, 3, 3, 3)
#: stage widths relative to ``base_channels`` (VGG-16: 64, 128, 256, 512, 512)
VGG16_STAGE_MULTIPLIERS: Tuple[int, ...] = (1, 2, 4, 8, 8)

#: Xavier-normal convolutions (zero bias), BN at weight 1 / bias 0: the initialisation of
#: MTAN's SegNet code as recorded in notes seed-roaming-recon.md ("Xavier for SegNet").
DEFAULT_INIT_CFG = [dict(type="Xavier", layer="Conv2d", distribution="normal", bias=0.0),
                    dict(type="Constant", layer=["_BatchNorm", "GroupNorm"], val=1.0, bias=0.0)]


def _stack(in_channels: int, out_channels: int, num_convs: int, norm_cfg: dict,
           act_cfg: dict) -> nn.Sequential:
    """``num_convs`` × (3×3 conv, norm, act); the first conv maps ``in_channels`` →
    ``out_channels``.

    The convs keep their bias before the norm, as SegNet/VGG-16 and MTAN's SegNet do (so the
    encoder's conv parameters equal VGG-16's 14,714,688 at full width). Plain modules, not
    mmcv's ``ConvModule``, whose ``init_weights`` would replace the Xavier initialisation.
    """
    layers: List[nn.Module] = []
    for i in range(num_convs):
        layers.append(nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3,
                                padding=1, bias=True))
        layers.append(build_norm_layer(norm_cfg, out_channels)[1])
        layers.append(build_activation_layer(act_cfg))
    return nn.Sequential(*layers)


@MODELS.register_module()
class SegNet(BaseModule):
    """SegNet encoder-decoder (Badrinarayanan et al. 2017) in MTAN's multi-task layout.

    See the module docstring for the architecture and its sources.

    Args:
        in_channels: image channels (3).
        base_channels: width of the first stage and of the output map (64 in SegNet; the
            stage widths are ``base_channels × (1, 2, 4, 8, 8)``). Lower it only for tests.
        stage_convs: convs per stage (VGG-16: ``(2, 2, 3, 3, 3)``); the decoder mirrors it.
        norm_cfg: normalisation after every conv (BN in SegNet).
        act_cfg: activation after every norm (ReLU).
        init_cfg: default :data:`DEFAULT_INIT_CFG`.

    ``forward(x [B, in_channels, H, W])`` returns ``(features [B, base_channels, H, W],)``
    (a tuple, like every mmseg backbone; heads read it with ``in_index=0``).
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64,
                 stage_convs: Sequence[int] = VGG16_STAGE_CONVS,
                 norm_cfg: Optional[dict] = None, act_cfg: Optional[dict] = None,
                 init_cfg: Optional[Union[dict, List[dict]]] = None) -> None:
        super().__init__(init_cfg=DEFAULT_INIT_CFG if init_cfg is None else init_cfg)
        if not isinstance(base_channels, int) or base_channels < 1:
            raise MTLConfigError(f"model.backbone.base_channels={base_channels!r}: expected a "
                                 "positive int (64 in SegNet)")
        convs = tuple(stage_convs)
        if len(convs) != len(VGG16_STAGE_MULTIPLIERS) or any(
                not isinstance(n, int) or n < 1 for n in convs):
            raise MTLConfigError(f"model.backbone.stage_convs={stage_convs!r}: expected "
                                 f"{len(VGG16_STAGE_MULTIPLIERS)} positive ints (VGG-16: "
                                 f"{VGG16_STAGE_CONVS})")
        norm_cfg = dict(type="BN", requires_grad=True) if norm_cfg is None else norm_cfg
        act_cfg = dict(type="ReLU") if act_cfg is None else act_cfg
        widths = [base_channels * m for m in VGG16_STAGE_MULTIPLIERS]
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.stage_convs = convs
        self.widths = tuple(widths)
        self.encoder = nn.ModuleList(
            _stack(in_channels if s == 0 else widths[s - 1], widths[s], n, norm_cfg, act_cfg)
            for s, n in enumerate(convs))
        # decoder[s] mirrors encoder[s]; it runs after un-pooling with encoder[s]'s indices
        self.decoder = nn.ModuleList(
            _stack(widths[s], widths[max(s - 1, 0)], n, norm_cfg, act_cfg)
            for s, n in enumerate(convs))

    @property
    def downsample(self) -> int:
        """Total pooling factor: input sides must be multiples of it."""
        return 2 ** len(self.stage_convs)

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        h, w = x.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise MTLConfigError(
                f"SegNet: input of {h}x{w}; its height and width must be multiples of "
                f"{self.downsample} (5 poolings): resize/crop the images or pad them with the "
                f"data preprocessor's size_divisor={self.downsample}")
        indices: List[Tensor] = []
        for stage in self.encoder:
            x = stage(x)
            x, idx = F.max_pool2d(x, kernel_size=2, stride=2, return_indices=True)
            indices.append(idx)
        for s in reversed(range(len(self.decoder))):
            x = F.max_unpool2d(x, indices[s], kernel_size=2, stride=2)
            x = self.decoder[s](x)
        return (x,)
