"""The exact Gramian ``G G^T`` in one pass over ``G``: a kernel compiled by ``torch.compile``.

:func:`~._utils.gramian64` casts ``G`` to float64 chunk by chunk and multiplies the chunks
with BLAS (``DGEMM`` on ``[T, c] x [c, T]``). Where that product runs slowly — MKL on this
project's AMD EPYC CPU: ~10 GFLOP/s, 7 ms for ``3 x 2.78 M``, i.e. three to four passes' worth
of ``G`` — the exact Gramian is the largest piece of the parameter-level engine's time above
the floor (``docs/benchmarks.md``, issue 12). :func:`fused_gramian64` computes the same
numbers in one pass: inductor fuses the float32 -> float64 cast, the products and the
``T (T + 1) / 2`` sums into one loop over the columns (2 ms for ``3 x 2.78 M`` on the same
CPU, the time of one read of ``G``), with no float64 copy and no scratch buffer.

Exactness is :func:`~._utils.gramian64`'s: the product of two float32 (or half) numbers is
exact in float64, so only the float64 sums round (in another order: the two agree to ~1e-14
of the largest entry).

The price is a compilation at the first call for each number of rows T in a process
(~14 s on a 2-core CPU with an empty cache, 1-2 s per further T; inductor keeps its cache on
disk, so later processes load it in about 2 s) and a working ``torch.compile`` toolchain on
the device (a C++ compiler on a CPU, Triton on a GPU). It is therefore opt-in:
``TaskBackward(gramian_kernel="fused")`` and the adapters' ``gramian_kernel`` keys.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..tasks import MTLConfigError

#: the engine's Gramian kernels: ``"blas"`` (:func:`~._utils.gramian64`, the default) or
#: ``"fused"`` (:func:`fused_gramian64`)
GRAMIAN_KERNELS = ("blas", "fused")

_compiled: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


def _pair_sums(grads: torch.Tensor) -> torch.Tensor:
    """``[K_00, K_01, ..., K_0(T-1), K_11, ...]``: the upper triangle of ``G G^T`` row by row,
    each entry a float64 sum of float64 products (the graph that inductor fuses)."""
    g = grads.to(torch.float64)
    t = grads.shape[0]
    return torch.stack([(g[i] * g[j]).sum() for i in range(t) for j in range(i, t)])


def _kernel() -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`_pair_sums` compiled once per process, for any number of columns (``dynamic``);
    a new number of rows compiles anew (the loop over the pairs is unrolled)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_pair_sums, dynamic=True, fullgraph=True)
    return _compiled


def fused_gramian64(grads: torch.Tensor) -> torch.Tensor:
    """``G G^T`` (``[T, T]`` float64 on ``grads``' device) of a ``[T, P]`` matrix of any
    floating dtype, from one compiled pass over ``grads`` (see the module doc).

    Raises :class:`~mtl_plugins.core.tasks.MTLConfigError` naming ``gramian_kernel='fused'``
    when ``torch.compile`` cannot build the kernel on this machine."""
    if grads.dim() != 2 or not grads.is_floating_point():
        raise ValueError(f"grads: expected a floating [T, P] matrix, got {grads.dtype} of shape "
                         f"{tuple(grads.shape)}")
    t = grads.shape[0]
    if grads.dtype == torch.float64 or t == 0:
        return grads.to(torch.float64) @ grads.to(torch.float64).T
    try:
        upper = _kernel()(grads.detach())
    except Exception as err:  # torch.compile's failures have no common base class
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise MTLConfigError(
            f"gramian_kernel='fused': torch.compile could not build the Gramian kernel on "
            f"{grads.device} ({type(err).__name__}: {reason[:300]}); expected a working "
            "torch.compile toolchain (a C++ compiler on a CPU), or gramian_kernel='blas'"
        ) from err
    out = torch.empty(t, t, dtype=torch.float64, device=grads.device)
    rows, cols = torch.triu_indices(t, t, device=grads.device)
    out[rows, cols] = upper
    out[cols, rows] = upper
    return out
