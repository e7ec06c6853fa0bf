import json
import typing

import pydantic
import pytest

from conftest import TINY, cli, run_cli
from test_data import make_folder


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # progress bars may come before it
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def sets(*items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.mark.parametrize("overrides,fragments", [
    (["data.name=imagefolder", "data.root=/nonexistent/photos"], ["/nonexistent/photos", "does not exist"]),
    (["model.name=torchvision:resnet81"], ["unknown torchvision classification model", "resnet18"]),
    (["train.epoks=2"], ["unknown key 'train.epoks'", "allowed here: epochs"]),
])
def test_user_mistakes_give_one_line_and_a_non_zero_exit(tmp_path, overrides, fragments):
    result = cli("train", *sets(*TINY, *overrides), "--output-dir", str(tmp_path / "out"))
    assert_one_line_error(result, *fragments)


@pytest.mark.slow
def test_corrupt_image_names_the_file(tmp_path):
    root = make_folder(tmp_path / "photos", corrupt=True)
    result = cli("train", *sets(*TINY, "data.name=imagefolder", f"data.root={root}"), "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(result, "broken.png", "on_corrupt=skip")


def test_unknown_config_key_in_a_file(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  nam: timm:efficientnet_lite0\n")
    assert_one_line_error(cli("train", "--config", str(tmp_path / "c.yaml")), "unknown key 'model.nam'", "allowed here: name, weights")


@pytest.mark.slow
def test_python_m_ftdeploy_train_is_the_train_command(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "ftdeploy.train", *sets(*TINY, "train.epochs=1"), "--output-dir", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 1
    assert f"run directory: {out}" in result.stdout


def torch_blocker(tmp_path):
    """A PYTHONPATH on which torch is missing as it is after pip install 'ftdeploy[serve]': importing
    it and looking for it (importlib.util.find_spec) both fail."""
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
        "sys.meta_path.insert(0, Hide())\n")
    return {"PYTHONPATH": str(blocker)}


@pytest.mark.parametrize("args", [["train"], ["export", "runs/x"], ["prune", "runs/x", "-o", "runs/y"],
                                  ["quantize", "runs/x/export"]], ids=lambda a: a[0])
def test_a_serving_install_names_the_extra_to_add(tmp_path, args):
    assert_one_line_error(run_cli(*args, env=torch_blocker(tmp_path)), "needs the training extra",
                          "pip install 'ftdeploy[train]'")


def test_validate_a_missing_file_says_so(tmp_path):
    assert_one_line_error(cli("validate", str(tmp_path / "missing.onnx"), "--run", str(tmp_path), "-o", str(tmp_path)),
                          "missing.onnx", "not found")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert_one_line_error(cli("bench", str(tmp_path / "junk.onnx")), "onnxruntime cannot load")


def test_a_misspelt_quantize_mode_lists_the_allowed_ones(tiny_run, tmp_path):
    assert_one_line_error(cli("export", str(tiny_run), "-o", str(tmp_path / "e"), "--quantize", "statik"),
                          "'auto', 'static' or 'dynamic'", "got 'statik'")
    assert not (tmp_path / "e").exists()  # refused before any work


@pytest.mark.parametrize("args,fragments", [
    (["export", "RUN", "--set", "train.lr=1"], ["takes --set export.<field>=value", "train.lr=1"]),
    (["prune", "RUN", "-o", "OUT", "--set", "importance=taylor"], ["takes --set prune.<field>=value"]),
    (["quantize", "EXPORT", "--set", "quantize.bogus=1"], ["unknown key 'quantize.bogus'", "allowed here: mode"]),
])
def test_set_means_section_field_on_every_command(tiny_run, tiny_export, tmp_path, args, fragments):
    args = [a.replace("RUN", str(tiny_run)).replace("OUT", str(tmp_path / "o")).replace("EXPORT", str(tiny_export))
            for a in args]
    assert_one_line_error(cli(*args), *fragments)


@pytest.mark.parametrize("section", ["data", "model", "preprocessing", "train", "export", "quantize", "prune", "report"])
def test_set_reaches_every_field_of_every_section(section):
    """Each field's default, written on the command line as a user would type it, reads back as that
    default: no field is out of --set's reach or comes back with another type."""
    from ftdeploy.config import PipelineConfig, apply_override, validate_config

    model = next(a for a in [PipelineConfig.model_fields[section].annotation, *typing.get_args(
        PipelineConfig.model_fields[section].annotation)] if isinstance(a, type) and issubclass(a, pydantic.BaseModel))
    default = model() if section != "prune" else model(target_macs=0.5)
    raw: dict = {}
    for name, value in default.model_dump(mode="json").items():
        typed = "null" if value is None else value if isinstance(value, str) else json.dumps(value)
        apply_override(raw, f"{section}.{name}={typed}")
    if section == "data":
        raw[section]["name"] = "synthetic"
    assert getattr(validate_config(raw), section) == (default if section != "data" else default.model_copy(
        update={"name": "synthetic"}))


def test_every_export_field_can_be_set_and_a_run_command_refuses_an_export_directory(tiny_run, tmp_path):
    """--set reaches fields without a flag of their own (here: the optimization level), and an export
    directory fed to a stage that wants a run names the mix-up."""
    result = cli("export", str(tiny_run), "-o", str(tmp_path / "e"), "--set", "export.optimization=none",
                     "--set", "export.batch_sizes=[1]", "--set", "export.latency_seconds=0.05",
                     "--set", "export.exporter=torchscript")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["variants"]["fp32"]["optimization"] == "none" and list(report["variants"]["fp32"]["latency_ms"]) == ["1"]
    assert not (tmp_path / "e" / "model.unoptimized.onnx").exists()  # nothing to keep: the shipped file is unoptimized
    assert_one_line_error(cli("prune", str(tmp_path / "e"), "-o", str(tmp_path / "p")), "export directory")
