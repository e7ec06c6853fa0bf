"""Training throughput of ftdeploy's Accelerate loop against a plain hand-written PyTorch loop.

Same model, data, batch size, optimizer and schedule; each loop trains one epoch at a time, the two
alternating so that machine noise hits both alike, and the median epoch counts. A second part
compares head-only training on cached backbone features with recomputing them every epoch.

    python benchmarks/train_throughput.py --config configs/digits.yaml --rounds 3 --json bench_train.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ftdeploy.config import load_config
from ftdeploy.data import build_datasets
from ftdeploy.machine import machine_info
from ftdeploy.models import build_model
from ftdeploy.train import train
from ftdeploy.preprocessing import resolve_preprocessing
from ftdeploy.training import lr_lambda, make_optimizer


def plain_epoch(cfg, built, dataset) -> float:
    """One epoch of the loop everybody writes by hand; returns images/s."""
    loader = DataLoader(dataset, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True)
    optimizer = make_optimizer(cfg, built)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(len(loader), 0))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    model = built.model.train()
    seen, t0 = 0, time.perf_counter()
    for x, y in loader:
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        loss.item()
        seen += len(y)
    return seen / (time.perf_counter() - t0)


def ftdeploy_run(cfg, out: Path, epochs: int) -> tuple[list[dict], float]:
    """Train through ftdeploy.train.train; returns (per-epoch records, wall seconds of the whole call)."""
    run = cfg.model_copy(deep=True, update={"output_dir": out})
    run.train.epochs, run.train.progress = epochs, False
    start = time.perf_counter()
    train(run)
    total = time.perf_counter() - start
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--rounds", type=int, default=3, help="epochs per loop, alternating")
    parser.add_argument("--head-epochs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()

    cfg = load_config(args.config)
    torch.manual_seed(cfg.train.seed)
    built = build_model(cfg.model, None)
    spec = resolve_preprocessing(cfg.preprocessing, built.defaults)
    splits = build_datasets(cfg.data, spec)
    built.set_classes(len(splits.classes))

    plain, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for r in range(args.rounds):
            plain.append(plain_epoch(cfg, built, splits.train))
            ours.append(ftdeploy_run(cfg, workdir / f"loop{r}", 1)[0][0]["train_items_per_second"])
            print(f"round {r + 1}: plain {plain[-1]:.1f} img/s, ftdeploy {ours[-1]:.1f} img/s", flush=True)
        head = cfg.model_copy(deep=True)
        head.train.mode = "head"
        head.train.cache_features = False
        history, recompute_total = ftdeploy_run(head, workdir / "head_recompute", args.head_epochs)
        recompute = [h["train_seconds"] for h in history]
        head.train.cache_features = True
        history, cached_total = ftdeploy_run(head, workdir / "head_cached", args.head_epochs)
        cached = [h["train_seconds"] for h in history]

    p, o = statistics.median(plain), statistics.median(ours)
    r, c = statistics.median(recompute), statistics.median(cached)
    result = {
        "machine": machine_info(torch.get_num_threads()),
        "model": cfg.model.name, "input_size": spec.input_size, "batch_size": cfg.data.batch_size,
        "train_images": len(splits.train),
        "full_finetune": {"plain_images_per_second": plain, "ftdeploy_images_per_second": ours,
                          "ratio_ftdeploy_to_plain": o / p},
        "head_only": {"recompute_epoch_seconds": recompute, "cached_epoch_seconds": cached,
                      "recompute_total_seconds": recompute_total, "cached_total_seconds_incl_feature_pass": cached_total,
                      "speedup_per_epoch": r / c},
    }
    print(f"\n{'':32}{'median':>12}")
    print(f"{'plain PyTorch loop (img/s)':32}{p:12.1f}")
    print(f"{'ftdeploy loop (img/s)':32}{o:12.1f}")
    print(f"{'ftdeploy / plain':32}{o / p:12.3f}")
    print(f"{'head-only epoch, recompute (s)':32}{r:12.3f}")
    print(f"{'head-only epoch, cached (s)':32}{c:12.4f}")
    print(f"{'cached speedup per epoch':32}{r / c:12.1f}x")
    print(f"machine: {result['machine']['cpu']}, {result['machine']['threads']} threads, isa {result['machine']['isa']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
