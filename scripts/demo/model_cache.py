"""The demo model's cache: a trained checkpoint is reused while the code and data that made it are unchanged.

Training the demo model takes most of an hour on CPU, and every fidelity figure is measured with
it, so ``maskrcnn-demo train`` writes, next to its checkpoint ``X.pth``, a record ``X.cache.json``
holding the cache key of the run and what it was computed from. A later ``train`` to the same
``X.pth`` recomputes the key and, when it equals the recorded one, returns at once.

The key is the sha256 of (as canonical JSON):

- the bytes of the files whose code decides the model (``CODE_FILES``: the data generator, the
  trainer, and the model), by path relative to the repository root;
- the training split's annotation ``info`` (seed and generation settings, written by
  ``scripts.demo.data``), its categories and its image count;
- the training settings (``TrainSettings`` as a dict: iterations, minutes, learning rate, ...).

A change to any of them is a new key, so a stale checkpoint is never taken for a matching one.
What the key cannot see is the machine: a run bounded by ``minutes`` takes fewer steps on a slower
or busier machine, so two matching checkpoints may differ; the record gives the steps and seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
CODE_FILES: tuple[str, ...] = ("scripts/demo/data.py", "scripts/demo/train.py", "build_tools/model.py")


class CacheRecordError(Exception):
    """A cache record that exists but cannot be read (not JSON, or without a key)."""


def record_path_for(checkpoint: str | Path) -> Path:
    """Where the cache record of ``checkpoint`` lives: ``<stem>.cache.json`` beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".cache.json")


def code_digests(root: Path = REPO_ROOT) -> dict[str, str]:
    """sha256 hex digest of each of ``CODE_FILES`` under ``root``, by relative path."""
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in CODE_FILES}


def key_inputs(dataset: Mapping[str, Any], settings: Mapping[str, Any], root: Path = REPO_ROOT) -> dict[str, Any]:
    """What the key is computed from: the code digests, ``dataset``'s (a COCO annotation file's
    content, the training split) info, categories and image count, and the training ``settings``."""
    return {
        "code": code_digests(root),
        "data": {
            "info": dataset.get("info", {}),
            "categories": dataset.get("categories", []),
            "images": len(dataset.get("images", [])),
        },
        "settings": dict(settings),
    }


def cache_key(dataset: Mapping[str, Any], settings: Mapping[str, Any], root: Path = REPO_ROOT) -> str:
    """The cache key (64 hex digits) of a run on ``dataset`` with ``settings`` (see :func:`key_inputs`)."""
    canonical = json.dumps(key_inputs(dataset, settings, root), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def write_record(checkpoint: str | Path, key: str, **facts: Any) -> Path:
    """Record ``key`` (and ``facts``: iterations, seconds, final losses) as ``checkpoint``'s cache
    record, atomically."""
    path = record_path_for(checkpoint)
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps({"key": key, "code_files": list(CODE_FILES), **facts}, indent=1, sort_keys=True),
                       encoding="utf-8")
    os.replace(partial, path)
    return path


def read_record(checkpoint: str | Path) -> dict[str, Any]:
    """The cache record of ``checkpoint``.

    Raises:
        FileNotFoundError: there is none.
        CacheRecordError: it is not a JSON object with a ``key``.
    """
    path = record_path_for(checkpoint)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CacheRecordError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(record, dict) or not isinstance(record.get("key"), str):
        raise CacheRecordError(f"{path} records no cache key")
    return record


def matches(checkpoint: str | Path, key: str) -> bool:
    """Whether ``checkpoint`` exists and its cache record holds ``key`` (an unreadable record does not)."""
    if not Path(checkpoint).is_file():
        return False
    try:
        return read_record(checkpoint)["key"] == key
    except (FileNotFoundError, CacheRecordError):
        return False
