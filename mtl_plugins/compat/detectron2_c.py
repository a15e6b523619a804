"""A placeholder for ``detectron2._C`` when detectron2 was installed without its extension.

detectron2's ``layers`` package imports its compiled extension at module level
(``from detectron2 import _C`` in ``deform_conv.py``, ``rotated_boxes.py``,
``roi_align_rotated.py``), although the standard Mask R-CNN path never calls it: ROIAlign
and NMS come from torchvision. Where only the Python package is installed (the
``pb1-detectron2`` source release, see docs/install.md) this module stands in for the
extension, and every op raises a ``RuntimeError`` naming the op and how to get a full build (the build
queries of ``collect_env_info`` answer "none" instead).

:func:`register_finder` appends a finder to the *end* of ``sys.meta_path``: a compiled
``detectron2/_C*.so`` is found by the normal path finder first, so the placeholder is
used only when the real extension is missing.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any, NoReturn

MODULE_NAME = "detectron2._C"

# Ops of detectron2 0.6's extension and the feature each one backs.
OP_FEATURES = {
    "box_iou_rotated": "rotated boxes (pairwise_iou_rotated)",
    "nms_rotated": "rotated boxes (batched_nms_rotated)",
    "roi_align_rotated_forward": "ROIAlignRotated",
    "roi_align_rotated_backward": "ROIAlignRotated",
    "deform_conv_forward": "deformable convolution (DeformConv)",
    "deform_conv_backward_input": "deformable convolution (DeformConv)",
    "deform_conv_backward_filter": "deformable convolution (DeformConv)",
    "modulated_deform_conv_forward": "modulated deformable convolution",
    "modulated_deform_conv_backward": "modulated deformable convolution",
    "COCOevalEvaluateImages": "fast COCO evaluation (COCOEvaluator(use_fast_impl=True))",
    "COCOevalAccumulate": "fast COCO evaluation (COCOEvaluator(use_fast_impl=True))",
    "InstanceAnnotation": "fast COCO evaluation (COCOEvaluator(use_fast_impl=True))",
    "ImageEvaluation": "fast COCO evaluation (COCOEvaluator(use_fast_impl=True))",
}

# Build queries answer instead of raising: detectron2's collect_env_info (called by
# default_setup in every upstream tools/ script) asks them of any importable _C.
BUILD_INFO = {
    "get_compiler_version": "none (Python-only install; detectron2._C is a placeholder)",
    "get_cuda_version": "none",
    "has_cuda": False,
}

HOW_TO_FIX = (
    "detectron2 was installed without its compiled extension detectron2._C. "
    "Install a full build (pip install 'git+https://github.com/facebookresearch/detectron2.git' "
    "on a machine with a compiler and internet), or avoid this op. "
    "For COCOEvaluator pass use_fast_impl=False."
)


def _missing_op(name: str) -> NoReturn:
    feature = OP_FEATURES.get(name, "an op of the compiled extension")
    raise RuntimeError(f"detectron2._C.{name} ({feature}) is unavailable: {HOW_TO_FIX}")


class PlaceholderModule(types.ModuleType):
    """Module whose every public attribute is an op that raises when called."""

    is_placeholder = True

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name in BUILD_INFO:
            return lambda: BUILD_INFO[name]

        def op(*args: Any, **kwargs: Any) -> NoReturn:
            _missing_op(name)

        op.__name__ = name
        return op


class _PlaceholderLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = PlaceholderModule(spec.name, __doc__)
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class PlaceholderFinder(importlib.abc.MetaPathFinder):
    """Serves ``detectron2._C`` only after every other finder failed to find it."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname != MODULE_NAME:
            return None
        return importlib.machinery.ModuleSpec(fullname, _PlaceholderLoader())


def register_finder() -> None:
    """Append the placeholder finder to ``sys.meta_path`` once (idempotent)."""
    if not any(isinstance(f, PlaceholderFinder) for f in sys.meta_path):
        sys.meta_path.append(PlaceholderFinder())


def has_real_extension() -> bool:
    """True when ``detectron2._C`` is a compiled extension, not this placeholder."""
    try:
        ext = importlib.import_module(MODULE_NAME)
    except ImportError:
        return False
    return not getattr(ext, "is_placeholder", False)
