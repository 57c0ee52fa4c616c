"""The test cache stays bounded: ``prune_cache`` keeps the newest generations of each kind."""

from __future__ import annotations

import os
import time

from conftest import STALE_BUILD_S, prune_cache


def _entry(folder, name, age_s, is_dir=True):
    path = folder / name
    if is_dir:
        path.mkdir()
        (path / "model.onnx").write_bytes(b"x")
    else:
        path.write_bytes(b"x")
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_keeps_newest_generations_of_each_kind(tmp_path):
    keys = ["0123456789abcdef", "fedcba9876543210", "00000000ffffffff"]
    exports = [_entry(tmp_path, f"export-b1-s0.0-seed0-{k}", age) for k, age in zip(keys, (30, 10, 20))]
    checkpoints = [_entry(tmp_path, f"checkpoint-r101-{k}.pth", age, is_dir=False)
                   for k, age in zip(keys, (5, 50, 40))]
    single = _entry(tmp_path, "artifact-b2-fp32-0123456789abcdef", 999)
    photos = _entry(tmp_path, "photos", 999)
    removed = prune_cache(tmp_path, keep=2)
    assert sorted(removed) == sorted([exports[0], checkpoints[1]])
    assert not exports[0].exists() and not checkpoints[1].exists()
    assert all(p.exists() for p in (exports[1], exports[2], checkpoints[0], checkpoints[2], single, photos))


def test_half_built_folders_go_only_when_stale_and_orphaned(tmp_path):
    dead_pid = 2 ** 22 + 17  # above the kernel's pid_max default: never a live process
    orphan = _entry(tmp_path, f"export-b1-s0.0-seed0-0123456789abcdef.tmp{dead_pid}", STALE_BUILD_S + 60)
    fresh = _entry(tmp_path, f"export-b1-s0.0-seed0-fedcba9876543210.tmp{dead_pid}", 60)
    mine = _entry(tmp_path, f"export-b2-s0.0-seed0-fedcba9876543210.tmp{os.getpid()}", STALE_BUILD_S + 60)
    assert prune_cache(tmp_path) == [orphan]
    assert fresh.exists() and mine.exists()


def test_missing_folder_is_fine(tmp_path):
    assert prune_cache(tmp_path / "absent") == []
