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
    """``lib`` with ``mtl_gramians``' C signature declared (its int64 arguments would
    otherwise be passed as C ints)."""
    fn = lib.mtl_gramians
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
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
