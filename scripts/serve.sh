#!/usr/bin/env bash
# The main job: serve Mask R-CNN on the embedded ONNX Runtime (CPU, fp32) engine.
#
# Uses ENGINE (default artifacts/ort-fp32); builds it first when missing, from CHECKPOINT when
# given (a file or a published name such as mask_rcnn_r50_fpn_1x_coco), else from the demo model
# at .cache/demo/demo_mask_rcnn.pth when it exists, else with random weights (a smoke run: the
# server works but detects nothing meaningful). Extra arguments go to maskrcnn-serve.
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE=${ENGINE:-artifacts/ort-fp32}
DEMO=.cache/demo/demo_mask_rcnn.pth
if [ ! -f "$ENGINE/manifest.json" ]; then
  if [ -n "${CHECKPOINT:-}" ]; then source_args=(--checkpoint "$CHECKPOINT")
  elif [ -f "$DEMO" ]; then source_args=(--checkpoint "$DEMO")
  else
    echo "serve.sh: no CHECKPOINT and no demo model: building a random-init engine (detections are meaningless)" >&2
    source_args=(--random-init)
  fi
  .venv/bin/maskrcnn-build all "${source_args[@]}" --backend onnxruntime --precision fp32 --out "$ENGINE"
fi
exec .venv/bin/maskrcnn-serve --engine "$ENGINE" "$@"
