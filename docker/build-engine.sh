#!/bin/sh
# The compose stack's one-shot builder: build the engine artifact ARTIFACTS/ENGINE_NAME unless
# it is there already, so `docker compose up` builds once and later ups start at once.
#
#   CHECKPOINT    a checkpoint file (mounted) or a published name (see README "Checkpoints");
#                 empty: random weights, a smoke run whose detections mean nothing
#   BUILD_ARGS    extra maskrcnn-build arguments, e.g. "--precision int8 --calib-images /data/calib"
set -eu
out="${ARTIFACTS:-/artifacts}/${ENGINE_NAME:-ort-fp32}"
if [ -f "$out/manifest.json" ]; then
    echo "build-engine: $out already holds an engine artifact; nothing to build"
    exit 0
fi
if ! python -c "import torch" >/dev/null 2>&1; then
    echo "build-engine: $out has no engine artifact and this image cannot build one (no torch):" \
         "run the builder image (docker/Dockerfile, target builder)" >&2
    exit 1
fi
if [ -n "${CHECKPOINT:-}" ]; then
    set -- --checkpoint "$CHECKPOINT"
else
    echo "build-engine: no CHECKPOINT given: building a random-init engine (detections are meaningless)" >&2
    set -- --random-init
fi
# BUILD_ARGS is split on spaces on purpose: it holds several arguments.
# shellcheck disable=SC2086
exec maskrcnn-build all "$@" --out "$out" ${BUILD_ARGS:-}
