"""The code that makes an engine, for benchmarks that cache exports and engines between runs.

An export or engine kept in a benchmark's cache is reused only while these files are unchanged: a
change to the model, the exporter or a backend's build makes a new cache entry, never a stale hit.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Files whose change makes a cached export or engine stale.
BUILD_SOURCES = ("build_tools/**/*.py", "service/backends/**/*.py", "service/manifest.py")


def build_source_files(root: Path = ROOT) -> list[Path]:
    """The files of :data:`BUILD_SOURCES` under ``root``, sorted."""
    return sorted({p for pattern in BUILD_SOURCES for p in root.glob(pattern)})


def build_sources_digest(root: Path = ROOT) -> str:
    """16 hex digits of the names (relative to ``root``) and bytes of :func:`build_source_files`."""
    digest = hashlib.sha256()
    for path in build_source_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]
