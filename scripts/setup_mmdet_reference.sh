#!/usr/bin/env bash
# Installs mmdetection's own Mask R-CNN R50-FPN into .venv as the reference that
# tests/build_tools/test_mmdet_reference.py measures our model against (see build_tools/mmdet_reference.py).
#
# Full mmcv (compiled ops) does not build for our torch, so: mmdet 3.3.0, mmengine 0.10.7 and
# mmcv-lite 2.1.0 installed without their declared dependencies (mmengine and mmcv-lite ask for
# opencv-python, which would shadow our opencv-python-headless), the packages their imports need,
# and mmcv's two CPU kernels the Mask R-CNN test path calls (nms, roi_align) compiled from the C++
# sources the mmcv-lite wheel ships, into .cache/mmcv_ops/ (git-ignored).
# Re-running is cheap: pip skips what is installed and the compile reuses its objects.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  echo "no .venv here: run scripts/setup.sh first" >&2
  exit 1
fi
start=$SECONDS

echo "[1/3] import-time dependencies of mmengine/mmdet: addict yapf termcolor rich shapely matplotlib terminaltables six"
"$PY" -m pip install -q addict yapf termcolor rich shapely matplotlib terminaltables six

echo "[2/3] mmcv-lite 2.1.0, mmengine 0.10.7, mmdet 3.3.0 (--no-deps)"
"$PY" -m pip install -q --no-deps mmcv-lite==2.1.0 mmengine==0.10.7 mmdet==3.3.0

echo "[3/3] compiling mmcv's CPU nms and roi_align (about a minute of CPU the first time)"
MAX_JOBS=${MAX_JOBS:-2} nice -n 10 "$PY" build_tools/mmdet_reference.py build-ops

echo "mmdet reference ready in $((SECONDS - start)) s; run: $PY -m pytest tests/build_tools/test_mmdet_reference.py"
