"""MagicMind runtime: registered with its precisions, and its availability names what is missing
(the SDK ships only inside Cambricon's container images). What it builds and how is
tests/build_tools/test_builder_magicmind.py's."""

from __future__ import annotations

from build_tools.backends import get_builder
from service.backends import get_backend

magicmind = get_backend("magicmind")
build = get_builder("magicmind")
ok, reason = magicmind.available()


def test_registered_with_its_precisions():
    assert magicmind.NAME == "magicmind"
    assert magicmind.PRECISIONS == ("fp32", "fp16", "int8")
    assert build.MODEL_FILE == "model.mm"


def test_availability_names_what_is_missing():
    assert ok or "magicmind" in reason or "MLU" in reason
