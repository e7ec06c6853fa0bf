import os
import subprocess
import sys
from pathlib import Path

import pytest

# Keep tests single-threaded-friendly on the 2-core CI machine and fully offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "data.name=synthetic", "data.num_samples=96", "data.num_classes=3", "data.image_size=16",
    "data.batch_size=8", "model.name=torchvision:resnet18", "model.weights=none",
    "preprocessing.input_size=16", "train.epochs=2", "train.lr=0.003", "train.warmup_epochs=0",
    "train.progress=false",
]


def tiny_config(out: Path, *overrides: str):
    """A ResNet-18 on 96 synthetic 16×16 images: seconds per run, still a real model and loop."""
    from ftdeploy.config import load_config

    return load_config(None, TINY + [f"output_dir={out}", *overrides])


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess."""
    return subprocess.run([sys.executable, "-m", "ftdeploy", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture
def tiny_run(tmp_path_factory):
    """A finished tiny training run directory."""
    from ftdeploy.train import train

    out = tmp_path_factory.mktemp("run") / "tiny"
    train(tiny_config(out))
    return out


FAST_EXPORT = {"batch_sizes": [1, 4], "latency_seconds": 0.05, "parity_samples": 64}


def make_run(out: Path, model: str = "torchvision:resnet18", *overrides: str) -> Path:
    """One epoch of a real model on synthetic 32×32 images: a run directory to export."""
    from ftdeploy.train import train

    return train(tiny_config(out, f"model.name={model}", "preprocessing.input_size=32", "data.image_size=32",
                             "train.epochs=1", *overrides))
