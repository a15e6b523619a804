#!/usr/bin/env bash
# Idempotent bootstrap of the pinned stack into a virtual environment.
#
#   tools/install.sh [VENV_DIR]       (default: .venv beside this repository's root)
#
# Steps: venv -> torch/torchvision -> pinned pure-Python stack -> mmcv (with compiled
# ops: ../shared/wheels, else the cache, else a build from the source release) ->
# mmsegmentation -> detectron2 (an existing full install, else the pb1-detectron2 0.6
# source release, Python package only) -> mtl_plugins in editable mode -> a smoke import.
# A stamp file records the inputs of the last successful run; when they are unchanged the
# script only verifies the imports (seconds).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${MTL_VENV:-$ROOT/.venv}}"
PY_BOOT="${PYTHON:-python3.11}"
command -v "$PY_BOOT" >/dev/null 2>&1 || PY_BOOT=python3
CONSTRAINTS="$ROOT/tools/constraints.txt"
SHARED_WHEELS="${MTL_SHARED_WHEELS:-$ROOT/../shared/wheels}"
CACHE="${MTL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mtl_plugins}"
TORCH_VERSION="$(sed -n 's/^torch==//p' "$CONSTRAINTS")"
STEP="start"

say() { printf '[install] %s\n' "$*"; }
fail() {
  local rc=$?
  printf '[install] FAILED at step "%s" (exit %s).\n' "$STEP" "$rc" >&2
  printf '[install] Fix the cause above, then re-run: make setup  (or tools/install.sh %s).\n' "$VENV" >&2
  printf '[install] To start over: rm -rf %s\n' "$VENV" >&2
  exit "$rc"
}
trap fail ERR

# This machine's global pip config names local file:// indexes that lack most projects;
# pip warns once per project about them. Drop those lines, keep every other message.
quiet_index_warnings() { { grep -v "^WARNING: Location 'file:" || true; } >&2; }
PIP() {
  "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" -c "$CONSTRAINTS" \
    2> >(quiet_index_warnings)
}

STAMP="$VENV/.mtl_plugins_stamp"
INPUTS="$(cat "$CONSTRAINTS" "$ROOT/setup.py" "$0" "$ROOT/tools/install_detectron2.py" \
  | sha256sum | cut -c1-16)"

STEP="virtual environment"
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV with $($PY_BOOT --version)"
  "$PY_BOOT" -m venv "$VENV"
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$INPUTS" ]; then
  say "environment $VENV is up to date; verifying imports"
  if "$VENV/bin/python" -m mtl_plugins.collect_env --check; then
    exit 0
  fi
  say "verification failed: repairing the environment"
fi

STEP="pip bootstrap"
# pip < 26 still downloads the pb1-detectron2 sdist (newer pip refuses its URL dependency).
PIP install "pip>=23,<26" wheel

STEP="torch $TORCH_VERSION + torchvision"
say "installing torch $TORCH_VERSION and torchvision"
PIP install "torch==$TORCH_VERSION" torchvision

STEP="pinned pure-Python stack"
say "installing numpy/pillow/setuptools pins, mmengine, fvcore, pycocotools, cityscapesscripts, test tools"
PIP install numpy pillow setuptools "matplotlib" mmengine fvcore iopath pycocotools \
  cityscapesscripts ftfy regex hydra-core omegaconf yacs tabulate termcolor cloudpickle \
  tqdm tensorboard future pydot scipy pytest pytest-timeout ninja

STEP="mmcv 2.1.0 with compiled ops"
if "$VENV/bin/python" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" 2>/dev/null; then
  say "mmcv 2.1.0 with ops already installed"
else
  PYTAG="cp$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
  WHEEL_CACHE="$CACHE/mmcv-2.1.0-torch$TORCH_VERSION-$PYTAG"
  mkdir -p "$WHEEL_CACHE"
  SHARED_WHL="$(ls "$SHARED_WHEELS"/mmcv-2.1.0-"$PYTAG"-*.whl 2>/dev/null | head -n1 || true)"
  CACHED_WHL="$(ls "$WHEEL_CACHE"/mmcv-2.1.0-*.whl 2>/dev/null | head -n1 || true)"
  if [ -n "$SHARED_WHL" ]; then
    say "using the prebuilt mmcv wheel $SHARED_WHL"
    PIP install --no-deps "$SHARED_WHL"
  elif [ -n "$CACHED_WHL" ]; then
    say "using the cached mmcv wheel $CACHED_WHL"
    PIP install --no-deps "$CACHED_WHL"
  else
    say "building mmcv 2.1.0 with ops from its source release (about 25-35 minutes on 2 cores)"
    # mmcv's setup.py forces -std=c++17; torch 2.14's headers need C++20.
    MMCV_WITH_OPS=1 MAX_JOBS="$(nproc)" CXX="$ROOT/tools/cxx_std20.sh" \
      "$VENV/bin/python" -m pip --disable-pip-version-check wheel --no-deps --no-build-isolation \
      --no-binary mmcv -w "$WHEEL_CACHE" "mmcv==2.1.0" -c "$CONSTRAINTS"
    PIP install --no-deps "$(ls "$WHEEL_CACHE"/mmcv-2.1.0-*.whl | head -n1)"
  fi
  # mmcv's own runtime requirements (it was installed with --no-deps)
  PIP install addict packaging pyyaml yapf opencv-python "mmengine"
fi

STEP="mmsegmentation"
say "installing mmsegmentation"
PIP install mmsegmentation

STEP="detectron2"
if "$VENV/bin/python" -c "import detectron2, detectron2._C" 2>/dev/null; then
  say "a full detectron2 (with _C) is already installed; keeping it"
elif "$VENV/bin/python" -c "import detectron2" 2>/dev/null; then
  say "detectron2 (Python package, no _C) already installed"
else
  say "installing detectron2 0.6 (Python package) from the pb1-detectron2 source release"
  SRC="$(ls "$SHARED_WHEELS"/pb1-detectron2-0.6.tar.gz 2>/dev/null || true)"
  DL="$CACHE/pb1-detectron2"
  mkdir -p "$DL"
  if [ -z "$SRC" ]; then
    SRC="$(ls "$DL"/pb1-detectron2-0.6.tar.gz 2>/dev/null || true)"
  fi
  if [ -z "$SRC" ]; then
    "$VENV/bin/python" -m pip --disable-pip-version-check -q download --no-deps --no-binary :all: \
      -d "$DL" "pb1-detectron2==0.6"
    SRC="$DL/pb1-detectron2-0.6.tar.gz"
  fi
  "$VENV/bin/python" "$ROOT/tools/install_detectron2.py" "$SRC" --python "$VENV/bin/python"
fi

STEP="mtl_plugins (editable)"
say "installing mtl_plugins in editable mode"
PIP install --no-deps --no-build-isolation -e "$ROOT"

STEP="verify"
"$VENV/bin/python" -m pip check >/dev/null || { "$VENV/bin/python" -m pip check; false; }
"$VENV/bin/python" -m mtl_plugins.collect_env --check
echo "$INPUTS" > "$STAMP"
say "done: $VENV"
