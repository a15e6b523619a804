"""Backbones of the mmseg integration, registered in ``mmseg.registry.MODELS``:
:class:`SegNet` (paper 001's NYUv2-13 trunk, MTAN's layout)."""
from .segnet import SegNet

__all__ = ["SegNet"]
