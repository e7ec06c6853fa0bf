import json

import numpy as np
import onnx
import pytest
import torch

from conftest import FAST_EXPORT, cli, copy_of
from test_cli import assert_one_line_error
from ftdeploy.tasks.image import occlusion_map, validation_images
from ftdeploy.tasks.classification import calibration, expected_calibration_error

QUICK = ["--set", "report.severities=[1,5]", "--set", "report.batch_sizes=[1,4]", "--set", "report.threads=[1]",
         "--set", "report.latency_seconds=0.05", "--samples", "3"]


@pytest.fixture(scope="module")
def export_dir(tiny_export):
    return tiny_export


def test_the_identity_corruption_gives_exactly_the_clean_inputs_and_accuracy(export_dir):
    from ftdeploy.data import build_datasets
    from ftdeploy.evaluation import EvalData, onnx_predictor
    from ftdeploy.onnx_model import open_session
    from ftdeploy.rundir import load_export, load_run

    source = load_export(export_dir)
    run = load_run(source.source_run)
    images = validation_images(source.task, build_datasets(source.data, source.preprocessing), source.preprocessing, 2000)
    clean = EvalData.from_run(run, 2000, 1)
    assert np.array_equal(images.inputs("identity"), clean.inputs)  # the corruption path adds nothing
    predict = onnx_predictor(open_session(export_dir / "model.onnx", 1))
    assert images.score(source.task.outputs(predict, images.inputs("identity"), 8)).value == \
        json.loads((export_dir / "report.json").read_text())["variants"]["fp32"]["scores"]["accuracy"]
    noisy = images.inputs("gaussian_noise", 5)
    assert noisy.shape == clean.inputs.shape and not np.array_equal(noisy, clean.inputs)
    assert np.array_equal(noisy, images.inputs("gaussian_noise", 5))  # seeded: every variant sees the same images


def test_ece_is_zero_when_confidence_matches_accuracy_and_hand_computed_when_over_confident():
    probs, labels = [], []
    for confidence in (0.6, 0.7, 0.8, 0.9):  # 10 images at each confidence, right exactly that often
        right = round(10 * confidence)
        probs += [[confidence, 1 - confidence]] * 10
        labels += [0] * right + [1] * (10 - right)
    assert expected_calibration_error(np.array(probs), np.array(labels)) == pytest.approx(0, abs=1e-12)
    # over-confident: 0.95 confidence, right 6 times in 10 (bin 14), plus 0.5 confidence right 5 in 10 (bin 7)
    over = np.array([[0.95, 0.05]] * 10 + [[0.5, 0.5]] * 10)
    over_labels = np.array([0] * 6 + [1] * 4 + [0] * 5 + [1] * 5)
    assert expected_calibration_error(over, over_labels) == pytest.approx(0.5 * abs(0.6 - 0.95) + 0.5 * abs(0.5 - 0.5))


def test_temperature_scaling_repairs_over_confidence_on_held_out_images():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    logits = rng.normal(0, 1, (600, 3))
    logits[np.arange(600), labels] += 1.0  # right ~2/3 of the time ...
    record = calibration(logits * 6, labels)  # ... but with six-times inflated confidence
    assert record["temperature"] == pytest.approx(6, rel=0.25)
    assert record["ece_after_temperature"] < record["ece_held_out"] / 2


class TopLeftOnly(torch.nn.Module):
    """Sees only the top-left quadrant: its logits are ±2 x that quadrant's mean."""

    def forward(self, x):
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        m = x[:, :, :h, :w].mean((1, 2, 3))
        return torch.stack([2 * m, -2 * m], 1)


def test_saliency_of_a_model_that_sees_one_quadrant_lies_in_that_quadrant(tmp_path):
    from ftdeploy.conversion import temporary_onnx
    from ftdeploy.evaluation import onnx_predictor
    from ftdeploy.onnx_model import open_session

    x = np.ones((3, 32, 32), np.float32)
    with temporary_onnx(TopLeftOnly(), [torch.zeros(2, 3, 32, 32)]) as path:
        saliency = occlusion_map(onnx_predictor(open_session(path, 1)), x, target=0, patch=4, stride=2)
    assert saliency.shape == (15, 15)  # patch tops at 0, 2, ..., 28
    touches = np.arange(15) * 2 < 16  # patches that cover part of the top-left 16x16 quadrant
    assert saliency.min() >= -1e-6 and saliency[np.ix_(touches, touches)].min() > 0
    assert np.abs(saliency[~touches, :]).max() < 1e-6 and np.abs(saliency[:, ~touches]).max() < 1e-6


def proc_writable() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_report_fills_every_section_for_every_variant(export_dir, tmp_path):
    export_dir = copy_of(export_dir, tmp_path)  # --calibrate writes into its files
    result = cli("report", str(export_dir), "-o", str(tmp_path / "r.html"), "--calibrate", *QUICK)
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "usability.json").read_text())
    assert set(data["variants"]) == {"torch", "fp32"} and data["passed"] is True and data["budgets"] == {}
    for name, v in data["variants"].items():
        assert 0 <= v["scores"]["accuracy"] <= 1
        assert set(v["performance"]["per_class"]["class_0"]) >= {"precision", "recall", "f1"}
        assert np.asarray(v["performance"]["confusion_matrix"]).sum() == data["dataset"]["num_samples"]
        rob = v["robustness"]
        assert set(rob["by_corruption"]) == {"gaussian_noise", "blur", "brightness", "contrast", "jpeg", "rotation",
                                             "translation", "occlusion"}
        assert all(set(s) == {"1", "5"} for s in rob["by_corruption"].values())
        assert rob["drop_vs_fp32_points"] is not None and 0 <= rob["mean_corruption_metric"] <= 1
        assert set(v["calibration"]) >= {"ece", "brier", "nll", "ece_after_temperature", "temperature"}
        assert v["saliency"]["method"] == "occlusion" and len(v["saliency"]["maps"]) == 3
        assert {(r["threads"], r["batch_size"]) for r in v["latency"]["grid"]} == {(1, 1), (1, 4)}
        if proc_writable():  # the peak counter is reset through /proc/self/clear_refs
            assert v["latency"]["peak_memory_mb"] > 0
    assert data["variants"]["fp32"]["saliency"]["agreement_with_fp32"] == pytest.approx(1.0)
    assert data["variants"]["torch"]["saliency"]["agreement_with_fp32"] > 0.9  # the same model, through torch
    assert len(data["variants"]["torch"]["saliency"]["integrated_gradients"]) == 3
    html = (tmp_path / "r.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 and "http://" not in html and "https://" not in html
    # --calibrate: the fitted temperature is in the file, for ftdeploy serve, and the hashes follow
    from ftdeploy.onnx_model import model_metadata
    from ftdeploy.rundir import sha256

    meta = model_metadata(onnx.load(str(export_dir / "model.onnx")))
    assert meta["temperature"] == pytest.approx(data["variants"]["fp32"]["calibration"]["temperature"])
    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert manifest["stage"] == "report" and manifest["lineage"][-1]["stage"] == "export"
    assert manifest["files"]["model.onnx"]["sha256"] == sha256(export_dir / "model.onnx")


@pytest.mark.slow
def test_compare_adds_the_variants_of_another_export_directory_and_never_writes_to_it(export_dir, tmp_path):
    """--calibrate stores temperatures in the reported directory's files only: a --compare directory
    is read, its files and manifest hashes left as they were."""
    from ftdeploy.config import ExportConfig, ReportConfig
    from ftdeploy.export import export
    from ftdeploy.rundir import load_export, sha256
    from ftdeploy.usability import report

    mine = copy_of(export_dir, tmp_path)
    other = export(load_export(export_dir).source_run, tmp_path / "again" / "export", ExportConfig(**FAST_EXPORT))
    before = {p.name: sha256(p) for p in other.iterdir()}
    out = report(mine, ReportConfig(output=tmp_path / "r.html", compare=[other], severities=[3], batch_sizes=[1],
                                    threads=[1], latency_seconds=0.05, samples=2, corruptions=["blur"], calibrate=True,
                                    peak_memory=False))
    data = json.loads(out.with_name("usability.json").read_text())
    assert list(data["variants"]) == ["torch", "fp32", "again/fp32"]
    assert data["variants"]["again/fp32"]["scores"] == data["variants"]["fp32"]["scores"]  # the same model
    assert data["variants"]["fp32"]["calibration"]["temperature_stored"]
    assert "temperature_stored" not in data["variants"]["again/fp32"]["calibration"]
    assert {p.name: sha256(p) for p in other.iterdir()} == before
    manifest = json.loads((mine / "manifest.json").read_text())
    assert manifest["files"]["model.onnx"]["sha256"] == sha256(mine / "model.onnx")  # rewritten, hashed again


@pytest.mark.slow
def test_strict_with_an_impossible_budget_exits_2_and_writes_both_files(export_dir, tmp_path):
    result = cli("report", str(export_dir), "-o", str(tmp_path / "r.html"), "--strict",
                     "--set", "report.max_p99_ms=0.000001", "--set", "report.min_accuracy=0.0", *QUICK,
                     "--set", "report.severities=[1]", "--set", "report.corruptions=[blur]", "--samples", "1",
                     "--set", "report.peak_memory=false")
    assert result.returncode == 2
    assert (tmp_path / "r.html").is_file()
    data = json.loads((tmp_path / "usability.json").read_text())
    assert data["passed"] is False
    # min_accuracy is the old name of min_metric: still accepted
    assert data["budgets"]["max_p99_ms:fp32"]["passed"] is False and data["budgets"]["min_metric:fp32"]["passed"]
    assert "max p99 ms" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args,fragments", [
    (["/nonexistent/export"], ["export directory '/nonexistent/export' does not exist"]),
    (["EXPORT", "--severities", "0,9"], ["severities must lie in 1..5"]),
    (["EXPORT", "--set", "report.corruptions=[fog]"], ["unknown corruption 'fog'", "gaussian_noise"]),
    (["EXPORT", "--set", "report.max_eec=0.1"], ["unknown key 'report.max_eec'", "max_ece"]),
])
@pytest.mark.slow
def test_a_bad_path_or_flag_gets_one_line(export_dir, args, fragments):
    assert_one_line_error(cli("report", *[a.replace("EXPORT", str(export_dir)) for a in args]), *fragments)
