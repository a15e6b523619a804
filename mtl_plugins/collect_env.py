"""Print the versions of the stack mtl_plugins runs on: ``python -m mtl_plugins.collect_env``.

With ``--check`` it exits non-zero when a required piece (torch, mmengine, mmcv with
compiled ops, mmsegmentation, detectron2) does not import.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Dict, List, Tuple


def _version(module: str, dist: str | None = None) -> str:
    mod = importlib.import_module(module)
    version = getattr(mod, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version(dist or module)
    return str(version)


def _mmcv_ops() -> str:
    import mmcv.ops  # noqa: F401  (imports the compiled extension)
    from mmcv.utils import ext_loader

    ext_loader.load_ext("_ext", ["nms"])
    return "compiled ops load"


def _d2_c() -> str:
    from mtl_plugins.compat.detectron2_c import has_real_extension

    return "compiled" if has_real_extension() else "placeholder (Python-only install)"


def _cuda() -> str:
    import torch

    if not torch.cuda.is_available():
        return f"not available (torch built with CUDA {torch.version.cuda})"
    return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"


CHECKS: List[Tuple[str, Callable[[], str], bool]] = [
    ("python", lambda: sys.version.split()[0], True),
    ("torch", lambda: _version("torch"), True),
    ("torchvision", lambda: _version("torchvision"), True),
    ("CUDA", _cuda, False),
    ("numpy", lambda: _version("numpy"), True),
    ("mmengine", lambda: _version("mmengine"), True),
    ("mmcv", lambda: _version("mmcv"), True),
    ("mmcv.ops", _mmcv_ops, True),
    ("mmsegmentation", lambda: _version("mmseg"), True),
    ("detectron2", lambda: _version("detectron2"), True),
    ("detectron2._C", _d2_c, True),
    ("pycocotools", lambda: _version("pycocotools"), True),
    ("mtl_plugins", lambda: _version("mtl_plugins"), True),
]


def collect() -> Dict[str, Tuple[str, bool]]:
    """Return ``{name: (text, ok)}`` for every entry of :data:`CHECKS`."""
    out: Dict[str, Tuple[str, bool]] = {}
    for name, probe, _required in CHECKS:
        try:
            out[name] = (probe(), True)
        except Exception as exc:  # report, never raise: this is a diagnostic tool
            out[name] = (f"MISSING: {type(exc).__name__}: {exc}", False)
    return out


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a required piece fails")
    args = parser.parse_args(argv)
    results = collect()
    width = max(len(k) for k in results)
    for name, (text, _ok) in results.items():
        print(f"{name:<{width}}  {text}")
    failed = [n for n, _p, req in CHECKS if req and not results[n][1]]
    if args.check and failed:
        print(f"required pieces failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
