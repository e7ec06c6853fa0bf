"""Run and export directories: the artifacts that flow from stage to stage, and their lineage.

A run directory (``train``, ``prune``) holds ``model.safetensors`` (weights), ``model.json`` (how to
rebuild the architecture), ``config.yaml`` (the resolved config), ``classes.json``,
``preprocessing.json`` and ``metrics.json``. An export directory (``export``, ``quantize``) holds
the ONNX files and ``report.json``. Every one carries ``manifest.json``: the stage that wrote it,
its parent directory, the lineage back to the training data, the stage's resolved config, the
command, the time, library versions and the sha256 of every file in the directory.

Every path a manifest or report stores (the directory itself, its parent stages, the files) is
relative to the directory that holds it, so a directory reads the same from any working directory
and after it is copied or moved together with the stages it came from. Paths to the user's data
are the exception: they are stored absolute, since the data does not move with the artifact.
Every file is written atomically (``ftdeploy.files``).

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
from typing import Any, Callable

from . import __version__
from .config import DataConfig, PipelineConfig, dump_config, validate_config
from .errors import RunDirError
from .files import relative, resolve, write_json, write_text
from .records import ExportReport, TrainMetrics, load_record
from .tasks import Task, get_task

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
REQUIRED = ("model.json", WEIGHTS, "classes.json", "preprocessing.json", MANIFEST)
UNHASHED = ("checkpoints", "logs")  # resume state and tracker logs: not part of the artifact
# config fields that name artifact paths: stored relative to the manifest's directory
CONFIG_PATHS = ("output_dir", "output", "compare")


@dataclass
class Run:
    path: Path
    config: PipelineConfig
    classes: list[str]
    preprocessing: Any  # the task's preprocessor (image Preprocessing, text TextPreprocessing)
    architecture: dict[str, Any]
    manifest: dict[str, Any]
    metrics: TrainMetrics

    @property
    def task(self) -> Task:
        return get_task(self.config.task)

    @property
    def info(self) -> dict[str, Any]:
        """What the task's postprocess needs of the run: its classes, and what the model family
        recorded for decoding (``model.json``'s ``postprocess``)."""
        return {"classes": self.classes, **self.architecture.get("postprocess", {})}

    @property
    def input_names(self) -> list[str]:
        """The model's inputs, in its argument order (a text model may lack token_type_ids)."""
        return list(self.architecture.get("input_names") or self.task.input_names)

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
    metrics = load_record(TrainMetrics, path / "metrics.json") if (path / "metrics.json").is_file() else TrainMetrics()
    return Run(path, config, read_json(path / "classes.json"),
               get_task(config.task).preprocessor_from_dict(read_json(path / "preprocessing.json")),
               read_json(path / "model.json"), read_json(path / MANIFEST), metrics)


@dataclass
class ExportDir:
    """An export directory: ``model.onnx`` (+ ``model.int8.onnx``), its report and its manifest. It
    carries what the later stages need (data, classes, preprocessing), so that quantize, report and
    serve work on it wherever it is; only the PyTorch variant of the report needs its source run."""

    path: Path
    report: ExportReport
    manifest: dict[str, Any]

    @property
    def model(self) -> Path:
        return self.path / "model.onnx"

    @property
    def source_run(self) -> Path:
        """The run directory the FP32 file was exported from."""
        return resolve(self.report.source_run, self.path)

    @property
    def data(self) -> DataConfig:
        return DataConfig.model_validate(self.report.source.data)

    @property
    def classes(self) -> list[str]:
        return list(self.report.source.classes)

    @property
    def task(self) -> Task:
        return get_task(self.report.source.task)

    @property
    def preprocessing(self):
        return self.task.preprocessor_from_dict(self.report.source.preprocessing)

    @property
    def input_names(self) -> list[str]:
        return list(self.report.source.input_names or self.task.input_names)

    @property
    def info(self) -> dict[str, Any]:
        return {"classes": self.classes, **self.report.source.info}

    def variant_path(self, variant: str) -> Path | None:
        v = self.report.variants.get(variant)
        path = resolve(v.path, self.path) if v is not None and v.path else None
        return path if path is not None and path.is_file() else None

    def load_source_run(self) -> "Run":
        if not is_run_dir(self.source_run):
            raise RunDirError(f"{self.path}: the run directory it was exported from ({self.report.source_run}, "
                              f"relative to it) is not there", "copy or move the export directory together with "
                              "its run directory, or export the run again")
        return load_run(self.source_run)


def load_export(path: str | Path) -> ExportDir:
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"export directory {str(path)!r} does not exist", "pass a folder written by ftdeploy export")
    missing = [f for f in ("model.onnx", "report.json", MANIFEST) if not (path / f).is_file()]
    if missing:
        hint = ("that is a run directory: export it first (ftdeploy export RUN_DIR)" if is_run_dir(path)
                else "its FP32 file failed the parity gate (model.rejected.onnx): see report.md"
                if (path / "model.rejected.onnx").is_file() else "pass a folder written by ftdeploy export")
        raise RunDirError(f"{path} is not an export directory: missing {', '.join(missing)}", hint)
    return ExportDir(path, load_record(ExportReport, path / "report.json"), read_manifest(path))


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
    manifest alone traces every stage back to the training data. Paths are absolute until
    ``write_manifest`` stores them relative to the directory it writes.
    """
    lineage: list[dict[str, Any]] = [{"stage": "data", **extra["data"]}] if parent is None and "data" in extra else []
    parent = Path(parent).absolute() if parent is not None else None
    if parent is not None and (parent / MANIFEST).is_file():
        pm = read_manifest(parent)
        rerun = pm.get("stage") == stage and pm.get("path") == str(parent)  # the same stage again, in place
        lineage = pm.get("lineage", []) + ([] if rerun else [{k: v for k, v in pm.items() if k != "lineage"}])
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    return {"stage": stage, "path": None, "parent": str(parent) if parent else None, "lineage": lineage,
            "config": config, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "versions": versions(), **extra}


def _map_paths(record: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    """``record`` with ``fn`` applied to every artifact path it holds: its own path and parent, the
    output paths of its config, and the same in each lineage entry."""
    out = dict(record)
    for key in ("path", "parent"):
        if out.get(key):
            out[key] = fn(out[key])
    if isinstance(out.get("config"), dict):
        out["config"] = {k: ([fn(x) for x in v] if isinstance(v, list) else fn(v)) if k in CONFIG_PATHS and v else v
                         for k, v in out["config"].items()}
    if out.get("lineage"):
        out["lineage"] = [_map_paths(entry, fn) for entry in out["lineage"]]
    return out


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """``directory/manifest.json`` with its paths resolved (they are stored relative to ``directory``)."""
    directory = Path(directory).absolute()
    return _map_paths(read_json(directory / MANIFEST), lambda p: str(resolve(p, directory)))


def write_manifest(out: Path, record: dict[str, Any]) -> None:
    """Write ``record`` as ``out/manifest.json``, its paths relative to ``out``, with the sha256 of every
    file under ``out`` (but the manifest, checkpoints and logs): a stage that rewrites a file in place
    writes the manifest again, so the hashes always describe the directory as it is."""
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                   if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
                   and p.relative_to(out).parts[0] not in UNHASHED)
    stored = _map_paths({**record, "path": str(Path(out).absolute())}, lambda p: relative(p, out))
    write_json(out / MANIFEST, {**stored, "files": {n: {"sha256": sha256(out / n), "bytes": (out / n).stat().st_size}
                                                    for n in names}})


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


def write_run_files(out: Path, cfg: PipelineConfig, classes: list[str], spec: Any,
                    architecture: dict[str, Any]) -> None:
    """Everything but the weights, metrics and manifest, written before training so a crash leaves a
    readable folder. The stored config's output_dir is the directory itself (``.``)."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", dump_config(cfg.model_copy(update={"output_dir": Path(".")})))
    write_json(out / "classes.json", classes)
    write_json(out / "preprocessing.json", spec.to_dict())
    write_json(out / "model.json", architecture)
