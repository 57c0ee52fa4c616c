"""The build contract, once for every registered backend (``service.backends.backend_names()``):
a builder refuses precisions it does not build, and int8 without calibration, before touching its
library. Loading and running what it builds is tests/service/test_backends.py's."""

from __future__ import annotations

import pytest

from build_tools.backends import get_builder
from service.backends import backend_names, get_backend
from service.backends.base import PRECISIONS, UnsupportedPrecision

NAMES = backend_names()


@pytest.mark.parametrize("name", NAMES)
def test_refuses_unknown_and_unoffered_precisions(name, tmp_path):
    builder, offered = get_builder(name), get_backend(name).PRECISIONS
    with pytest.raises(UnsupportedPrecision, match="unknown precision 'int4'"):
        builder.compile(tmp_path / "model.onnx", tmp_path / "out", "int4")
    for precision in (p for p in PRECISIONS if p not in offered):
        with pytest.raises(UnsupportedPrecision, match=f"{name} builds {', '.join(offered)}; {precision} is not offered"):
            builder.compile(tmp_path / "model.onnx", tmp_path / "out", precision)


@pytest.mark.parametrize("name", [n for n in NAMES if "int8" in get_backend(n).PRECISIONS])
def test_int8_needs_calibration(name, tmp_path):
    builder = get_builder(name)
    with pytest.raises(UnsupportedPrecision, match="int8 needs calibration images"):
        builder.compile(tmp_path / "model.onnx", tmp_path / "out", "qint8_mixed_float16")
    with pytest.raises(UnsupportedPrecision, match="int8 calibration got no images"):
        builder.compile(tmp_path / "model.onnx", tmp_path / "out", "int8", iter([]))
