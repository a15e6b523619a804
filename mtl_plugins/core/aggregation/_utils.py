"""Helpers shared by the aggregators: argument checks, Gramian preparation, RNG state.

Solvers work on the ``T x T`` Gramian on the CPU in float64: ``T`` is small, so one
device-to-host copy of ``T*T`` numbers per step is cheaper than launching many tiny kernels on
an accelerator, and the result is bitwise reproducible across devices.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Optional, Sequence

import torch

from ..tasks import MTLConfigError

#: rows whose norm is at most this fraction of the largest row norm count as zero ("absent").
ZERO_ROW_RTOL = 1e-10

_CPU = torch.device("cpu")


# --------------------------------------------------------------------------- argument checks
def check_choice(owner: str, key: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise MTLConfigError(
            f"aggregator {owner}: {key}={value!r}: expected one of {list(choices)!r}"
        )
    return value


def check_number(
    owner: str,
    key: str,
    value: Any,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    integer: bool = False,
) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = isinstance(value, int)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        kind = "an integer" if integer else "a finite number"
        lo = "" if low is None else (f" > {low}" if low_open else f" >= {low}")
        hi = "" if high is None else f" <= {high}"
        sep = " and" if lo and hi else ""
        raise MTLConfigError(f"aggregator {owner}: {key}={value!r}: expected {kind}{lo}{sep}{hi}")
    return value


def check_seed(owner: str, seed: Any) -> int:
    check_number(owner, "seed", seed, low=0, integer=True)
    return int(seed)


def check_vector(owner: str, key: str, value: Any, *, low: Optional[float] = None,
                 high: Optional[float] = None) -> Optional[torch.Tensor]:
    """``None`` or a 1-D sequence of finite numbers (returned as a float64 CPU tensor)."""
    if value is None:
        return None
    try:
        t = torch.as_tensor(value, dtype=torch.float64).detach().cpu().flatten()
    except (TypeError, ValueError, RuntimeError):
        raise MTLConfigError(
            f"aggregator {owner}: {key}={value!r}: expected a number or a list of numbers"
        ) from None
    bad = ~torch.isfinite(t)
    if low is not None:
        bad |= t < low
    if high is not None:
        bad |= t > high
    if t.numel() == 0 or bool(bad.any()):
        rng = "" if low is None and high is None else f" in [{low}, {high}]"
        raise MTLConfigError(
            f"aggregator {owner}: {key}={value!r}: expected finite number(s){rng}"
        )
    return t


def check_vector_length(owner: str, key: str, vec: torch.Tensor, n_tasks: int) -> None:
    if vec.numel() not in (1, n_tasks):
        raise ValueError(
            f"aggregator {owner}: {key} has {vec.numel()} entries but grads has {n_tasks} rows; "
            "expected one entry per task (or a single number)"
        )


# --------------------------------------------------------------------------- Gramian helpers
#: columns of ``G`` cast to float64 at a time by :func:`gramian64` and :func:`combine64`, per
#: device type (bounds their extra memory to ``T * chunk * 8`` bytes). On a CPU the float64
#: block then stays in the core's cache between the cast and the product: 64 Ki columns take
#: 7 ms for a ``3 x 2.78 M`` Gramian where 1 Mi columns take 28 ms (one thread; the float32
#: ``G @ G.T`` takes 4.3 ms). On a GPU fewer, larger chunks save kernel launches.
GRAMIAN_CHUNK = {"cpu": 1 << 16, "cuda": 1 << 20}


def chunk_columns(device: torch.device) -> int:
    """Columns per chunk of :func:`gramian64` and :func:`combine64` on ``device``."""
    return GRAMIAN_CHUNK.get(device.type, 1 << 20)


def work_buffer(rows: int, columns: int, device: torch.device,
                chunk: Optional[int] = None) -> torch.Tensor:
    """A float64 scratch buffer for :func:`gramian64` and :func:`combine64` on ``rows`` x
    ``columns`` task gradients: ``[rows + 1, min(columns, chunk)]`` (a cast block and one
    result chunk; ``chunk`` defaults to :data:`GRAMIAN_CHUNK` for the device). A caller that
    keeps one from step to step (the engine) makes no allocation per step. A fresh
    megabyte-sized block per chunk is, under glibc's default settings and depending on its
    adaptive mmap threshold, mapped and unmapped every time: a ``3 x 2.78 M`` Gramian on one
    CPU thread took 8 ms in one process and 29-36 ms in another that way, 7 ms with one
    buffer."""
    return torch.empty(rows + 1, max(1, min(columns, chunk or chunk_columns(device))),
                       dtype=torch.float64, device=device)


def _row_of(out: torch.Tensor, grads: torch.Tensor) -> Optional[int]:
    """The index r for which ``out`` is ``grads[r]`` (same memory, length and stride), or
    None."""
    if out.dim() != 1 or out.dtype != grads.dtype or out.shape[0] != grads.shape[1] \
            or out.stride(0) != grads.stride(1):
        return None
    step = grads.stride(0) * grads.element_size()
    offset = out.data_ptr() - grads.data_ptr()
    if step <= 0 or offset % step or not 0 <= offset // step < grads.shape[0]:
        return None
    return offset // step


def _checked_work(work: Optional[torch.Tensor], grads: torch.Tensor,
                  chunk: Optional[int]) -> tuple[torch.Tensor, int]:
    """``(work, columns per chunk)`` for a chunked pass over ``grads``: the caller's buffer
    (checked) or a fresh one, and ``chunk`` capped at the buffer's width."""
    t, p = grads.shape
    if work is None:
        work = work_buffer(t, p, grads.device, chunk)
    elif work.dtype != torch.float64 or work.dim() != 2 or work.shape[0] < t + 1 \
            or work.device != grads.device or work.stride(1) != 1:
        raise ValueError(
            f"work: expected a float64 [{t + 1}, chunk] buffer on {grads.device} with "
            f"contiguous rows (work_buffer), got {work.dtype} of shape {tuple(work.shape)} "
            f"on {work.device}")
    return work, min(chunk or work.shape[1], work.shape[1])


def gramian64(grads: torch.Tensor, chunk: Optional[int] = None,
              work: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``G G^T`` accumulated in float64 on ``grads``' device, for any dtype of ``grads``.

    The products of two float32 (or half) numbers are exact in float64, so only the float64
    summation rounds: on nearly collinear rows the Gramian keeps the small eigenvalues that a
    float32 ``G @ G.T`` (then cast) loses to cancellation (relative error ~1e-7 of the largest
    entry, i.e. of order 1 for an eigenvalue 1e-7 times smaller). Columns are cast in chunks of
    ``chunk`` (default :data:`GRAMIAN_CHUNK` for the device) into ``work``
    (:func:`work_buffer`; one is allocated when None), so the extra memory is ``T * chunk``
    float64 numbers, not a float64 copy of ``G``, and no allocation is made per chunk.
    """
    if grads.dtype == torch.float64:
        return grads @ grads.T
    t, p = grads.shape
    work, chunk = _checked_work(work, grads, chunk)
    out = torch.zeros(t, t, dtype=torch.float64, device=grads.device)
    block = work[:t, :chunk]
    block_t = block.T
    for part in torch.split(grads, chunk, dim=1):  # two dispatcher calls a chunk
        if part.shape[1] != block.shape[1]:  # the last, shorter chunk
            block = work[:t, :part.shape[1]]
            block_t = block.T
        block.copy_(part)
        out.addmm_(block, block_t)
    return out


#: kappa above which ``combine64`` accumulates ``w @ G`` in float64 (eps32 * 16 ~ 1e-6)
CANCELLATION_LIMIT = 16.0


def cancels64(weights: torch.Tensor, gramian: torch.Tensor) -> torch.Tensor:
    """Whether ``w @ G`` cancels beyond float32 (see :func:`combine64`): ``kappa = sum_t |w_t|
    |g_t| / |w @ G| > CANCELLATION_LIMIT``, from the Gramian (``|g_t|^2 = K_tt``, ``|w @ G|^2
    = w^T K w``), on the host in float64. Batched: ``weights`` ``[..., T]`` and ``gramian``
    ``[..., T, T]`` give a bool tensor ``[...]`` (GradVac's blocks in one go); one ``[T]``
    and one ``[T, T]`` are decided in Python floats (:func:`_cancels_one`)."""
    if gramian.dim() == 2:
        return torch.tensor(_cancels_one(weights, gramian))
    k = gramian.detach().to(device=_CPU, dtype=torch.float64)
    w = weights.detach().to(device=_CPU, dtype=torch.float64)
    spread = (w.abs() * k.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()).sum(-1)
    norm2 = (w.unsqueeze(-2) @ k @ w.unsqueeze(-1)).reshape(spread.shape)
    bound = CANCELLATION_LIMIT * norm2.clamp_min(0).sqrt()
    return ~((spread == 0) | ((norm2 > 0) & (spread <= bound)))


def _cancels_one(weights: torch.Tensor, gramian: torch.Tensor) -> bool:
    """:func:`cancels64`'s test for one ``[T]`` weight vector and one ``[T, T]`` Gramian, in
    Python floats (float64): two host copies instead of ~20 tiny tensor ops, which cost
    5-45 us each right after the backward passes on a CPU (0.18 ms of a 50 ms mmseg
    iteration). A NaN anywhere gives True, as in the batched form."""
    k = gramian.detach().to(device=_CPU, dtype=torch.float64).tolist()
    w = weights.detach().to(device=_CPU, dtype=torch.float64).reshape(-1).tolist()
    spread = sum(abs(wi) * math.sqrt(max(k[i][i], 0.0)) for i, wi in enumerate(w))
    norm2 = sum(wi * kij * wj for wi, row in zip(w, k) for kij, wj in zip(row, w))
    bound = CANCELLATION_LIMIT * math.sqrt(max(norm2, 0.0))
    return not (spread == 0 or (norm2 > 0 and spread <= bound))


def combine64(weights: torch.Tensor, grads: torch.Tensor, gramian: Optional[torch.Tensor] = None,
              chunk: Optional[int] = None, out: Optional[torch.Tensor] = None,
              cancels: Optional[bool] = None, work: Optional[torch.Tensor] = None
              ) -> torch.Tensor:
    """``weights @ G`` in ``G``'s dtype and device, accumulated in float64 where it cancels.

    The weights of nearly collinear rows can be large with opposite signs (Aligned-MTL's
    whitening, UPGrad's projections): a float32 ``w @ G`` then cancels and keeps only ~1e-5 of
    the (small) result. The cancellation factor ``kappa = sum_t |w_t| |g_t| / |w @ G|`` comes
    from the Gramian (``|g_t|^2 = K_tt``, ``|w @ G|^2 = w^T K w``) at no cost; the float32
    product's relative error is about ``eps32 * kappa``, so it is used when ``kappa <=``
    :data:`CANCELLATION_LIMIT` (relative error below ~1e-6: the common case, a plain GEMV) and
    the chunked float64 product otherwise (or when no Gramian is given).

    ``out``: a ``[P]`` tensor of ``G``'s dtype to write the result into (returned). It may be
    a row of ``grads`` itself (the engine passes ``G[0]``, so that the direction takes no
    memory beyond ``G``, and no fresh ``P``-sized tensor: on a CPU that costs page faults on
    every step, 3.5x the product itself for the 18 M shared parameters of a Mask R-CNN
    R50-FPN). Into G's first row, the float32 product is BLAS's in-place GEMV
    ``y <- w_0 y + G[1:]^T w[1:]``; otherwise (another row, or float64 accumulation) it is
    formed chunk by chunk, each chunk of the result computed before it overwrites that chunk.
    An ``out`` that shares memory with ``grads`` without being one of its rows is refused.

    ``cancels``: whether the weights may cancel; None (the default) decides from the Gramian
    as above (float64 without one); False for weights that cannot (Mean, Sum: equal, positive).

    ``work``: the scratch buffer of the chunked product (:func:`work_buffer`; allocated when
    None and needed): each chunk's result goes there before it is copied into ``out``.
    """
    t, p = grads.shape
    if out is None:
        out = torch.empty(p, dtype=grads.dtype, device=grads.device)
    if grads.dtype == torch.float64 or cancels is not None:
        fast = grads.dtype == torch.float64 or not cancels
    elif gramian is not None:
        fast = not bool(cancels64(weights, gramian))
    else:
        fast = False
    w = weights.to(device=grads.device, dtype=grads.dtype if fast else torch.float64)
    aliased = out.untyped_storage().data_ptr() == grads.untyped_storage().data_ptr()
    if fast and not aliased:
        return torch.mv(grads.t(), w, out=out)
    row = _row_of(out, grads) if aliased else None
    if aliased and row is None:
        raise ValueError(
            f"out: shares memory with grads (shape {tuple(grads.shape)}) but is not one of its "
            "rows; expected a separate [P] tensor or a row of grads (G[r])")
    if fast and row == 0 and grads.stride(1) == 1:
        # out is G's first row (the engine's case): y <- w_0 y + G[1:]^T w[1:], BLAS's own
        # in-place GEMV (beta = w_0), one pass over G with nothing else written. beta must be
        # a number: taken so only when w_0 is on the host (no device sync) and non-zero
        # (BLAS ignores y when beta is 0, which would hide a NaN in it); else y *= w_0 first.
        w0 = float(weights.reshape(-1)[0]) if weights.device.type == "cpu" else None
        beta = w0
        if t == 1 or not w0:
            out.mul_(w[0])
            beta = 1.0
        if t > 1:
            out.addmv_(grads[1:].t(), w[1:], beta=beta)
        return out
    if fast and work is None:  # the result chunks only: G's dtype, no float64 block
        chunk = min(p, chunk or chunk_columns(grads.device))
        result = torch.empty(chunk, dtype=grads.dtype, device=grads.device)
    else:
        work, chunk = _checked_work(work, grads, chunk)
        # fast: a G-dtype view of work's last row; float64: that row itself
        result = work[t].view(torch.uint8).view(grads.dtype) if fast else work[t]
    for start in range(0, p, chunk):
        part = grads[:, start:start + chunk]
        n = part.shape[1]
        if not fast:
            part = work[:t, :n].copy_(part)
        torch.mv(part.t(), w, out=result[:n])
        out[start:start + n].copy_(result[:n])
    return out


def solver_gramian(gramian: torch.Tensor, owner: str) -> torch.Tensor:
    """Detached float64 CPU copy of ``gramian``, symmetrised, checked for finiteness."""
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(
            f"aggregator {owner}: expected a square [T, T] Gramian, got shape {tuple(gramian.shape)}"
        )
    # decided and symmetrised in Python floats (the same IEEE operations as 0.5 * (k + k.T)):
    # a host copy and one tensor made, not the five tiny ops that cost microseconds each
    k = gramian.detach().to(device=_CPU, dtype=torch.float64).tolist()
    if not all(math.isfinite(x) for row in k for x in row):
        raise FloatingPointError(
            f"aggregator {owner}: the task gradients contain NaN or Inf (their Gramian is not "
            "finite); expected finite gradients. Check the losses and the learning rate."
        )
    symmetric = [[0.5 * (a + b) for a, b in zip(row, col)] for row, col in zip(k, zip(*k))]
    return torch.tensor(symmetric, dtype=torch.float64).reshape(len(k), len(k))


def active_rows(k: torch.Tensor, rtol: float = ZERO_ROW_RTOL) -> torch.Tensor:
    """Boolean ``[T]``: rows that are not (numerically) zero.

    A row whose squared norm is at most ``rtol**2`` times the largest squared row norm counts
    as zero. Every aggregator treats a zero row as a task absent from the step.
    """
    d = k.diagonal().clamp_min(0)
    top = float(d.max()) if d.numel() else 0.0
    if top <= 0.0:
        return torch.zeros_like(d, dtype=torch.bool)
    return d > top * rtol * rtol


def scatter_weights(w_active: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put the weights of the active rows back into a ``[T]`` vector (zeros elsewhere)."""
    out = torch.zeros(mask.shape[0], dtype=w_active.dtype)
    out[mask] = w_active
    return out


def to_like(w: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return w.to(device=ref.device, dtype=ref.dtype)


def reduce_factor(reduction: str, n_tasks: int) -> float:
    return 1.0 / n_tasks if reduction == "mean" else 1.0


# --------------------------------------------------------------------------- RNG state
class SeededRNG:
    """A lazily created ``torch.Generator`` whose state survives ``state_dict`` round trips.

    The generator lives on the device where random numbers are needed (CPU for the Gramian
    based methods, the gradients' device for GradDrop). Its state is saved as a uint8 tensor
    together with the device type; a state saved on another device type cannot be restored
    (the generator kinds differ), in which case the generator is re-seeded with a warning.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._gen: Optional[torch.Generator] = None
        self._pending: Optional[Dict[str, Any]] = None

    def get(self, device: torch.device = _CPU) -> torch.Generator:
        device = torch.device(device)
        if self._gen is None or self._gen.device.type != device.type or (
            device.index is not None and self._gen.device.index not in (None, device.index)
        ):
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            pending, self._pending = self._pending, None
            if pending is not None:
                if pending["device_type"] == device.type:
                    gen.set_state(pending["state"].to(device=_CPU, dtype=torch.uint8))
                else:
                    warnings.warn(
                        f"RNG state saved on device type {pending['device_type']!r} cannot be "
                        f"restored on {device.type!r}; re-seeding with seed={self.seed}",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            self._gen = gen
        return self._gen

    def state(self) -> Dict[str, Any]:
        if self._gen is not None:
            return {"device_type": self._gen.device.type, "state": self._gen.get_state().clone()}
        if self._pending is not None:
            return dict(self._pending)
        gen = torch.Generator()
        gen.manual_seed(self.seed)
        return {"device_type": "cpu", "state": gen.get_state()}

    def load(self, state: Dict[str, Any]) -> None:
        state = {"device_type": str(state["device_type"]), "state": state["state"].clone()}
        if self._gen is not None and self._gen.device.type == state["device_type"]:
            self._gen.set_state(state["state"].to(device=_CPU, dtype=torch.uint8))
            self._pending = None
        else:
            self._gen = None
            self._pending = state
