"""Export a run to ONNX and validate it in onnxruntime: parity with PyTorch on real data, latency.

``export_run`` writes ``OUT/model.onnx`` (checked, shape-inferred, optimized offline by
onnxruntime, carrying class names and preprocessing in its metadata), then ``OUT/report.json`` and
``OUT/report.md``. Every gate failure is collected, the report is written, then one
:class:`~ftdeploy.errors.GateError` lists them all.

>>> report = export_run("runs/digits", "runs/digits/export")  # doctest: +SKIP
>>> report["gates"]["passed"]  # doctest: +SKIP
True
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .config import ExportConfig, QuantizeConfig
from .errors import ExportError, GateError
from .latency import LatencyStats, measure_interleaved, ort_runner, ort_session, tile_batch
from .machine import machine_info, physical_cores
from .onnx_model import write_metadata
from .rundir import Run, load_run

TWO_GB = 2**31 - 2**24  # protobuf's hard limit, less a margin for the graph itself
INPUT, OUTPUT = "input", "logits"


def export_onnx(model: torch.nn.Module, sample: torch.Tensor, path: Path, opset: int = 18,
                exporter: str = "auto") -> tuple[str, str | None]:
    """Export with a dynamic batch axis; returns (exporter used, why dynamo was not used)."""
    model = model.eval()
    dynamo_error = None
    if exporter in ("auto", "dynamo"):
        try:
            _quiet(lambda: torch.onnx.export(
                model, (sample,), str(path), dynamo=True, opset_version=opset, input_names=[INPUT],
                output_names=[OUTPUT], dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
                external_data=_too_big(model)))
            return "dynamo", None
        except Exception as e:  # the dynamo exporter raises many types; the fallback decides
            dynamo_error = e
            if exporter == "dynamo":
                raise _export_error(model, e) from None
    try:
        _quiet(lambda: torch.onnx.export(
            model, (sample,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT],
            output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}))
    except Exception as e:
        raise _export_error(model, e, dynamo_error) from None
    return "torchscript", _first_line(dynamo_error) if dynamo_error else None


def _quiet(fn) -> None:
    """The exporters print progress and deprecation chatter; keep it out of the user's terminal."""
    import warnings

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn()


def _too_big(model: torch.nn.Module) -> bool:
    return sum(p.numel() * p.element_size() for p in model.state_dict().values()) > TWO_GB


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


_OP_PATTERNS = (r"No ONNX function found for <OpOverload\(op='([\w.:]+)'", r"target=torch\.ops\.([\w.]+?)\.default",
                r"unrecognized namespace ([\w:]+)", r"Exporting the operator '?([\w:]+)'? to ONNX")


def _export_error(model: torch.nn.Module, *errors: BaseException | None) -> ExportError:
    text = "\n".join(str(e) for e in errors if e is not None)
    ops = sorted({m for pattern in _OP_PATTERNS for m in re.findall(pattern, text)})
    name = type(model).__name__
    if ops:
        return ExportError(f"cannot export {name} to ONNX: no ONNX translation for operator(s) {', '.join(ops)}",
                           "replace the op with supported ones, or register an ONNX translation for it")
    return ExportError(f"cannot export {name} to ONNX: " + "; ".join(_first_line(e) for e in errors if e is not None))


def finalize(raw: Path, out: Path, metadata: dict[str, Any], optimization: str = "extended") -> None:
    """Check the raw export, apply onnxruntime's graph optimizations offline, store the metadata."""
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(raw), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(raw))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"the exported graph is not valid ONNX: {_first_line(e)}") from None
    large = sum(f.stat().st_size for f in raw.parent.iterdir()) > TWO_GB
    optimized = raw.with_name("optimized.onnx")
    if optimization == "none":
        shutil.copy(raw, optimized)
    else:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                         "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[optimization]
        opts.optimized_model_filepath = str(optimized)
        if large:
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        ort.InferenceSession(str(raw), opts, providers=["CPUExecutionProvider"])
    model = onnx.load(str(optimized))
    write_metadata(model, metadata)
    for stale in (out, out.with_name(out.name + ".data")):
        stale.unlink(missing_ok=True)
    onnx.save_model(model, str(out), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=out.name + ".data")


def onnx_metadata(run: Run, variant: str) -> dict[str, Any]:
    return {"classes": run.classes, "preprocessing": run.preprocessing.__dict__, "variant": variant,
            "source_run": str(run.path), "model": run.architecture["name"], "version": __version__,
            "val_accuracy": run.metrics.get("val_accuracy")}


def run_splits(run: Run):
    """A run's train/val datasets, preprocessed as in training and without augmentation. Built once
    per stage: building an image folder decodes every file."""
    from .data import build_datasets

    return build_datasets(run.config.data.model_copy(update={"augment": False}), run.preprocessing)


def split_arrays(ds, limit: int, shuffle: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``limit`` images of a dataset as (inputs, labels) arrays (a seeded random subset when shuffled)."""
    order = np.random.default_rng(0).permutation(len(ds)) if shuffle else np.arange(len(ds))
    xs, ys = zip(*(ds[int(i)] for i in order[:limit]))
    return torch.stack(xs).numpy(), np.asarray(ys)


def batched(fn, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([fn(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])


def torch_predictor(model: torch.nn.Module):
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return run


def onnx_predictor(session):
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Logit agreement of two models on the same inputs."""
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    num = (reference * candidate).sum(-1)
    den = np.linalg.norm(reference, axis=-1) * np.linalg.norm(candidate, axis=-1)
    cosine = num / np.maximum(den, 1e-12)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "cosine": float(cosine.mean()),
            "min_cosine": float(cosine.min()),
            "top1_agreement": float((reference.argmax(-1) == candidate.argmax(-1)).mean())}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == labels).mean())


def latency(runners: dict[str, Any], samples: np.ndarray, cfg: ExportConfig) -> dict[str, dict[str, Any]]:
    """Latency of every variant (name -> batch -> callable), measured interleaved at each batch size."""
    per_variant: dict[str, dict[str, LatencyStats]] = {name: {} for name in runners}
    for bs in cfg.batch_sizes:
        batch = tile_batch(samples, bs)
        stats = measure_interleaved({name: make(batch) for name, make in runners.items()}, bs,
                                    min_seconds=cfg.latency_seconds)
        for name, st in stats.items():
            per_variant[name][str(bs)] = st
    return {name: {"latency_ms": {k: {"p50": s.p50, "p90": s.p90, "p99": s.p99} for k, s in stats.items()},
                   "throughput": {k: s.throughput for k, s in stats.items()},
                   "iterations": {k: s.iterations for k, s in stats.items()}}
            for name, stats in per_variant.items()}


def logits_at_batch_sizes(predict, inputs: np.ndarray, batch_sizes: list[int]) -> list[np.ndarray]:
    return [batched(predict, inputs, bs) for bs in batch_sizes]


def validate(onnx_path: Path, run: Run, out: Path, cfg: ExportConfig, exporter: str | None = None,
             fallback_reason: str | None = None, quantize: QuantizeConfig | None = None,
             raw: Path | None = None) -> dict[str, Any]:
    """Parity and latency of ``onnx_path`` against the run's PyTorch model (and, with ``quantize``,
    of an INT8 model made from the ``raw`` export against it); writes report.json/.md, then raises
    one GateError listing every failed check."""
    from .report import write_report

    threads = cfg.threads or physical_cores()
    torch.set_num_threads(threads)
    splits = run_splits(run)
    inputs, labels = split_arrays(splits.val, cfg.parity_samples)
    model = run.load_model()
    session = ort_session(onnx_path, threads)

    torch_logits = logits_at_batch_sizes(torch_predictor(model), inputs, cfg.parity_batch_sizes)
    onnx_logits = logits_at_batch_sizes(onnx_predictor(session), inputs, cfg.parity_batch_sizes)
    fp32_parity = parity(np.concatenate(torch_logits), np.concatenate(onnx_logits))
    fp32_parity.update(reference="torch", batch_sizes=cfg.parity_batch_sizes)

    torch_run = torch_predictor(model)
    report = {
        "source_run": str(run.path),
        "dataset": {"name": run.config.data.name, "split": "val", "num_samples": int(len(labels))},
        "machine": machine_info(threads),
        "variants": {
            "torch": {"accuracy": accuracy(torch_logits[0], labels)},
            "fp32": {"path": str(onnx_path), "size_bytes": onnx_size(onnx_path),
                     "accuracy": accuracy(onnx_logits[0], labels), "exporter": exporter,
                     "exporter_fallback_reason": fallback_reason, "opset": cfg.opset,
                     "optimization": cfg.optimization, "parity": fp32_parity},
        },
    }
    runners = {"torch": lambda batch: (lambda: torch_run(batch)), "fp32": lambda batch: ort_runner(session, batch)}
    failures = []
    if fp32_parity["max_abs_diff"] > cfg.atol:
        failures.append(f"fp32 parity: max |logit diff| {fp32_parity['max_abs_diff']:.3g} > atol {cfg.atol:g} (vs torch)")
    if fp32_parity["top1_agreement"] < 1.0:
        failures.append(f"fp32 parity: top-1 agreement {fp32_parity['top1_agreement']:.2%} < 100% (vs torch)")
    if quantize is not None and raw is not None:
        calibration, _ = split_arrays(splits.train, quantize.calibration_samples, shuffle=True)
        failures += add_int8(report, runners, run, raw, onnx_path, out, cfg, quantize, inputs, labels, calibration,
                             onnx_logits, threads)
    for name, figures in latency(runners, inputs[: max(cfg.batch_sizes)], cfg).items():
        report["variants"][name].update(figures)
    if "int8" in report["variants"]:
        key = "1" if 1 in cfg.batch_sizes else str(cfg.batch_sizes[0])
        fp32_ms, int8_ms = (report["variants"][v]["latency_ms"][key]["p50"] for v in ("fp32", "int8"))
        if int8_ms >= fp32_ms:  # the search measured it faster; a slower final figure must not ship silently
            (out / "model.int8.onnx").unlink(missing_ok=True)
            report["variants"]["int8"]["shipped"] = False
            failures.append(f"int8: {int8_ms:.2f} ms is not faster than fp32 {fp32_ms:.2f} ms in the final "
                            "measurement; the int8 file was removed")
    report["gates"] = {"passed": not failures, "failures": failures}
    write_report(report, out)
    if failures:
        raise GateError(failures, str(out / "report.json"))
    return report


def add_int8(report: dict[str, Any], runners: dict[str, Any], run: Run, raw: Path, fp32_path: Path, out: Path,
             cfg: ExportConfig, qcfg: QuantizeConfig, inputs: np.ndarray, labels: np.ndarray, calibration: np.ndarray,
             fp32_logits: list[np.ndarray], threads: int) -> list[str]:
    """Search for an INT8 model that is faster and within the accuracy budget; record it in ``report``
    and add its runner to ``runners`` so that its latency is measured beside the others."""
    from .quantize import Evaluator, quantize_variant

    evaluator = Evaluator(inputs, labels, threads, qcfg.latency_seconds)
    int8_path = out / "model.int8.onnx"
    record, failures = quantize_variant(raw, fp32_path, int8_path, qcfg, calibration, evaluator,
                                        onnx_metadata(run, "int8"))
    report["quantization"] = record
    if not int8_path.is_file():
        return failures
    session = ort_session(int8_path, threads)
    int8_logits = logits_at_batch_sizes(onnx_predictor(session), inputs, cfg.parity_batch_sizes)
    int8_parity = parity(np.concatenate(fp32_logits), np.concatenate(int8_logits))
    int8_parity.update(reference="fp32", batch_sizes=cfg.parity_batch_sizes)
    fp32 = report["variants"]["fp32"]
    report["variants"]["int8"] = {
        "path": str(int8_path), "size_bytes": onnx_size(int8_path), "accuracy": accuracy(int8_logits[0], labels),
        "exporter": fp32["exporter"], "opset": fp32["opset"], "parity": int8_parity}
    runners["int8"] = lambda batch: ort_runner(session, batch)
    return failures


def onnx_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def export_run(run_dir: str | Path, output_dir: str | Path, cfg: ExportConfig | None = None,
               quantize: QuantizeConfig | None = None) -> dict[str, Any]:
    """Export ``run_dir``'s model to ``output_dir/model.onnx`` (and, with ``quantize``,
    ``model.int8.onnx``), validate it and write the report."""
    cfg = cfg or ExportConfig()
    run = load_run(run_dir)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = run.load_model()
    # Batch 2 for the trace: batch 1 invites the exporter to specialize the batch dimension.
    sample = torch.zeros(2, *run.preprocessing.input_shape)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        exporter, reason = export_onnx(model, sample, raw, cfg.opset, cfg.exporter)
        finalize(raw, out / "model.onnx", onnx_metadata(run, "fp32"), cfg.optimization)
        (out / "model.int8.onnx").unlink(missing_ok=True)  # never leave a stale INT8 file beside a new export
        return validate(out / "model.onnx", run, out, cfg, exporter, reason, quantize, raw)


def revalidate(onnx_path: str | Path, run_dir: str | Path, output_dir: str | Path,
               cfg: ExportConfig | None = None) -> dict[str, Any]:
    """Validate an existing ONNX file (e.g. one edited or copied since) against its run."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return validate(Path(onnx_path), load_run(run_dir), out, cfg or ExportConfig())
