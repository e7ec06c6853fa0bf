"""Run and export directories: the artifacts that flow from stage to stage, and their lineage.

A run directory (``train``, ``prune``) holds ``model.safetensors`` (weights), ``model.json`` (how to
rebuild the architecture), ``config.yaml`` (the resolved config), ``classes.json``,
``preprocessing.json`` and ``metrics.json``. An export directory (``export``, ``quantize``) holds
the ONNX files and ``report.json``. Every one carries ``manifest.json``: the stage that wrote it,
its parent directory, the lineage back to the training data, the stage's resolved config, the
command, the time, library versions and the sha256 of every file the stage wrote.

Nothing here imports a stage: every stage reads and writes through this module.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .config import PipelineConfig, dump_config, validate_config
from .errors import RunDirError
from .preprocessing import Preprocessing

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
REQUIRED = ("model.json", WEIGHTS, "classes.json", "preprocessing.json", MANIFEST)
UNHASHED = ("checkpoints", "logs")  # resume state and tracker logs: not part of the artifact


@dataclass
class Run:
    path: Path
    config: PipelineConfig
    classes: list[str]
    preprocessing: Preprocessing
    architecture: dict[str, Any]
    manifest: dict[str, Any]
    metrics: dict[str, Any]

    def load_model(self):
        """Rebuild the architecture (pruned channel counts included) and load the weights, in eval mode.

        Example::

            model = load_run("runs/digits").load_model()
        """
        from safetensors.torch import load_file

        from .models import rebuild

        model = rebuild(self.architecture, len(self.classes))
        state = load_file(str(self.path / WEIGHTS))
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise RunDirError(f"weights in {self.path / WEIGHTS} do not fit {self.architecture['name']}: {e}") from None
        return model.eval()


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "model.json").is_file() and (Path(path) / WEIGHTS).is_file()


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"run directory {str(path)!r} does not exist", "pass a folder written by ftdeploy train or prune")
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        hint = ("that is an export directory: pass the run directory it was exported from"
                if (path / "model.onnx").is_file() else
                "finish the training (or ftdeploy train --resume) before the next stage")
        raise RunDirError(f"{path} is not a complete run directory: missing {', '.join(missing)}", hint)
    import yaml

    config = validate_config(yaml.safe_load((path / "config.yaml").read_text()) or {}, source=str(path / "config.yaml"))
    metrics = read_json(path / "metrics.json") if (path / "metrics.json").is_file() else {}
    return Run(path, config, read_json(path / "classes.json"),
               Preprocessing.from_json((path / "preprocessing.json").read_text()),
               read_json(path / "model.json"), read_json(path / MANIFEST), metrics)


@dataclass
class ExportDir:
    """An export directory: ``model.onnx`` (+ ``model.int8.onnx``), its report and its manifest."""

    path: Path
    report: dict[str, Any]
    manifest: dict[str, Any]

    @property
    def model(self) -> Path:
        return self.path / "model.onnx"

    @property
    def source_run(self) -> Path:
        """The run directory the FP32 file was exported from."""
        return Path(self.report["source_run"])

    def variant_path(self, variant: str) -> Path | None:
        v = self.report["variants"].get(variant) or {}
        return Path(v["path"]) if v.get("path") and Path(v["path"]).is_file() else None


def load_export(path: str | Path) -> ExportDir:
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"export directory {str(path)!r} does not exist", "pass a folder written by ftdeploy export")
    missing = [f for f in ("model.onnx", "report.json", MANIFEST) if not (path / f).is_file()]
    if missing:
        hint = ("that is a run directory: export it first (ftdeploy export RUN_DIR)" if is_run_dir(path)
                else "pass a folder written by ftdeploy export")
        raise RunDirError(f"{path} is not an export directory: missing {', '.join(missing)}", hint)
    return ExportDir(path, read_json(path / "report.json"), read_json(path / MANIFEST))


def versions() -> dict[str, str]:
    out = {"ftdeploy": __version__, "python": platform.python_version()}
    for name in ("torch", "torchvision", "timm", "accelerate", "onnx", "onnxruntime", "torch_pruning"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = getattr(module, "__version__", "?")
    return out


def manifest(stage: str, parent: Path | None = None, config: Any = None, **extra: Any) -> dict[str, Any]:
    """The record of one stage: what it read (``parent``) and the full lineage behind it, its resolved
    config, the command, the time and library versions. ``write_manifest`` adds the path and files.

    The lineage is the parent's lineage plus the parent's own record (less its lineage), so the last
    manifest alone traces every stage back to the training data.
    """
    lineage: list[dict[str, Any]] = [{"stage": "data", **extra["data"]}] if parent is None and "data" in extra else []
    if parent is not None and (Path(parent) / MANIFEST).is_file():
        pm = read_json(Path(parent) / MANIFEST)
        rerun = pm.get("stage") == stage and pm.get("path") == str(parent)  # the same stage again, in place
        lineage = pm.get("lineage", []) + ([] if rerun else [{k: v for k, v in pm.items() if k != "lineage"}])
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    return {"stage": stage, "path": None, "parent": str(parent) if parent else None, "lineage": lineage,
            "config": config, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "versions": versions(), **extra}


def write_manifest(out: Path, record: dict[str, Any], files: list[str] | None = None) -> None:
    """Write ``record`` as ``out/manifest.json`` with the sha256 of ``files`` (default: every file under
    ``out`` but the manifest, checkpoints and logs)."""
    names = files if files is not None else sorted(
        str(p.relative_to(out)) for p in out.rglob("*")
        if p.is_file() and p.name != MANIFEST and p.relative_to(out).parts[0] not in UNHASHED)
    write_json(out / MANIFEST, {**record, "path": str(out),
                                "files": {n: {"sha256": sha256(out / n), "bytes": (out / n).stat().st_size}
                                          for n in names if (out / n).is_file()}})


def lineage_stages(record: dict[str, Any]) -> list[str]:
    """Stage names from the data to ``record`` itself, e.g. ``['data', 'train', 'export']``."""
    return [entry["stage"] for entry in record.get("lineage", [])] + [record["stage"]]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_run_files(out: Path, cfg: PipelineConfig, classes: list[str], spec: Preprocessing,
                    architecture: dict[str, Any]) -> None:
    """Everything but the weights, metrics and manifest, written before training so a crash leaves a
    readable folder."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    write_json(out / "classes.json", classes)
    (out / "preprocessing.json").write_text(spec.to_json() + "\n")
    write_json(out / "model.json", architecture)
