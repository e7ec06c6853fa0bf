"""Every record the stages write is typed and versioned, and what earlier versions wrote still
loads: tests/data/schema0/ holds a run (with its export, INT8 file and usability report) and an
optimize search's records, written by ftdeploy before records were typed (schema 0)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, cli

OLD = REPO / "tests" / "data" / "schema0"


@pytest.fixture(scope="module")
def old_run(tmp_path_factory) -> Path:
    """A copy of the old run directory (commands below write into it)."""
    return Path(shutil.copytree(OLD / "run", tmp_path_factory.mktemp("schema0") / "run"))


def test_an_old_run_and_export_directory_load_with_their_figures(old_run):
    from ftdeploy.rundir import load_export, load_run

    before_metrics = json.loads((OLD / "run" / "metrics.json").read_text())
    before = json.loads((OLD / "run" / "export" / "report.json").read_text())
    assert "schema_version" not in before  # written before records were typed
    run = load_run(old_run)
    assert run.metrics.schema_version == 1 and run.metrics.metric == "accuracy"
    assert run.metrics.val_metric == before_metrics["val_accuracy"] == run.metrics.val_scores["accuracy"]
    assert run.metrics.train_items_per_second == before_metrics["train_images_per_second"]
    report = load_export(old_run / "export").report
    fp32, int8 = report.variants["fp32"], report.variants["int8"]
    assert fp32.scores == {"accuracy": before["variants"]["fp32"]["accuracy"]}
    assert fp32.parity.decision == "top-1" and fp32.parity.passed
    assert fp32.parity.decision_agreement == before["variants"]["fp32"]["parity"]["top1_agreement"]
    assert int8.parity is None and int8.agreement["decision_agreement"] == before["variants"]["int8"]["parity"]["top1_agreement"]
    q = report.quantization
    assert q.max_metric_drop == before["quantization"]["max_accuracy_drop"]
    assert q.tried[0].metric_value == before["quantization"]["tried"][0]["accuracy"]


def test_the_old_records_of_every_kind_load():
    from ftdeploy.records import ParetoRecord, PointsRecord, PruneRecord, UsabilityRecord, load_record

    usability = load_record(UsabilityRecord, OLD / "run" / "export" / "usability.json")
    old = json.loads((OLD / "run" / "export" / "usability.json").read_text())["variants"]["fp32"]
    fp32 = usability.variants["fp32"]
    assert fp32.scores == {"accuracy": old["accuracy"]} and fp32.performance["macro_f1"] == old["macro_f1"]
    assert fp32.robustness.mean_corruption_metric == old["robustness"]["mean_corruption_accuracy"]
    pareto = load_record(ParetoRecord, OLD / "optimize" / "pareto.json")
    assert pareto.chosen is not None and pareto.test.metric_value == json.loads(
        (OLD / "optimize" / "pareto.json").read_text())["test"]["accuracy"]
    assert {p.level for p in load_record(PointsRecord, OLD / "optimize" / "points.json").points} == {1.0, 0.5}
    prune = load_record(PruneRecord, OLD / "optimize" / "prune_report.json")
    assert prune.before.scores["accuracy"] >= 0 and prune.metric_drop_points is not None


def test_a_record_from_a_newer_version_is_refused_saying_so(tmp_path):
    from ftdeploy.errors import RunDirError
    from ftdeploy.records import TrainMetrics, load_record

    (tmp_path / "metrics.json").write_text(json.dumps({"schema_version": 99, "metric": "accuracy"}))
    with pytest.raises(RunDirError, match="written by a newer ftdeploy"):
        load_record(TrainMetrics, tmp_path / "metrics.json")


@pytest.mark.slow
def test_the_stages_work_on_an_old_export_and_write_versioned_records(old_run, tmp_path):
    """quantize and report on the old export directory, and the server on its old files."""
    from ftdeploy.onnx_model import OnnxModel
    from ftdeploy.serve import create_app
    from test_serve import InProcess, png

    export_dir = old_run / "export"
    result = cli("quantize", str(export_dir), "-o", str(tmp_path / "q"), "--set", "quantize.search=off",
                 "--set", "quantize.latency_seconds=0.05", "--set", "quantize.min_speedup=1.0")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["schema_version"] == 1 and report["metric"] == "accuracy" and "scores" in report["variants"]["fp32"]
    result = cli("report", str(export_dir), "-o", str(tmp_path / "r.html"), "--severities", "1", "--samples", "1",
                 "--set", "report.batch_sizes=[1]", "--set", "report.threads=[1]", "--set", "report.peak_memory=false",
                 "--set", "report.latency_seconds=0.05", "--set", "report.corruptions=[blur]")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "usability.json").read_text())["schema_version"] == 1
    server = InProcess(create_app(export_dir / "model.int8.onnx", threads=1))
    try:
        answer = server.post("/v1/predict", files={"f": ("a.png", png(3), "image/png")})
    finally:
        server.close()
    model = OnnxModel(export_dir / "model.int8.onnx", threads=1)
    from PIL import Image
    import io

    expected = model.predict([Image.open(io.BytesIO(png(3)))])[0]
    top = answer.json()["predictions"][0]["top_k"][0]
    assert top["index"] == int(np.argmax(expected)) and top["probability"] == pytest.approx(expected.max(), abs=1e-5)
