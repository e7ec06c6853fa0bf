import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import FAST_EXPORT, REPO, make_run, run_cli
from ftdeploy.config import ExportConfig
from ftdeploy.errors import ExportError
from ftdeploy.conversion import export_onnx
from ftdeploy.export import export


@pytest.mark.parametrize("model", ["torchvision:resnet18", "torchvision:mobilenet_v3_small",
                                   "torchvision:efficientnet_b0", "timm:efficientnet_lite0"])
@pytest.mark.slow
def test_export_keeps_parity_with_pytorch(tmp_path, model):
    run = make_run(tmp_path / "run", model)
    out = export(run, tmp_path / "onnx", ExportConfig(**FAST_EXPORT))
    report = json.loads((out / "report.json").read_text())
    fp32 = report["variants"]["fp32"]
    assert report["gates"] == {"passed": True, "failures": []}
    assert fp32["parity"]["max_abs_diff"] <= 1e-3 and fp32["parity"]["worst_tolerance_fraction"] <= 1.0
    assert fp32["parity"]["top1_agreement"] == 1.0
    assert fp32["parity"]["batch_sizes"] == [1, 7]
    assert fp32["accuracy"] == report["variants"]["torch"]["accuracy"]
    assert fp32["exporter"] in ("dynamo", "torchscript") and fp32["size_bytes"] > 0
    assert set(report["machine"]) >= {"cpu", "cores", "threads", "isa", "onnxruntime", "torch"}
    assert report["dataset"] == {"name": "synthetic", "split": "val", "num_samples": 20}
    for variant in ("torch", "fp32"):
        for bs in ("1", "4"):
            lat = report["variants"][variant]["latency_ms"][bs]
            assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
            assert report["variants"][variant]["throughput"][bs] > 0
    assert "| fp32 |" in (tmp_path / "onnx" / "report.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "export" and manifest["parent"] == str(run)
    assert [e["stage"] for e in manifest["lineage"]] == ["data", "train"]
    assert set(manifest["files"]) >= {"model.onnx", "model.unoptimized.onnx", "report.json"}
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exported")
    run = make_run(tmp / "run")
    export(run, tmp / "onnx", ExportConfig(**FAST_EXPORT))
    return run, tmp / "onnx" / "model.onnx"


@pytest.mark.slow
def test_perturbed_weights_fail_the_gate_with_every_failure_listed(exported, tmp_path):
    run, path = exported
    model = onnx.load(str(path))
    biggest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    weights = numpy_helper.to_array(biggest)
    biggest.CopyFrom(numpy_helper.from_array(weights + np.random.default_rng(0).normal(0, 0.5, weights.shape).astype(weights.dtype), biggest.name))
    onnx.save(model, str(tmp_path / "corrupt.onnx"))
    result = run_cli("validate", str(tmp_path / "corrupt.onnx"), "--run", str(run), "--output-dir", str(tmp_path / "rep"),
                     "--batch-sizes", "1")
    assert result.returncode == 2
    assert "fp32 parity: max |logit diff|" in result.stderr and "exceeds atol 0.0001 + rtol 0.0001" in result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads((tmp_path / "rep" / "report.json").read_text())  # written before the exit
    assert report["gates"]["passed"] is False and report["gates"]["failures"]


def test_an_op_without_onnx_translation_is_named(tmp_path):
    @torch.library.custom_op("ftdeploy_test::mystery", mutates_args=())
    def mystery(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @mystery.register_fake
    def _(x):
        return torch.empty_like(x)

    class Mystery(torch.nn.Module):
        def forward(self, x):
            return mystery(x).flatten(1)

    with pytest.raises(ExportError, match=r"cannot export Mystery to ONNX: no ONNX translation for operator\(s\) ftdeploy_test"):
        export_onnx(Mystery(), torch.randn(2, 3, 8, 8), tmp_path / "m.onnx")


def test_torchscript_exporter_on_request(tmp_path):
    class Small(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).mean((2, 3))

    assert export_onnx(Small(), torch.randn(2, 3, 8, 8), tmp_path / "s.onnx", exporter="torchscript") == ("torchscript", None)
    import onnxruntime as ort

    out = ort.InferenceSession(str(tmp_path / "s.onnx")).run(None, {"input": np.ones((5, 3, 8, 8), np.float32)})[0]
    assert out.shape == (5, 4)


@pytest.mark.slow
def test_metadata_alone_reproduces_the_validation_accuracy(tmp_path):
    """A fresh process with only the ONNX file and raw digits images gets the report's accuracy."""
    run = make_run(tmp_path / "digits", "torchvision:resnet18", "data.name=digits", "preprocessing.input_size=16",
                   "data.batch_size=64", "train.epochs=2")
    out = export(run, tmp_path / "onnx", ExportConfig(**{**FAST_EXPORT, "parity_samples": 2000}))
    report = json.loads((out / "report.json").read_text())
    code = f"""
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from ftdeploy.data import stratified_split
from ftdeploy.onnx_model import OnnxClassifier
clf = OnnxClassifier({str(tmp_path / 'onnx' / 'model.onnx')!r})
d = load_digits()
_, val = stratified_split(d.target.tolist(), 0.2, 0)
images = [Image.fromarray((d.images[i] * 255 / 16).round().astype(np.uint8)) for i in val]
pred = np.concatenate([clf.predict(images[i:i + 50]) for i in range(0, len(images), 50)])
names = [clf.classes[p] for p in pred]
print((np.array(names) == np.array([str(d.target[i]) for i in val])).mean())
print(clf.metadata["source_run"], clf.metadata["variant"], clf.preprocessing.input_size)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    acc, meta = result.stdout.strip().splitlines()
    assert float(acc) == pytest.approx(report["variants"]["fp32"]["accuracy"], abs=1e-9)
    assert report["variants"]["fp32"]["accuracy"] > 0.5
    assert meta == f"{run} fp32 16"


@pytest.mark.slow
def test_bench_prints_a_grid(exported):
    _, path = exported
    result = run_cli("bench", str(path), "--batch-sizes", "1,2", "--threads", "1", "--seconds", "0.05", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["results"]
    assert [(r["threads"], r["batch_size"]) for r in rows] == [(1, 1), (1, 2)]
    assert all(r["p50"] > 0 and r["throughput"] > 0 for r in rows)
