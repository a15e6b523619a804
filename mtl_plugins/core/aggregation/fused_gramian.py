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

GradVac works per layer: :func:`fused_block_gramians64` forms the ``[B, T, T]`` Gramians of
the column blocks of ``G`` with the same kernel, one call per block (the same compiled graph
for any width), and the narrow blocks (biases, norms) with a float64 product, which costs
less there than a compiled call (~40 us of guards and wrapper on a CPU).

The price is a compilation at the first call for each number of rows T in a process
(~14 s on a 2-core CPU with an empty cache, 1-2 s per further T; inductor keeps its cache on
disk, so later processes load it in about 2 s) and a working ``torch.compile`` toolchain on
the device (a C++ compiler on a CPU, Triton on a GPU). It is therefore opt-in:
``TaskBackward(gramian_kernel="fused")`` and the adapters' ``gramian_kernel`` keys.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..tasks import MTLConfigError

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


#: column blocks narrower than this are formed by :func:`fused_block_gramians64` with a float64
#: product (a ``3 x 4096`` block: ~10 us on a CPU) instead of a compiled call (~40 us)
NARROW_BLOCK = 4096


def _check_rows(grads: torch.Tensor) -> None:
    if grads.dim() != 2 or not grads.is_floating_point():
        raise ValueError(f"grads: expected a floating [T, P] matrix, got {grads.dtype} of shape "
                         f"{tuple(grads.shape)}")


def _upper(grads: torch.Tensor) -> torch.Tensor:
    """:func:`_pair_sums` of ``grads`` by the compiled kernel; a build that fails raises
    :class:`~mtl_plugins.core.tasks.MTLConfigError` naming ``gramian_kernel='fused'``."""
    try:
        return _kernel()(grads.detach())
    except Exception as err:  # torch.compile's failures have no common base class
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise MTLConfigError(
            f"gramian_kernel='fused': torch.compile could not build the Gramian kernel on "
            f"{grads.device} ({type(err).__name__}: {reason[:300]}); expected a working "
            "torch.compile toolchain (a C++ compiler on a CPU), or gramian_kernel='blas'"
        ) from err


def _exact64(grads: torch.Tensor) -> torch.Tensor:
    """``G G^T`` by a float64 product: exact products, float64 sums (for float64 rows, the
    empty matrix and narrow blocks)."""
    g = grads.to(torch.float64)
    return g @ g.T


def _symmetric(upper: torch.Tensor, t: int) -> torch.Tensor:
    """``[..., T, T]`` from ``[..., T (T + 1) / 2]`` upper triangles in :func:`_pair_sums`'
    order (index tensors made on ``upper``'s device: no host copy)."""
    rows, cols = torch.triu_indices(t, t, device=upper.device)
    pairs = torch.arange(rows.numel(), device=upper.device)
    index = torch.empty(t, t, dtype=torch.long, device=upper.device)
    index[rows, cols] = pairs
    index[cols, rows] = pairs
    return upper[..., index]


def fused_gramian64(grads: torch.Tensor) -> torch.Tensor:
    """``G G^T`` (``[T, T]`` float64 on ``grads``' device) of a ``[T, P]`` matrix of any
    floating dtype, from one compiled pass over ``grads`` (see the module doc).

    Raises :class:`~mtl_plugins.core.tasks.MTLConfigError` naming ``gramian_kernel='fused'``
    when ``torch.compile`` cannot build the kernel on this machine."""
    _check_rows(grads)
    t = grads.shape[0]
    if grads.dtype == torch.float64 or t == 0:
        return _exact64(grads)
    return _symmetric(_upper(grads), t)


def fused_block_gramians64(grads: torch.Tensor, sizes: Sequence[int],
                           narrow: Optional[int] = None) -> torch.Tensor:
    """``[B, T, T]`` float64: the Gramian ``G_b G_b^T`` of each block of consecutive columns
    of ``grads`` (``sizes``: the blocks' widths, summing to ``P``), for GradVac's per-layer
    Gramians (Wang et al. 2021, Alg. 1 works on each layer's gradients). Blocks of at least
    ``narrow`` columns (default :data:`NARROW_BLOCK`) come from the compiled kernel, narrower
    ones from a float64 product; both are exact products summed in float64, so every entry
    equals :func:`~._utils.gramian64`'s of the block to ~1e-14 of the block's largest.

    Raises :class:`~mtl_plugins.core.tasks.MTLConfigError` naming ``gramian_kernel='fused'``
    when ``torch.compile`` cannot build the kernel on this machine."""
    _check_rows(grads)
    t = grads.shape[0]
    blocks = torch.split(grads, list(sizes), dim=1)
    narrow = NARROW_BLOCK if narrow is None else narrow
    if grads.dtype == torch.float64 or t == 0:
        return torch.stack([_exact64(b) for b in blocks])
    mats = [None if b.shape[1] >= narrow else _exact64(b) for b in blocks]
    wide = [i for i, m in enumerate(mats) if m is None]
    if wide:
        for i, m in zip(wide, _symmetric(torch.stack([_upper(blocks[i]) for i in wide]), t)):
            mats[i] = m
    return torch.stack(mats)
