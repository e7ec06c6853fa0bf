"""Stage ``export``: a run directory -> an export directory with a validated FP32 ONNX file.

Writes ``OUT/model.onnx`` (checked, shape-inferred, optimized offline by onnxruntime, carrying class
names and preprocessing in its metadata) and ``OUT/model.unoptimized.onnx`` (the checked graph
before onnxruntime's fusions: what quantization starts from), then validates the file in
onnxruntime: parity with PyTorch on the run's validation images, and latency of both, timed side by
side. ``report.json``, ``report.md``, ``latency.png`` and ``manifest.json`` are written even when a
gate fails; then one :class:`~ftdeploy.errors.GateError` lists every failure.

Example::

    export_dir = export("runs/digits", "runs/digits/export")
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ExportConfig
from .conversion import export_onnx, finalize, onnx_metadata
from .evaluation import EvalData, accuracy, logits_at_batch_sizes, onnx_predictor, parity, torch_predictor
from .gates import Gates
from .latency import ort_runner, profile, provider_latency, session_policy
from .machine import machine_info, physical_cores
from .onnx_model import encode_samples, onnx_size, open_session
from .report import write_report
from .rundir import Run, load_run, manifest, write_manifest

UNOPTIMIZED = "model.unoptimized.onnx"
SAMPLES = 8  # validation images stored in the file, for checks where it runs (serve --provider)
STALE = ("model.int8.onnx", "usability.json", "report.html")  # a later stage's files, from an older export


def export(run_dir: str | Path, output_dir: str | Path | None = None, cfg: ExportConfig | None = None) -> Path:
    """Export ``run_dir``'s model to ``output_dir`` (default ``cfg.output_dir``, else ``RUN/export``),
    validate it and write the report; raises GateError (after writing everything) when a gate fails."""
    cfg = cfg or ExportConfig()
    run = load_run(run_dir)
    out = Path(output_dir or cfg.output_dir or run.path / "export")
    out.mkdir(parents=True, exist_ok=True)
    for name in STALE:
        (out / name).unlink(missing_ok=True)
    model = run.load_model()
    # Batch 2 for the trace: batch 1 invites the exporter to specialize the batch dimension.
    sample = torch.zeros(2, *run.preprocessing.input_shape)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        exporter, reason = export_onnx(model, sample, raw, cfg.opset, cfg.exporter)
        # one load for both (building an image folder decodes every file): the samples stored in
        # the file and the parity images
        data = EvalData.from_run(run, max(cfg.parity_samples, SAMPLES), calibration_samples=1)
        samples = encode_samples(data.inputs[:SAMPLES], run.preprocessing)
        data = replace(data, inputs=data.inputs[:cfg.parity_samples], labels=data.labels[:cfg.parity_samples])
        finalize(raw, out / "model.onnx", {**onnx_metadata(run, "fp32"), "samples": samples}, cfg.optimization)
        (out / UNOPTIMIZED).unlink(missing_ok=True)
        if cfg.optimization != "none":
            shutil.copy(raw, out / UNOPTIMIZED)
    report, gates = validate(out / "model.onnx", run, cfg, model, data)
    report["variants"]["fp32"].update(exporter=exporter, exporter_fallback_reason=reason, opset=cfg.opset,
                                      optimization=cfg.optimization,
                                      unoptimized_path=str(out / UNOPTIMIZED) if cfg.optimization != "none" else None)
    write_report(report, out)
    write_manifest(out, manifest("export", run.path, config=cfg))
    gates.raise_if_failed(str(out / "report.json"))
    return out


def validate(onnx_path: Path, run: Run, cfg: ExportConfig, model=None, data: EvalData | None = None
             ) -> tuple[dict[str, Any], Gates]:
    """Parity of ``onnx_path`` against the run's PyTorch model on its validation images (``data``,
    when the caller has loaded them already), and both models' latency; returns (report, gates)."""
    threads = cfg.threads or physical_cores()
    torch.set_num_threads(threads)
    data = data or EvalData.from_run(run, cfg.parity_samples, calibration_samples=1)
    model = model if model is not None else run.load_model()
    session = open_session(onnx_path, threads)
    torch_logits = logits_at_batch_sizes(torch_predictor(model), data.inputs, cfg.parity_batch_sizes)
    onnx_logits = logits_at_batch_sizes(onnx_predictor(session), data.inputs, cfg.parity_batch_sizes)
    reference, candidate = np.concatenate(torch_logits), np.concatenate(onnx_logits)
    fp32_parity = parity(reference, candidate)
    # like numpy.allclose: |diff| <= atol + rtol * |reference|, element by element; 1.0 = at the limit
    worst = float((np.abs(candidate - reference) / (cfg.atol + cfg.rtol * np.abs(reference))).max())
    fp32_parity.update(reference="torch", batch_sizes=cfg.parity_batch_sizes, atol=cfg.atol, rtol=cfg.rtol,
                       worst_tolerance_fraction=worst)
    report: dict[str, Any] = {
        "source_run": str(run.path),
        "dataset": {"name": run.config.data.name, "split": "val", "num_samples": int(len(data.labels))},
        "machine": machine_info(threads),
        "latency_session": session_policy(threads),
        "variants": {
            "torch": {"accuracy": accuracy(torch_logits[0], data.labels)},
            "fp32": {"path": str(onnx_path), "size_bytes": onnx_size(onnx_path),
                     "accuracy": accuracy(onnx_logits[0], data.labels), "parity": fp32_parity},
        },
    }
    predict = torch_predictor(model)
    runners = {"torch": lambda batch: (lambda: predict(batch)), "fp32": lambda batch: ort_runner(session, batch)}
    figures_by_variant, _ = profile(runners, data.inputs[: max(cfg.batch_sizes)], cfg.batch_sizes, cfg.latency_seconds)
    for name, figures in figures_by_variant.items():
        report["variants"][name].update(figures, latency_measured_by="export")
    report["variants"]["fp32"]["providers_p50_ms"] = provider_latency(onnx_path, data.inputs, threads, cfg.latency_seconds)
    gates = Gates()
    gates.check(worst <= 1.0, f"fp32 parity: max |logit diff| {fp32_parity['max_abs_diff']:.3g} exceeds atol "
                              f"{cfg.atol:g} + rtol {cfg.rtol:g} x |logit| ({worst:.1f}x the tolerance; vs torch)")
    gates.check(fp32_parity["top1_agreement"] >= 1.0,
                f"fp32 parity: top-1 agreement {fp32_parity['top1_agreement']:.2%} < 100% (vs torch)")
    report["gates"] = gates.as_dict()
    return report, gates


def revalidate(onnx_path: str | Path, run_dir: str | Path, output_dir: str | Path,
               cfg: ExportConfig | None = None) -> dict[str, Any]:
    """Validate an existing ONNX file (e.g. one edited or copied since) against its run; writes the
    report to ``output_dir`` and raises GateError when a gate fails."""
    cfg = cfg or ExportConfig()
    open_session(onnx_path, 1)  # a missing or unreadable file: one clear error before any work
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report, gates = validate(Path(onnx_path), load_run(run_dir), cfg)
    write_report(report, out)
    gates.raise_if_failed(str(out / "report.json"))
    return report
