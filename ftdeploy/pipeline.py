"""``ftdeploy run``: every stage the config declares, each reading the previous stage's run directory."""

from __future__ import annotations

from pathlib import Path

from .config import PipelineConfig


def run_pipeline(cfg: PipelineConfig, resume: bool = False) -> dict[str, Path]:
    """Run the configured stages in order; returns the artifact each stage wrote."""
    from .train import train

    artifacts = {"train": train(cfg, resume=resume)}
    print(f"fine-tuned run: {artifacts['train']}")
    return artifacts
