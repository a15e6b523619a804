"""Unit normal vectors: ``x / max(||x||_2, eps)`` along one dimension, fast on CPU.

Surface normals are predicted as ``[B, 3, H, W]`` maps and normalised along the channel
dimension before the loss (survey, paper 003 §4.2: the L1 / cosine losses are taken on the
unit prediction) and before evaluation. ``torch.nn.functional.normalize`` computes the norm
with ``torch.linalg.vector_norm``, whose CPU kernel is not vectorised for a reduction over a
non-innermost dimension (pytorch/pytorch#91373, #120229): on ``[8, 3, 64, 64]`` float32, one
thread, torch 2.14, it takes 3.1 ms against 0.05 ms for ``sqrt(sum(x * x))``, 6 % of the whole
synthetic-scenes training iteration (``tools/benchmark_step.py``). :func:`unit_vectors` is the
same function written with the vectorised elementwise and sum kernels.

It equals ``F.normalize(x, p=2, dim=dim, eps=eps)`` in value and gradient to rounding (a
float32 ulp; half-precision results may differ by one ulp of their dtype), zero vectors and
vectors shorter than ``eps`` included: ``max(sqrt(s), eps) = sqrt(max(s, eps^2))`` with the
clamp before the square root, so a zero vector gets the gradient ``grad / eps`` (as
``F.normalize``) and never the ``0 * inf = NaN`` of a square root at zero (hence ``eps^2``
must not underflow: ``eps >= 1e-19``, checked). Half-precision inputs are squared, summed
and divided in float32 (a float16 component above 256 squares to inf) and the result is
float32, as ``F.normalize``'s is under autocast, where ``normalize`` is a float32 op (the
losses' sums of it then stay float32 too).
"""
from __future__ import annotations

import torch
from torch import Tensor

#: the least ``eps`` accepted: its square (1e-38) does not underflow to 0 in float32
MIN_EPS = 1e-19


def unit_vectors(x: Tensor, dim: int = 1, eps: float = 1e-12) -> Tensor:
    """``x / max(||x||_2, eps)`` along ``dim``; float32 for half inputs, else ``x``'s dtype
    (see the module docstring)."""
    if not x.is_floating_point():
        raise TypeError(f"unit_vectors: expected a floating-point tensor, got {x.dtype}")
    if not MIN_EPS <= eps:
        raise ValueError(f"unit_vectors: eps={eps!r}: expected eps >= {MIN_EPS} (eps^2 must "
                         "not underflow in float32)")
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    norm = wide.square().sum(dim, keepdim=True).clamp_min(eps * eps).sqrt()
    return wide / norm
