"""`maskrcnn-draw`: an image with its detections drawn on it (the picture `POST /render` makes).

    maskrcnn-draw IMAGE --url http://127.0.0.1:8000 --out overlay.png [--score-threshold 0.5]
    maskrcnn-draw IMAGE --results results.json [--image-id 42] --out overlay.png

With ``--url`` the image is sent to the service's ``/predict`` (``service.client``); with
``--results`` the detections come from a file: a ``/predict`` answer (native form) or a COCO
results file (a list of ``{image_id, category_id, bbox [x, y, w, h], score, segmentation}``,
whose ``--image-id`` picks one image: needed when it holds several, an error when the file lacks
it or is a ``/predict`` answer; class names are COCO's for COCO ids). ``--score-threshold``,
``--max-detections`` and ``--classes`` filter what is drawn; a ``--classes`` entry that names no
class (of the results or COCO's; with ``--url``, of the engine) is an error. The drawing is
``service.draw``'s, the same as ``/render``'s; the image is decoded as the service decodes it
(EXIF orientation applied).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from build_tools.classes import COCO_CLASSES
from service.client import AnswerError, Client, Detections
from service.decode import decode_image
from service.draw import draw_overlay, encode_png
from service.exceptions import ServiceError

COCO_NAMES = dict(COCO_CLASSES)


class ResultsError(ValueError):
    """Results that cannot be drawn as asked: neither form, several images and no --image-id, an
    --image-id the file does not hold or that a one-image answer cannot take, unknown --classes."""


def detections_from_results(results: Any, image_hw: tuple[int, int], image_id: int | None) -> Detections:
    """The detections of one image from a ``/predict`` answer or a COCO results list.

    Raises:
        ResultsError: neither form; a COCO list of several images without ``image_id``, or without
            ``image_id`` among them; ``image_id`` with a ``/predict`` answer (one image, no ids).
    """
    if isinstance(results, dict) and "detections" in results:
        if image_id is not None:
            raise ResultsError("--image-id picks one image of a COCO results list; this file is a /predict answer "
                               "of one image, which has no image ids: drop --image-id")
        return Detections.from_predict(results)
    if not isinstance(results, list) or not all(isinstance(r, dict) and "bbox" in r for r in results):
        raise ResultsError("expected a /predict answer ({\"detections\": ...}) or a COCO results list")
    ids = {r.get("image_id") for r in results}
    if image_id is not None:
        if image_id not in ids:
            held = sorted(i for i in ids if isinstance(i, int))
            shown = ", ".join(map(str, held[:10])) + (f" ... ({len(held)} in all)" if len(held) > 10 else "")
            raise ResultsError(f"--image-id {image_id} is not in the results (their image ids: {shown or 'none'})")
        results = [r for r in results if r.get("image_id") == image_id]
    elif len(ids) > 1:
        raise ResultsError(f"the results hold {len(ids)} images; choose one with --image-id")
    results = sorted(results, key=lambda r: -r["score"])
    return Detections(
        boxes=np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in results)],
                       dtype=np.float32).reshape(-1, 4),
        scores=np.array([r["score"] for r in results], dtype=np.float32),
        class_ids=np.array([r["category_id"] for r in results], dtype=np.int64),
        class_names=tuple(COCO_NAMES.get(r["category_id"], f"class {r['category_id']}") for r in results),
        rles=tuple(r["segmentation"] for r in results) if all("segmentation" in r for r in results) else None,
        image_hw=image_hw,
    )


def check_classes(classes: Sequence[str], found: Detections) -> None:
    """Refuse ``--classes`` entries that name no class of the results and no COCO class, as the
    service's 422 does for a class its engine lacks (a results file carries no class table, so
    its detections' classes and COCO's are all that is known).

    Raises:
        ResultsError: the unknown entries, with the classes the results hold.
    """
    known = {str(i) for i in found.class_ids.tolist()} | {n.lower() for n in found.class_names}
    known |= {str(i) for i in COCO_NAMES} | {n.lower() for n in COCO_NAMES.values()}
    unknown = [c for c in classes if c.lower() not in known]
    if unknown:
        held = ", ".join(sorted(set(found.class_names))) or "none"
        raise ResultsError(f"--classes {','.join(unknown)}: no class of the results (theirs: {held}) nor of COCO "
                           "has that name or id")


def filtered(found: Detections, score_threshold: float | None, max_detections: int | None,
             classes: Sequence[str] | None) -> Detections:
    """The detections scoring at least ``score_threshold``, of ``classes`` (names or ids), the best ``max_detections``."""
    keep = found.scores >= (score_threshold or 0.0)
    if classes:
        wanted = {c.lower() for c in classes}
        keep &= np.array([n.lower() in wanted or str(i) in wanted for n, i in zip(found.class_names, found.class_ids)],
                         dtype=bool).reshape(-1)
    index = np.flatnonzero(keep)[:max_detections]
    return Detections(found.boxes[index], found.scores[index], found.class_ids[index],
                      tuple(found.class_names[i] for i in index),
                      None if found.rles is None else tuple(found.rles[i] for i in index), found.image_hw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskrcnn-draw", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path, help="the image (JPEG, PNG, WebP or BMP)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", help="service base URL: its /predict finds the detections")
    source.add_argument("--results", type=Path, help="a /predict answer or a COCO results JSON file")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--image-id", type=int, default=None, help="with --results: the image's id in the file")
    parser.add_argument("--score-threshold", type=float, default=None, help="draw detections scoring at least this")
    parser.add_argument("--max-detections", type=int, default=None, help="draw at most this many (the best)")
    parser.add_argument("--classes", default=None, help="draw only these classes: names or ids, comma-separated")
    parser.add_argument("--api-key", default=None, help="with --url: the service's API key")
    parser.add_argument("--timeout", type=float, default=120.0, help="with --url: seconds per request (default 120)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``maskrcnn-draw``; exit status 1 for a service error, 2 for bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_detections is not None and args.max_detections < 1:
        parser.error("--max-detections must be >= 1")
    if args.url and args.image_id is not None:
        parser.error("--image-id picks an image of a --results file; with --url there is none to pick")
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    try:
        data = args.image.read_bytes()
        rgb = decode_image(data, max_bytes=len(data) or 1, max_pixels=2**31, min_side=1)
        if args.url:
            with Client(args.url, api_key=args.api_key, timeout=args.timeout) as client:
                found = client.predict(data, score_threshold=args.score_threshold,
                                       max_detections=args.max_detections, classes=classes)
        else:
            results = json.loads(args.results.read_text())
            found = detections_from_results(results, rgb.shape[:2], args.image_id)
            if classes:
                check_classes(classes, found)
        found = filtered(found, args.score_threshold, args.max_detections, classes)
        picture = draw_overlay(rgb, found.boxes, found.scores, found.class_ids.tolist(), found.class_names, found.rles)
        args.out.write_bytes(encode_png(picture))
    except (AnswerError, httpx.TransportError) as error:
        print(f"maskrcnn-draw: {args.url}: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError, ServiceError) as error:  # UnknownImageType and ResultsError are ValueErrors
        print(f"maskrcnn-draw: {error}", file=sys.stderr)
        return 2
    print(f"{len(found)} detections drawn on {args.image} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
