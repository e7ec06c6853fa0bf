"""Shared fixtures: trained and exported runs built once per session (tests that change one work on a
copy), the command line in a subprocess, and a suite that cannot reach the network."""

import contextlib
import io
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Hermetic: no test reaches beyond loopback. Subprocesses get a proxy that refuses (loopback is
# exempt, for the servers under test); this process refuses non-loopback connections and lookups.
os.environ["HF_HUB_OFFLINE"] = "1"
for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
    os.environ[var] = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused
os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost,::1"

_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _loopback(host) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _guard(address, family) -> None:
    if family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
        raise ConnectionRefusedError(f"the test suite is offline: no connection to {address[0]}")


def _guarded_connect(self, address):
    _guard(address, self.family)
    return _connect(self, address)


def _guarded_connect_ex(self, address):
    _guard(address, self.family)
    return _connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if host is not None and not _loopback(host if isinstance(host, str) else host.decode()):
        raise socket.gaierror(socket.EAI_NONAME, f"the test suite is offline: no lookup of {host}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = (_guarded_connect, _guarded_connect_ex,
                                                                       _guarded_getaddrinfo)

# The tiny registered model on 96 synthetic 16x16 images: seconds per run, still a real model and loop.
TINY = [
    "data.name=synthetic", "data.num_samples=96", "data.num_classes=3", "data.image_size=16",
    "data.batch_size=8", "model.name=tiny:convnet", "model.weights=none",
    "preprocessing.input_size=16", "train.epochs=2", "train.lr=0.01", "train.warmup_epochs=0",
    "train.progress=false", "train.checkpoint=false",
]
# TorchScript: seconds where the dynamo exporter takes ten; test_export covers dynamo (the default) once
FAST_EXPORT = {"batch_sizes": [1, 4], "latency_seconds": 0.05, "parity_samples": 64, "exporter": "torchscript"}


def tiny_config(out: Path, *overrides: str):
    from ftdeploy.config import load_config

    return load_config(None, TINY + [f"output_dir={out}", *overrides])


def make_run(out: Path, model: str = "tiny:convnet", *overrides: str) -> Path:
    """A real model, one epoch on synthetic 32x32 images: a run directory to export."""
    from ftdeploy.train import train

    return train(tiny_config(out, f"model.name={model}", "preprocessing.input_size=32", "data.image_size=32",
                             "train.epochs=1", *overrides))


def run_cli(*args: str, env: dict | None = None, timeout: int = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess."""
    return subprocess.run([sys.executable, "-m", "ftdeploy", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The command line in this process: the console script's own ``main``, its exit code and output,
    for tests about what a command does rather than about its process (each new interpreter spends
    ~4 s importing torch). ``run_cli`` stays for environments, signals and the process itself."""
    from ftdeploy.cli import main

    out, err, code, before = io.StringIO(), io.StringIO(), 0, Path.cwd()
    try:
        os.chdir(cwd or REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(["ftdeploy", *args], code, out.getvalue(), err.getvalue())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_of(directory: Path, tmp_path: Path) -> Path:
    """A private copy of a session fixture's directory, for a test that changes it."""
    return Path(shutil.copytree(directory, tmp_path / directory.name))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished tiny training run (read only: copy it to change it)."""
    from ftdeploy.train import train

    return train(tiny_config(tmp_path_factory.mktemp("tiny") / "run"))


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory) -> Path:
    """The tiny run exported (read only)."""
    from ftdeploy.config import ExportConfig
    from ftdeploy.export import export

    return export(tiny_run, tmp_path_factory.mktemp("tiny-export") / "export", ExportConfig(**FAST_EXPORT))


@pytest.fixture(scope="session")
def resnet_run(tmp_path_factory) -> Path:
    """ResNet-18, for the tests where a real architecture is the point (parity, pruning groups)."""
    return make_run(tmp_path_factory.mktemp("resnet") / "run", "torchvision:resnet18", "train.epochs=2")


@pytest.fixture(scope="session")
def resnet_export(resnet_run, tmp_path_factory) -> Path:
    from ftdeploy.config import ExportConfig
    from ftdeploy.export import export

    return export(resnet_run, tmp_path_factory.mktemp("resnet-export") / "export", ExportConfig(**FAST_EXPORT))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 BERT with its own WordPiece tokenizer, as a Hugging Face directory."""
    from textdata import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert")


@pytest.fixture(scope="session")
def reviews_csv(tmp_path_factory) -> Path:
    from textdata import write_reviews

    return write_reviews(tmp_path_factory.mktemp("reviews") / "reviews.csv")


def text_config(out: Path, bert: Path, data: Path, *overrides: str):
    from ftdeploy.config import load_config

    return load_config(None, ["task=text_classification", f"model.name=hf:{bert}", "model.weights=DEFAULT",
                              "data.name=csv", f"data.root={data}", "data.text_column=review",
                              "data.label_column=sentiment", "data.batch_size=16", "preprocessing.max_length=32",
                              "train.epochs=5", "train.lr=0.003", "train.warmup_epochs=0", "train.progress=false",
                              "train.checkpoint=false", f"output_dir={out}", *overrides])


@pytest.fixture(scope="session")
def text_run(tiny_bert, reviews_csv, tmp_path_factory) -> Path:
    """The tiny BERT fine-tuned on the reviews (read only)."""
    from ftdeploy.train import train

    return train(text_config(tmp_path_factory.mktemp("text") / "run", tiny_bert, reviews_csv))


@pytest.fixture(scope="session")
def text_export(text_run, tmp_path_factory) -> Path:
    from ftdeploy.config import ExportConfig
    from ftdeploy.export import export

    return export(text_run, tmp_path_factory.mktemp("text-export") / "export", ExportConfig(**FAST_EXPORT))
