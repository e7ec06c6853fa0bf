"""Structured pruning that makes the ONNX file really faster: ``ftdeploy prune``.

Channels are physically removed with Torch-Pruning's dependency graph (a group of coupled layers
is pruned together, the classifier's outputs never), accuracy is recovered by fine-tuning through
the same Accelerate loop as ``ftdeploy train`` (optionally distilling from the unpruned model), and
the result is judged by onnxruntime latency measured on this machine. The pruned architecture is
stored as plain channel counts in ``model.json``, so a run directory reloads without pickles.

>>> out = prune_run("runs/digits", "runs/digits-pruned", PruneConfig(target_macs=0.5))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import PruneConfig
from .errors import ConfigError, DependencyError
from .latency import measure, ort_runner, ort_session
from .machine import physical_cores
from .models import BuiltModel
from .registry import Registry
from .rundir import Run, load_run, write_json

SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features")

importances: Registry = Registry("pruning importance", ConfigError)


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


def macs_and_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    macs, params = _tp().utils.count_ops_and_params(model, example)
    return int(macs), int(params)


def prune_channels(model: nn.Module, head: nn.Module, example: torch.Tensor, cfg: PruneConfig, ratio: float,
                   batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None, steps: int = 1):
    """A pruner that removes ``ratio`` of the channels of every prunable group, in ``steps`` calls of step()."""
    tp = _tp()
    model.eval()
    pruner = tp.pruner.MetaPruner(model, example, importance=importances.get(cfg.importance)(),
                                  pruning_ratio=ratio, global_pruning=cfg.global_pruning, iterative_steps=steps,
                                  ignored_layers=[head], round_to=cfg.round_to)
    original_step = pruner.step

    def step() -> None:
        if cfg.importance == "taylor":  # Taylor importance reads the gradients of a few real batches
            model.zero_grad()
            for x, y in batches or []:
                nn.functional.cross_entropy(model(x), y).backward()
        original_step()
        model.zero_grad(set_to_none=True)

    pruner.step = step
    return pruner


def pruned_copy(model: nn.Module, head_name: str, example: torch.Tensor, cfg: PruneConfig, ratio: float,
                batches=None) -> nn.Module:
    candidate = copy.deepcopy(model)
    prune_channels(candidate, candidate.get_submodule(head_name), example, cfg, ratio, batches).step()
    return candidate


@contextlib.contextmanager
def shipped_onnx(model: nn.Module, example: torch.Tensor):
    """The model as a temporary, optimized ONNX file (TorchScript exporter: fast, and only measured)."""
    from .export import export_onnx, finalize

    with tempfile.TemporaryDirectory() as tmp:
        raw, shipped = Path(tmp) / "raw.onnx", Path(tmp) / "model.onnx"
        export_onnx(model.eval(), example.repeat(2, 1, 1, 1), raw, exporter="torchscript")
        finalize(raw, shipped, {})
        yield shipped


def onnx_p50(path: Path, example: torch.Tensor, threads: int, seconds: float) -> float:
    return measure(ort_runner(ort_session(path, threads), example.numpy()), 1, min_seconds=seconds).p50


def ort_latency(model: nn.Module, example: torch.Tensor, threads: int, seconds: float) -> float:
    """Batch-1 p50 (ms) of the model as an ONNX file in onnxruntime: MACs do not map one to one onto latency."""
    with shipped_onnx(model, example) as path:
        return onnx_p50(path, example, threads, seconds)


def choose_ratio(model: nn.Module, head_name: str, example: torch.Tensor, cfg: PruneConfig,
                 batches=None, progress=print) -> tuple[float, list[dict[str, Any]]]:
    """The least channel ratio that meets the target: MACs by bisection, speedup by measured latency."""
    base_macs, _ = macs_and_params(model, example)
    trials: list[dict[str, Any]] = []
    if cfg.ratio is not None:
        return cfg.ratio, trials
    if cfg.target_macs is not None:
        lo, hi = 0.0, 0.95
        for _ in range(8):
            mid = (lo + hi) / 2
            macs, _ = macs_and_params(pruned_copy(model, head_name, example, cfg, mid, batches), example)
            trials.append({"ratio": mid, "macs_fraction": macs / base_macs})
            lo, hi = (lo, mid) if macs / base_macs <= cfg.target_macs else (mid, hi)
        progress(f"ratio {hi:.3f} keeps <= {cfg.target_macs:.2f}x MACs")
        return hi, trials
    threads = cfg.threads or physical_cores()
    base = ort_latency(model, example, threads, cfg.latency_seconds)
    for ratio in np.arange(0.1, 0.91, 0.1):
        candidate = pruned_copy(model, head_name, example, cfg, float(ratio), batches)
        latency = ort_latency(candidate, example, threads, cfg.latency_seconds)
        macs, _ = macs_and_params(candidate, example)
        trials.append({"ratio": float(ratio), "macs_fraction": macs / base_macs, "latency_ms": latency,
                       "speedup": base / latency})
        progress(f"ratio {ratio:.1f}: {macs / base_macs:.2f}x MACs, {latency:.2f} ms = {base / latency:.2f}x")
        if base / latency >= cfg.target_speedup:
            return float(ratio), trials
    raise ConfigError(f"no pruning ratio up to 0.9 reaches a {cfg.target_speedup}x onnxruntime speedup "
                      f"(best {max(t['speedup'] for t in trials):.2f}x)", "lower --target-speedup")


def architecture_delta(base: nn.Module, pruned: nn.Module) -> dict[str, Any]:
    """Per module whose tensors changed shape: its shape attributes and tensor shapes (no pickles)."""
    before = {n: m for n, m in base.named_modules()}
    delta = {}
    for name, module in pruned.named_modules():
        own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        ref = before.get(name)
        ref_own = (dict(ref.named_parameters(recurse=False)) | dict(ref.named_buffers(recurse=False))) if ref else {}
        if any(k not in ref_own or ref_own[k].shape != v.shape for k, v in own.items()):
            delta[name] = {"attrs": {a: getattr(module, a) for a in SHAPE_ATTRS if hasattr(module, a)},
                           "tensors": {k: list(v.shape) for k, v in own.items()}}
    return delta


def restore_pruned(model: nn.Module, delta: dict[str, Any]) -> nn.Module:
    """Give a freshly built model the channel counts recorded by :func:`architecture_delta`."""
    for name, spec in delta.items():
        module = model.get_submodule(name)
        for attr, value in spec["attrs"].items():
            setattr(module, attr, value)
        for tensor, shape in spec["tensors"].items():
            old = getattr(module, tensor)
            new = torch.zeros(shape, dtype=old.dtype)
            if isinstance(old, nn.Parameter):
                setattr(module, tensor, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                module.register_buffer(tensor, new)
    return model


def unstructured(model: nn.Module, head_name: str, amount: float) -> float:
    """Global L1 magnitude pruning of conv/linear weights, made permanent; returns the sparsity reached."""
    from torch.nn.utils import prune

    params = [(m, "weight") for n, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and n != head_name]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    for module, name in params:
        prune.remove(module, name)  # masks folded into the weights: nothing of them reaches the export
    zeros = sum(int((m.weight == 0).sum()) for m, _ in params)
    return zeros / sum(m.weight.numel() for m, _ in params)


def prune_run(run_dir: str | Path, output_dir: str | Path, cfg: PruneConfig | None = None) -> Path:
    """Prune ``run_dir``'s model, recover it by fine-tuning, write the new run directory and its report."""
    from .export import run_splits, split_arrays

    cfg = cfg or PruneConfig()
    run = load_run(run_dir)
    out = Path(output_dir)
    if out.resolve() == run.path.resolve():
        raise ConfigError("prune --output-dir must differ from the run it prunes", "e.g. runs/digits-pruned")
    torch.manual_seed(run.config.train.seed)
    model = run.load_model()
    head_name = run.architecture["head_name"]
    example = torch.zeros(1, *run.preprocessing.input_shape)
    splits = run_splits(run)
    inputs, labels = split_arrays(splits.val, 2000)
    threads = cfg.threads or physical_cores()
    before = measure_model(model, example, inputs, labels, threads, cfg.latency_seconds)
    record: dict[str, Any] = {"source_run": str(run.path), "method": cfg.method, "importance": cfg.importance,
                              "before": before}

    if cfg.method == "unstructured":
        record["sparsity"] = unstructured(model, head_name, cfg.ratio if cfg.ratio is not None else 0.5)
        save_run(run, out, model, {}, record)
    else:
        teacher = copy.deepcopy(model).eval() if cfg.distill_alpha > 0 else None
        batches = _taylor_batches(splits.train, cfg) if cfg.importance == "taylor" else None
        ratio, trials = choose_ratio(model, head_name, example, cfg, batches)
        record.update(ratio=ratio, search=trials, iterative_steps=cfg.iterative_steps)
        base = copy.deepcopy(model)
        pruner = prune_channels(model, model.get_submodule(head_name), example, cfg, ratio, batches, cfg.iterative_steps)
        for step in range(cfg.iterative_steps):
            pruner.step()
            print(f"pruning step {step + 1}/{cfg.iterative_steps}: "
                  f"{macs_and_params(model, example)[0] / before['macs']:.2f}x MACs")
            epochs = _step_epochs(cfg, step)
            if epochs:
                _finetune(run, out, model, head_name, base, epochs, cfg, teacher)
        if _step_epochs(cfg, cfg.iterative_steps - 1) == 0:
            save_run(run, out, model, architecture_delta(base, model), record)
        model = load_run(out).load_model()  # the best recovered weights, through the reload path
    after = measure_model(model, example, inputs, labels, threads, cfg.latency_seconds)
    record["after"] = after
    record["ratios"] = {k: after[k] / before[k] for k in ("macs", "params", "fp32_latency_ms", "onnx_bytes")}
    record["accuracy_drop_points"] = 100 * (before["accuracy"] - after["accuracy"])
    if cfg.method == "unstructured":
        record["note"] = ("unstructured sparsity zeroes weights but keeps every tensor dense: onnxruntime runs "
                          "the same dense kernels, so latency does not improve; only a compressed file shrinks")
    write_json(out / "prune_report.json", record)
    (out / "prune_report.md").write_text(prune_markdown(record))
    print(prune_markdown(record))
    return out


def save_run(run: Run, out: Path, model: nn.Module, delta: dict[str, Any], record: dict[str, Any]) -> None:
    """A run directory for a model that is not fine-tuned after pruning."""
    from safetensors.torch import save_file

    from .rundir import manifest, write_run_files

    architecture = {**run.architecture, **({"pruned": delta} if delta else {})}
    write_run_files(out, run.config.model_copy(update={"output_dir": out}), run.classes, run.preprocessing,
                    architecture, manifest("prune", run.path, prune={k: record.get(k) for k in ("method", "ratio")}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    write_json(out / "metrics.json", {**run.metrics, "epochs": 0, "note": "not fine-tuned after pruning"})


def measure_model(model: nn.Module, example: torch.Tensor, inputs, labels, threads: int, seconds: float) -> dict:
    from .export import accuracy, batched, torch_predictor

    macs, params = macs_and_params(model, example)
    with shipped_onnx(model, example) as path:
        size = path.stat().st_size
        gz = len(gzip.compress(path.read_bytes(), compresslevel=6))
        latency = onnx_p50(path, example, threads, seconds)
    return {"macs": macs, "params": params, "accuracy": accuracy(batched(torch_predictor(model.eval()), inputs, 64), labels),
            "fp32_latency_ms": latency, "onnx_bytes": size, "onnx_gzip_bytes": gz}


def _step_epochs(cfg: PruneConfig, step: int) -> int:
    """Fine-tuning epochs after pruning step ``step``: spread evenly, the remainder at the end."""
    share, rest = divmod(cfg.finetune_epochs, cfg.iterative_steps)
    return share + (rest if step == cfg.iterative_steps - 1 else 0)


def _finetune(run: Run, out: Path, model: nn.Module, head_name: str, base: nn.Module, epochs: int,
              cfg: PruneConfig, teacher: nn.Module | None) -> None:
    """Recover through ftdeploy.train (distributed and mixed precision as configured) into ``out``."""
    from .train import train

    tcfg = run.config.model_copy(deep=True, update={"output_dir": out})
    tcfg.train.epochs, tcfg.train.mode = epochs, "full"
    if cfg.finetune_lr is not None:
        tcfg.train.lr = cfg.finetune_lr
    built = BuiltModel(model, head_name, {}, architecture={"pruned": architecture_delta(base, model)})
    train(tcfg, built=built, parent=run.path, teacher=teacher,
          distill=(cfg.distill_alpha, cfg.distill_temperature), preprocessing=run.preprocessing)


def _taylor_batches(train_set, cfg: PruneConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from .export import split_arrays

    x, y = split_arrays(train_set, cfg.taylor_batches * 16, shuffle=True)
    return [(torch.from_numpy(x[i:i + 16]), torch.from_numpy(y[i:i + 16])) for i in range(0, len(x), 16)]


def prune_markdown(record: dict[str, Any]) -> str:
    b, a = record["before"], record["after"]
    rows = [("MACs", f"{b['macs'] / 1e6:.1f} M", f"{a['macs'] / 1e6:.1f} M", a["macs"] / b["macs"]),
            ("parameters", f"{b['params'] / 1e6:.2f} M", f"{a['params'] / 1e6:.2f} M", a["params"] / b["params"]),
            ("ORT FP32 p50 @1", f"{b['fp32_latency_ms']:.2f} ms", f"{a['fp32_latency_ms']:.2f} ms",
             a["fp32_latency_ms"] / b["fp32_latency_ms"]),
            ("ONNX file", f"{b['onnx_bytes'] / 1e6:.2f} MB", f"{a['onnx_bytes'] / 1e6:.2f} MB", a["onnx_bytes"] / b["onnx_bytes"]),
            ("ONNX file, gzip", f"{b['onnx_gzip_bytes'] / 1e6:.2f} MB", f"{a['onnx_gzip_bytes'] / 1e6:.2f} MB",
             a["onnx_gzip_bytes"] / b["onnx_gzip_bytes"]),
            ("val accuracy", f"{100 * b['accuracy']:.2f} %", f"{100 * a['accuracy']:.2f} %", a["accuracy"] / max(b["accuracy"], 1e-9))]
    lines = [f"# Pruning report ({record['method']}, importance {record['importance']})", "",
             "| | before | after | after/before |", "|---|---:|---:|---:|",
             *[f"| {n} | {x} | {y} | {r:.3f} |" for n, x, y, r in rows]]
    if "sparsity" in record:
        lines += ["", f"Weight sparsity: {100 * record['sparsity']:.1f} %."]
    if "note" in record:
        lines += ["", f"Note: {record['note']}."]
    return "\n".join(lines) + "\n"
