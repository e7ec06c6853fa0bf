"""INT8 quantization that is measured to be faster and no less accurate on this CPU.

1. **Preflight**: the CPU's integer dot-product support decides activation/weight types and
   ``reduce_range`` (and whether INT8 can be expected to help at all).
2. **Quantize** (onnxruntime): static QDQ with per-channel weights, calibrated on the run's own
   training images (MinMax, Entropy or Percentile), or dynamic for Linear/attention-heavy models.
3. **Measure** accuracy on the validation images and latency against the FP32 file, then search:
   candidate exclusions that are slow in INT8 (depthwise convolutions, element-wise ops without
   fast INT8 kernels, first/last layers) are *timed*, and the nodes whose quantization error is
   largest (onnxruntime's QDQ debugging utilities) are kept in FP32 until the accuracy holds.
   If no configuration is both faster and within the accuracy budget, nothing is shipped.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from .config import QuantizeConfig
from .latency import measure_interleaved, ort_runner, ort_session, tile_batch
from .machine import cpu_flags

COMPUTE_OPS = ["Conv", "Gemm", "MatMul"]


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
    """Preprocessed training images, in batches, for calibration and activation debugging."""

    def __init__(self, inputs: np.ndarray, input_name: str = "input", batch_size: int = 16):
        self.batches = [inputs[i:i + batch_size] for i in range(0, len(inputs), batch_size)]
        self.input_name, self.index = input_name, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.batches):
            return None
        self.index += 1
        return {self.input_name: self.batches[self.index - 1]}

    def rewind(self) -> None:
        self.index = 0


@dataclass
class Attempt:
    name: str
    mode: str
    excluded_nodes: list[str]
    op_types: list[str] | None
    accuracy: float | None = None
    latency_ms: float | None = None
    speedup: float | None = None
    accuracy_drop_points: float | None = None
    passed: bool = False
    note: str = ""
    path: Path | None = field(default=None, repr=False)


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
    nodes = [n.name for n in model.graph.node if n.op_type in COMPUTE_OPS]
    return list(dict.fromkeys(nodes[:1] + nodes[-1:]))


_CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}


def quantize_once(pre: Path, out: Path, mode: str, plan: Preflight, cfg: QuantizeConfig, reader: CalibrationReader,
                  excluded: list[str], op_types: list[str] | None) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode == "dynamic":
        quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, per_channel=cfg.per_channel,
                         reduce_range=plan.reduce_range, nodes_to_exclude=excluded, op_types_to_quantize=op_types)
        return
    reader.rewind()
    quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
                    reduce_range=plan.reduce_range, activation_type=getattr(QuantType, _TYPES[plan.activation_type]),
                    weight_type=getattr(QuantType, _TYPES[plan.weight_type]), nodes_to_exclude=excluded,
                    op_types_to_quantize=op_types, calibrate_method=getattr(CalibrationMethod, _CALIBRATION[cfg.calibration]),
                    extra_options={"CalibMovingAverage": False})


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
        sample = CalibrationReader(np.concatenate(reader.batches)[:32], reader.input_name)
        float_acts = collect_activations(str(f_aug), sample)
        sample.rewind()
        qdq_acts = collect_activations(str(q_aug), sample)
    errors = compute_activation_error(create_activation_matching(qdq_acts, float_acts))
    producer = {out: node.name for node in model.graph.node for out in node.output}
    ranked = sorted(((e.get("qdq_err", float("inf")), name) for name, e in errors.items() if name in producer),
                    key=lambda t: t[0])  # lowest SQNR = largest local error
    return [producer[name] for _, name in ranked[:limit]]


class Evaluator:
    """Accuracy on the validation images, and batch-1 latency of a candidate measured in alternating
    rounds with the FP32 file, so that the speedup compares like with like on a noisy machine."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray, threads: int, seconds: float):
        self.inputs, self.labels, self.threads, self.seconds = inputs, labels, threads, seconds

    def accuracy(self, path: Path) -> float:
        from .export import accuracy, batched, onnx_predictor

        return accuracy(batched(onnx_predictor(ort_session(path, self.threads)), self.inputs, 32), self.labels)

    def latency_vs(self, path: Path, reference: Path) -> tuple[float, float]:
        """(p50 ms of ``path``, p50 ms of ``reference``) at batch 1."""
        batch = tile_batch(self.inputs, 1)
        stats = measure_interleaved({"candidate": ort_runner(ort_session(path, self.threads), batch),
                                     "reference": ort_runner(ort_session(reference, self.threads), batch)},
                                    1, min_seconds=self.seconds)
        return stats["candidate"].p50, stats["reference"].p50


def search(raw: Path, fp32: Path, workdir: Path, cfg: QuantizeConfig, calibration: np.ndarray, evaluator: Evaluator,
           plan: Preflight, progress=print) -> tuple[Attempt | None, list[Attempt], str]:
    """Try configurations, measure each; returns (the fastest that passes or None, all tried, mode)."""
    import onnx
    from onnxruntime.quantization import quant_pre_process

    pre = workdir / "pre.onnx"
    quant_pre_process(str(raw), str(pre))
    model = onnx.load(str(pre))  # read once; the helpers below only inspect the graph
    mode = pick_mode(model) if cfg.mode == "auto" else cfg.mode
    reader = CalibrationReader(calibration)
    fp32_accuracy = evaluator.accuracy(fp32)
    tried: list[Attempt] = []

    def attempt(name: str, excluded: list[str], op_types: list[str] | None) -> Attempt:
        a = Attempt(name, mode, sorted(set(excluded)), op_types, path=workdir / f"try{len(tried)}.onnx")
        quantize_once(pre, a.path, mode, plan, cfg, reader, a.excluded_nodes, op_types)
        a.accuracy = evaluator.accuracy(a.path)
        a.latency_ms, fp32_ms = evaluator.latency_vs(a.path, fp32)
        a.speedup = fp32_ms / a.latency_ms
        a.accuracy_drop_points = 100 * (fp32_accuracy - a.accuracy)
        a.passed = a.accuracy_drop_points <= cfg.max_accuracy_drop and a.speedup >= cfg.min_speedup
        tried.append(a)
        progress(f"  int8 try {len(tried)} [{name}]: accuracy {100 * a.accuracy:.2f}% "
                 f"(drop {a.accuracy_drop_points:+.2f} pts), {a.latency_ms:.2f} ms = {a.speedup:.2f}x fp32"
                 f"{' ✓' if a.passed else ''}")
        return a

    attempt("all ops", [], None)
    if cfg.search:
        edges, depthwise = first_last(model), depthwise_convs(model)
        # Latency candidates (each is timed, none is assumed), then the usual accuracy suspects.
        candidates = [("compute ops only", [], COMPUTE_OPS)]
        if depthwise:
            candidates += [("depthwise in fp32", depthwise, None), ("compute ops only, depthwise in fp32", depthwise, COMPUTE_OPS)]
        candidates.append(("first/last in fp32", edges, None))
        for name, excluded, op_types in candidates:
            attempt(name, excluded, op_types)
        best_passing = max((a.speedup for a in tried if a.passed), default=0.0)
        fast = [a for a in tried if not a.passed and a.speedup >= cfg.min_speedup and a.speedup > best_passing]
        if fast:
            # Fast enough but too inaccurate: on the one that loses least, keep the nodes whose own
            # quantization error is largest in FP32, a few at a time, until the budget holds.
            base = min(fast, key=lambda a: (a.accuracy_drop_points, -a.speedup))
            ranked = sensitive_nodes(pre, model, base.path, reader)
            for k in (1, 2, 4, 8):
                if attempt(f"{base.name} + {k} most sensitive in fp32", base.excluded_nodes + ranked[:k],
                           base.op_types).passed:
                    break
    passing = [a for a in tried if a.passed]
    chosen = max(passing, key=lambda a: a.speedup) if passing else None
    return chosen, tried, mode


def quantize_variant(raw: Path, fp32: Path, out: Path, cfg: QuantizeConfig, calibration: np.ndarray,
                     evaluator: Evaluator, metadata: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Search, ship the chosen INT8 file to ``out`` (or nothing), return (quantization record, failures)."""
    import onnx

    from .onnx_model import write_metadata

    plan = preflight()
    print(f"int8 preflight: {plan.reason}")
    with tempfile.TemporaryDirectory() as tmp:
        chosen, tried, mode = search(raw, fp32, Path(tmp), cfg, calibration, evaluator, plan)
        if chosen is not None:
            model = onnx.load(str(chosen.path))
            write_metadata(model, {**metadata, "variant": "int8"})
            onnx.save(model, str(out))
    out_record = {"mode": mode, "activation_type": plan.activation_type if mode == "static" else "uint8 (dynamic)",
                  "weight_type": plan.weight_type, "calibration": cfg.calibration if mode == "static" else None,
                  "calibration_samples": len(calibration), "per_channel": cfg.per_channel,
                  "reduce_range": plan.reduce_range, "preflight": asdict(plan),
                  "excluded_nodes": chosen.excluded_nodes if chosen else None, "chosen": chosen.name if chosen else None,
                  "tried": [{k: v for k, v in asdict(a).items() if k != "path"} for a in tried]}
    failures = []
    if chosen is None:
        out.unlink(missing_ok=True)
        best = max(tried, key=lambda a: a.speedup or 0)
        failures.append(f"int8: no configuration was both >= {cfg.min_speedup}x faster than fp32 and within "
                        f"{cfg.max_accuracy_drop} points "
                        f"of its accuracy ({len(tried)} tried; fastest {best.speedup:.2f}x with a "
                        f"{best.accuracy_drop_points:+.2f} point drop); no int8 file was written"
                        + ("" if plan.expect_speedup else f" — {plan.reason}"))
    return out_record, failures
