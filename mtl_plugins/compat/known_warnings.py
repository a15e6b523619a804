"""Filters for warnings the pinned stack emits on every run and that users cannot act on.

Each entry names its source; nothing else is silenced. Applied by
:func:`silence_known_warnings`, which the framework adapters call on import (and the test
suite in ``tests/conftest.py``).
"""
from __future__ import annotations

import warnings

KNOWN_WARNINGS = (
    # detectron2 0.6 decorates a few helpers with torch.jit.script (deprecated in torch 2.14)
    (FutureWarning, r"`torch\.jit\.script` is deprecated"),
    # detectron2's model_zoo imports pkg_resources (kept by the setuptools<81 pin)
    (UserWarning, r"pkg_resources is deprecated as an API"),
    (DeprecationWarning, r"pkg_resources is deprecated as an API"),
    # detectron2 0.6 reads Image.LINEAR at import time (kept by the pillow<10 pin)
    (DeprecationWarning, r"LINEAR is deprecated and will be removed in Pillow 10"),
)


def silence_known_warnings() -> None:
    """Ignore exactly the warnings of :data:`KNOWN_WARNINGS` (idempotent)."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
