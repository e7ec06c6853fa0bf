import json

import pytest

from conftest import TINY, run_cli
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
    result = run_cli("train", *sets(*TINY, *overrides), "--output-dir", str(tmp_path / "out"))
    assert_one_line_error(result, *fragments)


def test_corrupt_image_names_the_file(tmp_path):
    root = make_folder(tmp_path / "photos", corrupt=True)
    result = run_cli("train", *sets(*TINY, "data.name=imagefolder", f"data.root={root}"), "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(result, "broken.png", "on_corrupt=skip")


def test_unknown_config_key_in_a_file(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  nam: timm:efficientnet_lite0\n")
    assert_one_line_error(run_cli("train", "--config", str(tmp_path / "c.yaml")), "unknown key 'model.nam'", "allowed here: name, weights")


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
