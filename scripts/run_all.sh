#!/usr/bin/env bash
# One-click run: demo data -> demo model -> engines (default ONNX Runtime fp32 and int8) -> serve each and evaluate it
# through the endpoint against eager PyTorch's results -> engine perf -> one table.
#
# The model is CHECKPOINT (a file, a published name such as mask_rcnn_r50_fpn_1x_coco, or
# random-init for a smoke run), else the demo model at .cache/demo/demo_mask_rcnn.pth, trained
# first when missing (`maskrcnn-demo train`, resumed from its saved state; TRAIN_ARGS are passed on).
# Every step whose output exists is skipped, and an interrupted evaluation resumes, so rerunning
# after a failure redoes only what is missing. Servers are stopped on any exit.
#
# Knobs (environment): DATA (dataset folder, default .cache/demo/data, generated when missing),
# OUT (default .cache/run_all), LIMIT (first N val images, default all), CONCURRENCY (default 2),
# CALIB_COUNT (int8 calibration images, default 16), VERIFY_COUNT (build parity images, default 8),
# PERF_ITERATIONS (default 5), ENGINES (backend:precision list, default "onnxruntime:fp32
# onnxruntime:int8"; e.g. add openvino:bf16 openvino:int8, the fastest here). PRECISIONS="fp32 int8"
# is the older spelling of ENGINES for ONNX Runtime. Per engine, files are named by its tag
# <backend>-<precision>: engine-onnxruntime-fp32/, eval-onnxruntime-fp32.json, perf-onnxruntime-fp32.json.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA=${DATA:-.cache/demo/data}
OUT=${OUT:-.cache/run_all}
DEMO_CHECKPOINT=.cache/demo/demo_mask_rcnn.pth
if [ -z "${ENGINES:-}" ]; then
  ENGINES=""
  for p in ${PRECISIONS:-fp32 int8}; do ENGINES="$ENGINES onnxruntime:$p"; done
fi
# tag of backend:precision, used in every file name of that engine
tag_of() { echo "${1%%:*}-${1##*:}"; }
engine_of() { echo "$run/engine-$(tag_of "$1")"; }
limit_args=()
[ -n "${LIMIT:-}" ] && limit_args=(--limit "$LIMIT")

server_pid=""
stop_server() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid"
    wait "$server_pid" || true
  fi
  server_pid=""
}
trap stop_server EXIT
trap 'exit 130' INT TERM

step() { printf '\n=== %s\n' "$*"; }

# 1. demo data
if [ ! -f "$DATA/annotations/instances_val.json" ]; then
  step "demo data -> $DATA"
  "$BIN/maskrcnn-demo" data --out "$DATA"
fi
ann=$DATA/annotations/instances_val.json
data_args=(--ann "$ann" --images "$DATA/val" "${limit_args[@]}")

# 2. model
if [ -n "${CHECKPOINT:-}" ]; then
  checkpoint=$CHECKPOINT
elif [ -f "$DEMO_CHECKPOINT" ]; then
  checkpoint=$DEMO_CHECKPOINT
else
  step "training the demo model -> $DEMO_CHECKPOINT (CHECKPOINT=... skips this)"
  resume=()
  [ -f "${DEMO_CHECKPOINT%.pth}.state.pth" ] && resume=(--resume)
  # shellcheck disable=SC2086  # TRAIN_ARGS is a list of options
  "$BIN/maskrcnn-demo" train --data "$DATA" --out "$DEMO_CHECKPOINT" "${resume[@]}" ${TRAIN_ARGS:-}
  checkpoint=$DEMO_CHECKPOINT
fi
if [ "$checkpoint" = random-init ]; then
  source_args=(--random-init) key=random-init
else
  source_args=(--checkpoint "$checkpoint")
  # Outputs are keyed by the checkpoint's content, so a new model never reuses old engines or results.
  if [ -f "$checkpoint" ]; then key=$(sha256sum "$checkpoint" | cut -c1-12); else key=$checkpoint; fi
fi
run=$OUT/$key  # engines and perf
results=$run/val-${LIMIT:-all}  # reference and endpoint results on these images
mkdir -p "$results"
echo "model: $checkpoint -> $run"

# 3. engines
for item in $ENGINES; do
  backend=${item%%:*} precision=${item##*:} engine=$(engine_of "$item")
  [ -f "$engine/manifest.json" ] && continue
  step "building the $backend $precision engine -> $engine"
  extra=()
  # reduced-precision parity is reported (manifest and the table below), not enforced: the point is
  # to measure it. Random weights give mask probabilities near the 0.5 threshold, where fp32
  # rounding flips pixels.
  if [ "$precision" != fp32 ] || [ "$checkpoint" = random-init ]; then extra=(--allow-parity-failure); fi
  "$BIN/maskrcnn-build" all "${source_args[@]}" --backend "$backend" --precision "$precision" \
    --calib-images "$DATA/train" --calib-count "${CALIB_COUNT:-16}" \
    --verify-images "$DATA/val" --verify-count "${VERIFY_COUNT:-8}" "${extra[@]}" --out "$engine"
done

# 4. eager reference results (the model the engines were built from, run by its origin framework where it can)
read -r first_item _ <<< "$ENGINES"
first_engine=$(engine_of "$first_item")
if [ ! -f "$results/eager.summary.json" ]; then
  step "eager PyTorch reference results"
  "$BIN/maskrcnn-eval" "${data_args[@]}" --eager "$first_engine" --out "$results/eager.json" \
    --json "$results/eager.summary.json"
fi

# 5. serve each engine and evaluate it through the endpoint
for item in $ENGINES; do
  engine=$(engine_of "$item") tag=$(tag_of "$item")
  [ -f "$results/eval-$tag.summary.json" ] && continue
  port=$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  step "serving $engine on 127.0.0.1:$port and evaluating it"
  "$BIN/maskrcnn-serve" --engine "$engine" --port "$port" --request-timeout-ms 600000 --log-level warning \
    > "$results/serve-$tag.log" 2>&1 &
  server_pid=$!
  "$BIN/python" -m scripts.tools.wait_ready "http://127.0.0.1:$port" --pid "$server_pid" --timeout 600 \
    || { tail -n 30 "$results/serve-$tag.log"; exit 1; }
  "$BIN/maskrcnn-eval" "${data_args[@]}" --url "http://127.0.0.1:$port" --concurrency "${CONCURRENCY:-2}" \
    --out "$results/eval-$tag.json" --reference-results "$results/eager.json" \
    --json "$results/eval-$tag.summary.json"
  stop_server
done

# 6. engine perf with the eager baseline of the same run (no server competing for the cores)
for item in $ENGINES; do
  tag=$(tag_of "$item")
  [ -f "$run/perf-$tag.json" ] && continue
  step "perf of the $item engine against eager PyTorch"
  "$BIN/maskrcnn-perf" --engine "$(engine_of "$item")" --iterations "${PERF_ITERATIONS:-5}" --warmup 1 \
    --baseline eager --json "$run/perf-$tag.json"
done

# 7. the table
step "summary ($results/summary.md)"
"$BIN/python" - "$run" "$results" $ENGINES <<'EOF' | tee "$results/summary.md"
import json, sys
from pathlib import Path

run, results, engines = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]


def load(path):
    return json.loads(path.read_text())


eager = load(results / "eager.summary.json")
rows = [("eager", f"{eager['bbox']['AP']:.4f}", f"{eager['segm']['AP']:.4f}", *"-" * 8, "1.00")]
for item in engines:
    backend, precision = item.split(":")
    tag = f"{backend}-{precision}"
    ev, perf = load(results / f"eval-{tag}.summary.json"), load(run / f"perf-{tag}.json")
    parity = load(run / f"engine-{tag}" / "manifest.json")["parity"] or {}
    ms, engine = ev["latency_ms"], perf["results"]["engine"]
    rows.append((
        f"{backend} {precision}", f"{ev['bbox']['AP']:.4f}", f"{ev['segm']['AP']:.4f}",
        f"{ev['bbox']['AP'] - eager['bbox']['AP']:+.4f}", f"{ev['segm']['AP'] - eager['segm']['AP']:+.4f}",
        "; ".join(parity.get("failures", [])) or ("passed" if parity else "not verified"),
        f"{ms['p50']:.0f}", f"{ms['p90']:.0f}", f"{ms['p99']:.0f}", f"{ev['throughput_ips']:.3f}",
        f"{engine['throughput_ips']:.3f}", f"{perf['ratio']:.2f}",
    ))
header = ("model", "box AP", "mask AP", "d box AP", "d mask AP", "build parity", "p50 ms", "p90 ms", "p99 ms",
          "service img/s", "engine img/s", "x eager")
print(f"{eager['images']} val images. d = engine - eager AP, through the endpoint; build parity = the build's "
      f"verify report; latency and service img/s through HTTP (maskrcnn-eval); engine img/s and x eager from "
      f"maskrcnn-perf (input {perf['input_shape']}, eager timed in the same run)\n")
print("| " + " | ".join(header) + " |")
print("|" + "---|" * len(header))
for row in rows:
    print("| " + " | ".join(row) + " |")
EOF
