"""Safe globals so that mmengine 0.10 checkpoints load under torch >= 2.6's ``weights_only``.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True`` and refuses any class that
is not allow-listed. mmengine 0.10.7 saves its ``MessageHub`` state (``HistoryBuffer``
objects holding numpy arrays and scalars) into every checkpoint, so ``--resume`` fails with
"Unsupported global: mmengine.logging.history_buffer.HistoryBuffer". Rather than switching
the check off (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``), :func:`register_safe_globals`
allow-lists exactly the classes those checkpoints contain: mmengine's ``HistoryBuffer`` and
the numpy array/scalar/dtype reconstruction helpers. It is called when
``mtl_plugins.mmseg`` is imported, and is idempotent.

One more obstacle: a ``HistoryBuffer`` pickles its statistics-method table as
``getattr(HistoryBuffer, 'min')`` calls, and allow-listing the builtin ``getattr`` would
re-open arbitrary attribute access. :func:`register_safe_globals` therefore also gives
``HistoryBuffer`` a ``__reduce__`` that pickles only its constructor arguments (log history,
count history, max length; the method table is class-level and rebuilt by ``__init__``).
Checkpoints written after the plugin is imported load with ``weights_only=True``;
checkpoints written by mmengine without it still need ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``.
"""
from __future__ import annotations

from typing import Any, List

import numpy as np
import torch


def _numpy_globals() -> List[Any]:
    core = getattr(np, "_core", None) or np.core
    found: List[Any] = [np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar]
    # each dtype has its own class (numpy.dtype[float64], ...; np.dtypes.Float64DType in
    # numpy >= 1.25) that the unpickler must be allowed to build
    found += [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"]
    return found


def safe_globals() -> List[Any]:
    """The classes and functions allow-listed for ``torch.load(weights_only=True)``."""
    allowed = _numpy_globals()
    try:
        from mmengine.logging.history_buffer import HistoryBuffer
    except ImportError:  # mmengine absent: only the numpy part applies
        pass
    else:
        allowed.append(HistoryBuffer)
    return allowed


def _reduce_history_buffer(self: Any) -> tuple:
    return (type(self), (self._log_history, self._count_history, self.max_length))


def register_safe_globals() -> None:
    """Allow-list :func:`safe_globals` and make ``HistoryBuffer`` pickle by its constructor."""
    try:
        from mmengine.logging.history_buffer import HistoryBuffer
    except ImportError:
        pass
    else:
        HistoryBuffer.__reduce__ = _reduce_history_buffer  # type: ignore[method-assign]
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:
        add(safe_globals())
