"""The run directory: the artifact that flows from stage to stage.

``runs/<name>/`` holds ``model.safetensors`` (weights), ``model.json`` (how to rebuild the
architecture), ``config.yaml`` (the resolved config), ``classes.json``, ``preprocessing.json``,
``metrics.json`` and ``manifest.json`` (which stage made it, from what, when, with which versions).
Any stage reads one with :func:`load_run` and writes one with :func:`write_run_files`.
"""

from __future__ import annotations

import datetime as dt
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
REQUIRED = ("model.json", WEIGHTS, "classes.json", "preprocessing.json", "manifest.json")


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
        """Rebuild the architecture and load the weights; the model is returned in eval mode.

        >>> model = load_run("runs/digits").load_model()  # doctest: +SKIP
        """
        from safetensors.torch import load_file

        from .config import ModelConfig
        from .models import build_model

        built = build_model(ModelConfig(name=self.architecture["name"], weights="none"), len(self.classes))
        model = built.model
        if self.architecture.get("pruned"):  # channel counts recorded by ftdeploy prune
            from .prune import restore_pruned

            restore_pruned(model, self.architecture["pruned"])
        state = load_file(str(self.path / WEIGHTS))
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise RunDirError(f"weights in {self.path / WEIGHTS} do not fit {self.architecture['name']}: {e}") from None
        return model.eval()


def built_from_run(path: str | Path):
    """A run directory as a starting point for more training: its model (pruned or not) and preprocessing."""
    from .models import BuiltModel

    run = load_run(path)
    extra = {"name": run.architecture["name"], **({"pruned": run.architecture["pruned"]} if run.architecture.get("pruned") else {})}
    model = run.load_model()
    model.train()
    return BuiltModel(model, run.architecture["head_name"], {}, architecture=extra), run.preprocessing


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "model.json").is_file() and (Path(path) / WEIGHTS).is_file()


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"run directory {str(path)!r} does not exist", "pass a folder written by ftdeploy train or prune")
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise RunDirError(f"{path} is not a complete run directory: missing {', '.join(missing)}",
                          "finish the training (or ftdeploy train --resume) before the next stage")
    read = lambda name: json.loads((path / name).read_text())  # noqa: E731
    import yaml

    config = validate_config(yaml.safe_load((path / "config.yaml").read_text()) or {}, source=str(path / "config.yaml"))
    metrics = read("metrics.json") if (path / "metrics.json").is_file() else {}
    return Run(path, config, read("classes.json"), Preprocessing.from_json((path / "preprocessing.json").read_text()),
               read("model.json"), read("manifest.json"), metrics)


def versions() -> dict[str, str]:
    out = {"ftdeploy": __version__, "python": platform.python_version()}
    for name in ("torch", "torchvision", "timm", "accelerate", "onnx", "onnxruntime", "torch_pruning"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = getattr(module, "__version__", "?")
    return out


def manifest(stage: str, parent: Path | None = None, **extra: Any) -> dict[str, Any]:
    """Lineage record: this stage, its input run (and that run's own lineage), time and versions."""
    lineage: list[dict[str, Any]] = []
    if parent is not None and (parent / "manifest.json").is_file():
        pm = json.loads((parent / "manifest.json").read_text())
        lineage = pm.get("lineage", []) + [{k: pm.get(k) for k in ("stage", "path", "created")}]
    return {"stage": stage, "path": None, "parent": str(parent) if parent else None, "lineage": lineage,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "versions": versions(), **extra}


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_run_files(out: Path, cfg: PipelineConfig, classes: list[str], spec: Preprocessing,
                    architecture: dict[str, Any], record: dict[str, Any]) -> None:
    """Everything but the weights and metrics, written before training so a crash leaves a readable folder."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    write_json(out / "classes.json", classes)
    (out / "preprocessing.json").write_text(spec.to_json() + "\n")
    write_json(out / "model.json", architecture)
    write_json(out / "manifest.json", {**record, "path": str(out)})
