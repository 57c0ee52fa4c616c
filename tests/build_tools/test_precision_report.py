"""The precision report of a build (AP points lost and time per image against eager fp32),
``--backend auto`` measured on this machine or (``--no-measure``) read from
build_tools/backend_choice.json, several precisions per ``all``, and
the per backend/precision table of scripts/bench/build.py. Real exports and engines throughout
(the cached random-init R50-FPN of tests/conftest.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT, openvino_has_bf16

from build_tools import cli
from build_tools.backend_choice import BACKEND_CHOICE, MEASURE_WARMUP, LabelledImages, resolve_backend
from build_tools.errors import BuildError
from build_tools.images import read_rgb
from build_tools.pipeline import compile_step
from service.backends import backend_names, get_backend
from service.manifest import Manifest

openvino = get_backend("openvino")
OPENVINO_OK, OPENVINO_WHY = openvino.available()


def write_table(path, choice: dict) -> str:
    path.write_text(json.dumps({"measured": {"quality": "test", "date": "today", "cpu": {}}, "choice": choice}))
    return str(path)


def test_fp32_manifest_records_timing_and_ap_delta(engine_dir):
    parity = Manifest.load(engine_dir).parity
    timing = parity.timing
    assert timing.eager_s_per_image > 0 and timing.engine_s_per_image > 0
    assert timing.ratio_to_eager == pytest.approx(timing.engine_s_per_image / timing.eager_s_per_image)
    assert timing.engine_with_postprocess_s_per_image >= timing.engine_s_per_image
    assert timing.images == 1 and timing.batch_size == 1 and timing.threads >= 1
    delta = parity.ap_delta_points
    assert delta.box == pytest.approx(100 * (1 - parity.box_ap))
    assert delta.mask == pytest.approx(100 * (1 - parity.mask_ap))
    # fp32 reproduces eager: the fp32 tolerance (AP >= 0.95) bounds the loss at 5 points
    assert 0 <= delta.box <= 5 and 0 <= delta.mask <= 5


@pytest.mark.skipif(not OPENVINO_OK, reason=f"needs two fp32 backends: {OPENVINO_WHY}")
def test_backend_auto_measures_the_fp32_engines_here_and_keeps_the_fastest(export_dir, tmp_path, capsys):
    manifest = compile_step(export_dir, tmp_path / "eng", backend="auto", run_verify=False, measure_rounds=2)
    choice = manifest.tools.backend_choice
    assert choice.how == "measured" and choice.requested == "auto" and choice.rounds == 2
    assert choice.warmup == MEASURE_WARMUP and choice.input_hw == manifest.shape_profile.opt_hw
    assert choice.cpu["cores"] >= 1 and choice.cpu["model"]
    timed = {(c.backend, c.precision): c for c in choice.candidates}
    # without labelled images only fp32 engines are candidates: reduced precision is never chosen
    assert set(timed) == {("onnxruntime", "fp32"), ("openvino", "fp32")} and choice.ap_images is None
    for c in timed.values():
        assert len(c.seconds) == 2 and all(s > 0 for s in c.seconds)
        assert c.median_s == pytest.approx(sum(c.seconds) / 2)
        assert c.box_ap_delta_points is None
        assert f"{c.backend} fp32 {c.median_s:.3f} s" in choice.why  # why names every measured time
    fastest = min(timed.values(), key=lambda c: c.median_s)
    assert (manifest.backend, manifest.precision) == (fastest.backend, "fp32") == (choice.chosen, choice.precision)
    assert choice.why.startswith("fastest measured on this CPU (") and "tensorrt" in choice.why
    assert f"--backend auto chose {fastest.backend} fp32: fastest measured" in capsys.readouterr().err
    assert Manifest.load(tmp_path / "eng").tools.backend_choice == choice  # the record survives a reload
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]  # the other candidate's folder is gone


@pytest.mark.skipif(not openvino_has_bf16(), reason="needs openvino on a CPU with bf16")
def test_backend_auto_lowers_the_precision_only_within_the_ap_bound_on_labelled_images(export_dir, photos, tmp_path):
    h, w = read_rgb(photos / "coffee.png").shape[:2]
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "coffee.png", "height": h, "width": w}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [100, 80, 200, 160], "area": 32000,
                         "iscrowd": 0, "segmentation": [[100, 80, 300, 80, 300, 240, 100, 240]]}],
        "categories": [{"id": 1, "name": "person"}],
    }))
    manifest = compile_step(export_dir, tmp_path / "eng", backend="auto", run_verify=False, measure_rounds=1,
                            labelled=LabelledImages(ann, photos))
    choice = manifest.tools.backend_choice
    timed = {(c.backend, c.precision): c for c in choice.candidates}
    assert {("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")} <= set(timed)
    fp32 = min((c for c in timed.values() if c.precision == "fp32"), key=lambda c: c.median_s)
    bf16 = timed["openvino", "bf16"]
    if bf16.median_s < fp32.median_s:  # judged on the labelled image; random weights lose no AP there
        assert choice.ap_images == 1 and bf16.box_ap_delta_points is not None
        assert "openvino bf16 loses box" in choice.why and "within it" in choice.why
        assert (manifest.backend, manifest.precision) == ("openvino", "bf16")
    else:
        assert (manifest.backend, manifest.precision) == (fp32.backend, "fp32")


def test_verify_ann_is_refused_where_it_cannot_lower_the_precision(export_dir, tmp_path, capsys):
    code = cli.main(["compile", str(export_dir), "--out", str(tmp_path / "eng"), "--backend", "onnxruntime",
                     "--verify-ann", str(tmp_path / "ann.json"), "--no-verify"])
    assert code == 2 and "--verify-ann lets --backend auto" in capsys.readouterr().err
    assert not (tmp_path / "eng").exists()


def test_backend_auto_resolves_through_the_table(export_dir, tmp_path, capsys):
    table = write_table(tmp_path / "choice.json", {
        "fp32": {"backend": "onnxruntime", "why": "onnxruntime 0.61x eager < openvino 0.70x eager"},
        "bf16": {"backend": "openvino", "why": "only openvino offers bf16"},
    })
    assert resolve_backend("openvino", "fp32", table) == ("openvino", None)  # a named backend is taken as is
    name, record = resolve_backend("auto", "force_float32", table)
    assert name == "onnxruntime"
    assert record.requested == "auto" and record.chosen == "onnxruntime"
    assert record.why.startswith("onnxruntime 0.61x eager < openvino 0.70x eager; note: ")
    assert record.measured.quality == "test"
    if OPENVINO_OK:
        assert resolve_backend("auto", "bf16", table)[0] == "openvino"
    # a precision the table has no measurement for: the first available backend offering it
    name, record = resolve_backend("auto", "int8", table)
    assert name == "onnxruntime" and "no measurement for int8" in record.why

    code = cli.main(["compile", str(export_dir), "--out", str(tmp_path / "eng"), "--backend", "auto", "--no-measure",
                     "--backend-choice", table, "--no-verify"])
    printed = capsys.readouterr()
    out = printed.out
    assert code == 0
    # the table's CPU ({}: unknown) is not this one: the choice is followed, with a note saying so
    assert "--backend auto chose onnxruntime fp32: onnxruntime 0.61x eager" in printed.err
    assert "was measured on another kind of CPU (unknown CPU; this one: " in printed.err
    manifest = Manifest.load(tmp_path / "eng")  # one precision: the folder named by --out, as before
    choice = manifest.tools.backend_choice
    assert manifest.backend == "onnxruntime"
    assert (choice.requested, choice.how, choice.chosen, choice.same_cpu_kind) == ("auto", "table", "onnxruntime", False)
    assert choice.table == table and choice.measured.quality == "test" and not choice.candidates
    assert "0.61x eager" in choice.why
    assert "backend auto -> onnxruntime fp32: onnxruntime 0.61x eager" in out
    assert "report: onnxruntime fp32: not verified" in out


def test_backend_auto_falls_back_when_the_chosen_backend_is_missing(export_dir, tmp_path, monkeypatch):
    table = write_table(tmp_path / "choice.json", {
        "fp32": {"backend": "openvino", "why": "openvino 0.40x eager", "ranking": ["openvino", "onnxruntime"]},
        "bf16": {"backend": "openvino", "why": "only openvino offers bf16"},
    })
    monkeypatch.setattr(openvino, "available", lambda: (False, "openvino is not installed (test)"))
    manifest = compile_step(export_dir, tmp_path / "eng", backend="auto", precision="fp32", run_verify=False,
                            choice_table=table, measure_rounds=0)
    choice = manifest.tools.backend_choice
    assert manifest.backend == "onnxruntime" and choice.chosen == "onnxruntime"
    assert "fell back to onnxruntime" in choice.why and "openvino is not available" in choice.why
    assert Manifest.load(tmp_path / "eng").tools.backend_choice == choice
    others = [n for n in backend_names() if n != "openvino" and "bf16" in get_backend(n).PRECISIONS
              and get_backend(n).available()[0]]
    if not others:
        with pytest.raises(BuildError, match="no available backend offers bf16"):
            resolve_backend("auto", "bf16", table)


def test_checked_in_backend_choice_table_is_honest_and_resolves():
    table = json.loads(BACKEND_CHOICE.read_text())
    measured = table["measured"]
    assert measured["quality"] in ("smoke", "full")
    assert {"date", "command", "cpu"} <= set(measured) and "scripts.bench.build" in measured["command"]
    for precision, entry in table["choice"].items():
        assert entry["backend"] in backend_names() and entry["why"]
        assert precision in get_backend(entry["backend"]).PRECISIONS
    name, record = resolve_backend("auto", "fp32")
    assert name in backend_names() and record.requested == "auto"


def test_choice_keeps_precisions_within_their_ap_bound():
    from build_tools.backend_choice import choose_backends

    rows = [
        {"kind": "engine", "backend": "openvino", "precision": "int8", "median_s": 1.0, "ratio_to_eager": 0.3,
         "box_ap_delta_points": 1.6, "mask_ap_delta_points": 0.9},
        {"kind": "engine", "backend": "onnxruntime", "precision": "int8", "median_s": 1.5, "ratio_to_eager": 0.45,
         "box_ap_delta_points": 0.6, "mask_ap_delta_points": 0.7},
        {"kind": "engine", "backend": "onnxruntime", "precision": "fp32", "median_s": 3.0, "ratio_to_eager": 0.9,
         "box_ap_delta_points": None, "mask_ap_delta_points": None},
        {"kind": "engine", "backend": "openvino", "precision": "fp32", "median_s": 2.0, "ratio_to_eager": 0.6,
         "box_ap_delta_points": None, "mask_ap_delta_points": None},
    ]
    choice = choose_backends(rows).choice
    assert choice["int8"].backend == "onnxruntime" and "openvino (AP delta box 1.60" in choice["int8"].why
    assert choice["fp32"].backend == "openvino" and choice["fp32"].ranking == ["openvino", "onnxruntime"]
    assert "0.60x eager" in choice["fp32"].why
    assert choose_backends(rows, ap_bounds={}).choice["int8"].backend == "openvino"


@pytest.mark.skipif(not openvino_has_bf16(), reason="needs openvino on a CPU with bf16")
def test_all_with_two_precisions_writes_two_artifacts_and_a_table(photos, tmp_path, capsys):
    table = write_table(tmp_path / "choice.json", {
        "fp32": {"backend": "onnxruntime", "why": "measured for the test"},
        "bf16": {"backend": "openvino", "why": "only openvino offers bf16"},
    })
    out = tmp_path / "out"
    code = cli.main(["all", "--random-init", "--score-threshold", "0", "--out", str(out), "--backend", "auto",
                     "--no-measure", "--backend-choice", table, "--precision", "fp32", "--precision", "bf16",
                     "--verify-images", str(photos), "--verify-count", "1", "--allow-parity-failure"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    ort, ov = Manifest.load(out / "onnxruntime-fp32"), Manifest.load(out / "openvino-bf16")
    assert (ort.backend, ort.precision, ov.backend, ov.precision) == ("onnxruntime", "fp32", "openvino", "bf16")
    assert ort.tools.backend_choice.chosen == "onnxruntime" and ov.tools.backend_choice.chosen == "openvino"
    for manifest in (ort, ov):
        assert manifest.parity.timing.engine_s_per_image > 0
        assert manifest.parity.ap_delta_points.box is not None
    assert ort.parity.passed
    lines = printed.splitlines()
    assert sum(line.startswith("report: ") for line in lines) == 2
    assert any("only 1 verify image" in line for line in lines)  # the header says how few images timed it
    header = next(i for i, line in enumerate(lines) if line.startswith("backend ") and "speedup" in line)
    rows = [line.split() for line in lines[header + 1:header + 3]]
    assert [r[:2] for r in rows] == [["onnxruntime", "fp32"], ["openvino", "bf16"]]
    for r in rows:
        engine_s, eager_s, speedup = float(r[4]), float(r[5]), float(r[6].rstrip("x"))
        assert speedup == pytest.approx(eager_s / engine_s, rel=0.02, abs=0.01)


def test_bench_build_rows_per_backend_and_precision(export_dir, photos, tmp_path):
    # benchmarks are leaves: run as their users run them, never imported
    gt_data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "scripts.demo.data", "--out", str(gt_data), "--train", "0", "--val", "1",
                    "--objects-per-image", "3"], cwd=ROOT, check=True, capture_output=True)
    rows_path, choice_path = tmp_path / "rows.json", tmp_path / "choice.json"
    bench = subprocess.run([
        sys.executable, "-m", "scripts.bench.build",
        "--export", str(export_dir), "--backends", "onnxruntime", "--precisions", "fp32,fp16",
        "--iterations", "1", "--warmup", "0", "--no-stock", "--artifacts", str(tmp_path / "cache"),
        "--ap-images", str(photos), "--ap-count", "1", "--image", str(photos / "coffee.png"),
        "--gt-data", str(gt_data), "--gt-limit", "1",
        "--json", str(rows_path), "--write-choice", str(choice_path),
    ], cwd=ROOT, capture_output=True, text=True)
    assert bench.returncode == 0, bench.stderr[-3000:]
    rows = {(r["backend"], r["precision"]): r for r in json.loads(rows_path.read_text())}
    assert set(rows) == {("pytorch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16")}
    fields = {"engine", "backend", "precision", "artifact", "median_s", "infer_median_s", "ratio_to_eager",
              "box_ap_delta_points", "mask_ap_delta_points", "ap_images", "skipped"}
    ort = rows["onnxruntime", "fp32"]
    assert fields <= set(ort) and ort["skipped"] is None
    assert ort["median_s"] > 0 and 0 < ort["infer_median_s"] <= ort["median_s"]
    assert ort["ratio_to_eager"] == pytest.approx(ort["median_s"] / rows["pytorch", "fp32"]["median_s"])
    assert rows["pytorch", "fp32"]["ratio_to_eager"] == 1.0
    assert ort["ap_images"] == 1 and math.isfinite(ort["box_ap_delta_points"])
    # ground truth: eager and engine scored by pycocotools on the same image; the delta is their difference
    eager = rows["pytorch", "fp32"]
    assert eager["gt_box_ap_delta_points"] == 0.0 and 0 <= ort["gt_box_ap"] <= 100
    assert ort["gt_box_ap_delta_points"] == pytest.approx(eager["gt_box_ap"] - ort["gt_box_ap"])
    assert ort["gt_mask_ap_delta_points"] == pytest.approx(eager["gt_mask_ap"] - ort["gt_mask_ap"])
    assert (tmp_path / "cache").is_dir() and Manifest.load(ort["artifact"]).precision == "fp32"
    assert rows["onnxruntime", "fp16"]["median_s"] is None and "offers" in rows["onnxruntime", "fp16"]["skipped"]

    table = json.loads(choice_path.read_text())
    assert table["measured"]["quality"] == "smoke" and table["measured"]["input_hw"] == [800, 1333]
    assert table["choice"]["fp32"]["backend"] == "onnxruntime" and "x eager" in table["choice"]["fp32"]["why"]
    assert resolve_backend("auto", "fp32", choice_path)[0] == "onnxruntime"
