"""Stage ``report``: an export directory -> ``report.html`` and ``usability.json``: is each variant
still a usable model?

For every variant (the export directory's ``fp32`` and ``int8`` files, the PyTorch model its lineage
leads to, and the variants of ``--compare`` directories), on the run's validation examples, through
the task's usability suite (:class:`~ftdeploy.tasks.base.UsabilitySuite`):

- **task performance**: the task's metric and its own figures (a classifier's per-class F1 and
  confusion matrix);
- **robustness**: the metric under the task's corruptions of the raw input (images: Gaussian noise,
  blur, brightness, contrast, JPEG, rotation, translation, occlusion; text: typos, word dropout, ...)
  at five severities; the mean corruption metric and its drop against FP32;
- **calibration**: the task's (a classifier's ECE, Brier score, NLL, reliability diagram and a
  fitted temperature);
- **interpretability**: occlusion maps computed through each variant's own predictor
  (model-agnostic: INT8 and pruned files are explained exactly as FP32 is), their Spearman agreement
  with FP32's maps, and integrated gradients for the PyTorch model;
- **scalability**: p50/p99 latency over the task's grid (variants timed side by side), throughput,
  the session's peak memory, file size.

Budgets turn the figures into a pass/fail verdict; ``--strict`` exits 2 on a failed budget after
writing both files.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import ReportConfig
from .data import build_datasets
from .errors import FtdeployError, RunDirError
from .evaluation import onnx_predictor, torch_predictor
from .files import relative, write_text
from .gates import Gates
from .latency import compare, session_policy
from .machine import machine_info, physical_cores
from .onnx_model import onnx_size, open_session, update_metadata
from .records import (BudgetCheck, LatencyGrid, Robustness, UsabilityDataset, UsabilityRecord, UsabilityVariant,
                      write_record)
from .report import usability_html
from .rundir import ExportDir, load_export, manifest, write_manifest
from .tasks import Outputs, Task, UsabilitySuite
from .tasks.base import Predictor

log = logging.getLogger(__name__)


# --- interpretability ----------------------------------------------------------------------------

def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two maps (average ranks for ties)."""
    from scipy.stats import spearmanr

    a, b = a.ravel(), b.ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 1.0 if np.ptp(a) == np.ptp(b) == 0 else 0.0
    return float(spearmanr(a, b).statistic)


# --- scalability ---------------------------------------------------------------------------------

MEMORY_PROBE = """
import sys, numpy as np
kind, path, threads, shape = sys.argv[1], sys.argv[2], int(sys.argv[3]), [int(v) for v in sys.argv[4].split(",")]
answer = sys.argv[5]  # the file the parent reads the peak from (kB)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

if kind == "onnx":
    import onnxruntime
    from ftdeploy.latency import ort_session
else:
    import torch
    from ftdeploy.rundir import load_run
    torch.set_num_threads(threads)
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # reset the peak: the imports' own peak is not the model's
    f.write("5")
if kind == "onnx":
    session = ort_session(path, threads)
    # token ids (int64) as ones, images as zeros: every input at the probed shape
    session.run(None, {i.name: np.ones(shape, np.int64) if i.type == "tensor(int64)" else np.zeros(shape, np.float32)
                       for i in session.get_inputs()})
else:
    run = load_run(path)
    model = run.load_model()
    kinds = [a.dtype for a in run.task.example_inputs(run.preprocessing, run.input_names)]
    with torch.inference_mode():
        model(*(torch.ones(shape, dtype=torch.long) if k == np.int64 else torch.zeros(shape) for k in kinds))
with open(answer, "w") as f:
    f.write(str(status("VmHWM") - before))
"""


def peak_memory_mb(kind: str, path: Path, threads: int, shape: tuple[int, ...]) -> float | None:
    """Peak resident memory a fresh process gains by loading the model and running one batch (Linux's
    /proc peak counter; None where it cannot be read)."""
    with tempfile.TemporaryDirectory() as tmp:
        answer = Path(tmp) / "peak_kb"
        result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, kind, str(path), str(threads),
                                 ",".join(map(str, shape)), str(answer)], capture_output=True, text=True, timeout=300)
        return int(answer.read_text()) / 1024 if result.returncode == 0 and answer.is_file() else None


@dataclass
class Variant:
    """One model to judge: how to run it at a thread count, and what it is."""

    name: str
    kind: str  # onnx | torch
    path: Path  # the ONNX file, or the run directory of a PyTorch model
    make: Callable[[int], Predictor]  # threads -> batched predictor
    model: Any = None  # the PyTorch module, for gradients
    own: bool = True  # in the reported export directory (False: a --compare one, read only)


def gather_variants(export_dirs: list[ExportDir]) -> tuple[list[Variant], str | None]:
    """The variants of the first export directory (torch first, when its run can be found), then
    those of the others, named ``<directory>/<variant>``; returns them and why the PyTorch variant
    is missing (None when it is there)."""
    variants: list[Variant] = []
    first = export_dirs[0]
    try:
        variants.append(_torch_variant(first.load_source_run()))
        no_torch = None
    except RunDirError as e:  # a copied export directory without its run: the ONNX files still report
        no_torch = str(e)
    for i, src in enumerate(export_dirs):
        prefix = "" if i == 0 else f"{_label(src.path)}/"
        if i and (src.classes, src.report.source.preprocessing) != (first.classes, first.report.source.preprocessing):
            raise FtdeployError(f"--compare {src.path}: its model was trained on other classes or preprocessing than "
                                f"{first.path}'s", "compare export directories of runs on the same data "
                                "(e.g. a run and its pruned run)")
        for v in ("fp32", "int8"):
            path = src.variant_path(v)
            if path is not None:
                variants.append(Variant(prefix + v, "onnx", path, _onnx_maker(path), own=i == 0))
    return variants, no_torch


def _label(path: Path) -> str:
    return path.parent.name if path.name == "export" else path.name


def _onnx_maker(path: Path) -> Callable[[int], Predictor]:
    sessions: dict[int, Any] = {}

    def make(threads: int) -> Predictor:
        if threads not in sessions:
            sessions[threads] = open_session(path, threads)
        return onnx_predictor(sessions[threads])

    return make


def _torch_variant(run) -> Variant:
    import torch

    model = run.load_model()

    def make(threads: int) -> Predictor:
        torch.set_num_threads(threads)
        return torch_predictor(model, run.input_names)

    return Variant("torch", "torch", run.path, make, model)


# --- the stage -----------------------------------------------------------------------------------

def report(export_dir: str | Path, cfg: ReportConfig | None = None) -> Path:
    """Judge every variant of ``export_dir`` (and of ``cfg.compare``); writes the HTML report and
    ``usability.json`` beside it and returns the HTML path. Raises GateError for failed budgets
    under ``cfg.strict``, after writing both files.

    Example::

        report("runs/digits/export")
    """
    from tqdm.auto import tqdm

    cfg = cfg or ReportConfig()
    source = load_export(export_dir)
    task = source.task
    cfg = cfg.model_copy(update={"corruptions": cfg.corruptions or task.default_corruptions})
    splits = build_datasets(source.data.model_copy(update={"augment": False, "max_train_samples": None}),
                            source.preprocessing)
    suite = task.usability_suite(splits, source.preprocessing, cfg.val_limit, source.info)
    for name in cfg.corruptions:  # a misspelt one fails now, naming the known ones
        suite.corruptions.get(name)
    out = Path(cfg.output or source.path / "report.html")
    variants, no_torch = gather_variants([source, *(load_export(d) for d in cfg.compare)])
    threads = physical_cores()
    clean = suite.inputs()
    steps = len(variants) * (1 + len(cfg.corruptions) * len(cfg.severities)) + len(variants) * 2
    bar = tqdm(total=steps, desc="usability report", unit="step", disable=None, mininterval=0.5)
    results: dict[str, UsabilityVariant] = {}
    outputs: dict[str, Outputs] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    for v in variants:
        outputs[v.name] = task.outputs(v.make(threads), clean, 64)
        results[v.name] = UsabilityVariant(kind=v.kind, path=relative(v.path, out.parent),
                                           scores=suite.score(outputs[v.name], clean).values,
                                           performance=suite.performance(outputs[v.name], clean),
                                           calibration=suite.calibration(outputs[v.name], clean),
                                           size_bytes=onnx_size(v.path) if v.kind == "onnx" else None)
        bar.update()
    robustness(variants, task, suite, cfg, threads, results, bar)
    explained = saliency(variants, suite, clean, outputs, cfg, threads, results, bar)
    scalability(variants, suite, clean, cfg, results, bar)
    bar.close()
    if cfg.calibrate:
        store_temperatures(variants, results)
    record = UsabilityRecord(
        source=relative(source.path, out.parent), source_run=relative(source.source_run, out.parent),
        torch_variant_missing=no_torch, metric=cfg.metric or task.metric,
        metric_label=task.metric_label if (cfg.metric or task.metric) == task.metric else cfg.metric,
        dataset=UsabilityDataset(name=source.data.name, split="val", num_samples=len(clean), unit=task.unit,
                              corrupted=suite.corrupted),
        machine=machine_info(threads), latency_session=session_policy(threads), settings=cfg.model_dump(mode="json"),
        classes=source.classes, variants=results, saliency_inputs=explained)
    gates = budgets(record, cfg)
    write_record(out.with_name("usability.json"), record)
    write_text(out, usability_html(record, suite.sections(record.model_dump(mode="json")),
                                   source.source_run.resolve().name))
    if cfg.calibrate or out.parent.resolve() == source.path.resolve():  # its files changed: hashes again
        write_manifest(source.path, manifest("report", source.path, config=cfg))
    log.info("usability report: %s (%s)", out, "budgets passed" if gates.passed else f"{len(gates.failures)} budget(s) failed")
    if no_torch:
        log.warning("the PyTorch variant is left out: %s", no_torch)
    if cfg.strict:
        gates.raise_if_failed(str(out.with_name("usability.json")))
    return out


def robustness(variants: list[Variant], task: Task, suite: UsabilitySuite, cfg: ReportConfig, threads: int,
               results: dict[str, UsabilityVariant], bar) -> None:
    """The metric of every variant under every corruption and severity (the same seeded inputs for all)."""
    metric = cfg.metric or task.metric
    by_variant: dict[str, dict[str, dict[str, float]]] = {v.name: {} for v in variants}
    predictors = {v.name: v.make(threads) for v in variants}
    for corruption in cfg.corruptions:
        for severity in cfg.severities:
            inputs = suite.inputs(corruption, severity)
            for v in variants:
                value = suite.score(task.outputs(predictors[v.name], inputs, 64), inputs).get(metric)
                by_variant[v.name].setdefault(corruption, {})[str(severity)] = value
                bar.update()
    for v in variants:
        mean = float(np.mean([a for sev in by_variant[v.name].values() for a in sev.values()]))
        results[v.name].robustness = Robustness(mean_corruption_metric=mean, by_corruption=by_variant[v.name])
    reference = results.get("fp32")
    for v in variants:
        r = results[v.name].robustness
        r.drop_vs_fp32_points = (None if reference is None
                                 else 100 * (reference.robustness.mean_corruption_metric - r.mean_corruption_metric))
        r.clean_minus_corrupted_points = 100 * (results[v.name].scores[metric] - r.mean_corruption_metric)


def saliency(variants: list[Variant], suite: UsabilitySuite, clean, outputs: dict[str, Outputs],
             cfg: ReportConfig, threads: int, results: dict[str, UsabilityVariant], bar) -> dict[str, Any]:
    """Occlusion maps of every variant on the same examples (explaining what FP32 answers there), and
    their agreement with FP32's; returns the explained examples."""
    reference = "fp32" if "fp32" in outputs else variants[0].name
    samples = suite.saliency_samples(outputs[reference], cfg.samples)
    targets = [suite.target(outputs[reference], i) for i in samples]
    maps: dict[str, list[np.ndarray]] = {}
    for v in variants:
        predict = v.make(threads)
        maps[v.name] = [suite.occlusion(predict, clean, i, t) for i, t in zip(samples, targets)]
        bar.update()
    for v in variants:
        agreement = [spearman(a, b) for a, b in zip(maps[v.name], maps[reference])]
        record = {**suite.saliency_method(clean), "target": "fp32 prediction", "samples": samples,
                  "agreement_with_fp32": float(np.mean(agreement)), "agreement_per_sample": agreement,
                  "maps": [m.round(5).tolist() for m in maps[v.name]]}
        if v.kind == "torch":
            record["integrated_gradients"] = [suite.integrated_gradients(v.model, clean, i, t).round(6).tolist()
                                              for i, t in zip(samples, targets)]
        results[v.name].saliency = record
    return {"samples": samples, **suite.explained(samples, outputs[reference])}


def scalability(variants: list[Variant], suite: UsabilitySuite, clean, cfg: ReportConfig,
                results: dict[str, UsabilityVariant], bar) -> None:
    """Every variant timed side by side in each cell of the task's grid (batch size x threads for
    images, batch size x sequence length for text)."""
    table: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    for cell, batch, threads in suite.grid(clean, cfg, physical_cores()):
        runners = {v.name: (lambda p=v.make(threads), b=batch: p(b)) for v in variants}
        result = compare(runners, cell["batch_size"], rounds=3, seconds=cfg.latency_seconds)
        for name, st in result.stats.items():
            table[name].append({**cell, "p50_ms": st.p50, "p99_ms": st.p99, "throughput": st.throughput})
    top = max(r["threads"] for r in next(iter(table.values())))
    for v in variants:
        shape = suite.probe_shape(clean, cfg)
        results[v.name].latency = LatencyGrid(
            grid=table[v.name], peak_memory_mb=peak_memory_mb(v.kind, v.path, physical_cores(), shape)
            if cfg.peak_memory else None,
            p99_ms_bs1=next((r["p99_ms"] for r in table[v.name] if r["batch_size"] == 1 and r["threads"] == top), None))
        bar.update()


def store_temperatures(variants: list[Variant], results: dict[str, UsabilityVariant]) -> None:
    """Write each ONNX variant's fitted temperature (where the task fits one) into its metadata
    (atomically); ftdeploy serve applies it. Only the reported directory's files: a --compare
    directory is read, never written."""
    for v in variants:
        temperature = results[v.name].calibration.get("temperature")
        if v.kind == "onnx" and v.own and temperature is not None:
            update_metadata(v.path, {"temperature": temperature})
            results[v.name].calibration["temperature_stored"] = True


def budgets(record: UsabilityRecord, cfg: ReportConfig) -> Gates:
    """Check every budget for every variant it applies to; records each in ``record.budgets``."""
    gates, checks = Gates(), {}
    variants, metric = record.variants, record.metric

    def check(name: str, variant: str, limit: float, value: float | None, ok: bool) -> None:
        if value is None:
            return
        checks[f"{name}:{variant}"] = BudgetCheck(limit=limit, value=value, passed=bool(ok))
        gates.check(ok, f"{variant}: {name.replace('_', ' ')} ({metric}) {value:.4g} against a limit of {limit:g}")

    fp32 = variants.get("fp32")
    for name, v in variants.items():
        rob, ece, value = v.robustness, v.calibration.get("ece"), v.scores.get(metric)
        if cfg.min_metric is not None:
            check("min_metric", name, cfg.min_metric, value, value is not None and value >= cfg.min_metric)
        if cfg.max_metric_drop is not None and fp32 is not None and name != "fp32":
            drop = 100 * (fp32.scores[metric] - value)
            check("max_metric_drop", name, cfg.max_metric_drop, drop, drop <= cfg.max_metric_drop)
        if cfg.min_mean_corruption_metric is not None:
            mcm = rob.mean_corruption_metric
            check("min_mean_corruption_metric", name, cfg.min_mean_corruption_metric, mcm,
                  mcm >= cfg.min_mean_corruption_metric)
        if cfg.max_robustness_drop is not None and name != "fp32" and rob.drop_vs_fp32_points is not None:
            check("max_robustness_drop", name, cfg.max_robustness_drop, rob.drop_vs_fp32_points,
                  rob.drop_vs_fp32_points <= cfg.max_robustness_drop)
        if cfg.max_ece is not None:
            check("max_ece", name, cfg.max_ece, ece, ece is not None and ece <= cfg.max_ece)
        if cfg.min_saliency_agreement is not None and name != "fp32":
            agreement = v.saliency["agreement_with_fp32"]
            check("min_saliency_agreement", name, cfg.min_saliency_agreement, agreement,
                  agreement >= cfg.min_saliency_agreement)
        if cfg.max_p99_ms is not None:
            p99 = v.latency.p99_ms_bs1
            check("max_p99_ms", name, cfg.max_p99_ms, p99, p99 is not None and p99 <= cfg.max_p99_ms)
    record.budgets, record.passed, record.failures = checks, gates.passed, gates.failures
    return gates
