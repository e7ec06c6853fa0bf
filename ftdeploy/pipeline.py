"""``ftdeploy run``: a loop over the stages the config declares, each reading the directory the
previous one wrote.

A stage is declared by its config section (``train`` always; ``prune``, ``export``, ``quantize``,
``report`` when present; ``quantize`` and ``report`` imply ``export``). Under a multi-process launch every process trains
and prunes (data-parallel fine-tuning); the single-process stages run on the main process only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

from .config import ExportConfig, PipelineConfig

log = logging.getLogger(__name__)
ORDER = ("train", "prune", "export", "quantize", "report")
ALL_PROCESSES = ("train", "prune")


def declared(cfg: PipelineConfig) -> list[str]:
    """The stages ``cfg`` declares, in pipeline order.

    >>> from ftdeploy.config import load_config
    >>> declared(load_config(None, ["quantize.mode=static"]))
    ['train', 'export', 'quantize']
    """
    present = {"train": True, "prune": cfg.prune is not None,
               "export": cfg.export is not None or cfg.quantize is not None or cfg.report is not None,
               "quantize": cfg.quantize is not None, "report": cfg.report is not None}
    return [name for name in ORDER if present[name]]


def _train(_src: Path | None, cfg: PipelineConfig, resume: bool) -> Path:
    from .train import train

    return train(cfg, cfg.output_dir, resume=resume)


def _prune(src: Path, cfg: PipelineConfig, _resume: bool) -> Path:
    from .prune import prune

    return prune(src, cfg.prune.output_dir or src.with_name(src.name + "-pruned"), cfg.prune)


def _export(src: Path, cfg: PipelineConfig, _resume: bool) -> Path:
    from .export import export

    return export(src, None, cfg.export or ExportConfig())


def _quantize(src: Path, cfg: PipelineConfig, _resume: bool) -> Path:
    from .quantize import quantize

    return quantize(src, None, cfg.quantize)


def _report(src: Path, cfg: PipelineConfig, _resume: bool) -> Path:
    from .usability import report

    report(src, cfg.report)
    return src  # the export directory, which now holds the report


STAGES: dict[str, Callable[[Path | None, PipelineConfig, bool], Path]] = {
    "train": _train, "prune": _prune, "export": _export, "quantize": _quantize, "report": _report}


def run_pipeline(cfg: PipelineConfig, resume: bool = False) -> dict[str, Path]:
    """Run the declared stages in order; returns the directory each stage wrote."""
    artifacts: dict[str, Path] = {}
    current: Path | None = None
    from .training import release_processes

    stages = declared(cfg)
    last_shared = [name for name in stages if name in ALL_PROCESSES][-1]
    for name in stages:
        if name not in ALL_PROCESSES and not is_main_process():
            break
        current = artifacts[name] = STAGES[name](current, cfg, resume)
        if is_main_process():
            log.info("%s: %s", name, current)
        if name == last_shared:
            release_processes()
    return artifacts


def is_main_process() -> bool:
    """Under accelerate launch/torchrun, only rank 0 runs the single-process stages."""
    return int(os.environ.get("RANK", "0")) == 0
