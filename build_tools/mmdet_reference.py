"""mmdetection's own Mask R-CNN, run on CPU, as the reference our model is measured against.

The R50-FPN model is the test-time part of mmdet's base config, written out below
(``MASK_RCNN_R50_FPN``); other members of the family come from mmdet's own config files, shipped
in its wheel (:func:`zoo_model_config`: ``mask-rcnn_r101_fpn_1x_coco``, ``mask-rcnn_x101-32x4d_fpn_1x_coco``,
...), with the class count of a custom head.

Full mmcv (with its compiled ops) does not build for our torch, so the reference is
``mmcv-lite`` + ``mmengine`` + ``mmdet`` (pure Python) plus the two mmcv C++ CPU kernels that
mmdet's Mask R-CNN test path calls, ``nms`` and ``roi_align_forward``, compiled from the C++
sources the mmcv-lite wheel ships (:func:`build_ops`, about a minute). :func:`install_ops`
registers them as ``mmcv._ext``; every other mmcv op resolves to a function that raises
``NotImplementedError`` naming the op, so nothing can silently run a stand-in.

``scripts/setup_mmdet_reference.sh`` installs the packages and runs ``build_ops``;
``tests/build_tools/test_mmdet_reference.py`` skips with :func:`unavailable_reason` when either is missing.

Command line: ``python build_tools/mmdet_reference.py build-ops`` compiles the kernels (idempotent).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OPS_CACHE = ROOT / ".cache" / "mmcv_ops"
OPS_MODULE = "mmcv_reference_ops"
# The mmcv ops mmdet's Mask R-CNN test path calls (mmcv.ops.nms and mmcv.ops.RoIAlign forward).
COMPILED_OPS = ("nms", "roi_align_forward")
# mmcv C++ sources (under mmcv/ops/csrc) -> file name in the build folder; the names must differ
# because torch's ninja build names objects after the file.
OPS_SOURCES = {
    "pytorch/nms.cpp": "nms.cpp",
    "pytorch/cpu/nms.cpp": "nms_cpu.cpp",
    "pytorch/roi_align.cpp": "roi_align.cpp",
    "pytorch/cpu/roi_align.cpp": "roi_align_cpu.cpp",
}
# The binding, as in mmcv's pytorch/pybind.cpp for these two functions.
_BINDING = """\
#include <torch/extension.h>
using at::Tensor;
Tensor nms(Tensor boxes, Tensor scores, float iou_threshold, int offset);
void roi_align_forward(Tensor input, Tensor rois, Tensor output, Tensor argmax_y, Tensor argmax_x,
                       int aligned_height, int aligned_width, float spatial_scale,
                       int sampling_ratio, int pool_mode, bool aligned);
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nms", &nms, py::arg("boxes"), py::arg("scores"), py::arg("iou_threshold"),
        py::arg("offset"));
  m.def("roi_align_forward", &roi_align_forward, py::arg("input"), py::arg("rois"),
        py::arg("output"), py::arg("argmax_y"), py::arg("argmax_x"), py::arg("aligned_height"),
        py::arg("aligned_width"), py::arg("spatial_scale"), py::arg("sampling_ratio"),
        py::arg("pool_mode"), py::arg("aligned"));
}
"""

# mmdetection v3 configs/_base_/models/mask-rcnn_r50_fpn.py, test-time part (train_cfg and losses
# only matter for training; the backbone's ImageNet init is replaced by the checkpoint).
MASK_RCNN_R50_FPN = dict(
    type="MaskRCNN",
    data_preprocessor=dict(
        type="DetDataPreprocessor",
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_mask=True,
        pad_size_divisor=32,
    ),
    backbone=dict(
        type="ResNet",
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type="BN", requires_grad=True),
        norm_eval=True,
        style="pytorch",
        init_cfg=None,
    ),
    neck=dict(type="FPN", in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5),
    rpn_head=dict(
        type="RPNHead",
        in_channels=256,
        feat_channels=256,
        anchor_generator=dict(
            type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64]
        ),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(type="L1Loss", loss_weight=1.0),
    ),
    roi_head=dict(
        type="StandardRoIHead",
        bbox_roi_extractor=dict(
            type="SingleRoIExtractor",
            roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0),
            out_channels=256,
            featmap_strides=[4, 8, 16, 32],
        ),
        bbox_head=dict(
            type="Shared2FCBBoxHead",
            in_channels=256,
            fc_out_channels=1024,
            roi_feat_size=7,
            num_classes=80,
            bbox_coder=dict(
                type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]
            ),
            reg_class_agnostic=False,
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0),
        ),
        mask_roi_extractor=dict(
            type="SingleRoIExtractor",
            roi_layer=dict(type="RoIAlign", output_size=14, sampling_ratio=0),
            out_channels=256,
            featmap_strides=[4, 8, 16, 32],
        ),
        mask_head=dict(
            type="FCNMaskHead",
            num_convs=4,
            in_channels=256,
            conv_out_channels=256,
            num_classes=80,
            loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0),
        ),
    ),
    train_cfg=None,
    test_cfg=dict(
        rpn=dict(nms_pre=1000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
        rcnn=dict(
            score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100, mask_thr_binary=0.5
        ),
    ),
)

# configs/_base_/datasets/coco_instance.py test_pipeline, without the annotation loading.
TEST_PIPELINE = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(1333, 800), keep_ratio=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]


def zoo_model_config(config_name: str, num_classes: int | None = None) -> dict:
    """The ``model`` of mmdet's config file ``configs/mask_rcnn/<config_name>.py`` (from the
    installed wheel's ``.mim`` folder, ``_base_`` files resolved by mmengine), without the backbone's
    pretrained init (the checkpoint replaces it), with ``num_classes`` in the box and mask heads
    when given."""
    import mmdet
    from mmengine.config import Config

    path = Path(mmdet.__file__).parent / ".mim" / "configs" / "mask_rcnn" / f"{config_name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: this mmdet wheel ships no config {config_name!r}")
    model = Config.fromfile(str(path)).model.to_dict()
    model["backbone"]["init_cfg"] = None
    if num_classes is not None:
        model["roi_head"]["bbox_head"]["num_classes"] = num_classes
        model["roi_head"]["mask_head"]["num_classes"] = num_classes
    return model


def ops_dir() -> Path:
    """Build folder of the compiled kernels, keyed by the torch and mmcv versions they fit."""
    import mmcv

    return OPS_CACHE / f"torch{torch.__version__}-mmcv{mmcv.__version__}"


def unavailable_reason() -> str | None:
    """Why the reference cannot run here (None when it can)."""
    missing = [name for name in ("mmcv", "mmengine", "mmdet") if importlib.util.find_spec(name) is None]
    if missing:
        return f"{', '.join(missing)} not installed; run scripts/setup_mmdet_reference.sh"
    library = ops_dir() / f"{OPS_MODULE}.so"
    if not library.is_file():
        return f"mmcv CPU ops not built ({library} missing); run scripts/setup_mmdet_reference.sh"
    return None


def build_ops(verbose: bool = False) -> Path:
    """Compile mmcv's CPU ``nms`` and ``roi_align`` into ``ops_dir()``; returns the library path.

    torch's extension builder keeps the objects and rebuilds only what changed, so a second call
    costs seconds.
    """
    import mmcv
    from torch.utils.cpp_extension import load

    csrc = Path(mmcv.__file__).parent / "ops" / "csrc"
    build = ops_dir()
    build.mkdir(parents=True, exist_ok=True)
    texts = {"binding.cpp": _BINDING}
    for relative, name in OPS_SOURCES.items():
        if not (csrc / relative).is_file():
            raise FileNotFoundError(f"{csrc / relative} missing: this mmcv wheel ships no C++ sources")
        texts[name] = (csrc / relative).read_text()
    for name, text in texts.items():
        target = build / name
        if not target.is_file() or target.read_text() != text:  # a new mtime would make ninja rebuild
            target.write_text(text)
    load(
        OPS_MODULE,
        [str(build / name) for name in texts],
        extra_include_paths=[str(csrc / "common")],
        build_directory=str(build),
        verbose=verbose,
    )
    return build / f"{OPS_MODULE}.so"


def install_ops() -> None:
    """Register the compiled kernels as ``mmcv._ext`` (idempotent); call before importing mmdet."""
    import mmcv

    if "mmcv._ext" in sys.modules:
        return
    library = ops_dir() / f"{OPS_MODULE}.so"
    spec = importlib.util.spec_from_file_location(OPS_MODULE, library)
    compiled = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compiled)

    ext = types.ModuleType("mmcv._ext", f"mmcv ops compiled for the reference: {', '.join(COMPILED_OPS)}")
    for name in COMPILED_OPS:
        setattr(ext, name, getattr(compiled, name))

    def absent_op(name: str):
        # mmcv.ops imports every op module, and each checks its kernels exist; those outside the
        # Mask R-CNN test path exist here only as this error.
        if name.startswith("__"):
            raise AttributeError(name)

        def raise_absent(*args, **kwargs):
            raise NotImplementedError(
                f"mmcv op {name!r} is not compiled in the mmdet reference build (only "
                f"{', '.join(COMPILED_OPS)}); see build_tools/mmdet_reference.py"
            )

        return raise_absent

    ext.__getattr__ = absent_op
    # No loader: mmengine's ``mmcv_full_available()`` rightly answers False (not full mmcv).
    ext.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)
    sys.modules["mmcv._ext"] = ext
    mmcv._ext = ext


@dataclass
class ReferenceDetections:
    """mmdet's detections of one image, in original-image pixels.

    Attributes:
        boxes: float32 ``[K, 4]`` ``x1, y1, x2, y2``.
        scores: float32 ``[K]``, descending.
        labels: int64 ``[K]``, class index 0..C-1 (COCO order for COCO's 80).
        masks: bool ``[K, h0, w0]``, thresholded at ``mask_thr_binary``.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: np.ndarray


@dataclass
class ReferenceRun:
    """One ``inference_detector`` call and what its stages saw.

    Attributes:
        detections: the final result.
        inputs: float32 ``[1, 3, H, W]`` tensor the backbone received (normalised RGB, padded).
        features: the FPN's 5 float32 maps ``[1, 256, H / s, W / s]``, s = 4, 8, 16, 32, 64.
        data_sample: mmdet's ``DetDataSample`` (its metainfo holds img_shape, scale_factor, ...).
    """

    detections: ReferenceDetections
    inputs: torch.Tensor
    features: list[torch.Tensor]
    data_sample: object


class MMDetReference:
    """mmdet's Mask R-CNN (``model``: an mmdet model config, default R50-FPN) with a checkpoint,
    and its test-time stages one by one; ``classes`` names its classes (default COCO's), ``scale``
    is the test pipeline's (long, short) resize limit (default mmdet's 1333x800)."""

    def __init__(self, checkpoint: str | Path, model: dict = MASK_RCNN_R50_FPN,
                 classes: tuple[str, ...] | None = None, scale: tuple[int, int] = (1333, 800)):
        install_ops()
        from mmdet.evaluation import get_classes
        from mmdet.registry import MODELS
        from mmengine.config import Config
        from mmengine.registry import init_default_scope
        from mmengine.runner import load_checkpoint

        # What mmdet.apis.init_detector does, with strict loading (every key of the file must
        # fit; init_detector only logs mismatches) and without its global warning filter change.
        # ``scale`` (long, short): the test pipeline's Resize, as the engine's build recorded it
        pipeline = [dict(step, scale=tuple(scale)) if step["type"] == "Resize" else step for step in TEST_PIPELINE]
        config = Config(
            dict(model=model, test_dataloader=dict(dataset=dict(pipeline=pipeline)))
        )
        init_default_scope("mmdet")
        self.model = MODELS.build(config.model)
        load_checkpoint(self.model, str(checkpoint), map_location="cpu", strict=True, logger="silent")
        self.model.cfg = config  # inference_detector reads the test pipeline from it
        self.model.dataset_meta = {"classes": classes or get_classes("coco")}
        self.model.eval()

    def detect(self, image: str | Path | np.ndarray) -> ReferenceRun:
        """mmdet's ``inference_detector`` on one image (a file, or a uint8 ``[H, W, 3]`` BGR array as
        mmcv reads files; its test pipeline and ``test_step``), with the backbone's input and the
        FPN's output recorded on the way."""
        from mmdet.apis import inference_detector

        seen = {}
        hooks = [
            self.model.backbone.register_forward_pre_hook(lambda _, args: seen.update(inputs=args[0])),
            self.model.neck.register_forward_hook(lambda _, args, out: seen.update(features=list(out))),
        ]
        try:
            sample = inference_detector(self.model, image if isinstance(image, np.ndarray) else str(image))
        finally:
            for hook in hooks:
                hook.remove()
        result = sample.pred_instances
        detections = ReferenceDetections(
            boxes=result.bboxes.numpy().astype(np.float32),
            scores=result.scores.numpy().astype(np.float32),
            labels=result.labels.numpy().astype(np.int64),
            masks=result.masks.numpy().astype(bool),
        )
        return ReferenceRun(detections, seen["inputs"], seen["features"], sample)

    def proposals(self, features: list[torch.Tensor], run: ReferenceRun) -> tuple[torch.Tensor, torch.Tensor]:
        """RPN test output on ``features`` (with ``run``'s image geometry): ``(boxes [P, 4] in
        input pixels, scores [P])``, best first."""
        with torch.no_grad():
            result = self.model.rpn_head.predict(tuple(features), [run.data_sample], rescale=False)[0]
        return result.bboxes, result.scores

    def detect_from_proposals(
        self, run: ReferenceRun, boxes: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Box head + per-class NMS on given proposals and ``run.features``, not rescaled:
        ``(boxes [K, 4] in input pixels, scores [K], labels [K])``."""
        from mmengine.structures import InstanceData

        proposals = InstanceData(bboxes=boxes, scores=scores)
        with torch.no_grad():
            result = self.model.roi_head.predict_bbox(
                tuple(run.features),
                [run.data_sample.metainfo],
                [proposals],
                self.model.roi_head.test_cfg,
                rescale=False,
            )[0]
        return result.bboxes, result.scores, result.labels

    def mask_probabilities(self, run: ReferenceRun, boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mask head on ``boxes`` (input pixels): float32 ``[K, 28, 28]`` probabilities of ``labels``."""
        from mmdet.structures.bbox import bbox2roi

        with torch.no_grad():
            mask_results = self.model.roi_head._mask_forward(tuple(run.features), bbox2roi([boxes]))
        logits = mask_results["mask_preds"]
        return logits[torch.arange(len(labels)), labels].sigmoid()


def main(argv: list[str]) -> int:
    if argv != ["build-ops"]:
        print("usage: python build_tools/mmdet_reference.py build-ops", file=sys.stderr)
        return 2
    library = build_ops(verbose=False)
    install_ops()
    import mmcv.ops  # noqa: F401  (proves the registered kernels satisfy mmcv's import checks)

    print(f"mmcv ops ({', '.join(COMPILED_OPS)}) built: {library}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
