"""Where reduced precision goes: the layers that do the arithmetic, named as the export names them.

The exported graph's node names are the TorchScript scopes of ``build_tools.model.MaskRCNN``
(``/backbone/body/layer1/...``, ``/box_head/fc6/Gemm``, ...). bf16 and int8 belong to the layers
that hold almost all of the arithmetic (``COMPUTE_SCOPES``: the ResNet body, FPN, the RPN head's
3x3 convolution, the box head's two FCs, the mask head's convolutions and deconvolution). Their last
layers whose outputs are read as numbers (``FP32_LAYERS``: RPN objectness logits and box deltas, the
box predictor's class logits and deltas, mask logits) are cheap and stay fp32, as does everything
else: anchors, box decoding, proposal and detection coordinates, RoI level mapping and RoIAlign
sampling coordinates, softmax, NMS and top-k (a bf16 coordinate near 1000 px has an 8 px step).

Each backend applies this with its own mechanism (build_tools/backends/onnxruntime.py: QDQ with
the other nodes excluded; build_tools/backends/openvino.py: NNCF's ignored scope for int8, fp32
anchors around RoIAlign for bf16).
"""

from __future__ import annotations

from collections.abc import Iterable

COMPUTE_SCOPES: tuple[str, ...] = (
    "/backbone/", "/head/conv", "/box_head/", "/mask_head/", "/mask_predictor/conv5_mask", "/mask_predictor/relu")
FP32_LAYERS: tuple[str, ...] = ("/head/cls_logits", "/head/bbox_pred", "/box_predictor/", "/mask_predictor/mask_fcn_logits")


def reduced_precision_allowed(node_name: str) -> bool:
    """Whether the node named ``node_name`` may compute in bf16 or int8."""
    return node_name.startswith(COMPUTE_SCOPES) and not node_name.startswith(FP32_LAYERS)


def fp32_nodes(names: Iterable[str]) -> list[str]:
    """The names among ``names`` that stay fp32."""
    return [name for name in names if not reduced_precision_allowed(name)]


def summary() -> dict[str, list[str]]:
    """The scopes, as the manifest's backend facts record them."""
    return {"reduced_precision_scopes": list(COMPUTE_SCOPES), "fp32_layers": list(FP32_LAYERS)}
