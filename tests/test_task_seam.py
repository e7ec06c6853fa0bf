"""A new kind of output enters without a stage edit: a task that is not a classifier (tests/toytask.py:
a variable number of points per input, judged by a metric of its own), registered here, runs through
train, export (parity), quantize, the usability report, optimize and the server. No module of
ftdeploy/ knows it: it reaches them through the registries alone."""

import json

import numpy as np
import pytest

import toytask
from test_serve import InProcess


@pytest.fixture(scope="module")
def toy():
    toytask.register()
    yield
    toytask.unregister()


def toy_config(out, *overrides):
    from ftdeploy.config import load_config

    return load_config(None, ["task=toy_peaks", "data.name=toy_peaks", "data.num_samples=200", "data.val_fraction=0.3",
                              "data.test_fraction=0.3", "data.batch_size=16", "model.name=toy:peaks",
                              "model.weights=none", "train.epochs=10", "train.lr=0.01", "train.warmup_epochs=0",
                              "train.progress=false", "train.checkpoint=false", f"output_dir={out}", *overrides])


@pytest.mark.slow
def test_a_task_that_is_not_a_classifier_runs_through_every_stage(toy, tmp_path):
    from ftdeploy.config import ExportConfig, OptimizeConfig, QuantizeConfig, ReportConfig
    from ftdeploy.export import export
    from ftdeploy.onnx_model import OnnxModel
    from ftdeploy.optimize import optimize
    from ftdeploy.quantize import quantize
    from ftdeploy.serve import create_app
    from ftdeploy.train import train
    from ftdeploy.usability import report

    run = train(toy_config(tmp_path / "run"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["metric"], metrics["unit"]) == ("point_f1", "signals")
    assert metrics["val_metric"] > 0.6 and set(metrics["val_scores"]) == {"point_f1", "precision", "recall"}

    fast = {"exporter": "torchscript", "batch_sizes": [1, 4], "latency_seconds": 0.05}
    export_dir = export(run, tmp_path / "export", ExportConfig(**fast))
    exported = json.loads((export_dir / "report.json").read_text())
    parity = exported["variants"]["fp32"]["parity"]
    assert exported["metric"] == "point_f1" and parity["passed"] and parity["decision"] == "peaks"
    assert parity["decisions_compared"] == 2 * 42 * toytask.LENGTH  # every sample, at batch sizes 1 and 7
    assert exported["variants"]["fp32"]["scores"] == exported["variants"]["torch"]["scores"]

    quantize(export_dir, None, QuantizeConfig(search="off", latency_seconds=0.05, max_metric_drop=50))
    q = json.loads((export_dir / "report.json").read_text())["quantization"]
    assert q["metric"] == "point_f1" and q["tried"][0]["metric_value"] is not None

    html = report(export_dir, ReportConfig(severities=[1, 3], batch_sizes=[1], latency_seconds=0.05, samples=2,
                                           peak_memory=False, min_metric=0.0))
    usability = json.loads(html.with_name("usability.json").read_text())
    assert usability["metric"] == "point_f1" and usability["passed"]
    assert {"torch", "fp32"} <= set(usability["variants"])
    for v in usability["variants"].values():
        assert set(v["robustness"]["by_corruption"]) == {"noise"} and "ece" in v["calibration"]
        assert len(v["saliency"]["maps"]) == 2
    assert "Peaks found" in html.read_text() and "point_f1" in html.read_text()

    opt = optimize(run, tmp_path / "opt", OptimizeConfig(levels=[0.5], finetune_epochs=1, latency_seconds=0.05,
                                                         max_metric_drop=50, export=ExportConfig(**fast),
                                                         quantize=QuantizeConfig(search="off", latency_seconds=0.05)))
    pareto = json.loads((opt / "pareto.json").read_text())
    assert pareto["metric"] == "point_f1" and {p["level"] for p in pareto["points"]} == {1.0, 0.5}
    assert pareto["chosen"] is not None and pareto["test"]["samples"] == 18  # 0.3 of the 60 validation signals

    model = OnnxModel(export_dir / "model.onnx", threads=1)
    signals = [toytask.make_signals(3, seed=7).raw(i) for i in range(3)]
    server = InProcess(create_app(export_dir / "model.onnx", threads=1))
    try:
        answer = server.post("/v1/predict", json={"signals": [s.tolist() for s in signals]})
        strict = server.post("/v1/predict?threshold=0.95", json={"signals": [s.tolist() for s in signals]})
        bad = server.post("/v1/predict", json={"signals": [[0.0] * 5]})
        bad_param = server.post("/v1/predict?threshold=2", json={"signals": [signals[0].tolist()]})
    finally:
        server.close()
    assert answer.status_code == 200, answer.text
    expected = model.task.codec.answer(model, signals)
    assert [[p["position"] for p in found] for found in answer.json()["points"]] == \
        [[p["position"] for p in found] for found in expected["points"]]
    assert np.allclose([p["score"] for found in answer.json()["points"] for p in found],
                       [p["score"] for found in expected["points"] for p in found], atol=1e-5)
    assert sum(map(len, strict.json()["points"])) <= sum(map(len, answer.json()["points"]))
    assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_signal")
    assert (bad_param.status_code, bad_param.json()["error"]["code"]) == (422, "invalid_parameter")
