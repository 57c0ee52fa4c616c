#!/usr/bin/env bash
# The main job: serve Mask R-CNN on this machine's fastest fp32 engine.
#
# Uses ENGINE (default artifacts/auto-fp32); builds it first when missing with `--backend auto`,
# which compiles every available fp32 backend (ONNX Runtime, OpenVINO), times each here and keeps
# the fastest (the build's stderr says which, with the times), from CHECKPOINT when
# given (a file or a published name; `maskrcnn-build fetch --help` lists them), else from the
# official mask_rcnn_r50_fpn_1x_coco (downloaded once, sha256-checked). Where that cannot be
# downloaded (offline) it says so in one line and builds from the demo model at
# .cache/demo/demo_mask_rcnn.pth when it exists, else with random weights (a smoke run: the server
# works but detects nothing meaningful). With VERIFY_ANN (a COCO annotation file of labelled images,
# file_name relative to its folder) the build may choose bf16, or int8 when CALIB_IMAGES names a
# folder of calibration images, where that is faster here and keeps its AP on those images within
# its bound (default ENGINE then artifacts/auto). An OpenVINO engine learns static shape buckets
# for the padded sizes it serves most (MASKRCNN_OPENVINO_SHAPE_BUCKETS, default here auto: at most
# two, while memory allows; `none` turns it off). Extra arguments go to maskrcnn-serve.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${VERIFY_ANN:-}" ]; then
  ENGINE=${ENGINE:-artifacts/auto}
  precision_args=(--verify-ann "$VERIFY_ANN")
  if [ -n "${CALIB_IMAGES:-}" ]; then precision_args+=(--calib-images "$CALIB_IMAGES"); fi
else
  ENGINE=${ENGINE:-artifacts/auto-fp32}
  precision_args=(--precision fp32)
fi
OFFICIAL=mask_rcnn_r50_fpn_1x_coco
DEMO=.cache/demo/demo_mask_rcnn.pth
if [ ! -f "$ENGINE/manifest.json" ]; then
  if [ -n "${CHECKPOINT:-}" ]; then source_args=(--checkpoint "$CHECKPOINT")
  elif .venv/bin/maskrcnn-build fetch "$OFFICIAL" >/dev/null 2>&1; then source_args=(--checkpoint "$OFFICIAL")
  elif [ -f "$DEMO" ]; then
    echo "serve.sh: cannot download $OFFICIAL (offline?): building from the demo model $DEMO instead" >&2
    source_args=(--checkpoint "$DEMO")
  else
    echo "serve.sh: cannot download $OFFICIAL (offline?) and no demo model at $DEMO: building a random-init engine (detections are meaningless)" >&2
    source_args=(--random-init)
  fi
  .venv/bin/maskrcnn-build all "${source_args[@]}" --backend auto "${precision_args[@]}" --out "$ENGINE"
fi
export MASKRCNN_OPENVINO_SHAPE_BUCKETS=${MASKRCNN_OPENVINO_SHAPE_BUCKETS:-auto}
exec .venv/bin/maskrcnn-serve --engine "$ENGINE" "$@"
