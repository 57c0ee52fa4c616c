#!/usr/bin/env bash
# First run of the TensorRT backend, on a lent NVIDIA GPU machine (H100/H200) without internet.
# Prepared here, never run here (no GPU).
#
#   OUT=/some/dir bash scripts/device_check_tensorrt.sh    # -> $OUT/summary.json + one log per step
#
# Installs nothing: it checks what the machine has (torch, onnx, onnxruntime, tensorrt, cuda-python
# or torch CUDA, a visible GPU), writes what is missing into summary.json and stops. Otherwise, at
# batch 1: random-init export (score threshold 0: 100 detections per image to compare), the ONNX
# Runtime fp32 artifact (the reference), TensorRT fp32 and fp16 artifacts (`maskrcnn-build compile`
# verifies each against eager PyTorch), parity of each against ONNX Runtime fp32 on photos, and
# latency (`maskrcnn-perf`). Then the same TensorRT builds and latency at batch 8 (the graph's batch
# is fixed: a second export) while time is left. Every step has a hard timeout, and the whole run
# ends within DEADLINE_S (default 540 s) so that it fits one 10-minute device command.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-check}
WORK=${WORK:-$(mktemp -d /tmp/trt-check.XXXXXX)}
DEADLINE_S=${DEADLINE_S:-540}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for candidate in .venv/bin/python python3; do
        if command -v "$candidate" >/dev/null 2>&1; then PY=$candidate; break; fi
    done
fi
mkdir -p "$OUT" "$WORK"
TIMING_CACHE="$WORK/timing.cache"   # shared by every TensorRT build below (--tensorrt-timing-cache)
STEPS="$OUT/steps.tsv"
: > "$STEPS"

# step NAME LIMIT_S CMD...: run CMD with a hard timeout (cut to the time left), log to $OUT/NAME.log
step() {
    local name=$1 limit=$2; shift 2
    local left=$((DEADLINE_S - SECONDS))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 30 ]; then
        printf '%s\tskipped\t0\n' "$name" >> "$STEPS"; echo "$name: skipped, ${left}s left"; return 1
    fi
    local started=$SECONDS
    echo "== $name (timeout ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - started))" >> "$STEPS"
    echo "$name: rc $rc in $((SECONDS - started))s"
    return $rc
}

summarize() {
    "${PY:-python3}" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
read = lambda p: json.loads(p.read_text()) if p.is_file() else None
steps = [dict(zip(("name", "rc", "seconds"), line.split("\t"))) for line in (out / "steps.tsv").read_text().splitlines()]
summary = {"environment": read(out / "environment.json"), "steps": steps, "engines": {}}
for manifest in sorted(out.glob("*.manifest.json")):
    name = manifest.name.removesuffix(".manifest.json")
    m = read(manifest)
    perf = read(out / f"{name}.perf.json")
    summary["engines"][name] = {
        "backend_facts": m["tools"].get("backend"),
        "parity_vs_eager": m.get("parity"),
        "parity_vs_onnxruntime_fp32": read(out / f"{name}.vs-ort.json"),
        "latency_ms": perf and perf["results"]["engine"]["latency_ms"],
        "throughput_ips": perf and perf["results"]["engine"]["throughput_ips"],
    }
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"summary: {out / 'summary.json'}")
EOF
}

if [ -z "$PY" ]; then
    echo '{"missing": ["python"]}' > "$OUT/environment.json"; summarize; exit 3
fi

# 1. what is installed: exit 3 with the list of what is missing
step environment 60 "$PY" - "$OUT/environment.json" <<'EOF'
import importlib, json, subprocess, sys
env = {"python": sys.version.split()[0]}
for module in ("torch", "torchvision", "onnx", "onnxruntime", "tensorrt", "cuda.bindings", "cuda.cudart", "skimage"):
    try:
        env[module] = getattr(importlib.import_module(module), "__version__", "present")
    except Exception:
        env[module] = None
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as exc:
    env["nvidia_smi"] = f"not runnable: {exc}"
missing = [m for m in ("torch", "torchvision", "onnx", "onnxruntime", "tensorrt") if env[m] is None]
env["device_api"] = "torch" if env["cuda.bindings"] is None and env["cuda.cudart"] is None else "cuda-python"
if not missing:
    from service.backends import get_backend
    ok, reason = get_backend("tensorrt").available()
    env["tensorrt_available"] = [ok, reason]
    if not ok:
        missing.append(f"tensorrt backend unavailable: {reason}")
    import onnxruntime
    env["onnxruntime_providers"] = onnxruntime.get_available_providers()
env["missing"] = missing
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env, indent=2))
sys.exit(3 if missing else 0)
EOF
if [ $? -ne 0 ]; then echo "missing pieces: see $OUT/environment.json"; summarize; exit 3; fi

# verify/parity photos: scikit-image's samples when installed, else synthetic photographs
step photos 60 "$PY" - "$WORK/photos" <<'EOF'
import shutil, sys
from pathlib import Path
folder = Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
try:
    import skimage
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png"):
        shutil.copyfile(Path(skimage.data_dir) / name, folder / name)
except ImportError:
    from scripts.bench.service import synthetic_photo
    for h, w in ((480, 640), (640, 480), (600, 800), (768, 1024)):
        (folder / f"synthetic_{h}x{w}.jpg").write_bytes(synthetic_photo(h, w))
EOF

# build_and_measure B: export at batch B, ORT fp32 reference (batch 1 only), TensorRT fp32 + fp16,
# parity against the reference (batch 1), latency of each
build_and_measure() {
    local b=$1 verify=(--verify-images "$WORK/photos" --verify-count 2 --allow-parity-failure)
    step "export-b$b" 240 "$PY" -m build_tools.cli export --random-init --score-threshold 0.0 \
        --batch-size "$b" --out "$WORK/export-b$b" || return 1
    [ "$b" -eq 1 ] || verify=(--no-verify)   # eager on the CPU at batch 8 would eat the time left
    if [ "$b" -eq 1 ]; then
        step ort-fp32-b1 120 "$PY" -m build_tools.cli compile "$WORK/export-b1" --backend onnxruntime \
            --precision fp32 --no-verify --out "$WORK/ort-fp32-b1" \
            && cp "$WORK/ort-fp32-b1/manifest.json" "$OUT/ort-fp32-b1.manifest.json"
    fi
    for precision in fp32 fp16; do
        local name="trt-$precision-b$b"
        step "$name" 300 "$PY" -m build_tools.cli compile "$WORK/export-b$b" --backend tensorrt \
            --tensorrt-timing-cache "$TIMING_CACHE" --precision "$precision" "${verify[@]}" --out "$WORK/$name" || continue
        cp "$WORK/$name/manifest.json" "$OUT/$name.manifest.json"
        if [ "$b" -eq 1 ]; then
            step "$name-vs-ort" 180 "$PY" - "$WORK/ort-fp32-b1" "$WORK/$name" "$WORK/photos" "$OUT/$name.vs-ort.json" <<'EOF'
import json, sys
sys.path.insert(0, "tests")
from engine_reference import EngineAsReference  # the adapter the parity tests use
from build_tools.images import list_images
from build_tools.verify import Tolerance, check_tolerance, verify
from service.backends import load_engine
reference, engine = load_engine(sys.argv[1]), load_engine(sys.argv[2])
report = verify(EngineAsReference(reference), engine, list_images(sys.argv[3]),
                engine.manifest.input.spec, progress=False)
report.update(device_api=engine.device_api, failures_at_fp32_tolerance=check_tolerance(report, Tolerance.for_precision("fp32")))
json.dump(report, open(sys.argv[4], "w"), indent=2)
print(json.dumps(report, indent=2))
EOF
        fi
        step "$name-perf" 120 "$PY" -m scripts.tools.perf --engine "$WORK/$name" --iterations 20 --warmup 3 \
            --json "$OUT/$name.perf.json"
    done
    if [ "$b" -eq 1 ]; then
        step ort-fp32-b1-perf 120 "$PY" -m scripts.tools.perf --engine "$WORK/ort-fp32-b1" --iterations 5 --warmup 1 \
            --json "$OUT/ort-fp32-b1.perf.json"
    fi
}

build_and_measure 1
if [ $((DEADLINE_S - SECONDS)) -ge 240 ]; then
    build_and_measure 8
else
    printf 'batch-8\tskipped\t0\n' >> "$STEPS"; echo "batch 8: skipped, $((DEADLINE_S - SECONDS))s left"
fi
summarize
