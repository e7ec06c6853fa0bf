"""``ftdeploy run``: every stage the config declares, each reading the previous stage's run directory."""

from __future__ import annotations

from pathlib import Path

from .config import PipelineConfig


def run_pipeline(cfg: PipelineConfig, resume: bool = False) -> dict[str, Path]:
    """Run the configured stages in order; returns the artifact each stage wrote."""
    from .train import train

    artifacts = {"train": train(cfg, resume=resume)}
    print(f"fine-tuned run: {artifacts['train']}")
    final = artifacts["train"]
    if cfg.prune is not None:
        from .prune import prune_run

        out = cfg.prune.output_dir or final.with_name(final.name + "-pruned")
        final = artifacts["prune"] = prune_run(final, out, cfg.prune)
    if (cfg.export is not None or cfg.quantize is not None) and _is_main_process():
        from .config import ExportConfig
        from .export import export_run

        export_cfg = cfg.export or ExportConfig()
        out = export_cfg.output_dir or final / "export"
        try:
            export_run(final, out, export_cfg, cfg.quantize)
        finally:  # the report is written even when a gate fails: show it
            if (out / "report.md").is_file():
                print((out / "report.md").read_text())
        artifacts["onnx"] = out / "model.onnx"
        if (out / "model.int8.onnx").is_file():
            artifacts["onnx_int8"] = out / "model.int8.onnx"
        print("ONNX file(s): " + ", ".join(str(v) for k, v in artifacts.items() if k.startswith("onnx")))
        print(f"report: {out / 'report.json'}")
    return artifacts


def _is_main_process() -> bool:
    """Under accelerate launch/torchrun, only rank 0 runs the single-process stages."""
    import os

    return int(os.environ.get("RANK", "0")) == 0
