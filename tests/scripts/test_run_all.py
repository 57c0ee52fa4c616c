"""scripts/run_all.sh end to end, as small as it gets: random-init weights, two val images, the
ONNX Runtime fp32 engine only, one perf iteration. The fp32 engine must score what eager PyTorch
scores through the endpoint. Minutes on 2 cores: the build exports the full R50-FPN."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from scripts.demo.data import write_dataset

ROOT = Path(__file__).resolve().parents[2]


def table_rows(summary: str) -> dict[str, dict[str, str]]:
    """The summary's markdown table as ``{model: {column: cell}}``."""
    lines = [line for line in summary.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = ([cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:])
    return {cells[0]: dict(zip(header, cells)) for cells in rows}


@pytest.mark.slow
def test_run_all_with_a_random_init_fp32_engine(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    write_dataset(data, train_images=1, val_images=2, seed=0, progress=False)
    env = {**os.environ, "CHECKPOINT": "random-init", "DATA": str(data), "OUT": str(out),
           "ENGINES": "onnxruntime:fp32", "VERIFY_COUNT": "1", "CALIB_COUNT": "1", "PERF_ITERATIONS": "1",
           "LIMIT": "2"}
    run = subprocess.run(["bash", str(ROOT / "scripts/run_all.sh")], env=env, capture_output=True, text=True,
                         timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    run_dir = out / "random-init"
    summary = (run_dir / "val-2" / "summary.md").read_text()
    assert summary in run.stdout
    rows = table_rows(summary)
    assert set(rows) == {"eager", "onnxruntime fp32"}
    engine = rows["onnxruntime fp32"]
    assert engine["box AP"] == rows["eager"]["box AP"] and engine["mask AP"] == rows["eager"]["mask AP"]
    assert f"{abs(float(engine['d box AP'])):.4f}" == "0.0000" and f"{abs(float(engine['d mask AP'])):.4f}" == "0.0000"
    assert float(engine["service img/s"]) > 0 and float(engine["engine img/s"]) > 0
    # every file of the engine is named by its backend and precision
    for name in ("engine-onnxruntime-fp32/manifest.json", "perf-onnxruntime-fp32.json",
                 "val-2/eval-onnxruntime-fp32.summary.json", "val-2/serve-onnxruntime-fp32.log"):
        assert (run_dir / name).exists(), name
