"""Benchmark the KServe v2 route against /predict on the same engine: latency, as a ratio.

One ``maskrcnn-serve`` (``scripts.tools.service_process.running_service``) on loopback; one client sends
the same JPEG again and again, one request at a time, taking turns call by call
(``build_tools.timing.time_calls``, alternating who goes first) between:

- ``predict``: ``POST /predict`` with the raw image body, the native JSON answer;
- ``v2 binary``: tritonclient's ``infer`` with the image as binary BYTES, outputs in binary;
- ``v2 json``: tritonclient's ``infer`` with the image in base64, outputs as JSON.

Each answer carries every detection (``--max-detections``, masks included), so the extra cost of
the protocol (its body codec, base64, the tensor layout) is what the ratio shows.

    python -m scripts.bench.kserve --engine ARTIFACT_DIR [--iterations 8]

The goal is v2 binary / predict <= 1.05 at the median.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

import httpx
import numpy as np
import tritonclient.http as triton

from build_tools.timing import latency_summary, time_calls
from scripts.tools.photos import synthetic_photo
from scripts.tools.service_process import running_service
from service.settings import Settings

GOAL = 1.05


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench.kserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", type=Path, required=True, help="engine artifact folder")
    parser.add_argument("--iterations", type=int, default=8, help="timed calls per route (default 8)")
    parser.add_argument("--max-detections", type=int, default=100, help="detections per answer (default 100)")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    image = synthetic_photo()
    options = {"max_detections": args.max_detections}
    with running_service(args.engine, Settings(engine_dir=args.engine), concurrency=1) as url, \
            httpx.Client(base_url=url, timeout=600) as http:
        client = triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=600)
        binary = triton.InferInput("image", [1], "BYTES")
        binary.set_data_from_numpy(np.array([image], dtype=object), binary_data=True)
        text = triton.InferInput("image", [1], "BYTES")
        text.set_data_from_numpy(np.array([base64.b64encode(image)], dtype=object), binary_data=False)
        json_outputs = [triton.InferRequestedOutput(name, binary_data=False)
                        for name in ("boxes", "scores", "labels", "classes", "masks", "image_index")]

        def predict() -> None:
            http.post("/predict", content=image, headers={"Content-Type": "image/jpeg"}, params=options).raise_for_status()

        runners = {
            "predict": predict,
            "v2 binary": lambda: client.infer("maskrcnn", [binary], parameters=options).as_numpy("masks"),
            "v2 json": lambda: client.infer("maskrcnn", [text], outputs=json_outputs, parameters=options).as_numpy("masks"),
        }
        seconds = time_calls(runners, args.iterations, warmup=1, alternate=True)
    summary = {name: latency_summary(samples) for name, samples in seconds.items()}
    baseline = summary["predict"]["p50"]
    report = {"iterations": args.iterations, "max_detections": args.max_detections, "latency_ms": summary,
              "ratio_p50": {name: s["p50"] / baseline for name, s in summary.items()},
              "overhead_ms_p50": {name: s["p50"] - baseline for name, s in summary.items()}}
    for name, s in summary.items():
        print(f"{name:10s} p50 {s['p50']:8.1f} ms  mean {s['mean']:8.1f} ms  x{report['ratio_p50'][name]:.3f} "
              f"({report['overhead_ms_p50'][name]:+.1f} ms)")
    ok = report["ratio_p50"]["v2 binary"] <= GOAL
    print(f"v2 binary / predict at p50: {report['ratio_p50']['v2 binary']:.3f} (goal <= {GOAL}): "
          f"{'met' if ok else 'missed'}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
