"""Engine speed against eager PyTorch, measured in one run on the same image.

Rows: eager PyTorch (this project's model, the engines' own reference), torchvision's stock ONNX
export run by ONNX Runtime (full-image masks pasted inside the graph), and each given engine
artifact. Every row includes its host work (preprocess and the host postprocess: box rescale, mask
paste, RLE), so the ratios compare what a request costs. Ratios are to eager in the same run.

    python -m scripts.bench_build --engine artifacts/fp32 --engine artifacts/int8 [--image IMG]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def _time(fn, iterations: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _stock_torchvision_onnx(cache: Path, hw: tuple[int, int]) -> Path:
    """torchvision's maskrcnn_resnet50_fpn exported the stock way (random weights: timing only)."""
    import torch
    import torchvision

    path = cache / "torchvision_stock_maskrcnn.onnx"
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    image = torch.rand(3, *hw)
    torch.onnx.export(model, ([image],), str(path), dynamo=False, opset_version=17, input_names=["image"],
                      output_names=["boxes", "labels", "scores", "masks"],
                      dynamic_axes={"image": {1: "h", 2: "w"}})
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", action="append", required=True, help="engine artifact folder (repeatable)")
    p.add_argument("--image", help="image file (default: scikit-image's 'coffee' photo, 600x400)")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-stock", action="store_true", help="skip torchvision's stock ONNX export row")
    p.add_argument("--cache", default=".cache/bench", help="where the stock export is kept")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    import onnxruntime as ort
    import torch

    from build_tools.pipeline import input_spec_of, reload_reference
    from build_tools.verify import read_rgb
    from service.backends import load_engine
    from service.backends.onnxruntime import default_threads
    from service.postprocess import postprocess_image
    from service.preprocess import pad_batch, prepare_image

    if args.image:
        image_path = Path(args.image)
    else:
        import skimage

        image_path = Path(skimage.data_dir) / "coffee.png"
    rgb = read_rgb(image_path)
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)

    engines = [load_engine(e, threads=threads) for e in args.engine]
    first = engines[0].manifest
    reference = reload_reference({"checkpoint": first.checkpoint, "inference_config": first.inference_config}).model
    spec = input_spec_of(first.inference_config)
    post = first.postprocess

    def run_with(infer):
        """One request's work: preprocess, infer, host postprocess with RLE masks."""
        def once():
            prepared = prepare_image(rgb, spec)
            images, sizes = pad_batch([prepared], spec.pad_divisor, batch_size=1)
            out = infer(images, sizes)
            return postprocess_image(out["dets"][0], out["labels"][0], out["masks"][0], prepared.scale_factor,
                                     prepared.orig_hw, score_threshold=post["score_threshold"],
                                     mask_threshold=post["mask_threshold"])
        return once

    def eager_infer(images, sizes):
        with torch.no_grad():
            d, l, m = reference(torch.from_numpy(images), torch.from_numpy(sizes))
        return {"dets": d.numpy(), "labels": l.numpy(), "masks": m.numpy()}

    rows = []
    eager_times = _time(run_with(eager_infer), args.iterations, args.warmup)
    rows.append(("eager PyTorch (reference)", eager_times))

    if not args.no_stock:
        stock_path = _stock_torchvision_onnx(Path(args.cache), spec.resized_hw(rgb.shape[:2]))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(stock_path), options, providers=["CPUExecutionProvider"])
        stock_input = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / 255.0

        def stock_once():
            boxes, labels, scores, masks = session.run(None, {"image": stock_input})
            from pycocotools import mask as mask_utils

            binary = np.asfortranarray((masks[:, 0] > 0.5).transpose(1, 2, 0).astype(np.uint8))
            return mask_utils.encode(binary) if len(scores) else []

        rows.append(("torchvision stock ONNX (ORT, masks pasted in graph)",
                     _time(stock_once, args.iterations, args.warmup)))

    for engine in engines:
        m = engine.manifest
        rows.append((f"{m.backend} {m.precision} (this project)",
                     _time(run_with(engine.infer), args.iterations, args.warmup)))

    eager_median = statistics.median(eager_times)
    print(f"image {image_path.name} {rgb.shape[1]}x{rgb.shape[0]}, threads {threads}, "
          f"{args.iterations} iterations after {args.warmup} warm-up")
    print(f"{'engine':55s} {'median s':>9s} {'min s':>7s} {'x eager':>8s}")
    results = []
    for name, times in rows:
        med = statistics.median(times)
        print(f"{name:55s} {med:9.3f} {min(times):7.3f} {med / eager_median:8.2f}")
        results.append({"engine": name, "median_s": med, "min_s": min(times), "ratio_to_eager": med / eager_median})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
