"""The fine-tuning loop on Hugging Face Accelerate: one CPU, one GPU, many GPUs or nodes, mixed precision.

Shared by the ``train`` stage and by pruning's recovery fine-tuning, so both run the same
distributed and mixed-precision paths. :func:`fine_tune` writes a run directory's model files;
the stage that calls it writes the manifest once its own files are there.

Only the main process writes files and shows progress; every process trains.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .config import PipelineConfig
from .data import DatasetSplits, build_datasets
from .errors import ConfigError, DependencyError
from .evaluation import split_arrays, torch_predictor
from .figures import pyplot
from .files import atomic_path, write_text
from .models import BuiltModel, build_model, fixed_labels, split_parameters
from .records import BatchNormRecord, TrainMetrics, write_record
from .rundir import WEIGHTS, is_run_dir, load_run, write_run_files
from .tasks import Scores, Task, get_task

log = logging.getLogger(__name__)


class Callback(Protocol):
    """Hooks into the loop (all optional); used by tests and by callers who want to watch or stop it."""

    def on_train_batch(self, state: "TrainState", batch: tuple[torch.Tensor, torch.Tensor]) -> None: ...

    def on_epoch_end(self, state: "TrainState") -> None: ...


@dataclass
class TrainState:
    """What a checkpoint needs besides model/optimizer/scheduler/RNG, registered with Accelerate."""

    epoch: int = -1  # last finished epoch
    best_metric: float = -1.0  # the task's primary metric on validation, at the best epoch
    best_epoch: int = -1
    best_scores: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    model: nn.Module | None = None  # the live (unwrapped) model, for callbacks; not checkpointed
    best_weights: dict[str, torch.Tensor] | None = None  # on every process: the file is only on the main one

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "best_metric": self.best_metric, "best_epoch": self.best_epoch,
                "best_scores": self.best_scores, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # checkpoints written before the metric was the task's name it best_accuracy
        self.epoch, self.best_metric = state["epoch"], state.get("best_metric", state.get("best_accuracy"))
        self.best_epoch, self.history = state["best_epoch"], list(state["history"])
        self.best_scores = dict(state.get("best_scores") or {})


@dataclass
class Job:
    """One fine-tuning job: the model, its data and what the loss adds."""

    cfg: PipelineConfig
    out: Path
    built: BuiltModel
    spec: Any  # the task's preprocessor
    splits: DatasetSplits
    teacher: nn.Module | None = None
    distill: tuple[float, float] = (0.0, 1.0)


def built_from_run(path: str | Path) -> tuple[BuiltModel, Any]:
    """A run directory as a starting point for more training: its model (pruned or not) and preprocessing."""
    run = load_run(path)
    extra = {k: v for k, v in run.architecture.items() if k not in ("num_classes", "head_name")}
    model = run.load_model()
    model.train()
    return (BuiltModel(model, run.architecture["head_name"], {}, architecture=extra,
                       fit_labels=fixed_labels(len(run.classes))), run.preprocessing)


def make_accelerator(cfg: PipelineConfig, out: Path):
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import ProjectConfiguration

    trackers = list(cfg.train.log_with)
    if "tensorboard" in trackers:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise DependencyError("train.log_with=[tensorboard] needs TensorBoard", "pip install tensorboard") from None
    mixed_precision = resolve_mixed_precision(cfg.train.mixed_precision)
    try:
        return Accelerator(
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.grad_accum_steps,
            log_with=trackers or None,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
            # A seeded sampler reshuffles as seed + epoch, so a resumed run sees the same batches.
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
        )
    except (ValueError, RuntimeError) as e:  # e.g. a precision this device has no autocast for
        raise ConfigError(f"cannot set up training with mixed_precision={mixed_precision}: {e}",
                          "use train.mixed_precision=no (or bf16 on CPUs/GPUs that support it)") from None


LAUNCHER_PRECISION = "ACCELERATE_MIXED_PRECISION"  # what accelerate launch --mixed_precision sets


def resolve_mixed_precision(configured: str | None) -> str:
    """The precision this training runs in: the config's when it names one (one log line when that
    overrides the launcher's), else the launcher's (Accelerate's own rule: ``no`` when nothing was
    launched). Accelerate keeps one precision per process; a state left by an earlier call with
    another precision (library users train several configs in one process) is reset, or it would
    silently win."""
    from accelerate.state import AcceleratorState

    launcher = os.environ.get(LAUNCHER_PRECISION, "").lower() or None
    wanted = configured or launcher or "no"
    if configured and launcher and configured != launcher:
        log.warning("train.mixed_precision=%s overrides the launcher's %s (unset it to follow the launcher)",
                    configured, launcher)
    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != wanted:
        AcceleratorState._reset_state()
    return wanted


def lr_lambda(total_steps: int, warmup_steps: int):
    """Linear warm-up, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(cfg: PipelineConfig, built: BuiltModel) -> torch.optim.Optimizer:
    backbone, head = split_parameters(built.model, built.head_name)
    t = cfg.train
    if t.mode == "head":
        groups = [{"params": head, "lr": t.lr}]
    elif t.mode == "full_lower_backbone_lr":
        groups = [{"params": head, "lr": t.lr}, {"params": backbone, "lr": t.lr * t.backbone_lr_scale}]
    else:
        groups = [{"params": backbone + head, "lr": t.lr}]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=True)
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)


def features_collate(items: list) -> tuple[tuple, torch.Tensor]:
    """Batches of cached head features, in the loop's ((inputs, ...), labels) shape."""
    xs, ys = zip(*items)
    return (torch.stack(xs),), torch.stack(ys)


@torch.no_grad()
def head_features(built: BuiltModel, dataset, batch_size: int, collate) -> TensorDataset:
    """Inputs of the classifier layer for every image, computed once by the frozen backbone."""
    captured: list[torch.Tensor] = []
    hook = built.model.get_submodule(built.head_name).register_forward_hook(
        lambda _m, inputs, _out: captured.append(inputs[0].detach().float()))
    labels = []
    try:
        built.model.eval()
        for x, y in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
            built.model(*x)
            labels.append(torch.as_tensor(y))
    finally:
        hook.remove()
    return TensorDataset(torch.cat(captured), torch.cat(labels))


@dataclass
class Validation:
    """The validation split as the numpy path holds it (inputs batched by the task, targets), and how
    the module being trained is run on it: every epoch is judged by the task's own postprocess and
    metric, the same code that judges the exported file. Each process of a multi-process launch
    judges the whole split, so they all pick the same best epoch, through the wrapped model: its
    forward broadcasts rank 0's buffers (BatchNorm statistics), so every rank ends the epoch alike."""

    inputs: Any
    targets: Any
    input_names: list[str]
    info: dict[str, Any]
    batch_size: int

    def scores(self, task: Task, accelerator, module: nn.Module) -> Scores:
        module.eval()
        predict = torch_predictor(module, self.input_names, accelerator.device, accelerator.autocast)
        outputs = task.outputs(predict, self.inputs, self.batch_size)
        return task.evaluate(outputs, self.inputs, self.targets, self.info)


def prepare_data(cfg: PipelineConfig, built: BuiltModel, splits: DatasetSplits
                 ) -> tuple[nn.Module, Any, Any, Any, Validation]:
    """(module to train, train dataset, its collate function, the training order or None for a plain
    shuffle, the validation split): cached head features in head mode (where the task's head takes
    one tensor), else the task's inputs."""
    task = get_task(cfg.task)
    collate = task.collate
    info = {"classes": splits.classes, **built.architecture.get("postprocess", {})}
    batch_size = max(cfg.data.batch_size, 64)
    if cfg.train.mode == "head":
        for p in built.model.parameters():
            p.requires_grad_(False)
        for p in built.model.get_submodule(built.head_name).parameters():
            p.requires_grad_(True)
        if cfg.train.cache_features and not cfg.data.augment and task.head_features_cacheable:
            # The frozen backbone in eval mode gives the same features every epoch: compute them once.
            head = built.model.get_submodule(built.head_name)
            features = head_features(built, splits.val, 256, collate)
            val = Validation(features.tensors[0].numpy(), task.stack_targets(features.tensors[1].tolist()),
                             ["features"], info, batch_size)
            return head, head_features(built, splits.train, 256, collate), features_collate, None, val
    inputs, targets = split_arrays(splits.val, len(splits.val), task)
    names = list(built.architecture.get("input_names") or task.input_names)
    return (built.model, splits.train, collate, task.train_sampler(splits.train, cfg.data.batch_size, cfg.train.seed),
            Validation(inputs, targets, names, info, batch_size))


@torch.no_grad()
def reestimate_batchnorm(accelerator, model: nn.Module, loader, batches: int) -> bool:
    """Recompute every BatchNorm's running statistics as a plain average over ``batches`` training
    batches with the final weights (as ``torch.optim.swa_utils.update_bn`` does, for a bounded number
    of batches). False when the model has no BatchNorm."""
    model.train()  # a BatchNorm its model keeps frozen stays in eval mode: its statistics are kept
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
             and m.training]
    if not norms:
        model.eval()
        return False
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average instead of an exponential one
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        with accelerator.autocast():
            model(*x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
    return True


def start(cfg: PipelineConfig, built: BuiltModel | None = None,
          preprocessing: Any = None) -> tuple[BuiltModel, Any, Path | None]:
    """(model, preprocessing, parent run) to fine-tune: ``built`` as given, a run directory named by
    ``model.weights``, or the registry's model with pretrained weights."""
    parent = None
    if built is None and is_run_dir(cfg.model.weights):  # continue from a run (e.g. a pruned one)
        built, preprocessing = built_from_run(cfg.model.weights)
        parent = Path(cfg.model.weights)
    if built is None:
        built = build_model(cfg.model, num_classes=None)
    return built, preprocessing or get_task(cfg.task).resolve_preprocessor(cfg.preprocessing, built.defaults), parent


def setup(cfg: PipelineConfig, out: Path, built: BuiltModel, spec: Any, accelerator) -> DatasetSplits:
    """Build the data, fit the head to its classes and write the run's model files (main process)."""
    splits = build_datasets(cfg.data, spec)
    built.set_classes(len(splits.classes))
    if splits.skipped and accelerator.is_main_process:
        log.warning("skipped %d unreadable item(s), e.g. %s", len(splits.skipped), splits.skipped[0])
    if accelerator.is_main_process:
        architecture = {"name": cfg.model.name, "num_classes": len(splits.classes), "head_name": built.head_name,
                        **built.architecture}
        write_run_files(out, cfg, splits.classes, spec, architecture)
    return splits


def fine_tune(job: Job, accelerator, resume: bool = False, callbacks: Iterable[Callback] = ()) -> TrainMetrics:
    """Run the loop of ``job`` and write its weights, history and metrics; returns the metrics. The
    caller seeds (``accelerate.utils.set_seed``) before it builds the model, so that the same config
    gives the same weights."""
    cfg, out = job.cfg, job.out
    ckpt = out / "checkpoints" / "last"
    if resume and not ckpt.is_dir():
        raise ConfigError(f"--resume: no checkpoint at {ckpt}", "run without --resume to start from scratch"
                          + ("" if cfg.train.checkpoint else " (train.checkpoint=false saves none)"))
    if accelerator.device.type == "cuda":  # metrics.json's peak is this training's, not the process's
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    task = get_task(cfg.task)
    trained, train_set, collate, sampler, val = prepare_data(cfg, job.built, job.splits)
    optimizer = make_optimizer(cfg, job.built)
    bs, workers = cfg.data.batch_size, cfg.data.num_workers
    # Workers that persist across epochs: starting them again every epoch re-imports torch in each
    # under the spawn start method (macOS, Python 3.14), seconds per epoch for nothing.
    loading = {"num_workers": workers, "persistent_workers": workers > 0, "collate_fn": collate}
    train_loader = DataLoader(train_set, batch_size=bs, shuffle=sampler is None, sampler=sampler,
                              drop_last=len(train_set) > bs, **loading)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.grad_accum_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(steps_per_epoch * cfg.train.epochs, round(cfg.train.warmup_epochs * steps_per_epoch)))
    trained, optimizer, train_loader, scheduler = accelerator.prepare(trained, optimizer, train_loader, scheduler)
    state = TrainState(model=job.built.model)
    accelerator.register_for_checkpointing(state)
    if resume:
        accelerator.load_state(str(ckpt))
        if accelerator.is_main_process:
            log.info("resumed after epoch %d (best val %s %.4f)", state.epoch + 1, task.metric, state.best_metric)
    if cfg.train.log_with:
        accelerator.init_trackers(cfg.name, config={"lr": cfg.train.lr, "epochs": cfg.train.epochs,
                                                    "batch_size": bs, "mode": cfg.train.mode})
    teacher = job.teacher.eval().to(accelerator.device) if job.teacher is not None else None
    for epoch in range(state.epoch + 1, cfg.train.epochs):
        record = run_epoch(job, accelerator, trained, train_loader, optimizer, scheduler, task, teacher, epoch, state,
                           callbacks)
        scores = val.scores(task, accelerator, trained)
        record["val_metric"] = scores.value
        end_epoch(job, accelerator, trained, state, record, scores, ckpt, callbacks)
    bn = finish_batchnorm(job, accelerator, trained, train_loader, val, task, state)
    metrics = TrainMetrics(metric=task.metric, val_metric=state.best_metric, val_scores=state.best_scores,
                           best_epoch=state.best_epoch, epochs=len(state.history),
                           final_val_metric=state.history[-1]["val_metric"] if state.history else None,
                           train_items_per_second=_median([h["train_items_per_second"] for h in state.history]),
                           unit=task.unit, num_processes=accelerator.num_processes,
                           mixed_precision=accelerator.mixed_precision, mixed_precision_configured=cfg.train.mixed_precision,
                           device=accelerator.device.type, mode=cfg.train.mode, bn_reestimate=bn,
                           peak_device_memory_mb=(torch.cuda.max_memory_allocated(accelerator.device) / 2**20
                                                  if accelerator.device.type == "cuda" else None))
    if accelerator.is_main_process:
        write_record(out / "metrics.json", metrics)
        plot_history(out, state.history, task.metric_label)
    for tracker in accelerator.trackers:  # not end_training(): that also ends the process group, which later
        tracker.finish()                  # stages of the same launch (pruning's recovery) still need
    return metrics


def release_processes() -> None:
    """End the process group of a multi-process launch, once its last stage has run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _median(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


def run_epoch(job: Job, accelerator, trained, loader, optimizer, scheduler, task: Task, teacher, epoch: int,
              state: TrainState, callbacks) -> dict[str, Any]:
    from tqdm.auto import tqdm

    cfg = job.cfg
    loader.set_epoch(epoch)
    trained.train()
    if cfg.train.mode == "head":
        # The frozen backbone keeps its BatchNorm statistics (and its dropout off) whether the model
        # is trained whole or wrapped for data parallelism; only the head trains.
        job.built.model.eval()
        job.built.model.get_submodule(job.built.head_name).train()
    seen, loss_sum, t0 = 0, 0.0, time.perf_counter()
    show = cfg.train.progress and accelerator.is_local_main_process
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
               disable=None if show else True, leave=False, mininterval=1)  # None: off when not a terminal
    for x, y in bar:
        with accelerator.accumulate(trained):
            with accelerator.autocast():
                outputs = trained(*x)
                if teacher is None:
                    loss = task.loss(outputs, y, cfg.train)
                else:
                    with torch.no_grad():
                        taught = teacher(*x)
                    loss = task.distillation_loss(outputs, taught, y, cfg.train, *job.distill)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        n = len(x[0])  # every input's first axis is the batch
        seen += n
        loss_sum += loss.item() * n
        bar.set_postfix(loss=f"{loss.item():.3f}")
        for cb in callbacks:
            getattr(cb, "on_train_batch", lambda *a: None)(state, (x, y))
    seconds = time.perf_counter() - t0
    return {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen), "lr": scheduler.get_last_lr()[0],
            "train_seconds": seconds, "train_items_per_second": seen * accelerator.num_processes / seconds}


def end_epoch(job: Job, accelerator, trained, state: TrainState, record: dict[str, Any], scores: Scores, ckpt: Path,
              callbacks) -> None:
    """Log the epoch, keep the best weights (in memory on every process, on disk on the main one),
    checkpoint for --resume."""
    state.history.append(record)
    state.epoch = record["epoch"] - 1
    accelerator.log({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])
    if accelerator.is_main_process:
        log.info("epoch %d/%d: loss %.4f val %s %.4f (%.0f %s/s)", record["epoch"], job.cfg.train.epochs,
                 record["train_loss"], scores.primary, scores.value, record["train_items_per_second"],
                 get_task(job.cfg.task).unit)
    if scores.value > state.best_metric:
        state.best_metric, state.best_epoch, state.best_scores = scores.value, record["epoch"], dict(scores.values)
        weights = accelerator.unwrap_model(trained) if trained is job.built.model else job.built.model
        state.best_weights = {k: v.detach().cpu().clone() for k, v in weights.state_dict().items()}
        if accelerator.is_main_process:
            save_weights(state.best_weights, job.out)
    accelerator.wait_for_everyone()
    if job.cfg.train.checkpoint:
        accelerator.save_state(str(ckpt))
    if accelerator.is_main_process:
        write_history(job.out, state.history)
    for cb in callbacks:
        getattr(cb, "on_epoch_end", lambda *a: None)(state)


def finish_batchnorm(job: Job, accelerator, trained, train_loader, val: Validation, task: Task,
                     state: TrainState) -> BatchNormRecord:
    """Re-estimate BatchNorm statistics for the best weights (``train.bn_reestimate``). Running
    statistics lag the weights after a short fine-tune (far behind with torchvision MobileNetV3's
    momentum of 0.01); ``auto`` keeps the re-estimate only where it helps: when the validation
    metric does not drop."""
    policy = job.cfg.train.bn_reestimate
    if policy == "never" or job.cfg.train.mode == "head":  # head mode: the frozen backbone keeps its statistics
        return BatchNormRecord(policy=policy, applied=False)
    model = accelerator.unwrap_model(trained)
    best = state.best_weights
    if best is None and (job.out / WEIGHTS).is_file():  # resumed after the best epoch
        from safetensors.torch import load_file

        best = load_file(str(job.out / WEIGHTS))
    if best is None:
        return BatchNormRecord(policy=policy, applied=False)
    model.load_state_dict(best)
    before = copy.deepcopy(best)
    if not reestimate_batchnorm(accelerator, model, train_loader, job.cfg.train.bn_reestimate_batches):
        return BatchNormRecord(policy=policy, applied=False, reason="no BatchNorm layers")
    after = val.scores(task, accelerator, trained)
    kept = policy == "always" or after.value >= state.best_metric
    if accelerator.is_main_process:
        log.info("BatchNorm statistics re-estimated: val %s %.4f -> %.4f (%s)", task.metric, state.best_metric,
                 after.value, "kept" if kept else "discarded")
    record = BatchNormRecord(policy=policy, applied=kept, val_metric_before=state.best_metric,
                             val_metric_after=after.value)
    if kept:
        state.best_metric, state.best_scores = after.value, dict(after.values)
        if accelerator.is_main_process:
            save_weights(model.state_dict(), job.out)
    else:
        model.load_state_dict(before)
    return record


def save_weights(state_dict: dict[str, torch.Tensor], out: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(out / WEIGHTS) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(tmp))


def write_history(out: Path, history: list[dict[str, Any]]) -> None:
    write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(history[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text(out / "metrics.csv", table.getvalue())


def plot_history(out: Path, history: list[dict[str, Any]], metric_label: str) -> None:
    """training_curves.png: loss and the validation metric per epoch (skipped without matplotlib)."""
    plt = pyplot()
    if plt is None or not history:
        return
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax1.set(title="training loss", xlabel="epoch")
    ax2.plot(epochs, [100 * h["val_metric"] for h in history], marker="o", color="tab:green")
    ax2.set(title=f"validation {metric_label} (%)", xlabel="epoch")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out / "training_curves.png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
