#!/usr/bin/env bash
# The detectron2 + MMSegmentation stack for a GPU machine without network, as one folder.
#
#   tools/gpu_stack.sh [DIR]          (default: .gpu_stack in the repository root; needs PyPI)
#
# The GPU machine lent through the `device` tool has python3 3.12 with torch 2.11 (CUDA 13),
# torchvision, numpy 2, Pillow >= 10, OpenCV, SciPy, pytest, but no mmengine, mmcv,
# mmsegmentation or detectron2, and cannot reach PyPI. This script, run where PyPI is
# reachable, fills DIR with what the framework parts of tools/gpu_check.sh need, for the
# target Python ($GPU_STACK_PYTHON, default 3.12):
#   - the pure-Python packages (mmengine, mmsegmentation, fvcore, iopath, hydra-core, ...),
#     pycocotools' manylinux wheel and the benchmark's anchors LibMTL 1.1.5 and TorchJD
#     0.18.0, installed with `pip install --target` (no dependencies: the machine has them);
#   - detectron2 0.6's Python package from the pb1-detectron2 source release (setup.py
#     patched by tools/install_detectron2.py, as `make setup` does); `import detectron2._C`
#     then resolves to mtl_plugins.compat.detectron2_c's placeholder;
#   - mmcv 2.1.0's Python files from the wheel in ../shared/wheels without its compiled ops
#     (built for another Python and torch): mmcv/_ext.py is a placeholder that raises on any
#     op, named. mmsegmentation imports mmcv.ops at import time; the models of the check
#     (ResNetV1c, mmseg's FCN head, the depth/normal/PAD-Net heads) call none of its ops;
#   - sitecustomize.py: processes DIR's .pth files and gives detectron2 0.6 the numpy and
#     Pillow names it uses and newer releases removed (np.float, np.int, np.str,
#     PIL.Image.LINEAR), aliases of the builtins and of Image.BILINEAR.
# On the GPU machine:  PYTHONPATH=DIR PYTHON=python3 bash tools/gpu_check.sh
# (the device tool: carry DIR). Nothing outside DIR is written there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$(realpath -m "${1:-$ROOT/.gpu_stack}")"
cd "$ROOT"  # (DIR is resolved against the caller's directory first)
PYV="${GPU_STACK_PYTHON:-3.12}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
SHARED_WHEELS="${MTL_SHARED_WHEELS:-$ROOT/../shared/wheels}"
MMCV_WHEEL="$(ls "$SHARED_WHEELS"/mmcv-2.1.0-*.whl 2>/dev/null | head -n1 || true)"
D2_SDIST="$SHARED_WHEELS/pb1-detectron2-0.6.tar.gz"
[ -n "$MMCV_WHEEL" ] || { echo "gpu_stack: no mmcv-2.1.0 wheel in $SHARED_WHEELS" >&2; exit 1; }
[ -f "$D2_SDIST" ] || { echo "gpu_stack: $D2_SDIST is missing" >&2; exit 1; }

# pure-Python packages the GPU machine lacks (versions as in `make setup`'s environment)
# (setuptools < 81 for the pkg_resources that detectron2 0.6's model_zoo imports)
PURE=(mmengine==0.10.7 mmsegmentation==1.2.2 addict==2.4.0 yapf==0.43.0 platformdirs
  termcolor prettytable wcwidth ftfy iopath==0.1.9 yacs==0.1.8 omegaconf==2.3.1
  hydra-core==1.3.8 "setuptools>=77,<81")
# the benchmark's anchors (tools/benchmark_backward.py times them beside the engine)
PURE+=(libmtl==1.1.5 torchjd==0.18.0)
# source-only releases, built into wheels here (pure Python)
SDISTS=(fvcore==0.1.5.post20221221 antlr4-python3-runtime==4.9.3)

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
rm -rf "$DIR"
mkdir -p "$DIR" "$WORK/wheels"
PIP=("$PY" -m pip --disable-pip-version-check -q)
TARGET=(--target "$DIR" --no-deps --only-binary=:all: --python-version "$PYV"
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64)

echo "[gpu_stack] wheels of the source-only releases"
"${PIP[@]}" wheel --no-deps -w "$WORK/wheels" "${SDISTS[@]}"
echo "[gpu_stack] detectron2 0.6 Python package (wheel of the patched source release)"
"$PY" - "$D2_SDIST" "$WORK" <<'EOF'
import subprocess, sys
from pathlib import Path
sys.path.insert(0, "tools")
from install_detectron2 import prepare_source
work = Path(sys.argv[2])
(work / "d2").mkdir()
src = prepare_source(Path(sys.argv[1]), work / "d2")
subprocess.check_call([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                       "--no-build-isolation", "-w", str(work / "wheels"), str(src)])
EOF
echo "[gpu_stack] installing for Python $PYV into $DIR"
"${PIP[@]}" install "${TARGET[@]}" --find-links "$WORK/wheels" "${PURE[@]}" pycocotools \
  "${SDISTS[@]}" "pb1-detectron2==0.6"

echo "[gpu_stack] mmcv 2.1.0 Python files from $(basename "$MMCV_WHEEL"), ops left out"
"$PY" -m zipfile -e "$MMCV_WHEEL" "$DIR"
rm -f "$DIR"/mmcv/_ext*.so
cat > "$DIR/mmcv/_ext.py" <<'EOF'
"""Placeholder for mmcv's compiled ops (written by tools/gpu_stack.sh): this mmcv has its
Python files only. Every op raises, named; importing mmcv.ops works."""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        raise RuntimeError(
            f"mmcv op {name!r} is not available: this mmcv 2.1.0 was carried without its "
            "compiled ops (tools/gpu_stack.sh). Build mmcv with MMCV_WITH_OPS=1 for this torch."
        )

    return missing
EOF
# detectron2._C -> mtl_plugins' placeholder (the line tools/install_detectron2.py writes)
"$PY" -c "import sys; sys.path.insert(0, 'tools'); import install_detectron2 as m; \
open(sys.argv[1] + '/' + m.PTH_NAME, 'w').write(m.PTH_LINE)" "$DIR"
cat > "$DIR/sitecustomize.py" <<'EOF'
"""Start-up for the carried stack (tools/gpu_stack.sh): this folder's .pth files, and the
numpy/Pillow names detectron2 0.6 uses that numpy >= 1.24 and Pillow >= 10 removed."""
import os
import site
import sys

_here = os.path.dirname(os.path.abspath(__file__))
site.addsitedir(_here)
# this file shadows the interpreter's own sitecustomize, if it has one: run that too
for _entry in sys.path:
    _file = os.path.join(os.path.abspath(_entry or "."), "sitecustomize.py")
    if os.path.dirname(_file) != _here and os.path.isfile(_file):
        with open(_file) as _f:
            exec(compile(_f.read(), _file, "exec"),
                 {"__name__": "sitecustomize", "__file__": _file})
        break

import numpy as _np  # noqa: E402
from PIL import Image as _Image  # noqa: E402

for _name, _value in (("float", float), ("int", int), ("str", str)):
    if _name not in _np.__dict__:
        setattr(_np, _name, _value)
if not hasattr(_Image, "LINEAR"):
    _Image.LINEAR = _Image.BILINEAR
EOF
# what no import needs: scripts, test suites, bytecode, mmseg's model-zoo configs (the
# device tool carries at most 64 MiB with the working tree), detectron2's upstream tools/
# package (it would shadow this repository's tools/)
rm -rf "$DIR"/bin "$DIR"/tests "$DIR"/yapftests "$DIR"/mmseg/.mim/configs "$DIR"/mmcv/ops/csrc \
  "$DIR"/tools
find "$DIR" -name __pycache__ -type d -prune -exec rm -rf {} +
echo "[gpu_stack] done: $DIR ($(du -sh --apparent-size "$DIR" | cut -f1)); on the GPU machine:"
echo "  PYTHONPATH=\$PWD/$(basename "$DIR") PYTHON=python3 bash tools/gpu_check.sh"
