"""Building blocks of the decoder-focused heads (survey notes §2.0), written from the text.

- :class:`BasicBlock`: two 3×3 conv+norm with a residual; a 1×1 conv+norm projection when
  the channel count changes (stride 1 only: these heads never downsample).
- :class:`Bottleneck`: 1×1 → 3×3 → 1×1 with 4× expansion, projection when needed.
- :class:`SABlock`: the PAD-Net/MTI-Net distillation message (see its docstring for the
  code-vs-Eq. 2 choice).
- :class:`SEBlock`: squeeze-and-excitation channel gating.
- :func:`resize_concat`: bilinear upsampling of several maps to the first one's size, then concat.

Norm layers go through ``mmcv.cnn.build_norm_layer`` so that configs can use SyncBN.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from torch import Tensor

from ...core.tasks import MTLConfigError

DEFAULT_NORM_CFG = dict(type="BN", requires_grad=True)


def norm(norm_cfg: Optional[dict], channels: int) -> nn.Module:
    return build_norm_layer(dict(norm_cfg or DEFAULT_NORM_CFG), channels)[1]


def conv1x1(cin: int, cout: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, bias=bias)


def conv3x3(cin: int, cout: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=bias)


class ConvNormAct(nn.Sequential):
    """``k×k`` conv (no bias) + norm + ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 1,
                 norm_cfg: Optional[dict] = None) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False),
                         norm(norm_cfg, cout), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """ResNet basic block at stride 1: ``relu(bn(conv3(relu(bn(conv3(x))))) + proj(x))``."""

    def __init__(self, cin: int, cout: int, norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(cin, cout)
        self.bn1 = norm(norm_cfg, cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = norm(norm_cfg, cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(conv1x1(cin, cout), norm(norm_cfg, cout))
                           if cin != cout else None)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet bottleneck at stride 1 with expansion 4: output ``4·planes`` channels."""

    expansion = 4

    def __init__(self, cin: int, planes: int, norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = norm(norm_cfg, planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm(norm_cfg, planes)
        self.conv3 = conv1x1(planes, cout)
        self.bn3 = norm(norm_cfg, cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(conv1x1(cin, cout), norm(norm_cfg, cout))
                           if cin != cout else None)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class SABlock(nn.Module):
    """Spatial-attention message from a source task's features (PAD-Net distillation).

    Two forms (survey notes §2.6 and decision D3):

    - ``message_conv=True`` (default, the form behind the survey's numbers):
      ``conv3x3(F) ⊙ σ(conv3x3'(F))`` — a value conv and a gate conv, C→C, no bias, no norm;
    - ``message_conv=False`` (the survey's Eq. 2): ``σ(W ∗ F) ⊙ F``.

    ``mask_channels``: channels of the gate; ``None`` = C (a per-channel, per-pixel mask,
    the default) or ``1`` (one spatial map broadcast over the channels, Eq. 2 read literally).
    """

    def __init__(self, channels: int, message_conv: bool = True,
                 mask_channels: Optional[int] = None) -> None:
        super().__init__()
        if mask_channels not in (None, 1, channels):
            raise MTLConfigError(
                f"mask_channels={mask_channels!r}: expected None (= channels), 1 or {channels}")
        self.value = conv3x3(channels, channels) if message_conv else None
        self.gate = conv3x3(channels, mask_channels or channels)

    def forward(self, x: Tensor) -> Tensor:
        value = x if self.value is None else self.value(x)
        return value * torch.sigmoid(self.gate(x))


class SEBlock(nn.Module):
    """Squeeze-and-excitation: GAP → FC(C→max(1, C//r)) → ReLU → FC → sigmoid → scale."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        w = self.fc(x.mean(dim=(2, 3)))
        return x * w[:, :, None, None]


def resize_to(x: Tensor, size: Sequence[int], align_corners: bool = False) -> Tensor:
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def resize_concat(xs: Sequence[Tensor], align_corners: bool = False) -> Tensor:
    size = xs[0].shape[2:]
    return torch.cat([resize_to(x, size, align_corners) for x in xs], dim=1)
