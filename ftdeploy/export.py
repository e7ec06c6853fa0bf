"""Stage ``export``: a run directory -> an export directory with a validated FP32 ONNX file.

Writes ``OUT/model.onnx`` (checked, shape-inferred, optimized offline by onnxruntime, carrying class
names and preprocessing in its metadata) and ``OUT/model.unoptimized.onnx`` (the checked graph
before onnxruntime's fusions: what quantization starts from), then validates the file in
onnxruntime: parity with PyTorch on the run's validation images, and latency of both, timed side by
side. ``report.json``, ``report.md``, ``latency.png`` and ``manifest.json`` are written even when a
gate fails; the file then never carries the shipping name: it is kept as ``model.rejected.onnx``
for inspection, and one :class:`~ftdeploy.errors.GateError` lists every failure.

The parity gate is grounded in float64: PyTorch's float32 outputs and the file's are both compared
with the same model run in float64, and the file passes when it is within
``export.parity_error_ratio`` times PyTorch float32's own error (plus ``export.atol``). Two float32
answers differ by their summation order; neither is the truth, and a fixed bound on their
difference fails correct files on CPUs that sum in another order.

Example::

    export_dir = export("runs/digits", "runs/digits/export")
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from .config import ExportConfig
from .conversion import export_onnx, finalize, onnx_metadata, outputs_of
from .evaluation import EvalData, ParitySet, fp32_parity, onnx_predictor, reference_outputs, torch_predictor
from .files import relative
from .gates import Gates
from .latency import FASTER, beside_reference, ort_runner, profile, provider_latency, session_policy, tile_batch
from .machine import machine_info, physical_cores
from .errors import FtdeployError
from .onnx_model import (ANSWER_MARGIN, OnnxModel, ANSWERED_SAMPLES, encode_answers, external_data, fuse_transformer, model_metadata,
                         move_onnx, onnx_size, open_session, read_metadata, save_onnx, update_metadata, write_metadata)
from .records import (DatasetRecord, ExportReport, GatesRecord, ParityRecord, SourceRecord, VariantRecord,
                      latency_fields)
from .report import write_report
from .rundir import Run, load_run, manifest, write_manifest
from .tasks.base import output_errors

log = logging.getLogger(__name__)
SHIPPED, REJECTED, UNOPTIMIZED = "model.onnx", "model.rejected.onnx", "model.unoptimized.onnx"
SAMPLES = 8  # validation images stored in the file, for checks where it runs (serve --provider)
# a later stage's files, from an older export
STALE = ("model.int8.onnx", "model.int8.rejected.onnx", "usability.json", "report.html")


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
    task, names = run.task, run.input_names
    args = [torch.from_numpy(a) for a in task.example_inputs(run.preprocessing, names)]
    candidate = out / ".model.validating.onnx"  # no shipping name until the gates have passed
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        exporter, reason = export_onnx(model, args, raw, cfg.opset, cfg.exporter, names, task.dynamic_axes(names),
                                       task.exporter_order, *outputs_of(task, run.info))
        # one load for all (building an image folder decodes every file): the samples stored in the
        # file, the parity examples and the examples every variant is scored on
        data = EvalData.from_run(run, max(cfg.eval_samples, cfg.parity_samples, SAMPLES), calibration_samples=1)
        samples = task.encode_samples(data.inputs[:SAMPLES], run.preprocessing)
        metadata = {**onnx_metadata(run, "fp32", out), "samples": samples}
        finalize(raw, candidate, metadata, cfg.optimization)
        options = task.fusion_options(run.architecture) if cfg.fusions else None
        fusions = (transformer_fusions(raw, candidate, metadata, options, data.bench,
                                       cfg.threads or physical_cores(), cfg.latency_seconds) if options else None)
        (out / UNOPTIMIZED).unlink(missing_ok=True)
        if cfg.optimization != "none":
            save_onnx(onnx.load(str(raw)), out / UNOPTIMIZED)
    report, gates = validate(candidate, run, cfg, out, model, data)
    store_answers(candidate, model, run, report.variants["fp32"].parity)
    final = out / (SHIPPED if gates.passed else REJECTED)
    (out / (REJECTED if gates.passed else SHIPPED)).unlink(missing_ok=True)  # an older export's verdict
    move_onnx(candidate, final)
    fp32 = report.variants["fp32"]
    fp32.path, fp32.exporter, fp32.exporter_fallback_reason, fp32.opset = final.name, exporter, reason, cfg.opset
    fp32.optimization, fp32.fusions = cfg.optimization, fusions
    fp32.unoptimized_path = UNOPTIMIZED if cfg.optimization != "none" else None
    write_report(report, out)
    write_manifest(out, manifest("export", run.path, config=cfg))
    gates.raise_if_failed(str(out / "report.json"))
    return out


def store_answers(path: Path, model, run: Run, parity: ParityRecord) -> None:
    """Store beside the file's sample inputs the answers PyTorch FP32 gives them, and how far the file
    may be from them: the parity gate's allowed error from float64 plus PyTorch float32's own (the
    answers are float32's), with room for another CPU's rounding. Serving and ``ftdeploy validate``
    hold the file to them (:meth:`~ftdeploy.onnx_model.OnnxModel.check_answers`)."""
    metadata = model_metadata(onnx.load(str(path), load_external_data=False))
    samples = run.task.decode_samples(metadata["samples"], run.preprocessing)[:ANSWERED_SAMPLES]
    answers = torch_predictor(model, run.input_names)(samples)
    tolerance = ANSWER_MARGIN * (parity.allowed_error + parity.torch_fp32_error)
    update_metadata(path, {"sample_answers": encode_answers(answers, tolerance, "PyTorch FP32 at export")})


def transformer_fusions(raw: Path, candidate: Path, metadata: dict[str, Any], options: dict[str, Any], bench,
                        threads: int, seconds: float) -> dict[str, Any]:
    """onnxruntime's transformer fusions (Attention, SkipLayerNormalization, EmbedLayerNormalization,
    Gelu/BiasGelu) on the raw export; the fused file replaces ``candidate`` only when it is measured
    faster at batch 1 than onnxruntime's own optimizations, outside the noise of an A/A session timed
    in the same rounds. The parity gate then checks whichever file ships."""
    try:
        fused_model, found = fuse_transformer(raw, options)
    except Exception as e:  # a graph the optimizer does not understand keeps onnxruntime's own optimizations
        return {"kept": False, "reason": f"the optimizer failed ({type(e).__name__}: {str(e)[:200]})"}
    fused = candidate.with_name(".model.fused.onnx")
    write_metadata(fused_model, metadata)
    save_onnx(fused_model, fused)
    try:
        plain, fused_session = open_session(candidate, threads), open_session(fused, threads)
        sample = bench[:16]
        expected, got = onnx_predictor(plain)(sample), onnx_predictor(fused_session)(sample)
        difference = output_errors(expected, got)[0]
        scale = max(float(np.abs(e).max()) for e in expected)
        if difference > FUSION_RTOL * scale + 1e-4:  # a fusion that changes the answer
            return {"kept": False, "fused_operators": found, "options": options,
                    "reason": f"the fused graph's outputs differ by {difference:.3g} from the unfused graph's"}
        batch = tile_batch(bench, 1)
        result, noise = beside_reference(ort_runner(plain, batch), ort_runner(open_session(candidate, threads), batch),
                                         {"fused": ort_runner(fused_session, batch)}, 1, 2 * seconds, "onnxruntime")
        speedup = result.speedup("onnxruntime", "fused")
        verdict = speedup.verdict(noise)
        kept = verdict in FASTER
        if kept:
            move_onnx(fused, candidate)
        return {"kept": kept, "fused_operators": found, "speedup": speedup.as_dict(), "noise_floor": noise,
                "verdict": verdict, "options": options}
    finally:
        fused.unlink(missing_ok=True)
        external_data(fused).unlink(missing_ok=True)


FUSION_RTOL = 1e-3  # fused kernels sum in another order: they may differ by float32 rounding, not more


def source_record(run: Run) -> SourceRecord:
    """What later stages need of the run, kept in the export directory's report so that they work on
    the directory wherever it is: the data it was trained on, its classes and preprocessing, and what
    the task's postprocess needs."""
    return SourceRecord(task=run.config.task, input_names=run.input_names, data=run.config.data.model_dump(mode="json"),
                        classes=run.classes, preprocessing=run.preprocessing.to_dict(), model=run.architecture["name"],
                        metric=run.metrics.metric, val_metric=run.metrics.val_metric,
                        info={k: v for k, v in run.info.items() if k != "classes"})


def parity_check(model, session, sets: dict[str, Any], cfg: ExportConfig, run: Run) -> ParityRecord:
    """The FP32 parity record of an onnxruntime ``session`` against the PyTorch ``model`` on every
    input set of ``sets`` (the task's: the validation inputs, and for text the same sentences at
    several lengths) at ``cfg.parity_batch_sizes``, grounded in a float64 run of the model (see
    :func:`~ftdeploy.evaluation.fp32_parity`)."""
    task, names = run.task, run.input_names
    torch_predict, onnx_predict = torch_predictor(model, names), onnx_predictor(session)
    runs = [(inputs, [task.outputs(torch_predict, inputs, bs) for bs in cfg.parity_batch_sizes],
             [task.outputs(onnx_predict, inputs, bs) for bs in cfg.parity_batch_sizes]) for inputs in sets.values()]
    note, atol = None, cfg.atol
    try:
        references = [reference_outputs(model, inputs, task, names) for inputs in sets.values()]
    except Exception as e:  # an op without a float64 kernel: PyTorch float32 is the only reference left
        log.warning("no float64 reference (%s): parity is judged against PyTorch float32", e)
        references = [[o.astype(np.float64) for o in t[0]] for _, t, _ in runs]
        note = f"float64 failed ({type(e).__name__}: {e})"[:300]
        # PyTorch's own error is unknown: allow float32 rounding of the largest output instead
        atol += FLOAT32_ONLY_RTOL * max(float(np.abs(o).max()) for ref in references for o in ref)
    record = fp32_parity(task, [ParitySet(inputs, ref, t, o) for (inputs, t, o), ref in zip(runs, references)],
                         cfg.parity_error_ratio, atol, run.info)
    record.batch_sizes, record.parity_error_ratio, record.atol = cfg.parity_batch_sizes, cfg.parity_error_ratio, cfg.atol
    record.input_sets = {name: len(inputs) for name, inputs in sets.items()}
    if note:
        record.error_reference, record.error_reference_note = "torch float32", note
    return record


FLOAT32_ONLY_RTOL = 1e-4  # the gate without a float64 reference: |diff| <= atol + this x max |output|


def validate(onnx_path: Path, run: Run, cfg: ExportConfig, out: Path, model=None, data: EvalData | None = None
             ) -> tuple[ExportReport, Gates]:
    """Parity of ``onnx_path`` against the run's PyTorch model on its validation examples (``data``,
    when the caller has loaded them already), its metadata against the run's, every variant's scores
    on the same examples, and both models' latency; returns (report, gates). Paths in the report are
    relative to ``out``, where it goes."""
    threads = cfg.threads or physical_cores()
    torch.set_num_threads(threads)
    data = data or EvalData.from_run(run, max(cfg.eval_samples, cfg.parity_samples), calibration_samples=1)
    model = model if model is not None else run.load_model()
    session = open_session(onnx_path, threads)
    task = run.task
    record = parity_check(model, session, task.parity_sets(data.inputs[:cfg.parity_samples], run.preprocessing), cfg, run)
    scored = data.head(cfg.eval_samples)
    scores = {name: scored.score(scored.outputs(predict, 64 if name == "torch" else 32)).values
              for name, predict in (("torch", torch_predictor(model, run.input_names)), ("fp32", onnx_predictor(session)))}
    report = ExportReport(
        source_run=relative(run.path, out), source=source_record(run), metric=task.metric,
        dataset=DatasetRecord(name=run.config.data.name, split="val", num_samples=len(scored), unit=task.unit),
        machine=machine_info(threads), latency_session=session_policy(threads),
        variants={"torch": VariantRecord(scores=scores["torch"]),
                  "fp32": VariantRecord(path=relative(onnx_path, out), size_bytes=onnx_size(onnx_path),
                                        scores=scores["fp32"], parity=record)},
        gates=GatesRecord(passed=True))
    predict = torch_predictor(model, run.input_names)
    runners = {"torch": lambda batch: (lambda: predict(batch)), "fp32": lambda batch: ort_runner(session, batch)}
    figures_by_variant, _ = profile(runners, data.bench[: max(cfg.batch_sizes)], cfg.batch_sizes, cfg.latency_seconds)
    for name, figures in figures_by_variant.items():
        report.variants[name] = report.variants[name].model_copy(update={**latency_fields(figures),
                                                                         "latency_measured_by": "export"})
    report.variants["fp32"].providers_p50_ms = provider_latency(onnx_path, data.bench, threads, cfg.latency_seconds)
    gates = Gates()
    gates.check(record.worst_tolerance_fraction <= 1.0,
                f"fp32 parity: the file is {record.onnx_error:.3g} from the {record.error_reference} answer, more "
                f"than {cfg.parity_error_ratio:g}x PyTorch float32's own {record.torch_fp32_error:.3g} + atol "
                f"{cfg.atol:g} ({record.worst_tolerance_fraction:.1f}x the allowed error)")
    gates.check(record.disagreements_counted == 0,
                f"fp32 parity: {record.decision} differs from PyTorch on {record.disagreements_counted} input(s) where "
                f"the float64 answer is clear by more than both models' errors (agreement "
                f"{record.decision_agreement:.2%}, {record.near_ties} near-tie(s) excused)")
    for problem in metadata_mismatches(read_metadata(session), run):
        gates.check(False, f"fp32 metadata: {problem}")
    report.gates = GatesRecord(**gates.as_dict())
    return report, gates


def metadata_mismatches(metadata: dict[str, Any], run: Run) -> list[str]:
    """What the file says about its classes and preprocessing, where it differs from the run: the
    server preprocesses by the file, so a wrong constant there is a wrong model in production."""
    problems = []
    if metadata.get("classes") != run.classes:
        problems.append(f"classes {metadata.get('classes')} differ from the run's {run.classes}")
    stored = metadata.get("preprocessing")
    if stored is None or run.task.preprocessor_from_dict(stored) != run.preprocessing:
        shown = {k: v for k, v in run.preprocessing.to_dict().items() if k != "tokenizer"}
        problems.append(f"preprocessing {str(stored)[:200]} differs from the run's {shown}")
    return problems


def revalidate(onnx_path: str | Path, run_dir: str | Path, output_dir: str | Path,
               cfg: ExportConfig | None = None) -> ExportReport:
    """Validate an existing ONNX file (e.g. one edited or copied since) against its run; writes the
    report to ``output_dir`` and raises GateError when a gate fails."""
    cfg = cfg or ExportConfig()
    open_session(onnx_path, 1)  # a missing or unreadable file: one clear error before any work
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report, gates = validate(Path(onnx_path), load_run(run_dir), cfg, out)
    try:  # the file's own check, as serving runs it: its answers to its samples against the stored ones
        log.info("self-check: %s", OnnxModel(onnx_path, cfg.threads).check_answers())
    except FtdeployError as e:
        gates.check(False, f"self-check: {e.message}")
        report.gates = GatesRecord(**gates.as_dict())
    write_report(report, out)
    gates.raise_if_failed(str(out / "report.json"))
    return report
