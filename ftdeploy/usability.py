"""Stage ``report``: an export directory -> ``report.html`` and ``usability.json``: is each variant
still a usable model?

For every variant (the export directory's ``fp32`` and ``int8`` files, the PyTorch model its lineage
leads to, and the variants of ``--compare`` directories), on the run's validation images:

- **task performance**: accuracy, precision / recall / F1 per class, confusion matrix;
- **robustness**: accuracy under common corruptions (a registry: Gaussian noise, blur, brightness,
  contrast, JPEG, rotation, translation, occlusion) at five severities, applied to the image
  before normalization; the mean corruption accuracy and its drop against FP32;
- **calibration**: ECE (15 bins), Brier score, NLL, a reliability diagram; temperature scaling
  fitted on one half of the validation set and evaluated on the other;
- **interpretability**: occlusion-sensitivity maps computed through each variant's own predictor
  (model-agnostic: INT8 and pruned files are explained exactly as FP32 is), their Spearman agreement
  with FP32's maps, and integrated gradients for the PyTorch model;
- **scalability**: p50/p99 latency over batch sizes and threads (variants timed side by side),
  throughput, the session's peak memory, file size.

Budgets turn the figures into a pass/fail verdict; ``--strict`` exits 2 on a failed budget after
writing both files.

>>> round(expected_calibration_error(np.array([[0.9, 0.1], [0.9, 0.1]]), np.array([0, 1])), 3)
0.4
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import ReportConfig
from .errors import FtdeployError, RunDirError
from .evaluation import Predictor, batched, onnx_predictor, torch_predictor
from .files import relative, write_json, write_text
from .gates import Gates
from .latency import compare, session_policy
from .machine import machine_info, physical_cores
from .onnx_model import onnx_size, open_session, update_metadata
from .report import usability_html
from .rundir import ExportDir, load_export, manifest, write_manifest
from .tasks.base import softmax

# --- task performance and calibration ------------------------------------------------------------

def task_performance(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    pred = logits.argmax(-1)
    k = len(classes)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (labels, pred), 1)
    per_class = {}
    for i, name in enumerate(classes):
        tp = confusion[i, i]
        precision = tp / max(1, confusion[:, i].sum())
        recall = tp / max(1, confusion[i].sum())
        f1 = 2 * precision * recall / max(1e-12, precision + recall)
        per_class[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                           "support": int(confusion[i].sum())}
    return {"accuracy": float((pred == labels).mean()), "per_class": per_class,
            "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
            "confusion_matrix": confusion.tolist()}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Sum over equal-width confidence bins of |accuracy - mean confidence|, weighted by the bin's share."""
    confidence, pred = probs.max(-1), probs.argmax(-1)
    correct = (pred == labels).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[dict[str, float]]:
    confidence, correct = probs.max(-1), (probs.argmax(-1) == labels)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    return [{"low": float(edges[b]), "high": float(edges[b + 1]), "count": int((which == b).sum()),
             "accuracy": float(correct[which == b].mean()) if (which == b).any() else None,
             "confidence": float(confidence[which == b].mean()) if (which == b).any() else None} for b in range(bins)]


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    onehot = np.eye(probs.shape[1])[labels]
    return float(((probs - onehot) ** 2).sum(-1).mean())


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimizes NLL, by golden-section search over log T in [-3, 3]."""
    lo, hi = -3.0, 3.0
    g = (5 ** 0.5 - 1) / 2
    f = lambda t: nll(softmax(logits, float(np.exp(t))), labels)  # noqa: E731
    for _ in range(60):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        lo, hi = (lo, b) if f(a) < f(b) else (a, hi)
    return float(np.exp((lo + hi) / 2))


def calibration(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Calibration at T=1 on all images; temperature fitted on the even-indexed half, evaluated on the odd."""
    probs = softmax(logits)
    fit, held = np.arange(0, len(labels), 2), np.arange(1, len(labels), 2)
    t = fit_temperature(logits[fit], labels[fit])
    before, after = softmax(logits[held]), softmax(logits[held], t)
    return {"ece": expected_calibration_error(probs, labels), "brier": brier(probs, labels), "nll": nll(probs, labels),
            "temperature": t, "ece_held_out": expected_calibration_error(before, labels[held]),
            "ece_after_temperature": expected_calibration_error(after, labels[held]),
            "nll_held_out": nll(before, labels[held]), "nll_after_temperature": nll(after, labels[held]),
            "reliability": reliability(probs, labels)}


# --- interpretability ----------------------------------------------------------------------------

def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two maps (average ranks for ties)."""
    from scipy.stats import spearmanr

    a, b = a.ravel(), b.ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 1.0 if np.ptp(a) == np.ptp(b) == 0 else 0.0
    return float(spearmanr(a, b).statistic)


def saliency_samples(labels: np.ndarray, fp32_pred: np.ndarray, n: int) -> list[int]:
    """``n`` fixed validation images, in dataset order: misclassified ones (up to half), then correct ones."""
    wrong = [int(i) for i in np.flatnonzero(fp32_pred != labels)][: n // 2]
    right = [int(i) for i in np.flatnonzero(fp32_pred == labels)]
    return sorted(wrong + right[: n - len(wrong)])


# --- scalability ---------------------------------------------------------------------------------

MEMORY_PROBE = """
import sys, numpy as np
kind, path, threads, shape = sys.argv[1], sys.argv[2], int(sys.argv[3]), [int(v) for v in sys.argv[4].split(",")]

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
print(status("VmHWM") - before)
"""


def peak_memory_mb(kind: str, path: Path, threads: int, shape: tuple[int, ...]) -> float | None:
    """Peak resident memory a fresh process gains by loading the model and running one batch (Linux's
    /proc peak counter; None where it cannot be read)."""
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, kind, str(path), str(threads),
                             ",".join(map(str, shape))], capture_output=True, text=True, timeout=300)
    return int(result.stdout.strip()) / 1024 if result.returncode == 0 and result.stdout.strip() else None


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
        if i and (src.classes, src.preprocessing) != (first.classes, first.preprocessing):
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
    cfg = cfg.model_copy(update={"corruptions": cfg.corruptions or source.task.default_corruptions})
    images = source.task.usability_suite(source.data, source.preprocessing, cfg.val_limit)  # or texts
    for name in cfg.corruptions:  # a misspelt one fails now, naming the known ones
        images.corruptions.get(name)
    out = Path(cfg.output or source.path / "report.html")
    variants, no_torch = gather_variants([source, *(load_export(d) for d in cfg.compare)])
    threads = physical_cores()
    clean = images.inputs()
    steps = len(variants) * (1 + len(cfg.corruptions) * len(cfg.severities)) + len(variants) * 2
    bar = tqdm(total=steps, desc="usability report", unit="step", disable=None, mininterval=0.5)
    results: dict[str, dict[str, Any]] = {}
    logits: dict[str, np.ndarray] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    for v in variants:
        predict = v.make(threads)
        logits[v.name] = batched(predict, clean, 64)
        results[v.name] = {"kind": v.kind, "path": relative(v.path, out.parent),
                           **task_performance(logits[v.name], images.labels, images.classes),
                           "calibration": calibration(logits[v.name], images.labels),
                           "size_bytes": onnx_size(v.path) if v.kind == "onnx" else None}
        bar.update()
    robustness(variants, images, cfg, threads, results, bar)
    explained = saliency(variants, images, clean, logits, cfg, threads, results, bar)
    scalability(variants, images, clean, cfg, results, bar)
    bar.close()
    if cfg.calibrate:
        store_temperatures(variants, results)
    data = {"source": relative(source.path, out.parent), "source_run": relative(source.source_run, out.parent),
            "torch_variant_missing": no_torch,
            "dataset": {"name": source.data.name, "split": "val", "num_samples": len(images.labels),
                        "unit": source.task.unit, "corrupted": images.corrupted},
            "machine": machine_info(threads), "latency_session": session_policy(threads),
            "settings": cfg.model_dump(mode="json"), "classes": images.classes, "variants": results,
            "saliency_inputs": explained}
    gates = budgets(data, cfg)
    write_json(out.with_name("usability.json"), data)
    write_text(out, usability_html(data))
    if cfg.calibrate or out.parent.resolve() == source.path.resolve():  # its files changed: hashes again
        write_manifest(source.path, manifest("report", source.path, config=cfg))
    print(f"usability report: {out} ({'budgets passed' if gates.passed else f'{len(gates.failures)} budget(s) failed'})")
    if no_torch:
        print(f"note: the PyTorch variant is left out: {no_torch}")
    if cfg.strict:
        gates.raise_if_failed(str(out.with_name("usability.json")))
    return out


def robustness(variants: list[Variant], images, cfg: ReportConfig, threads: int,
               results: dict[str, dict[str, Any]], bar) -> None:
    by_variant: dict[str, dict[str, dict[str, float]]] = {v.name: {} for v in variants}
    predictors = {v.name: v.make(threads) for v in variants}
    for corruption in cfg.corruptions:
        for severity in cfg.severities:
            inputs = images.inputs(corruption, severity)
            for v in variants:
                acc = float((batched(predictors[v.name], inputs, 64).argmax(-1) == images.labels).mean())
                by_variant[v.name].setdefault(corruption, {})[str(severity)] = acc
                bar.update()
    reference = by_variant.get("fp32")
    for v in variants:
        mean = float(np.mean([a for sev in by_variant[v.name].values() for a in sev.values()]))
        results[v.name]["robustness"] = {"mean_corruption_accuracy": mean, "by_corruption": by_variant[v.name]}
    ref_mean = results["fp32"]["robustness"]["mean_corruption_accuracy"] if reference else None
    for v in variants:
        r = results[v.name]["robustness"]
        r["drop_vs_fp32_points"] = None if ref_mean is None else 100 * (ref_mean - r["mean_corruption_accuracy"])
        r["clean_minus_corrupted_points"] = 100 * (results[v.name]["accuracy"] - r["mean_corruption_accuracy"])


def saliency(variants: list[Variant], images, clean, logits: dict[str, np.ndarray],
             cfg: ReportConfig, threads: int, results: dict[str, dict[str, Any]], bar) -> dict[str, Any]:
    """Occlusion maps of every variant on the same images, and their agreement with FP32's; returns
    the explained images."""
    reference = "fp32" if "fp32" in logits else variants[0].name
    fp32_pred = logits[reference].argmax(-1)
    samples = saliency_samples(images.labels, fp32_pred, cfg.samples)
    maps: dict[str, list[np.ndarray]] = {}
    for v in variants:
        predict = v.make(threads)
        maps[v.name] = [images.occlusion(predict, clean, i, int(fp32_pred[i])) for i in samples]
        bar.update()
    for v in variants:
        agreement = [spearman(a, b) for a, b in zip(maps[v.name], maps[reference])]
        results[v.name]["saliency"] = {**images.saliency_method(clean), "target": "fp32 prediction",
                                       "samples": samples, "agreement_with_fp32": float(np.mean(agreement)),
                                       "agreement_per_sample": agreement,
                                       "maps": [m.round(5).tolist() for m in maps[v.name]]}
        if v.kind == "torch":
            results[v.name]["saliency"]["integrated_gradients"] = [
                images.integrated_gradients(v.model, clean, i, int(fp32_pred[i])).round(6).tolist() for i in samples]
    return {"samples": samples, "labels": [images.classes[images.labels[i]] for i in samples],
            "fp32_predictions": [images.classes[fp32_pred[i]] for i in samples], **images.explained(samples)}


def scalability(variants: list[Variant], images, clean, cfg: ReportConfig,
                results: dict[str, dict[str, Any]], bar) -> None:
    """Every variant timed side by side in each cell of the task's grid (batch size x threads for
    images, batch size x sequence length for text)."""
    table: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    for cell, batch, threads in images.grid(clean, cfg, physical_cores()):
        runners = {v.name: (lambda p=v.make(threads), b=batch: p(b)) for v in variants}
        result = compare(runners, cell["batch_size"], rounds=3, seconds=cfg.latency_seconds)
        for name, st in result.stats.items():
            table[name].append({**cell, "p50_ms": st.p50, "p99_ms": st.p99, "throughput": st.throughput})
    top = max(r["threads"] for r in next(iter(table.values())))
    for v in variants:
        shape = images.probe_shape(clean, cfg)
        results[v.name]["latency"] = {"grid": table[v.name],
                                      "peak_memory_mb": peak_memory_mb(v.kind, v.path, physical_cores(), shape)
                                      if cfg.peak_memory else None,
                                      "p99_ms_bs1": next((r["p99_ms"] for r in table[v.name] if r["batch_size"] == 1
                                                          and r["threads"] == top), None)}
        bar.update()


def store_temperatures(variants: list[Variant], results: dict[str, dict[str, Any]]) -> None:
    """Write each ONNX variant's fitted temperature into its metadata (atomically); ftdeploy serve
    applies it. Only the reported directory's files: a --compare directory is read, never written."""
    for v in variants:
        if v.kind == "onnx" and v.own:
            update_metadata(v.path, {"temperature": results[v.name]["calibration"]["temperature"]})
            results[v.name]["calibration"]["temperature_stored"] = True


def budgets(data: dict[str, Any], cfg: ReportConfig) -> Gates:
    """Check every budget for every variant it applies to; records each in ``data['budgets']``."""
    gates, checks = Gates(), {}
    variants = data["variants"]

    def check(name: str, variant: str, limit: float, value: float | None, ok: bool) -> None:
        if value is None:
            return
        checks[f"{name}:{variant}"] = {"limit": limit, "value": value, "passed": bool(ok)}
        gates.check(ok, f"{variant}: {name.replace('_', ' ')} {value:.4g} against a limit of {limit:g}")

    fp32 = variants.get("fp32")
    for name, v in variants.items():
        rob, cal = v["robustness"], v["calibration"]
        if cfg.min_accuracy is not None:
            check("min_accuracy", name, cfg.min_accuracy, v["accuracy"], v["accuracy"] >= cfg.min_accuracy)
        if cfg.max_accuracy_drop is not None and fp32 is not None and name != "fp32":
            drop = 100 * (fp32["accuracy"] - v["accuracy"])
            check("max_accuracy_drop", name, cfg.max_accuracy_drop, drop, drop <= cfg.max_accuracy_drop)
        if cfg.min_mean_corruption_accuracy is not None:
            mca = rob["mean_corruption_accuracy"]
            check("min_mean_corruption_accuracy", name, cfg.min_mean_corruption_accuracy, mca,
                  mca >= cfg.min_mean_corruption_accuracy)
        if cfg.max_robustness_drop is not None and name != "fp32" and rob["drop_vs_fp32_points"] is not None:
            check("max_robustness_drop", name, cfg.max_robustness_drop, rob["drop_vs_fp32_points"],
                  rob["drop_vs_fp32_points"] <= cfg.max_robustness_drop)
        if cfg.max_ece is not None:
            check("max_ece", name, cfg.max_ece, cal["ece"], cal["ece"] <= cfg.max_ece)
        if cfg.min_saliency_agreement is not None and name != "fp32":
            agreement = v["saliency"]["agreement_with_fp32"]
            check("min_saliency_agreement", name, cfg.min_saliency_agreement, agreement,
                  agreement >= cfg.min_saliency_agreement)
        if cfg.max_p99_ms is not None:
            p99 = v["latency"]["p99_ms_bs1"]
            check("max_p99_ms", name, cfg.max_p99_ms, p99, p99 is not None and p99 <= cfg.max_p99_ms)
    data["budgets"], data["passed"], data["failures"] = checks, gates.passed, gates.failures
    return gates
