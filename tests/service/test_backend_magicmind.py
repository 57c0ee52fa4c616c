"""MagicMind runtime: its availability names what is missing (the SDK ships only inside Cambricon's
container images). What it builds and how is tests/build_tools/test_builder_magicmind.py's."""

from __future__ import annotations

from service.backends import get_backend

magicmind = get_backend("magicmind")
ok, reason = magicmind.available()


def test_availability_names_what_is_missing():
    assert ok or "magicmind" in reason or "MLU" in reason
