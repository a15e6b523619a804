"""Which kernel forms the engine's exact float64 Gramian: the ``gramian_kernel`` setting.

Every kernel gives the same numbers to ~1e-14 of the largest entry (exact float32 products,
float64 sums, in different orders); they differ in speed and in what they need:

- ``"auto"`` (default): ``"c"`` for float32 rows on a CPU when the C kernel builds on this
  machine, else ``"blas"`` (with one warning saying why, when it does not build);
- ``"blas"``: :func:`~._utils.gramian64`, chunked cast + BLAS ``DGEMM``; any device, dtype;
- ``"c"``: :mod:`.c_gramian`, one read of G by a C kernel compiled at first use (CPU float32;
  refused when it cannot be built, or for G on another device or of another dtype);
- ``"fused"``: :mod:`.fused_gramian`, one pass compiled by ``torch.compile`` (any device;
  a build at the first step; Triton on a GPU).

GradVac's per-layer Gramians (``sizes``) go through the same kernel.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch

from ..tasks import MTLConfigError
from . import c_gramian
from ._utils import gramian64
from .fused_gramian import fused_block_gramians64, fused_gramian64

GRAMIAN_KERNELS = ("auto", "blas", "c", "fused")


def check_gramian_kernel(kernel: str, has_aggregator: bool) -> str:
    """``kernel`` when valid; :class:`MTLConfigError` naming ``gramian_kernel`` otherwise: an
    unknown name, an explicit kernel with no aggregator (the plain summed loss forms no
    Gramian, so the setting would do nothing), or ``"c"`` where the C kernel cannot be built."""
    if kernel not in GRAMIAN_KERNELS:
        raise MTLConfigError(f"gramian_kernel={kernel!r}: expected one of {list(GRAMIAN_KERNELS)}")
    if kernel in ("c", "fused") and not has_aggregator:
        raise MTLConfigError(f"gramian_kernel={kernel!r} with no aggregator: the plain summed "
                             "loss forms no Gramian; expected gramian_kernel='auto' (or an "
                             "aggregator)")
    if kernel == "c" and c_gramian.unavailable():
        raise MTLConfigError(f"gramian_kernel='c': the C Gramian kernel cannot be built on this "
                             f"machine ({c_gramian.unavailable()}); expected a C compiler ($CC, "
                             "default cc), or gramian_kernel='auto' / 'blas'")
    return kernel


def _use_c(kernel: str, grads: torch.Tensor) -> bool:
    """Whether ``kernel`` means the C kernel for ``grads``."""
    if kernel == "c":
        if not c_gramian.supports(grads):
            raise MTLConfigError(
                f"gramian_kernel='c': the C kernel takes float32 task gradients on a CPU with "
                f"contiguous columns, got {grads.dtype} on {grads.device} with strides "
                f"{grads.stride()}; expected gramian_kernel='auto' (BLAS there), 'blas' or "
                "'fused'")
        return True
    if kernel != "auto" or not c_gramian.supports(grads):
        return False
    reason = c_gramian.unavailable()
    if reason:
        warnings.warn(f"gramian_kernel='auto': the C Gramian kernel cannot be built ({reason});"
                      " the exact Gramian is formed with BLAS instead (slower on some CPUs). "
                      "Set gramian_kernel='blas' to silence this.", RuntimeWarning, stacklevel=3)
    return not reason


#: ``grads -> float64 scratch`` for the BLAS path (:func:`~._utils.work_buffer`), called only
#: when that path runs (so the other kernels allocate none)
Scratch = Callable[[torch.Tensor], Optional[torch.Tensor]]


def exact_gramian(grads: torch.Tensor, kernel: str,
                  scratch: Optional[Scratch] = None) -> torch.Tensor:
    """``G G^T`` (``[T, T]`` float64) of ``grads`` with ``kernel``."""
    if kernel == "fused":
        return fused_gramian64(grads)
    if _use_c(kernel, grads):
        return c_gramian.c_gramian64(grads)
    return gramian64(grads, work=scratch(grads) if scratch is not None else None)


def exact_block_gramians(grads: torch.Tensor, sizes: Sequence[int], kernel: str,
                         scratch: Optional[Scratch] = None) -> torch.Tensor:
    """``[B, T, T]`` float64 Gramians of the column blocks of widths ``sizes`` with ``kernel``
    (GradVac's per-layer Gramians, Wang et al. 2021, Alg. 1)."""
    if kernel == "fused":
        return fused_block_gramians64(grads, sizes)
    if _use_c(kernel, grads):
        return c_gramian.c_block_gramians64(grads, sizes)
    work = scratch(grads) if scratch is not None else None
    return torch.stack([gramian64(b, work=work) for b in torch.split(grads, list(sizes), dim=1)])
