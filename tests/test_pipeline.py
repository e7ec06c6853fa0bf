import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY, cli

STAGE_SECTIONS = {
    "prune": {"ratio": 0.25, "finetune_epochs": 1, "latency_seconds": 0.05},
    "export": {"batch_sizes": [1], "latency_seconds": 0.05, "parity_samples": 64, "exporter": "torchscript"},
    # an unreachable speed target: INT8 is refused on any CPU, so both ways ship the same files
    "quantize": {"min_speedup": 1000, "search": False, "latency_seconds": 0.1},
}


def tiny_yaml(path: Path) -> Path:
    from ftdeploy.config import apply_override

    raw: dict = {}
    for item in TINY:
        apply_override(raw, item)
    for section, values in STAGE_SECTIONS.items():
        raw.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(raw))
    return path


def artifact(directory: Path) -> tuple[set[str], dict]:
    files = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()
             and p.relative_to(directory).parts[0] not in ("checkpoints", "logs", "export")}
    return files, json.loads((directory / "manifest.json").read_text())


def without_paths(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "output_dir"}


def shape(value):
    """The keys of a report, recursively, with values left out (timings differ between runs)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value[:1]]
    return type(value).__name__


@pytest.mark.slow
def test_stages_by_hand_give_what_ftdeploy_run_gives(tmp_path):
    """train -> prune -> export -> quantize, each command on the previous one's directory, against
    ftdeploy run on the same config: the same files, the same weights, the same report fields."""
    config = tiny_yaml(tmp_path / "tiny.yaml")
    auto, hand = tmp_path / "auto" / "run", tmp_path / "hand" / "run"
    result = cli("run", "--config", str(config), "-o", str(auto))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("INT8 not shipped: ") == 1
    steps = [("train", "--config", str(config), "-o", str(hand)),
             ("prune", str(hand), "-o", str(hand) + "-pruned", "--ratio", "0.25", "--finetune-epochs", "1",
              "--set", "prune.latency_seconds=0.05"),
             ("export", str(hand) + "-pruned", "--batch-sizes", "1", "--set", "export.latency_seconds=0.05",
              "--set", "export.parity_samples=64", "--set", "export.exporter=torchscript"),
             ("quantize", str(hand) + "-pruned/export", "--set", "quantize.min_speedup=1000",
              "--set", "quantize.search=false", "--set", "quantize.latency_seconds=0.1")]
    for step in steps:
        done = cli(*step)
        assert done.returncode == 0, (step, done.stderr)
    for a, b in [(auto, hand), (Path(f"{auto}-pruned"), Path(f"{hand}-pruned")),
                 (Path(f"{auto}-pruned/export"), Path(f"{hand}-pruned/export"))]:
        (files_a, manifest_a), (files_b, manifest_b) = artifact(a), artifact(b)
        assert files_a == files_b
        assert manifest_a["stage"] == manifest_b["stage"]
        assert without_paths(manifest_a["config"]) == without_paths(manifest_b["config"])
        if "model.safetensors" in manifest_a["files"]:
            assert manifest_a["files"]["model.safetensors"] == manifest_b["files"]["model.safetensors"]
    reports = [json.loads((Path(f"{d}-pruned/export") / "report.json").read_text()) for d in (auto, hand)]
    assert shape(reports[0]) == shape(reports[1])
    assert reports[0]["variants"]["fp32"]["scores"] == reports[1]["variants"]["fp32"]["scores"]
    last = json.loads((Path(f"{hand}-pruned/export") / "manifest.json").read_text())
    assert [e["stage"] for e in last["lineage"]] + [last["stage"]] == ["data", "train", "prune", "export", "quantize"]
    assert last["lineage"][0]["name"] == "synthetic" and last["lineage"][1]["path"] == "../../run"
    assert last["lineage"][2]["path"] == ".." and last["lineage"][3]["path"] == last["path"] == "."
    assert {"sha256", "bytes"} <= set(last["lineage"][3]["files"]["model.onnx"])


@pytest.mark.slow
def test_multi_process_run_prunes_everywhere_and_writes_once(tmp_path):
    """Under torchrun every rank prunes and fine-tunes; only rank 0 measures and writes the report."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    config = tiny_yaml(tmp_path / "tiny.yaml")
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    sets = ["--set", "data.num_samples=80", "--set", "train.epochs=1"]
    result = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "ftdeploy", "run",
                             "--config", str(config), "-o", str(out), *sets], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("# Pruning report") == 1
    assert json.loads((Path(f"{out}-pruned") / "metrics.json").read_text())["num_processes"] == 2
    assert (Path(f"{out}-pruned") / "export" / "report.json").is_file()


def test_run_declares_stages_by_section():
    from ftdeploy.config import load_config
    from ftdeploy.pipeline import declared

    assert declared(load_config(None)) == ["train"]
    assert declared(load_config(REPO / "configs" / "digits.yaml")) == ["train", "export", "quantize", "report"]
    assert declared(load_config(REPO / "configs" / "digits-compressed.yaml")) == ["train", "prune", "export", "quantize", "report"]


@pytest.mark.slow
def test_a_copied_run_and_export_work_from_any_working_directory(tiny_run, tiny_export, tmp_path):
    """Both directories copied elsewhere, side by side as they were: quantize, report (with the
    PyTorch variant, found through the relative path) and serve, run from a third directory."""
    import shutil
    import signal
    import time

    import httpx

    from conftest import free_port

    copies = tmp_path / "copies"
    shutil.copytree(tiny_run.parent, copies / tiny_run.parent.name)
    export = Path(shutil.copytree(tiny_export.parent, copies / tiny_export.parent.name)) / tiny_export.name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    quick = ["--set", "quantize.min_speedup=1000", "--set", "quantize.search=false", "--set", "quantize.latency_seconds=0.05"]
    assert cli("quantize", str(export), *quick, cwd=elsewhere).returncode == 0
    report = cli("report", str(export), "--set", "report.severities=[1]", "--set", "report.batch_sizes=[1]",
                     "--set", "report.threads=[1]", "--set", "report.latency_seconds=0.02", "--set",
                     "report.corruptions=[blur]", "--samples", "1", "--set", "report.peak_memory=false", cwd=elsewhere)
    assert report.returncode == 0, report.stderr
    usability = json.loads((export / "usability.json").read_text())
    assert list(usability["variants"]) == ["torch", "fp32"] and usability["source_run"] == "../../tiny0/run"
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "ftdeploy", "serve", str(export / "model.onnx"), "--port", str(port),
                               "--drain-seconds", "0"], cwd=elsewhere, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and server.poll() is None
            time.sleep(0.05)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/model").json()["source_run"] == "../../tiny0/run"
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    assert server.returncode == 0
