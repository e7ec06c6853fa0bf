"""Stage ``quantize``: an export directory -> ``model.int8.onnx``, shipped only when it is measured
faster than FP32 and within the metric budget on this CPU.

The INT8 variant and the ``quantization`` record join the export directory's ``report.json`` (or a
copy of it in ``-o OUT``). When no configuration qualifies, FP32 ships alone: the report says why,
and that is not a failure unless ``quantize.required`` (``--strict``) asks for one.

1. **Preflight**: the CPU's integer dot-product support decides activation/weight types and
   ``reduce_range`` (and whether INT8 can be expected to help at all).
2. **Quantize** (onnxruntime): static QDQ with per-channel weights, calibrated on the run's own
   training images (MinMax, Entropy or Percentile), or dynamic for Linear/attention-heavy models.
3. **Measure** the task's metric on the validation examples and latency against the FP32 file, then search:
   candidate exclusions that are slow in INT8 (depthwise convolutions, element-wise ops without
   fast INT8 kernels, first/last layers) are *timed*, and the nodes whose quantization error is
   largest (onnxruntime's QDQ debugging utilities) are kept in FP32 until the metric holds.
   If no configuration is both faster and within the metric budget, nothing is shipped.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from .config import QuantizeConfig
from .errors import FtdeployError, NotShipped
from .evaluation import EvalData, onnx_predictor
from .files import relative, resolve
from .latency import (FASTER, RETAKES, Comparison, Speedup, beside_reference, drifted, ort_runner, profile, provider_latency,
                      tile_batch)
from .machine import cpu_flags, physical_cores
from .onnx_model import (TWO_GB, batch_dependent, copy_onnx, fuse_transformer, model_metadata, move_onnx, onnx_size,
                         open_session, save_onnx, store_own_answers, update_metadata, write_metadata)
from .records import Attempt as AttemptRecord
from .records import ExportReport, QuantizationRecord, VariantRecord, latency_fields
from .report import write_report
from .rundir import ExportDir, load_export, manifest, write_manifest
from .tasks import Outputs, feeds

log = logging.getLogger(__name__)
COMPUTE_OPS = ["Conv", "Gemm", "MatMul"]
INT8, INT8_REJECTED = "model.int8.onnx", "model.int8.rejected.onnx"


@dataclass
class Preflight:
    """What this CPU's integer instructions make of INT8."""

    isa: str  # the best integer dot-product support found
    activation_type: str  # uint8 | int8
    weight_type: str
    reduce_range: bool
    expect_speedup: bool
    reason: str


def preflight(flags: set[str] | None = None) -> Preflight:
    """Choose quantized types for the CPU whose ``/proc/cpuinfo`` flags are ``flags``.

    >>> preflight({"avx2", "avx512_vnni"}).activation_type, preflight({"avx2"}).reduce_range
    ('uint8', True)
    """
    flags = cpu_flags() if flags is None else flags
    if {"amx_int8", "amx_tile"} <= flags:
        return Preflight("amx", "uint8", "int8", False, True, "AMX tiles: INT8 matrix units; u8s8 is the fast path")
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        isa = "avx512_vnni" if "avx512_vnni" in flags else "avx_vnni"
        return Preflight(isa, "uint8", "int8", False, True,
                         f"{isa}: one-instruction u8 x s8 dot products; s8 x s8 has no such path and runs slower")
    if "asimddp" in flags:
        return Preflight("arm_dotprod", "int8", "int8", False, True, "ARM dot-product (SDOT/UDOT): s8s8 and u8s8 both fast")
    if "avx2" in flags or "avx512bw" in flags:
        isa = "avx512bw" if "avx512bw" in flags else "avx2"
        return Preflight(isa, "uint8", "int8", True, True,
                         f"{isa} without VNNI: u8 x s8 via vpmaddubsw, whose 16-bit sums can saturate, so weights "
                         "use 7 bits (reduce_range); INT8 gains are smaller than on VNNI CPUs")
    return Preflight("none", "uint8", "int8", True, False,
                     "no SIMD integer dot-product instructions: INT8 cannot be expected to beat FP32 on this CPU")


class CalibrationReader(CalibrationDataReader):
    """Preprocessed training inputs (images, or real token batches), in batches, for calibration and
    activation debugging; ``input_names``: the model's inputs."""

    def __init__(self, inputs, input_names: list[str] | tuple[str, ...] = ("input",), batch_size: int = 16):
        self.inputs, self.input_names = inputs, list(input_names)
        self.batches = [inputs[i:i + batch_size] for i in range(0, len(inputs), batch_size)]
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.batches):
            return None
        self.index += 1
        return feeds(self.batches[self.index - 1], self.input_names)

    def rewind(self) -> None:
        self.index = 0


@dataclass(frozen=True)
class Scheme:
    """The integer types and granularity of one quantized model."""

    activation_type: str  # uint8 | int8
    weight_type: str
    per_channel: bool
    reduce_range: bool

    @property
    def label(self) -> str:
        sign = {"uint8": "u8", "int8": "s8"}
        return (f"{sign[self.activation_type]}{sign[self.weight_type]}, "
                f"{'per-channel' if self.per_channel else 'per-tensor'}{', reduce_range' if self.reduce_range else ''}")


def schemes(plan: Preflight, cfg: QuantizeConfig) -> list[Scheme]:
    """The preflight's scheme first, then the other type and granularity choices worth measuring on
    this CPU (u8s8 / s8s8, per-channel on / off): a CPU or model where another one wins is found by
    measurement, not assumed away.

    >>> [s.label for s in schemes(preflight({"avx2", "avx512_vnni"}), QuantizeConfig())]
    ['u8s8, per-channel', 'u8s8, per-tensor', 's8s8, per-channel']
    """
    first = Scheme(plan.activation_type, plan.weight_type, cfg.per_channel, plan.reduce_range)
    others = [Scheme(first.activation_type, first.weight_type, not first.per_channel, first.reduce_range),
              Scheme("int8" if first.activation_type == "uint8" else "uint8", "int8", first.per_channel, first.reduce_range)]
    return [first] + [o for o in others if o != first]


@dataclass
class Attempt:
    name: str
    mode: str
    excluded_nodes: list[str]
    op_types: list[str] | None
    scheme: Scheme | None = None
    metric_value: float | None = None
    latency_ms: float | None = None
    speedup: float | None = None  # median of per-round ratios against FP32
    speedup_low: float | None = None
    speedup_high: float | None = None
    noise_floor: float = 0.0  # the A/A spread this attempt was judged against
    graph: str = "exported"  # the graph quantized: "exported", or "fused" (onnxruntime's transformer fusions)
    first_pass: dict | None = None  # its first measurement, when it was measured again (a retake, the final round)
    verdict: str = ""
    metric_drop_points: float | None = None
    passed: bool = False
    note: str = ""
    reference_p50_ms: float | None = None  # FP32's p50 in the rounds it was timed in
    retakes: int = 0
    reference_drift: float | None = None
    path: Path | None = field(default=None, repr=False)

    def record(self) -> AttemptRecord:
        return AttemptRecord(**{k: v for k, v in asdict(self).items() if k != "path"})


def pick_mode(model) -> str:
    """static for convolutional models, dynamic where MatMul/Gemm weights dominate (Linear/attention)."""
    sizes = {init.name: int(np.prod(init.dims)) for init in model.graph.initializer}
    conv = sum(sizes.get(n.input[1], 0) for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1)
    dense = sum(sizes.get(i, 0) for n in model.graph.node if n.op_type in ("MatMul", "Gemm") for i in n.input)
    return "static" if conv >= dense else "dynamic"


def depthwise_convs(model) -> list[str]:
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    out = []
    for node in model.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and group > 1 and shapes.get(node.input[1], [0, 0])[1] == 1:
            out.append(node.name)
    return out


def first_last(model) -> list[str]:
    """The first compute node and, for every output of the graph, the compute nodes nearest it (a
    classifier's last layer; a detector's class and box convolutions of every level): the layers
    whose quantization error reaches the answer unaveraged."""
    nodes = [n for n in model.graph.node if n.op_type in COMPUTE_OPS]
    producer = {out: node for node in model.graph.node for out in node.output}
    nearest, seen = [], set()
    stack = [o.name for o in model.graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in COMPUTE_OPS:
            nearest.append(node.name)
        else:
            stack.extend(node.input)
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    return list(dict.fromkeys([n.name for n in nodes[:1]] + sorted(nearest, key=order.get)))


_CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}


def quantize_once(pre: Path, out: Path, mode: str, scheme: Scheme, cfg: QuantizeConfig, reader: CalibrationReader,
                  excluded: list[str], op_types: list[str] | None) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    large = onnx_size(pre) > TWO_GB  # the quantized file keeps its weights outside the protobuf too
    if mode == "dynamic":
        quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, per_channel=scheme.per_channel,
                         reduce_range=scheme.reduce_range, nodes_to_exclude=excluded, op_types_to_quantize=op_types,
                         use_external_data_format=large)
        return
    reader.rewind()
    quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=scheme.per_channel,
                    reduce_range=scheme.reduce_range, activation_type=getattr(QuantType, _TYPES[scheme.activation_type]),
                    weight_type=getattr(QuantType, _TYPES[scheme.weight_type]), nodes_to_exclude=excluded,
                    op_types_to_quantize=op_types, calibrate_method=getattr(CalibrationMethod, _CALIBRATION[cfg.calibration]),
                    use_external_data_format=large, extra_options={"CalibMovingAverage": False})


def sensitive_nodes(pre: Path, model, qdq: Path, reader: CalibrationReader, limit: int = 16) -> list[str]:
    """Float-model nodes ranked by the error their own quantization adds (worst first), measured by
    onnxruntime's QDQ debugging utilities comparing float and quantized activations. ``model`` is
    ``pre`` already loaded."""
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_activation_error,
                                                         create_activation_matching,
                                                         modify_model_output_intermediate_tensors)

    with tempfile.TemporaryDirectory() as tmp:
        f_aug, q_aug = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        modify_model_output_intermediate_tensors(str(pre), str(f_aug))
        modify_model_output_intermediate_tensors(str(qdq), str(q_aug))
        sample = CalibrationReader(reader.inputs[:32], reader.input_names)
        float_acts = collect_activations(str(f_aug), sample)
        sample.rewind()
        qdq_acts = collect_activations(str(q_aug), sample)
    errors = compute_activation_error(create_activation_matching(qdq_acts, float_acts))
    producer = {out: node.name for node in model.graph.node for out in node.output}
    ranked = sorted(((e.get("qdq_err", float("inf")), name) for name, e in errors.items() if name in producer),
                    key=lambda t: t[0])  # lowest SQNR = largest local error
    return [producer[name] for _, name in ranked[:limit]]


def pre_process(source: Path, pre: Path) -> None:
    """onnxruntime's quantization pre-processing (shape inference, then graph optimization). Its
    symbolic shape inference gives up on some attention graphs: plain ONNX shape inference is then
    enough for quantization. It runs from ``pre``'s folder, where the symbolic pass, when it gives up,
    leaves a copy of the whole model."""
    from onnxruntime.quantization import quant_pre_process

    _import_ort_tools_without_torch()
    source, pre = Path(source).absolute(), Path(pre).absolute()
    before = os.getcwd()
    os.chdir(pre.parent)
    try:
        try:
            quant_pre_process(str(source), str(pre))
        except Exception as e:  # onnxruntime raises a bare Exception("Incomplete symbolic shape inference")
            log.info("symbolic shape inference gave up (%s); plain shape inference instead", e)
            quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
    finally:
        os.chdir(before)


def _import_ort_tools_without_torch() -> None:
    """Import ``onnxruntime.tools`` (the symbolic shape inference) as if torch were not installed,
    unless torch is loaded already: the package imports torch whenever it is installed, for an
    export helper quantization never calls, and that import was the largest single cost of
    quantize's quick path (2-9 s of ~30). ``importlib.util.find_spec`` reads a ``None`` in
    ``sys.modules`` as "not installed"."""
    if "torch" in sys.modules or "onnxruntime.tools" in sys.modules:
        return
    sys.modules["torch"] = None
    try:
        importlib.import_module("onnxruntime.tools")
    finally:
        del sys.modules["torch"]


class Evaluator:
    """The task's metric of a candidate on the validation examples, and its batch-1 speedup against
    the FP32 file under the latency protocol (alternating blocks, per-round ratios). Tests substitute
    one that returns set figures, so the search's logic is checked apart from this machine's speed."""

    def __init__(self, data: EvalData, metric: str | None, threads: int, seconds: float):
        self.data, self.metric, self.threads, self.seconds = data, metric or data.task.metric, threads, seconds
        self.bench = data.inputs if data.bench is None else data.bench  # the inputs latency is timed on
        self.latest: Comparison | None = None  # the last measurement: the quick path's final figures
        self.outputs: dict[str, Outputs] = {}  # name -> outputs behind its figure, for confirm to reuse

    def score(self, name: str, path: Path) -> float:
        """``name``'s figure of the metric budgets judge (the task's primary unless quantize.metric)."""
        self.outputs[name] = self.data.outputs(onnx_predictor(open_session(path, self.threads)), 32)
        return self.data.score(self.outputs[name]).get(self.metric)

    def speedups(self, candidates: dict[str, Path], reference: Path, longer: float = 1.0
                 ) -> tuple[dict[str, tuple[Speedup, float]], float]:
        """({name: (speedup over ``reference``, p50 ms)}, noise) at batch 1, every candidate timed in
        the same alternating rounds. A second session on ``reference`` runs in those rounds too: its
        A/A spread is the noise during this very measurement, not only at the start of the search."""
        batch = tile_batch(self.bench, 1)

        def runner(path: Path):
            return ort_runner(open_session(path, self.threads), batch)

        result, noise = beside_reference(runner(reference), runner(reference),
                                         {name: runner(path) for name, path in candidates.items()}, 1, longer * self.seconds)
        self.latest = result
        return {name: (result.speedup("reference", name), result.stats[name].p50) for name in candidates}, noise

    def noise_floor(self, reference: Path) -> float:
        """The A/A check before the search: the reference file against itself (two sessions)."""
        return self.speedups({}, reference)[1]


def search(source: Path, fp32: Path, workdir: Path, cfg: QuantizeConfig, calibration: np.ndarray, evaluator,
           plan: Preflight, noise_floor: float, progress=log.info, fusions: dict[str, Any] | None = None
           ) -> tuple[Attempt | None, list[Attempt], str]:
    """Try configurations, measure each; returns (the fastest that passes or None, all tried, mode).

    A configuration passes when it loses at most ``max_metric_drop`` points of the metric and its speedup's
    verdict is ``faster``: the low end of its per-round ratios clears ``min_speedup`` and its median
    lies outside the noise floor: ``noise_floor`` (the A/A check before the search) or the A/A
    spread measured beside it, whichever is larger. Each attempt records the floor it was judged by.

    Dynamic INT8 starts from onnxruntime's transformer fusions when ``fusions`` (the export's fusion
    options) fuse anything: its quantizer turns the fused Attention into one integer kernel, as
    Optimum's recipe does (MiniLM on a 2-core EPYC: 2.23x FP32 against 2.13x unfused, same rounds). The full
    search also measures the exported graph, for a CPU where the fused kernels are slower.
    """
    import onnx

    pre = workdir / "pre.onnx"
    pre_process(source, pre)
    # each graph read once (the helpers below only inspect it), by name: "exported" and maybe "fused"
    graphs, models = {"exported": pre}, {"exported": onnx.load(str(pre))}
    mode = pick_mode(models["exported"]) if cfg.mode == "auto" else cfg.mode
    if mode == "dynamic" and fusions:
        try:
            fused, found = fuse_transformer(source, fusions)
            if found:
                save_onnx(fused, workdir / "fused.onnx")
                graphs["fused"], models["fused"] = workdir / "fused.onnx", fused
        except Exception as e:  # a graph the optimizer does not understand is quantized as exported
            log.info("transformer fusions failed (%s): quantizing the exported graph", e)
    primary = "fused" if "fused" in graphs else "exported"
    model = models[primary]
    reader = CalibrationReader(calibration, [i.name for i in model.graph.input])
    fp32_figure = evaluator.score("fp32", fp32)
    tried: list[Attempt] = []

    default, *other_schemes = schemes(plan, cfg)

    def judge(a: Attempt, speedup: Speedup, latency_ms: float, noise: float) -> None:
        a.speedup, a.speedup_low, a.speedup_high, a.latency_ms = speedup.median, speedup.low, speedup.high, latency_ms
        a.noise_floor = max(noise_floor, noise)
        a.verdict = speedup.verdict(a.noise_floor, cfg.min_speedup)
        a.passed = a.metric_drop_points <= cfg.max_metric_drop and a.verdict == "faster"

    def attempt(name: str, excluded: list[str], op_types: list[str] | None, scheme: Scheme = default,
                kind: str = mode, graph: str = primary) -> Attempt:
        a = Attempt(name, kind, sorted(set(excluded)), op_types, scheme, graph=graph, path=workdir / f"try{len(tried)}.onnx")
        quantize_once(graphs[graph], a.path, kind, scheme, cfg, reader, a.excluded_nodes, op_types)
        a.metric_value = evaluator.score(name, a.path)
        a.metric_drop_points = 100 * (fp32_figure - a.metric_value)
        measured, noise = evaluator.speedups({name: a.path}, fp32)
        judge(a, *measured[name], noise)
        a.reference_p50_ms = reference_p50(evaluator)
        tried.append(a)
        progress(f"  int8 try {len(tried)} [{name}]: {evaluator.metric} {100 * a.metric_value:.2f}% "
                 f"(drop {a.metric_drop_points:+.2f} pts), {a.latency_ms:.2f} ms = {a.speedup:.2f}x fp32 "
                 f"[{a.speedup_low:.2f}-{a.speedup_high:.2f}]: {a.verdict}{' ✓' if a.passed else ''}")
        return a

    preset = attempt("all ops", [], None)
    if cfg.search == "full" or (cfg.search == "auto" and not preset.passed):
        edges, depthwise = first_last(model), depthwise_convs(model)
        # Latency candidates (each is timed, none is assumed), then the usual metric suspects.
        candidates = [("compute ops only", [], COMPUTE_OPS)]
        if depthwise:
            candidates += [("depthwise in fp32", depthwise, None), ("compute ops only, depthwise in fp32", depthwise, COMPUTE_OPS)]
        candidates.append(("first/last in fp32", edges, None))
        for name, excluded, op_types in candidates:
            attempt(name, excluded, op_types)
        if mode == "static":
            for scheme in other_schemes:
                attempt(f"all ops, {scheme.label}", [], None, scheme)
        else:  # dynamic (transformers): the other weight granularity, and static QDQ calibrated on real inputs
            flipped = replace(default, per_channel=not default.per_channel)
            attempt(f"dynamic, {'per-channel' if flipped.per_channel else 'per-tensor'} weights", [], None, flipped)
            if primary == "fused":
                attempt("all ops, exported graph", [], None, graph="exported")
            # QDQ has no form of the fused Attention: static INT8 quantizes the exported graph, its
            # MatMuls only: LayerNorm, GELU, Softmax, the residual Adds and the embeddings' Gather stay
            # FP32 (min-max static INT8 of a whole DistilBERT NER graph: F1 0.940 -> 0.103, in runs an
            # Optimum developer published)
            attempt(f"static QDQ, {default.label}, compute ops only", [], COMPUTE_OPS, default, "static", graph="exported")
        best_passing = max((a.speedup for a in tried if a.passed), default=0.0)
        fast = [a for a in tried if not a.passed and a.verdict == "faster" and a.speedup > best_passing]
        if fast:
            # Fast enough but too inaccurate: on the one that loses least, keep the nodes whose own
            # quantization error is largest in FP32, a few at a time, until the budget holds.
            base = min(fast, key=lambda a: (a.metric_drop_points, -a.speedup))
            # The most first: when even 8 nodes in FP32 do not restore the metric, fewer will not
            # (the error is spread over the network, e.g. per-tensor ranges), so one try settles it.
            ranked = sensitive_nodes(graphs[base.graph], models[base.graph], base.path, reader)
            for k in (8, 1, 2, 4):
                passed = attempt(f"{base.name} + {k} most sensitive in fp32", base.excluded_nodes + ranked[:k],
                                 base.op_types, base.scheme, base.mode, base.graph).passed
                if passed != (k == 8):
                    break
        retake_drifting(tried, fp32, evaluator, judge, progress)
        final_round(tried, fp32, evaluator, judge, cfg.max_metric_drop, progress)
    # Ties are called within the noise of the passing configurations' own measurements (the final
    # round's): a noisy A/A beside a configuration that failed once made a 25 % gap a tie (ResNet-18).
    return choose(tried, max((a.noise_floor for a in tried if a.passed), default=0.0)), tried, mode


FINALISTS = 4


def reference_p50(evaluator) -> float | None:
    """FP32's p50 in the evaluator's latest measurement (None where it keeps none)."""
    latest = getattr(evaluator, "latest", None)
    return latest.stats["reference"].p50 if latest is not None and "reference" in latest.stats else None


def retake_drifting(tried: list[Attempt], fp32: Path, evaluator, judge, progress=log.info) -> None:
    """Each configuration was timed beside its own measurement of FP32. One whose FP32 ran more than
    REFERENCE_DRIFT from the median of those measurements is measured again, up to RETAKES times, and
    flagged (``reference_drift``) when still off (see :data:`~ftdeploy.latency.REFERENCE_DRIFT`)."""
    refs = [a.reference_p50_ms for a in tried if a.reference_p50_ms]
    if len(refs) < 3:  # two measurements have no median to stand out from
        return
    median = float(np.median(refs))
    for a in tried:
        while (off := drifted(a.reference_p50_ms, median)) is not None and a.retakes < RETAKES:
            progress(f"  int8 retake [{a.name}]: FP32 ran at {a.reference_p50_ms:.3f} ms beside it, {100 * off:+.0f}% "
                     f"from the median {median:.3f} ms")
            if a.first_pass is None:
                a.first_pass = {"median": a.speedup, "low": a.speedup_low, "high": a.speedup_high, "verdict": a.verdict}
            measured, noise = evaluator.speedups({a.name: a.path}, fp32)
            judge(a, *measured[a.name], noise)
            a.reference_p50_ms, a.retakes = reference_p50(evaluator), a.retakes + 1
        a.reference_drift = drifted(a.reference_p50_ms, median)


def final_round(tried: list[Attempt], fp32: Path, evaluator, judge, budget: float, progress=log.info) -> None:
    """Time the configurations that could win (within the metric budget, and faster than FP32 in
    their first measurement) again, together in the same rounds and twice as long, and judge them on
    that: the decision then rests on one long side-by-side measurement instead of separate short ones
    taken minutes apart, which on a shared machine can disagree by more than the gap between them.
    Their first-pass figures are kept in ``first_pass``."""
    contenders = sorted((a for a in tried if a.metric_drop_points <= budget
                         and a.verdict in FASTER), key=lambda a: -a.speedup)[:FINALISTS]
    if not contenders:
        return
    measured, noise = evaluator.speedups({a.name: a.path for a in contenders}, fp32, longer=2.0)
    for a in contenders:
        a.first_pass = {"median": a.speedup, "low": a.speedup_low, "high": a.speedup_high, "verdict": a.verdict}
        judge(a, *measured[a.name], noise)
        progress(f"  int8 final round [{a.name}]: {a.speedup:.2f}x fp32 [{a.speedup_low:.2f}-{a.speedup_high:.2f}]: "
                 f"{a.verdict}{' ✓' if a.passed else ''}")


def choose(tried: list[Attempt], noise_floor: float = 0.0) -> Attempt | None:
    """The fastest passing configuration. Configurations whose median speedups lie within the noise
    floor of the fastest are a tie, broken by the order they were tried in (the simplest first), so
    two runs on the same files reach the same decision despite timing noise."""
    passing = [a for a in tried if a.passed]
    if not passing:
        return None
    best = max(a.speedup for a in passing)
    return next(a for a in passing if a.speedup >= best - noise_floor * best)


def refusal(tried: list[Attempt], cfg: QuantizeConfig, plan: Preflight, metric: str) -> str:
    best = max(tried, key=lambda a: a.speedup or 0)
    return (f"no configuration was both faster than fp32 by >= {cfg.min_speedup}x (low end of the measured "
            f"spread, outside the noise floor) and within {cfg.max_metric_drop} points of its {metric} "
            f"({len(tried)} tried; fastest {best.speedup:.2f}x [{best.speedup_low:.2f}-{best.speedup_high:.2f}], "
            f"{best.verdict}, with a {best.metric_drop_points:+.2f} point drop)"
            + ("" if plan.expect_speedup else f"; {plan.reason}"))


def quantize(export_dir: str | Path, output_dir: str | Path | None = None, cfg: QuantizeConfig | None = None) -> Path:
    """Quantize the FP32 file of ``export_dir`` into ``output_dir`` (default: the export directory
    itself), adding the ``int8`` variant and the ``quantization`` record to its report. Another
    ``output_dir`` becomes a complete export directory of its own (the FP32 files copied beside the
    INT8 one), which every later command accepts; the source directory is left as it was.

    Raises NotShipped when INT8 was refused and ``cfg.required`` is set; otherwise a refusal logs
    one line and the directory ships FP32 alone. A file the final measurement refuses is kept as
    ``model.int8.rejected.onnx``, never under the shipping name.

    Example::

        quantize("runs/digits/export")
    """
    cfg = cfg or QuantizeConfig()
    src = load_export(export_dir)
    if not src.report.gates.passed:
        raise FtdeployError(f"{src.path}: the FP32 export failed its gates ({'; '.join(src.report.gates.failures)})",
                            "fix the export first: quantizing a file that does not match PyTorch is meaningless")
    out = Path(output_dir or cfg.output_dir or src.path)
    out.mkdir(parents=True, exist_ok=True)
    report = rebase_report(src, out)
    for name in (INT8, INT8_REJECTED):
        (out / name).unlink(missing_ok=True)  # never leave an INT8 file from an earlier try
    fp32_record = report.variants["fp32"]
    fp32 = out / fp32_record.path
    source = out / (fp32_record.unoptimized_path or fp32_record.path)
    threads = report.latency_session.get("intra_op_threads") or physical_cores()
    data = EvalData.from_export(src, cfg.eval_samples, cfg.calibration_samples)
    evaluator = Evaluator(data, cfg.metric, threads, cfg.latency_seconds)
    candidate = out / ".model.int8.validating.onnx"
    started = time.perf_counter()
    fusions = fp32_record.fusions or {}
    record, reason = ship(source, fp32, candidate, cfg, data.calibration, evaluator,
                          {**_metadata(fp32), "variant": "int8"}, fusions.get("options") if fusions.get("fused_operators") else None)
    record.seconds = time.perf_counter() - started  # the search and its timing, not the data nor confirm
    log.info("int8 search: %s (%s)", record.search, record.search_why)
    report.quantization = record
    report.variants.pop("int8", None)
    if reason is None:
        # The quick path's one measurement, seconds old, beside FP32 and an A/A session, is its
        # batch-1 figure: timing the same two files again would only repeat it.
        preset = evaluator.latest.renamed({"reference": "fp32", "reference A/A": "fp32 A/A", record.chosen: "int8"}
                                          ) if record.search == "quick" else None
        reason = confirm(report, fp32, candidate, data, evaluator.metric, threads, cfg, record, preset,
                         {"fp32": evaluator.outputs.get("fp32"), "int8": evaluator.outputs.get(record.chosen)})
    record.shipped, record.not_shipped_reason = reason is None, reason
    if candidate.is_file():
        final = out / (INT8 if reason is None else INT8_REJECTED)
        store_own_answers(candidate, "this INT8 file at quantize")
        move_onnx(candidate, final)
        record.file = final.name
        if reason is None:
            report.variants["int8"].path = final.name
    write_report(report, out)
    write_manifest(out, manifest("quantize", src.path, config=cfg))
    if reason is not None:
        log.warning("INT8 not shipped: %s", reason)
        if cfg.required:
            raise NotShipped(f"INT8 not shipped: {reason}", "quantize.required (--strict) asks for INT8; "
                             "drop --strict to ship FP32 alone, or raise --max-metric-drop")
    return out


def rebase_report(src: ExportDir, out: Path) -> ExportReport:
    """The export directory's report as ``out`` will hold it. For another directory, its FP32 files
    are copied there and the run's path is stored relative to ``out``, so ``out`` is a complete
    export directory wherever it lies."""
    report = src.report.model_copy(deep=True)
    if out.resolve() == src.path.resolve():
        return report
    fp32 = report.variants["fp32"]
    for key in ("path", "unoptimized_path"):
        if getattr(fp32, key):
            copy_onnx(resolve(getattr(fp32, key), src.path), out / Path(getattr(fp32, key)).name)
            setattr(fp32, key, Path(getattr(fp32, key)).name)
    report.source_run = relative(src.source_run, out)
    update_metadata(out / fp32.path, {"source_run": report.source_run})  # relative to the file's folder
    return report


def _metadata(path: Path) -> dict[str, Any]:
    import onnx

    return model_metadata(onnx.load(str(path), load_external_data=False))


def ship(source: Path, fp32: Path, out: Path, cfg: QuantizeConfig, calibration: np.ndarray, evaluator,
         metadata: dict[str, Any], fusions: dict[str, Any] | None = None) -> tuple[QuantizationRecord, str | None]:
    """Search and write the chosen INT8 file to ``out``; returns (quantization record, why nothing
    was shipped or None)."""
    import onnx

    plan = preflight()
    log.info("int8 preflight: %s", plan.reason)
    # The full search checks the noise first; the quick path judges the preset on the A/A session
    # timed in its own rounds, which is the noise of that very measurement.
    noise = evaluator.noise_floor(fp32) if cfg.search == "full" else 0.0
    if cfg.search == "full":
        log.info("int8 noise floor (fp32 against itself): ±%.3f", noise)
    with tempfile.TemporaryDirectory() as tmp:
        chosen, tried, mode = search(source, fp32, Path(tmp), cfg, calibration, evaluator, plan, noise, fusions=fusions)
        if chosen is not None:
            model = onnx.load(str(chosen.path))
            # dynamic INT8 scales activations per run: its answers depend on the batch (see session_outputs)
            write_metadata(model, {**metadata, "batch_dependent": chosen.mode == "dynamic"})
            save_onnx(model, out)
    scheme = chosen.scheme if chosen else schemes(plan, cfg)[0]
    mode = chosen.mode if chosen else mode  # a search may ship another mode than it started from
    record = QuantizationRecord(
        mode=mode, activation_type=scheme.activation_type if mode == "static" else "uint8 (dynamic)",
        weight_type=scheme.weight_type, calibration=cfg.calibration if mode == "static" else None,
        calibration_samples=len(calibration), per_channel=scheme.per_channel, reduce_range=scheme.reduce_range,
        preflight=asdict(plan), metric=evaluator.metric,
        # the largest A/A spread seen: before the search, beside every attempt (and, once confirmed,
        # beside the final measurement)
        noise_floor=max([noise] + [a.noise_floor for a in tried]), noise_floor_before_search=noise,
        min_speedup=cfg.min_speedup, max_metric_drop=cfg.max_metric_drop,
        excluded_nodes=chosen.excluded_nodes if chosen else None, chosen=chosen.name if chosen else None,
        graph=chosen.graph if chosen else None,
        search_speedup={"median": chosen.speedup, "low": chosen.speedup_low, "high": chosen.speedup_high}
        if chosen else None, tried=[a.record() for a in tried], **search_path(cfg, tried))
    return record, None if chosen else refusal(tried, cfg, plan, evaluator.metric)


def search_path(cfg: QuantizeConfig, tried: list[Attempt]) -> dict[str, str]:
    """Which path the search took and why, for the report."""
    preset = tried[0]
    label = preset.scheme.label if preset.scheme else preset.mode
    figures = (f"the preset ({preset.name}, {label}{', on the fused graph' if preset.graph == 'fused' else ''}) measured "
               f"{preset.speedup:.2f}x [{preset.speedup_low:.2f}-{preset.speedup_high:.2f}] against fp32, "
               f"'{preset.verdict}', {preset.metric_drop_points:+.2f} points")
    if cfg.search == "off":
        return {"search": "preset only", "search_why": f"quantize.search=off: {figures}"}
    if cfg.search == "full":
        return {"search": "full search", "search_why": f"quantize.search=full: {len(tried)} configurations measured"}
    if len(tried) == 1:
        return {"search": "quick", "search_why": f"{figures}: within the budget and faster outside the noise "
                                                 f"floor, so it ships without the full search"}
    return {"search": "full search", "search_why": f"{figures}: not both within the budget and faster, so the full "
                                                   f"search ran ({len(tried)} configurations)"}


def confirm(report: ExportReport, fp32: Path, int8: Path, data: EvalData, metric: str, threads: int,
            cfg: QuantizeConfig, record: QuantizationRecord, batch1: Comparison | None = None,
            outputs: dict[str, Outputs | None] | None = None) -> str | None:
    """Measure the file to ship again beside FP32 at the report's batch sizes (the final figures the
    report shows) and record how it agrees with FP32; say why not when this measurement does not
    confirm it is faster (the caller then keeps it under the rejected name). ``batch1``: a batch-1
    measurement of these files (variants fp32, int8, fp32 A/A) just taken, used instead of timing
    batch 1 again. ``outputs``: the search's own (batch 32) on ``data.inputs``, reused where a file
    answers independently of the batch; a batch-dependent file (dynamic INT8) is run one example at a
    time."""
    fp32_session, int8_session = open_session(fp32, threads), open_session(int8, threads)
    batch_sizes = [int(b) for b in report.variants["fp32"].latency_ms]
    reused = {name for name, session in (("fp32", fp32_session), ("int8", int8_session))
              if (outputs or {}).get(name) is not None and not batch_dependent(session)}
    fp32_outputs, int8_outputs = (outputs[name] if name in reused else data.outputs(onnx_predictor(session), 1)
                                  for name, session in (("fp32", fp32_session), ("int8", int8_session)))
    bs = 1 if 1 in batch_sizes else batch_sizes[0]  # where the speedup is judged, with an A/A session
    figures, comparisons = profile({"fp32": lambda b: ort_runner(fp32_session, b), "int8": lambda b: ort_runner(int8_session, b),
                                    "fp32 A/A": lambda b: ort_runner(open_session(fp32, threads), b)},
                                   data.bench[: max(batch_sizes)], batch_sizes, cfg.latency_seconds,
                                   {1: batch1} if batch1 else None, only_at={"fp32 A/A": bs},
                                   report_seconds=cfg.latency_seconds / 2)
    record.final_measured_by = "the quick path's measurement of the preset" if batch1 and bs == 1 else "confirm"
    final = comparisons[bs].speedup("fp32", "int8")
    record.noise_floor_final = comparisons[bs].speedup("fp32", "fp32 A/A").noise
    record.noise_floor = max(record.noise_floor, record.noise_floor_final)  # the largest seen anywhere
    # Judged on the noise of this file's own two measurements: a hiccup timed beside another
    # configuration says nothing about this one (it once refused a Lite0 file measured 1.5x twice).
    chosen = next(t for t in record.tried if t.name == record.chosen)
    record.noise_floor_judged = noise = max(chosen.noise_floor, record.noise_floor_final)
    record.final_speedup = {**final.as_dict(), "batch_size": bs, "verdict": final.verdict(noise, cfg.min_speedup)}
    # two measurements of one ratio agree when they differ by less than the noise, relative to it
    record.search_final_agree = abs(final.median / record.search_speedup["median"] - 1) <= noise
    # FP32 again on the examples INT8 was judged on (quantize.eval_samples, often more than the export's)
    samples = len(data)
    report.variants["fp32"] = report.variants["fp32"].model_copy(update={
        **latency_fields(figures["fp32"]), "latency_measured_by": "quantize", "metric_samples": samples,
        "scores": data.score(fp32_outputs).values})
    report.variants["int8"] = VariantRecord(
        path=int8.name, size_bytes=onnx_size(int8), metric_samples=samples, scores=data.score(int8_outputs).values,
        agreement={**data.task.agreement(fp32_outputs, int8_outputs, data.inputs, data.info), "reference": "fp32",
                   "batch_size": 32 if "int8" in reused else 1},
        **latency_fields(figures["int8"]), latency_measured_by="quantize",
        providers_p50_ms=provider_latency(int8, data.bench, threads, cfg.latency_seconds))
    # The search applied min_speedup to its own (longer, side-by-side) measurement; this one guards
    # against what it cannot see twice: an INT8 file that is not faster at all. Applying the
    # threshold again would flip a borderline decision on every other run.
    if record.final_speedup["verdict"] not in FASTER:
        report.variants.pop("int8")
        return (f"the final measurement did not confirm the search: {final.median:.2f}x "
                f"[{final.low:.2f}-{final.high:.2f}] against fp32 at batch {bs} is "
                f"'{record.final_speedup['verdict']}' (noise floor ±{noise:.3f})")
    return None
