"""The exact Gramian ``G G^T`` of float32 rows on a CPU: a small C kernel, built at first use.

:func:`~._utils.gramian64` casts ``G`` to float64 chunk by chunk and multiplies the chunks with
BLAS. The product of two float32 numbers is exact in float64, so the Gramian only needs
float64 *sums*; BLAS's ``DGEMM`` on ``[T, c] x [c, T]`` blocks does far more work than that:
MKL runs it at ~10 GFLOP/s on this project's AMD EPYC CPU (6 ms for ``3 x 2.78 M`` on one
thread, three to four reads' worth of ``G``). ``gramian.c`` (next to this file) reads each
column of ``G`` once, converts it in registers and keeps the ``T (T + 1) / 2`` float64 sums of
a 3-row tile in vector registers: 1.0 ms for ``3 x 2.78 M`` on one thread (AVX-512; 1.7 ms
AVX2), 0.6 ms on two, against 6.3 ms for BLAS and 1.3 ms for the ``torch.compile`` kernel of
:mod:`.fused_gramian` (``tools/bench_gramian.py``).

The rows may also be given as segments, one tensor per (row, segment) (:class:`SegmentedRows`:
the engine's per-task gradients as autograd made them, one tensor per parameter), for the
Gramian and for the weighted sum ``w @ G`` written into one row's tensors
(:meth:`SegmentedRows.combine`), so that no ``[T, P]`` matrix has to be filled.

Exactness is :func:`~._utils.gramian64`'s (exact products, float64 sums; the two agree to
~1e-14 of the largest entry). The summation order is fixed by the source alone (16 running
sums per pair over items of 65536 columns, summed in order; ``gramian.c``; built without
fast-math), so the result is bitwise identical for any thread count and any vector width:
DDP ranks agree whatever their CPU or ``torch.get_num_threads()`` (given the same
``torch.set_flush_denormal`` setting, which decides whether denormal inputs count as 0).
The cache is meant to be per user (a shared, writable one would let others plant a
library under the name this module loads).

The library is compiled once per machine with the C compiler ``$CC`` (default ``cc``) into
``$MTL_CACHE_DIR`` (default ``$XDG_CACHE_HOME/mtl_plugins``, ``~/.cache/mtl_plugins``) under
a name that hashes the source, the flags and the compiler's version (~0.3 s; concurrent
processes each write a temporary file and rename it, so DDP ranks need no lock). The vector
width follows ``torch.backends.cpu.get_cpu_capability()`` (AVX-512, AVX2, else the baseline
of the architecture). Without a working compiler the kernel is unavailable and
:func:`unavailable` says why: ``gramian_kernel="auto"`` (the default) then uses BLAS, and
``gramian_kernel="c"`` is refused.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import operator
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

SOURCE = Path(__file__).with_name("gramian.c")

#: ``torch.backends.cpu.get_cpu_capability()`` -> (doubles per vector register, compiler flags)
_ISA = {"AVX512": (8, ("-mavx512f", "-mfma")), "AVX2": (4, ("-mavx2", "-mfma"))}


def cache_dir() -> Path:
    """Where the compiled library is kept (the same folder as ``tools/install.sh``'s cache)."""
    root = os.environ.get("MTL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mtl_plugins")
    return Path(root) / "kernels"


def _compiler() -> Tuple[List[str], str]:
    """``(compiler command, its version line)``; ``$CC`` may have words (``ccache gcc``).
    Raises ``OSError`` when there is no compiler."""
    cc = shlex.split(os.environ.get("CC") or "cc")
    if not cc or shutil.which(cc[0]) is None:
        raise OSError(f"no C compiler: {os.environ.get('CC') or 'cc'!r} is not on PATH "
                      "(set $CC to one)")
    run = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60)
    lines = (run.stdout or run.stderr).strip().splitlines()
    return cc, lines[0] if lines else ""


def _flags(baseline: bool = False) -> Tuple[str, ...]:
    """Compiler flags: vectors as wide as the CPU's (or the architecture's ``baseline``), and
    IEEE float64 arithmetic as written (no fast-math reassociation of the sums; SSE2, not
    x87's 80-bit registers, on 32-bit x86), which the fixed summation order relies on."""
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")()
    width, isa = (2, ()) if baseline else _ISA.get(capability, (2, ()))
    x87 = ("-msse2", "-mfpmath=sse") if platform.machine() in ("i386", "i686") else ()
    return ("-O3", "-std=gnu11", "-fno-fast-math", "-fPIC", "-shared", "-pthread",
            f"-DVW={width}", *isa, *x87)


def _build(baseline: bool = False, again: bool = False) -> Path:
    """The compiled library's path, compiling it when the cache lacks it or ``again``
    (``baseline``: with the architecture's baseline vectors, for the tests of the summation
    order)."""
    cc, version = _compiler()
    flags = _flags(baseline)
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    target = cache_dir() / f"gramian-{key}.so"
    if target.exists() and not again:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix="gramian-", dir=target.parent)
    os.close(fd)
    try:
        run = subprocess.run([*cc, *flags, str(SOURCE), "-o", tmp], capture_output=True,
                             text=True, timeout=300)
        if run.returncode != 0:
            raise OSError(f"{' '.join(cc)} failed on {SOURCE.name}: {run.stderr.strip()[:500]}")
        os.chmod(tmp, 0o755)  # mkstemp made it 0600
        os.replace(tmp, target)  # atomic: a concurrent rank's rename gives the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.lru_cache(maxsize=None)
def _library() -> Tuple[Optional[ctypes.CDLL], str]:
    """``(library, "")``, or ``(None, why it is unavailable)``; once per process. A cached
    file that does not load (truncated by a crash, say) is built again once."""
    try:
        try:
            lib = ctypes.CDLL(str(_build()))
        except OSError:
            lib = ctypes.CDLL(str(_build(again=True)))
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"{type(err).__name__}: {err}"
    return _bind(lib), ""


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` with its functions' C signatures declared (their int64 arguments would
    otherwise be passed as C ints)."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    signatures = {"mtl_gramians": [ptr, i64, i64, ptr, i64, i64, ptr],
                  "mtl_gramian_rows": [ptr, i64, ptr, i64, i64, i64, ptr],
                  "mtl_combine_rows": [ptr, i64, ptr, i64, ptr, i64, ptr, i64]}
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = argtypes
    lib.mtl_sums.restype = None
    lib.mtl_sums.argtypes = [ptr, ptr, i64, ptr]
    return lib


def unavailable() -> str:
    """Why the C kernel cannot be used on this machine ("" when it can); builds it once."""
    return _library()[1]


def supports(grads: torch.Tensor) -> bool:
    """Whether the kernel takes ``grads``: a ``[T, P]`` float32 matrix on a CPU with contiguous
    columns (any row stride), T >= 1."""
    return (grads.device.type == "cpu" and grads.dtype == torch.float32 and grads.dim() == 2
            and grads.shape[0] >= 1 and (grads.stride(1) == 1 or grads.shape[1] <= 1))


def c_block_gramians64(grads: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """``[B, T, T]`` float64: the Gramian of each block of consecutive columns of ``grads``
    (``sizes``: the blocks' widths, summing to ``P``), on up to ``torch.get_num_threads()``
    threads (at least 4 items of 65536 columns each: starting a thread costs about one).
    ``grads`` as :func:`supports` says; raises ``ValueError`` otherwise and ``RuntimeError``
    when the kernel is unavailable (:func:`unavailable`)."""
    if not supports(grads):
        raise ValueError(f"grads: expected a [T >= 1, P] float32 CPU matrix with contiguous "
                         f"columns, got {grads.dtype} {tuple(grads.shape)} on {grads.device} "
                         f"with strides {grads.stride()}")
    sizes = [operator.index(s) for s in sizes]  # no float widths, truncated
    ends = list(itertools.accumulate(sizes))
    if len(sizes) == 0 or ends[-1] != grads.shape[1] or min(sizes) < 0:
        raise ValueError(f"sizes: expected non-negative widths summing to {grads.shape[1]}, "
                         f"got {list(sizes)}")
    lib, reason = _library()
    if lib is None:
        raise RuntimeError(f"the C Gramian kernel is unavailable: {reason}")
    # offsets formed in Python: one tensor op (each costs microseconds in a training step)
    return _gramians(lib, grads, torch.tensor([0, *ends], dtype=torch.int64))


def _gramians(lib: ctypes.CDLL, grads: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``mtl_gramians`` of ``lib`` (:func:`_bind`) on checked ``grads`` and int64 column
    ``offsets`` (``[B + 1]``, from 0 to P)."""
    t = grads.shape[0]
    out = torch.empty(offsets.numel() - 1, t, t, dtype=torch.float64)
    status = lib.mtl_gramians(grads.data_ptr(), t, grads.stride(0), offsets.data_ptr(),
                              offsets.numel() - 1, torch.get_num_threads(), out.data_ptr())
    if status != 0:
        raise MemoryError("the C Gramian kernel could not allocate its work space")
    return out


def c_gramian64(grads: torch.Tensor) -> torch.Tensor:
    """``G G^T`` (``[T, T]`` float64) of a ``[T, P]`` float32 CPU matrix (see the module doc)."""
    return c_block_gramians64(grads, [grads.shape[1]])[0]


def plain_float32(t: torch.Tensor) -> bool:
    """Whether the kernel can read ``t`` by address: a dense contiguous float32 CPU tensor."""
    return (t.dtype is torch.float32 and t.is_cpu and t.layout is torch.strided
            and t.is_contiguous())


def sums64(tensors: Sequence[torch.Tensor]) -> Optional[List[float]]:
    """Each tensor's sum in float64, as Python floats, in one call of the kernel; None when
    the kernel is unavailable or a tensor is not a contiguous float32 CPU tensor (the caller
    then sums with torch). Finite float32 entries cannot overflow a float64 sum, so a sum is
    finite iff its tensor is: the engine's NaN/inf check of the head gradients (~18 tensors
    of an mmseg model: one call instead of a sum op per tensor, a stack and a copy)."""
    lib = _library()[0]
    if lib is None or not all(map(plain_float32, tensors)):
        return None
    count = len(tensors)
    out = (ctypes.c_double * count)()
    lib.mtl_sums((ctypes.c_void_p * count)(*[t.data_ptr() for t in tensors]),
                 (ctypes.c_int64 * count)(*[t.numel() for t in tensors]), count, out)
    return list(out)


def _check_segments(segments: Sequence[Sequence[Optional[torch.Tensor]]],
                    sizes: Sequence[int]) -> None:
    """Raise ``ValueError`` naming the first tensor of ``segments[s][r]`` (row r's segment s)
    that is not a contiguous float32 CPU tensor of ``sizes[s]`` elements (or None)."""
    for s, (segment, size) in enumerate(zip(segments, sizes)):
        for r, part in enumerate(segment):
            if part is not None and not (plain_float32(part) and part.numel() == size):
                raise ValueError(
                    f"rows[{r}][{s}]: expected a contiguous float32 CPU tensor of {size} "
                    f"elements or None, got {part.dtype} {part.layout} of {part.numel()} "
                    f"elements on {part.device} with strides "
                    f"{part.stride() if part.layout is torch.strided else None}")


class SegmentedRows:
    """T float32 rows given as segments, for the C kernel without a ``[T, P]`` matrix.

    ``rows[r][s]`` is row ``r``'s segment ``s``: a contiguous float32 CPU tensor of
    ``sizes[s]`` elements (any shape), or None for zeros. The engine's per-task gradients
    are such rows: task ``r``'s gradient of shared parameter ``s``, as autograd allocated it.
    The tensors are checked (``checked``) and their addresses taken once, here; the object
    holds them, so they stay alive while it is used (resizing one in place would move it).
    ``checked=False`` skips the per-tensor checks (0.08 ms per step for the 198 tensors of
    the 3-task mmseg model, 0.12 against 0.05 ms for the whole constructor) for a caller
    that guarantees them: the engine, whose shared parameters are contiguous float32 CPU
    tensors and which copies any gradient that is not dense and contiguous
    (``backward._own_row``). A tensor that breaks them would be read out of bounds.

    Raises ``ValueError`` for rows or tensors that do not fit and ``RuntimeError`` when the
    kernel is unavailable (:func:`unavailable`).
    """

    def __init__(self, rows: Sequence[Sequence[Optional[torch.Tensor]]],
                 sizes: Sequence[int], checked: bool = True) -> None:
        lib, reason = _library()
        if lib is None:
            raise RuntimeError(f"the C Gramian kernel is unavailable: {reason}")
        self._lib = lib
        self.t, self.nseg = len(rows), len(sizes)
        if self.t < 1 or self.nseg < 1 or any(len(row) != self.nseg for row in rows):
            raise ValueError(f"rows: expected T >= 1 rows of {self.nseg} segments each (one per "
                             f"size), got {[len(row) for row in rows]}")
        segments = list(zip(*rows))  # [segment][row]: the C table's order
        if checked:
            _check_segments(segments, sizes)
        pointers = [None if part is None else part.data_ptr()
                    for segment in segments for part in segment]
        self._rows = (ctypes.c_void_p * len(pointers))(*pointers)
        self._offsets = (ctypes.c_int64 * (self.nseg + 1))(0, *itertools.accumulate(sizes))
        self._held = [list(row) for row in rows]  # what the addresses point into
        self.sizes = list(sizes)

    def gramian(self, per_segment: bool = False) -> torch.Tensor:
        """``G G^T`` (``[T, T]`` float64) over all segments, each segment's items summed in
        order (``gramian.c``), or with ``per_segment`` one Gramian per segment (``[S, T, T]``,
        each bitwise :func:`c_block_gramians64`'s for that block: GradVac's per-layer
        Gramians); exact products, float64 sums, as :func:`c_gramian64`."""
        out = torch.empty(*((self.nseg,) if per_segment else ()), self.t, self.t,
                          dtype=torch.float64)
        status = self._lib.mtl_gramian_rows(self._rows, self.t, self._offsets, self.nseg,
                                            torch.get_num_threads(), int(per_segment),
                                            out.data_ptr())
        if status != 0:
            raise MemoryError("the C Gramian kernel could not allocate its work space")
        return out

    def combine(self, weights: torch.Tensor, out: Optional[Sequence[torch.Tensor]] = None
                ) -> List[torch.Tensor]:
        """``w @ G`` segment by segment: ``out[s] = sum_r w_r rows[r][s]``, accumulated in
        float64 and rounded once to float32; ``weights`` ``[T]`` for all segments or
        ``[S, T]``, one vector per segment (``out[s] = sum_r w[s, r] rows[r][s]``). ``out``
        defaults to row 0's tensors (written in place; a None segment of row 0 gets a fresh
        tensor), which is what the engine's ``.grad`` then are; otherwise it must not
        overlap the rows but as one of them. Returns the output tensors, one per segment."""
        w = weights.detach().to(device="cpu", dtype=torch.float64).contiguous()
        if tuple(w.shape) not in ((self.t,), (self.nseg, self.t)):
            raise ValueError(f"weights: expected [{self.t}] (one per row) or [{self.nseg}, "
                             f"{self.t}] (per segment), got {tuple(w.shape)}")
        if out is None:
            out = [part if part is not None else torch.empty(size, dtype=torch.float32)
                   for part, size in zip(self._held[0], self.sizes)]
        elif len(out) != self.nseg or any(not (plain_float32(o) and o.numel() == size)
                                          for o, size in zip(out, self.sizes)):
            raise ValueError(f"out: expected {self.nseg} contiguous float32 CPU tensors of "
                             f"the segments' sizes {self.sizes}")
        targets = (ctypes.c_void_p * self.nseg)(*[o.data_ptr() for o in out])
        status = self._lib.mtl_combine_rows(self._rows, self.t, self._offsets, self.nseg,
                                            w.data_ptr(), self.t if w.dim() == 2 else 0,
                                            targets, torch.get_num_threads())
        if status != 0:
            raise MemoryError("the C kernel could not allocate its work space")
        return list(out)
