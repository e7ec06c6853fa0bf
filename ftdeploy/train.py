"""Fine-tuning on Hugging Face Accelerate: one CPU, one GPU, many GPUs or nodes, mixed precision.

``python -m ftdeploy.train`` is the same entry point as ``ftdeploy train``, so
``accelerate launch -m ftdeploy.train --config configs/digits.yaml`` runs it on every process.

>>> from ftdeploy.config import load_config
>>> cfg = load_config("configs/digits.yaml", ["output_dir=/tmp/digits"])  # doctest: +SKIP
>>> run_dir = train(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .config import PipelineConfig, PreprocessingConfig
from .data import DatasetSplits, build_datasets
from .errors import ConfigError, DependencyError
from .models import BuiltModel, build_model, split_parameters
from .preprocessing import Preprocessing
from .rundir import WEIGHTS, built_from_run, is_run_dir, manifest, write_json, write_run_files


class Callback(Protocol):
    """Hooks into the loop (all optional); used by tests and by callers who want to watch or stop it."""

    def on_train_batch(self, state: "TrainState", batch: tuple[torch.Tensor, torch.Tensor]) -> None: ...

    def on_epoch_end(self, state: "TrainState") -> None: ...


@dataclass
class TrainState:
    """What a checkpoint needs besides model/optimizer/scheduler/RNG, registered with Accelerate."""

    epoch: int = -1  # last finished epoch
    best_accuracy: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    model: nn.Module | None = None  # the live (unwrapped) model, for callbacks; not checkpointed

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "best_accuracy": self.best_accuracy, "best_epoch": self.best_epoch,
                "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.best_accuracy = state["epoch"], state["best_accuracy"]
        self.best_epoch, self.history = state["best_epoch"], list(state["history"])


def resolve_preprocessing(cfg: PreprocessingConfig, defaults: dict[str, Any]) -> Preprocessing:
    """The config's values where set, otherwise the ones that match the model's pretrained weights."""
    input_size = cfg.input_size or defaults["input_size"]
    resize = cfg.resize_size or (input_size if cfg.input_size else defaults["resize_size"])
    mean, std = cfg.mean or defaults["mean"], cfg.std or defaults["std"]
    if cfg.channels == 1:  # one channel: average the per-channel statistics of the weights
        mean, std = mean if len(mean) == 1 else (sum(mean) / len(mean),), std if len(std) == 1 else (sum(std) / len(std),)
    if len(mean) != cfg.channels or len(std) != cfg.channels:
        raise ConfigError(f"preprocessing.mean/std have {len(mean)}/{len(std)} values for {cfg.channels} channel(s)",
                          "give one value per channel")
    if resize < input_size:
        raise ConfigError(f"preprocessing.resize_size {resize} is smaller than input_size {input_size}")
    return Preprocessing(input_size, resize, cfg.channels, tuple(mean), tuple(std),
                         cfg.interpolation if cfg.interpolation != "bilinear" else defaults.get("interpolation", "bilinear"))


def make_accelerator(cfg: PipelineConfig, out: Path):
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import ProjectConfiguration

    trackers = list(cfg.train.log_with)
    if "tensorboard" in trackers:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise DependencyError("train.log_with=[tensorboard] needs TensorBoard", "pip install tensorboard") from None
    try:
        return Accelerator(
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.grad_accum_steps,
            log_with=trackers or None,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
            # A seeded sampler reshuffles as seed + epoch, so a resumed run sees the same batches.
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
        )
    except (ValueError, RuntimeError) as e:  # e.g. fp16 requested on a machine without a GPU
        raise ConfigError(f"cannot set up training with mixed_precision={cfg.train.mixed_precision}: {e}",
                          "use train.mixed_precision=no (or bf16 on CPUs/GPUs that support it)") from None


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


@torch.no_grad()
def head_features(built: BuiltModel, dataset, batch_size: int) -> TensorDataset:
    """Inputs of the classifier layer for every image, computed once by the frozen backbone."""
    captured: list[torch.Tensor] = []
    hook = built.model.get_submodule(built.head_name).register_forward_hook(
        lambda _m, inputs, _out: captured.append(inputs[0].detach().float()))
    labels = []
    try:
        built.model.eval()
        for x, y in DataLoader(dataset, batch_size=batch_size):
            built.model(x)
            labels.append(torch.as_tensor(y))
    finally:
        hook.remove()
    return TensorDataset(torch.cat(captured), torch.cat(labels))


def prepare_data(cfg: PipelineConfig, built: BuiltModel, splits: DatasetSplits) -> tuple[nn.Module, Any, Any]:
    """(module to train, train dataset, val dataset): cached head features in head mode, else images."""
    if cfg.train.mode == "head":
        for p in built.model.parameters():
            p.requires_grad_(False)
        for p in built.model.get_submodule(built.head_name).parameters():
            p.requires_grad_(True)
        if cfg.train.cache_features and not cfg.data.augment:
            # The frozen backbone in eval mode gives the same features every epoch: compute them once.
            head = built.model.get_submodule(built.head_name)
            return head, head_features(built, splits.train, 256), head_features(built, splits.val, 256)
    return built.model, splits.train, splits.val


class DistillationLoss(nn.Module):
    """The usual loss plus soft-target KL divergence from a frozen teacher's logits."""

    def __init__(self, base: nn.Module, teacher: nn.Module, alpha: float, temperature: float):
        super().__init__()
        self.base, self.teacher, self.alpha, self.t = base, teacher, alpha, temperature

    def forward(self, logits: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft = (self.teacher(inputs) / self.t).softmax(-1)
        kl = nn.functional.kl_div((logits / self.t).log_softmax(-1), soft, reduction="batchmean") * self.t**2
        return (1 - self.alpha) * self.base(logits, target) + self.alpha * kl


def evaluate(accelerator, model: nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            with accelerator.autocast():
                logits = model(x)
            preds, targets = accelerator.gather_for_metrics((logits.argmax(-1), y))
            correct += (preds == targets).sum().item()
            total += targets.numel()
    return correct / max(1, total)


def train(cfg: PipelineConfig, resume: bool = False, callbacks: Iterable[Callback] = (),
          parent: Path | None = None, built: BuiltModel | None = None, teacher: nn.Module | None = None,
          distill: tuple[float, float] = (0.0, 1.0), preprocessing: Preprocessing | None = None) -> Path:
    """Fine-tune ``cfg.model`` on ``cfg.data`` and write the run directory ``cfg.output_dir``.

    ``resume`` continues from ``output_dir/checkpoints/last`` exactly where it stopped. ``built``
    starts from an already built model (e.g. a pruned one) with the ``preprocessing`` of ``parent``,
    the run it came from. With a ``teacher``, the loss adds knowledge distillation:
    ``(1 - alpha) * CE + alpha * T^2 * KL(student/T || teacher/T)`` for ``distill = (alpha, T)``.
    """
    from accelerate.utils import set_seed
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    out = Path(cfg.output_dir)
    ckpt = out / "checkpoints" / "last"
    if resume and not ckpt.is_dir():
        raise ConfigError(f"--resume: no checkpoint at {ckpt}", "run without --resume to start from scratch")
    accelerator = make_accelerator(cfg, out)
    set_seed(cfg.train.seed)

    if built is None and is_run_dir(cfg.model.weights):  # continue from a run (e.g. a pruned one)
        built, preprocessing = built_from_run(cfg.model.weights)
        parent = parent or Path(cfg.model.weights)
    if built is None:
        built = build_model(cfg.model, num_classes=None)
    spec = preprocessing or resolve_preprocessing(cfg.preprocessing, built.defaults)
    splits = build_datasets(cfg.data, spec)
    built.set_classes(len(splits.classes))
    if splits.skipped:
        accelerator.print(f"skipped {len(splits.skipped)} unreadable image(s), e.g. {splits.skipped[0]}")
    if accelerator.is_main_process:
        architecture = {"name": cfg.model.name, "num_classes": len(splits.classes), "head_name": built.head_name,
                        **built.architecture}
        write_run_files(out, cfg, splits.classes, spec, architecture,
                        manifest("train" if parent is None else "finetune", parent,
                                 data={"name": splits.name, "train": len(splits.train), "val": len(splits.val),
                                       "skipped": len(splits.skipped)}))

    trained, train_set, val_set = prepare_data(cfg, built, splits)
    optimizer = make_optimizer(cfg, built)
    bs, workers = cfg.data.batch_size, cfg.data.num_workers
    train_loader = DataLoader(train_set, batch_size=bs, shuffle=True, num_workers=workers, drop_last=len(train_set) > bs)
    val_loader = DataLoader(val_set, batch_size=max(bs, 64), num_workers=workers)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.grad_accum_steps)
    total = steps_per_epoch * cfg.train.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total, round(cfg.train.warmup_epochs * steps_per_epoch)))
    trained, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        trained, optimizer, train_loader, val_loader, scheduler)
    state = TrainState(model=built.model)
    accelerator.register_for_checkpointing(state)
    if resume:
        accelerator.load_state(str(ckpt))
        accelerator.print(f"resumed after epoch {state.epoch + 1} (best val accuracy {state.best_accuracy:.4f})")
    if cfg.train.log_with:
        accelerator.init_trackers(cfg.name, config={"lr": cfg.train.lr, "epochs": cfg.train.epochs,
                                                    "batch_size": bs, "mode": cfg.train.mode})
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    if teacher is not None:
        teacher = teacher.eval().to(accelerator.device)
        criterion = DistillationLoss(criterion, teacher, *distill)
    show = cfg.train.progress and accelerator.is_local_main_process

    for epoch in range(state.epoch + 1, cfg.train.epochs):
        train_loader.set_epoch(epoch)
        trained.train()
        if cfg.train.mode == "head" and trained is not built.model:
            built.model.eval()
        seen, loss_sum, t0 = 0, 0.0, time.perf_counter()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   disable=None if show else True, leave=False, mininterval=1)  # None: off when not a terminal
        for x, y in bar:
            with accelerator.accumulate(trained):
                with accelerator.autocast():
                    loss = criterion(trained(x), y, x) if teacher is not None else criterion(trained(x), y)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            seen += y.shape[0]
            loss_sum += loss.item() * y.shape[0]
            bar.set_postfix(loss=f"{loss.item():.3f}")
            for cb in callbacks:
                getattr(cb, "on_train_batch", lambda *a: None)(state, (x, y))
        train_seconds = time.perf_counter() - t0
        val_accuracy = evaluate(accelerator, trained, val_loader)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen), "val_accuracy": val_accuracy,
                  "lr": scheduler.get_last_lr()[0], "train_seconds": train_seconds,
                  "train_images_per_second": seen * accelerator.num_processes / train_seconds}
        state.history.append(record)
        state.epoch = epoch
        accelerator.log({k: v for k, v in record.items() if k != "epoch"}, step=epoch + 1)
        accelerator.print(f"epoch {epoch + 1}/{cfg.train.epochs}: loss {record['train_loss']:.4f} "
                          f"val_accuracy {val_accuracy:.4f} ({record['train_images_per_second']:.0f} img/s)")
        if val_accuracy > state.best_accuracy:
            state.best_accuracy, state.best_epoch = val_accuracy, epoch + 1
            if accelerator.is_main_process:
                weights = accelerator.unwrap_model(trained) if trained is built.model else built.model
                save_file({k: v.contiguous() for k, v in weights.state_dict().items()}, str(out / WEIGHTS))
        accelerator.wait_for_everyone()
        accelerator.save_state(str(ckpt))
        if accelerator.is_main_process:
            write_history(out, state.history)
        for cb in callbacks:
            getattr(cb, "on_epoch_end", lambda *a: None)(state)

    if accelerator.is_main_process:
        throughput = [h["train_images_per_second"] for h in state.history]
        write_json(out / "metrics.json", {
            "val_accuracy": state.best_accuracy, "best_epoch": state.best_epoch, "epochs": len(state.history),
            "final_val_accuracy": state.history[-1]["val_accuracy"] if state.history else None,
            "train_images_per_second": sorted(throughput)[len(throughput) // 2] if throughput else None,
            "num_processes": accelerator.num_processes, "mixed_precision": cfg.train.mixed_precision,
            "mode": cfg.train.mode})
        plot_history(out, state.history)
    accelerator.end_training()
    return out


def write_history(out: Path, history: list[dict[str, Any]]) -> None:
    (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def plot_history(out: Path, history: list[dict[str, Any]]) -> None:
    """training_curves.png: loss and validation accuracy per epoch (skipped without matplotlib)."""
    from .report import pyplot

    plt = pyplot()
    if plt is None:
        return
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax1.set(title="training loss", xlabel="epoch")
    ax2.plot(epochs, [100 * h["val_accuracy"] for h in history], marker="o", color="tab:green")
    ax2.set(title="validation accuracy (%)", xlabel="epoch")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=100)
    plt.close(fig)


def main() -> None:
    """``python -m ftdeploy.train ARGS`` == ``ftdeploy train ARGS``."""
    import sys

    from .cli import main as cli_main

    cli_main(["train", *sys.argv[1:]])


if __name__ == "__main__":
    main()
