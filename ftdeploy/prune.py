"""Stage ``prune``: a run directory -> a run directory whose model has fewer channels, for real.

Channels are physically removed with Torch-Pruning's dependency graph (a group of coupled layers
is pruned together, the model's output layers never), the task's metric is recovered by fine-tuning through
the same Accelerate loop as ``ftdeploy train`` (optionally distilling from the unpruned model), and
the result is judged by onnxruntime latency measured on this machine, unpruned and pruned side by
side. The pruned architecture is stored as plain channel counts in ``model.json``, so a run
directory reloads without pickles.

Under a multi-process launch every process prunes (the recovery fine-tuning is data-parallel), and
only the main one measures and writes.

Example::

    out = prune("runs/digits", "runs/digits-pruned", PruneConfig(target_macs=0.5))
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .config import PruneConfig
from .conversion import outputs_of, temporary_onnx
from .data import build_datasets
from .errors import ConfigError, DependencyError
from .evaluation import split_arrays, torch_predictor
from .files import relative, write_text
from .latency import compare, ort_runner, ort_session, session_policy
from .machine import physical_cores
from .models import BuiltModel, architecture_delta, fixed_labels
from .records import ModelMeasure, PruneRecord, write_record
from .registry import Registry
from .rundir import Run, load_run, manifest, write_manifest
from .tasks import Task, tile
from .training import Job, fine_tune, make_accelerator, save_weights, setup

log = logging.getLogger(__name__)

importances: Registry = Registry("pruning importance", ConfigError)
# Candidate upper bounds of the MACs bisection, from the most pruning allowed down (see choose_ratio).
UPPER_BOUNDS = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


def _tp():
    try:
        import torch_pruning as tp
    except ImportError:
        raise DependencyError("pruning needs Torch-Pruning", "pip install 'ftdeploy[train]'") from None
    return tp


@importances.register("l1")
def _l1():
    """Sum of |w| over each coupled channel group."""
    return _tp().importance.MagnitudeImportance(p=1)


@importances.register("l2")
def _l2():
    return _tp().importance.MagnitudeImportance(p=2)


@importances.register("bn_scale")
def _bn_scale():
    """|gamma| of the BatchNorm after each channel (network slimming)."""
    return _tp().importance.BNScaleImportance()


@importances.register("taylor")
def _taylor():
    """|w * dL/dw|, from gradients of a few training batches."""
    return _tp().importance.TaylorImportance()


def macs_and_params(model: nn.Module, example: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    macs, params = _tp().utils.count_ops_and_params(model, example)
    return int(macs), int(params)


def step_ratios(ratio: float, steps: int) -> list[float]:
    """The ratio of each step's one-shot pruning, of the channels left by the steps before, so that
    ``steps`` steps remove ``ratio`` of the original channels in even shares.

    >>> [round(r, 3) for r in step_ratios(0.5, 3)]
    [0.167, 0.2, 0.25]
    """
    kept = [1 - ratio * k / steps for k in range(steps + 1)]
    return [1 - kept[k + 1] / kept[k] for k in range(steps)]


def prune_channels(model: nn.Module, head: nn.Module, example: tuple[torch.Tensor, ...], cfg: PruneConfig,
                   ratio: float, task: Task, batches: list | None = None, steps: int = 1) -> Iterator[None]:
    """Remove ``ratio`` of the channels of every prunable group (and, where the task says so, of the
    attention heads) in ``steps`` steps, one per item drawn. Each step is a one-shot pruner on the
    model as it is then: Torch-Pruning's own iterative schedule counts heads to remove from the
    cumulative ratio times the heads *left* (MiniLM's 12 heads at ratio 0.5 in 3 steps: 3 heads
    kept, not 6; a 2-head model: none, and a division by zero)."""
    tp = _tp()
    importance = cfg.importance or task.pruning_importance
    for step_ratio in step_ratios(ratio, steps):
        model.eval()
        if importance == "taylor":  # Taylor importance reads the gradients of a few real batches
            model.zero_grad()
            for x, y in batches or []:
                task.loss(model(*x), y, None).backward()
        extra, whole = task.pruning_options(model, step_ratio)
        tp.pruner.MetaPruner(model, example, importance=importances.get(importance)(), pruning_ratio=step_ratio,
                             global_pruning=cfg.global_pruning, ignored_layers=[head, *whole], round_to=cfg.round_to,
                             **extra).step()
        task.after_pruning(model)
        model.zero_grad(set_to_none=True)
        yield


def pruned_copy(model: nn.Module, head_name: str, example: tuple[torch.Tensor, ...], cfg: PruneConfig, ratio: float,
                task: Task, batches=None) -> nn.Module:
    """``model`` pruned at ``ratio`` in ``cfg.iterative_steps`` steps, without the fine-tuning
    between them: the MACs the pruned run will have."""
    candidate = copy.deepcopy(model)
    for _ in prune_channels(candidate, candidate.get_submodule(head_name), example, cfg, ratio, task, batches,
                            cfg.iterative_steps):
        pass
    return candidate


@dataclass
class Probe:
    """What pruning measures a model with: ``example`` (batch-1 tensors in the model's argument
    order, for Torch-Pruning's tracing and MAC counts), ``names`` and ``axes`` of the ONNX inputs,
    ``bench`` (one real input at the shape latency is declared for), the ``task``, and the
    validation examples its metric is judged on (``inputs``, ``targets``, ``info``)."""

    example: tuple[torch.Tensor, ...]
    names: list[str]
    axes: dict[str, dict[int, str]]
    bench: Any
    task: Task
    inputs: Any = None
    targets: Any = None
    info: dict[str, Any] | None = None

    @contextlib.contextmanager
    def onnx(self, model: nn.Module):
        traced = [t.repeat(2, *[1] * (t.dim() - 1)) for t in self.example]  # batch 2: not specialized to 1
        with temporary_onnx(model, traced, self.names, self.axes, *outputs_of(self.task, self.info or {})) as path:
            yield path


def onnx_speedup(base: nn.Module, candidate: nn.Module, probe: Probe, threads: int, seconds: float) -> dict[str, Any]:
    """Batch-1 onnxruntime latency of both models as ONNX files, timed side by side under the latency
    protocol: MACs do not map one to one onto latency, and a ratio across runs drifts with the machine."""
    with probe.onnx(base) as a, probe.onnx(candidate) as b:
        batch = probe.bench
        result = compare({"base": ort_runner(ort_session(a, threads), batch),
                          "candidate": ort_runner(ort_session(b, threads), batch)}, 1, seconds=seconds)
    speedup = result.speedup("base", "candidate")
    return {"base_ms": result.stats["base"].p50, "latency_ms": result.stats["candidate"].p50,
            "speedup": speedup.median, "speedup_low": speedup.low, "speedup_high": speedup.high}


def choose_ratio(model: nn.Module, head_name: str, probe: Probe, cfg: PruneConfig,
                 batches=None, progress=log.info) -> tuple[float, list[dict[str, Any]]]:
    """The least channel ratio that meets the target: MACs by bisection, speedup by measured latency
    (the low end of the measured speedup must reach the target)."""
    example = probe.example
    base_macs, _ = macs_and_params(model, example)
    trials: list[dict[str, Any]] = []
    if cfg.ratio is not None:
        return cfg.ratio, trials
    if cfg.target_macs is not None:
        def fraction(ratio: float) -> float:
            macs, _ = macs_and_params(pruned_copy(model, head_name, example, cfg, ratio, probe.task, batches), example)
            trials.append({"ratio": ratio, "macs_fraction": macs / base_macs})
            return macs / base_macs

        # The bounds first. Ratio 0 keeps every MAC (above any target). The upper bound must be
        # tested: near the most pruning allowed, Torch-Pruning leaves some groups whole (ResNet-18:
        # 0.33x MACs at ratio 0.9, 0.55x at 0.95), so the first ratio from the top that reaches the
        # target bounds the bisection, and when none does, the target is out of reach.
        lo, hi = 0.0, None
        for ratio in UPPER_BOUNDS:
            if fraction(ratio) <= cfg.target_macs:
                hi = ratio
                break
        if hi is None:
            best = min(trials, key=lambda t: t["macs_fraction"])
            raise ConfigError(f"target unreachable: best {best['macs_fraction']:.3f}x MACs at ratio {best['ratio']} "
                              f"(target_macs {cfg.target_macs})", "raise --target-macs (what pruning leaves whole, such as "
                              "a classifier or a detector's FPN and heads, and the layers Torch-Pruning cannot prune "
                              "keep their MACs), or try --global")
        for _ in range(8):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if fraction(mid) <= cfg.target_macs else (mid, hi)
        progress(f"ratio {hi:.3f} keeps <= {cfg.target_macs:.2f}x MACs")
        return hi, trials
    threads = cfg.threads or physical_cores()
    for ratio in np.arange(0.1, 0.91, 0.1):
        candidate = pruned_copy(model, head_name, example, cfg, float(ratio), probe.task, batches)
        macs, _ = macs_and_params(candidate, example)
        trial = {"ratio": float(ratio), "macs_fraction": macs / base_macs,
                 **onnx_speedup(model, candidate, probe, threads, cfg.latency_seconds)}
        trials.append(trial)
        progress(f"ratio {ratio:.1f}: {trial['macs_fraction']:.2f}x MACs, {trial['latency_ms']:.2f} ms = "
                 f"{trial['speedup']:.2f}x (low {trial['speedup_low']:.2f}x)")
        if trial["speedup_low"] >= cfg.target_speedup:
            return float(ratio), trials
    raise ConfigError(f"no pruning ratio up to 0.9 reaches a {cfg.target_speedup}x onnxruntime speedup "
                      f"(best {max(t['speedup'] for t in trials):.2f}x)", "lower --target-speedup")


def unstructured(model: nn.Module, head_name: str, amount: float) -> float:
    """Global L1 magnitude pruning of conv/linear weights, made permanent; returns the sparsity reached."""
    from torch.nn.utils import prune as torch_prune

    params = [(m, "weight") for n, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and n != head_name]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=amount)
    for module, name in params:
        torch_prune.remove(module, name)  # masks folded into the weights: nothing of them reaches the export
    zeros = sum(int((m.weight == 0).sum()) for m, _ in params)
    return zeros / sum(m.weight.numel() for m, _ in params)


def prune(run_dir: str | Path, output_dir: str | Path, cfg: PruneConfig | None = None) -> Path:
    """Prune ``run_dir``'s model, recover it by fine-tuning, write the new run directory and its report."""
    from accelerate import PartialState

    run = load_run(run_dir)
    cfg = cfg or PruneConfig()
    cfg = cfg.model_copy(update={"importance": cfg.importance or run.task.pruning_importance})
    out = Path(output_dir)
    if out.resolve() == run.path.resolve():
        raise ConfigError("prune --output-dir must differ from the run it prunes", "e.g. runs/digits-pruned")
    main = PartialState().is_main_process
    torch.manual_seed(run.config.train.seed)
    model = run.load_model()
    base = copy.deepcopy(model)
    head_name = run.architecture["head_name"]
    splits = build_datasets(run.config.data.model_copy(update={"augment": False}), run.preprocessing)
    inputs, targets = split_arrays(splits.val, 2000, run.task)
    names = run.input_names
    example = tuple(torch.from_numpy(a[:1]) for a in run.task.example_inputs(run.preprocessing, names))
    probe = Probe(example, names, run.task.dynamic_axes(names), tile(run.task.bench_inputs(inputs, run.preprocessing), 1),
                  run.task, inputs, targets, run.info)
    record = PruneRecord(source_run=relative(run.path, out), method=cfg.method, importance=cfg.importance,
                         metric=run.task.metric, before=measure_model(model, probe) if main else None)
    stage = manifest("prune", run.path, config=cfg)
    if cfg.method == "unstructured":
        record.sparsity = unstructured(model, head_name, cfg.ratio if cfg.ratio is not None else 0.5)
        if main:
            save_run(run, out, model, {})
    else:
        model = structured(run, out, model, head_name, probe, cfg, record, splits, main)
    if main:
        write_manifest(out, stage)
        model = load_run(out).load_model()  # the best recovered weights, through the reload path
        finish_report(out, record, base, model, probe, cfg)
        write_manifest(out, {**stage, "ratio": record.ratio})
    PartialState().wait_for_everyone()
    return out


def structured(run: Run, out: Path, model: nn.Module, head_name: str, probe: Probe, cfg: PruneConfig,
               record: PruneRecord, splits, main: bool) -> nn.Module:
    """Remove channels (in ``cfg.iterative_steps`` steps, fine-tuning after each) and save the run."""
    from accelerate.utils import broadcast_object_list

    teacher = copy.deepcopy(model).eval() if cfg.distill_alpha > 0 else None
    batches = _taylor_batches(splits.train, cfg, run.task) if cfg.importance == "taylor" else None
    # Measured targets could differ between processes: the main process decides for all.
    choice = [choose_ratio(model, head_name, probe, cfg, batches) if main else None]
    ratio, trials = broadcast_object_list(choice, from_process=0)[0]
    record.ratio, record.search, record.iterative_steps = ratio, trials, cfg.iterative_steps
    base = copy.deepcopy(model)
    steps = prune_channels(model, model.get_submodule(head_name), probe.example, cfg, ratio, run.task, batches,
                           cfg.iterative_steps)
    for step, _ in enumerate(steps):
        if main:
            log.info("pruning step %d/%d: %.2fx MACs", step + 1, cfg.iterative_steps,
                     macs_and_params(model, probe.example)[0] / macs_and_params(base, probe.example)[0])
        epochs = _step_epochs(cfg, step)
        if epochs:
            _finetune(run, out, model, head_name, base, epochs, cfg, teacher)
    if _step_epochs(cfg, cfg.iterative_steps - 1) == 0 and main:
        save_run(run, out, model, architecture_delta(base, model))
    return model


def finish_report(out: Path, record: PruneRecord, base: nn.Module, model: nn.Module, probe: Probe,
                  cfg: PruneConfig) -> None:
    threads = cfg.threads or physical_cores()
    after = measure_model(model, probe)
    timing = onnx_speedup(base, model, probe, threads, cfg.latency_seconds)
    record.before.fp32_latency_ms, after.fp32_latency_ms = timing["base_ms"], timing["latency_ms"]
    record.after = after
    record.speedup = {k: timing[k] for k in ("speedup", "speedup_low", "speedup_high")}
    record.latency_session = session_policy(threads)
    record.ratios = {k: getattr(after, k) / getattr(record.before, k)
                     for k in ("macs", "params", "fp32_latency_ms", "onnx_bytes")}
    record.metric_drop_points = 100 * (record.before.scores[record.metric] - after.scores[record.metric])
    if cfg.method == "unstructured":
        record.note = ("unstructured sparsity zeroes weights but keeps every tensor dense: onnxruntime runs "
                       "the same dense kernels, so latency does not improve; only a compressed file shrinks")
    write_record(out / "prune_report.json", record)
    write_text(out / "prune_report.md", prune_markdown(record))
    log.info("%s", prune_markdown(record))


def save_run(run: Run, out: Path, model: nn.Module, delta: dict[str, Any]) -> None:
    """A run directory for a model that is not fine-tuned after pruning."""
    from .rundir import write_run_files

    architecture = {**run.architecture, **({"pruned": delta} if delta else {})}
    write_run_files(out, run.config.model_copy(update={"output_dir": out}), run.classes, run.preprocessing, architecture)
    save_weights(model.state_dict(), out)
    write_record(out / "metrics.json", run.metrics.model_copy(update={"epochs": 0, "note": "not fine-tuned after pruning"}))


def measure_model(model: nn.Module, probe: Probe) -> ModelMeasure:
    """MACs, parameters, the task's scores and ONNX file size (plain and gzip) of a model."""
    macs, params = macs_and_params(model, probe.example)
    with probe.onnx(model) as path:
        size = path.stat().st_size
        gz = len(gzip.compress(path.read_bytes(), compresslevel=6))
    outputs = probe.task.outputs(torch_predictor(model.eval(), probe.names), probe.inputs, 64)
    scores = probe.task.evaluate(outputs, probe.inputs, probe.targets, probe.info)
    return ModelMeasure(macs=macs, params=params, scores=scores.values, onnx_bytes=size, onnx_gzip_bytes=gz)


def _step_epochs(cfg: PruneConfig, step: int) -> int:
    """Fine-tuning epochs after pruning step ``step``: spread evenly, the remainder at the end."""
    share, rest = divmod(cfg.finetune_epochs, cfg.iterative_steps)
    return share + (rest if step == cfg.iterative_steps - 1 else 0)


def _finetune(run: Run, out: Path, model: nn.Module, head_name: str, base: nn.Module, epochs: int,
              cfg: PruneConfig, teacher: nn.Module | None) -> None:
    """Recover through the shared Accelerate loop (distributed and mixed precision as configured) into ``out``."""
    tcfg = run.config.model_copy(deep=True, update={"output_dir": out})
    tcfg.train.epochs, tcfg.train.mode = epochs, "full"
    if cfg.finetune_lr is not None:
        tcfg.train.lr = cfg.finetune_lr
    from accelerate.utils import set_seed

    built = BuiltModel(model, head_name, {}, architecture={**{k: v for k, v in run.architecture.items()
                                                              if k not in ("name", "num_classes", "head_name", "pruned")},
                                                           "pruned": architecture_delta(base, model)},
                       fit_labels=fixed_labels(len(run.classes)))
    accelerator = make_accelerator(tcfg, out)
    set_seed(tcfg.train.seed)
    splits = setup(tcfg, out, built, run.preprocessing, accelerator)
    fine_tune(Job(tcfg, out, built, run.preprocessing, splits, teacher, (cfg.distill_alpha, cfg.distill_temperature)),
              accelerator)


def _taylor_batches(train_set, cfg: PruneConfig, task: Task) -> list[tuple[tuple, torch.Tensor]]:
    """A few seeded training batches, collated by the task: ((inputs, ...), labels)."""
    order = np.random.default_rng(0).permutation(len(train_set))[:cfg.taylor_batches * 16]
    items = [train_set[int(i)] for i in order]
    return [task.collate(items[i:i + 16]) for i in range(0, len(items), 16)]


def prune_markdown(record: PruneRecord) -> str:
    b, a, metric = record.before, record.after, record.metric
    rows = [("MACs", f"{b.macs / 1e6:.1f} M", f"{a.macs / 1e6:.1f} M", a.macs / b.macs),
            ("parameters", f"{b.params / 1e6:.2f} M", f"{a.params / 1e6:.2f} M", a.params / b.params),
            ("ORT FP32 p50 @1 (side by side)", f"{b.fp32_latency_ms:.2f} ms", f"{a.fp32_latency_ms:.2f} ms",
             a.fp32_latency_ms / b.fp32_latency_ms),
            ("ONNX file", f"{b.onnx_bytes / 1e6:.2f} MB", f"{a.onnx_bytes / 1e6:.2f} MB", a.onnx_bytes / b.onnx_bytes),
            ("ONNX file, gzip", f"{b.onnx_gzip_bytes / 1e6:.2f} MB", f"{a.onnx_gzip_bytes / 1e6:.2f} MB",
             a.onnx_gzip_bytes / b.onnx_gzip_bytes),
            (f"val {metric}", f"{100 * b.scores[metric]:.2f} %", f"{100 * a.scores[metric]:.2f} %",
             a.scores[metric] / max(b.scores[metric], 1e-9))]
    lines = [f"# Pruning report ({record.method}, importance {record.importance})", "",
             "| | before | after | after/before |", "|---|---:|---:|---:|",
             *[f"| {n} | {x} | {y} | {r:.3f} |" for n, x, y, r in rows]]
    if record.sparsity is not None:
        lines += ["", f"Weight sparsity: {100 * record.sparsity:.1f} %."]
    if record.note:
        lines += ["", f"Note: {record.note}."]
    return "\n".join(lines) + "\n"
