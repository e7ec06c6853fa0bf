"""``ftdeploy optimize``: from a metric budget to the fastest file this machine runs.

A loop over the stages, not a copy of them: for each pruning level (a fraction of the MACs; 1.0 is
the run itself) ``prune`` (recovery fine-tuning with distillation) writes a run directory, ``export``
an export directory and ``quantize`` (its own measured search) the INT8 file, all under
``OUT/levels/<level>/`` with their manifests and lineage. Every file shipped there, on every
requested execution provider that is installed, is a *point*: timed at batch 1 beside the unpruned
FP32 file under the latency protocol (the same rounds, with an A/A session for the noise), and
judged by the task's metric on the validation split (up to 2,000 examples, on the point's own provider). The choice is the fastest point within the budget (ties inside
the noise of the two measurements go to the least compressed), or, with a target, the least
compressed point that meets it;
it is then evaluated on the test split (``data.test_fraction``) that no stage saw, so that choosing
among many points does not flatter it.

Writes ``points.json`` after every point (a killed search resumes and skips finished levels and
points), then ``pareto.json``, ``pareto.png``, ``summary.md`` and ``best/`` (the chosen level's export
directory). ``time_budget_s`` stops starting new levels; the front found so far is still written.

Example::

    optimize("runs/digits", "runs/digits-opt", OptimizeConfig(max_metric_drop=1.0))
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from .config import ExportConfig, OptimizeConfig, PruneConfig, QuantizeConfig
from .errors import ConfigError
from .evaluation import EvalData, held_out_test, onnx_predictor
from .export import export
from .figures import pyplot
from .files import relative, write_text
from .latency import (PROVIDERS, REFERENCE_DRIFT, RETAKES, beside_reference, drifted, installed_providers, ort_runner,
                      ort_session, tile_batch)
from .machine import machine_info, physical_cores
from .prune import prune
from .quantize import quantize
from .records import ExportReport, HeldOutRecord, ParetoRecord, Point, PointsRecord, load_record, write_record
from .rundir import load_export, load_run, manifest, write_manifest
from .tasks import Task

log = logging.getLogger(__name__)

POINTS = "points.json"
VAL_SAMPLES = 2000  # validation examples every point is evaluated on (at most)


def level_name(level: float) -> str:
    return f"{level:.2f}"


def build_level(run_dir: Path, out: Path, level: float, cfg: OptimizeConfig) -> Path:
    """The export directory of one pruning level, made by the stages (or found finished from an
    earlier, interrupted search: a level counts once its quantize stage wrote its record)."""
    base = out / "levels" / level_name(level)
    export_dir = base / "export"
    if (export_dir / "report.json").is_file() and load_record(ExportReport, export_dir / "report.json").quantization:
        return export_dir
    shutil.rmtree(base, ignore_errors=True)  # half-made by a killed search: made again, whole
    source = run_dir
    if level < 1.0:
        source = prune(run_dir, base / "run", PruneConfig(target_macs=level, finetune_epochs=cfg.finetune_epochs,
                                                           distill_alpha=cfg.distill_alpha, round_to=cfg.round_to,
                                                           latency_seconds=cfg.latency_seconds))
    export(source, export_dir, cfg.export or ExportConfig())
    quantize(export_dir, None, (cfg.quantize or QuantizeConfig()).model_copy(
        update={"max_metric_drop": cfg.max_metric_drop, "metric": cfg.metric}))
    return export_dir


def file_metric(path: Path, provider: str, task: Task, inputs, targets, info: dict[str, Any], threads: int,
                metric: str | None) -> float:
    """The metric of a file run on ``provider``: every point on the validation split (up to
    VAL_SAMPLES), the choice on the test split."""
    outputs = task.outputs(onnx_predictor(ort_session(path, threads, [PROVIDERS[provider]])), inputs, 32)
    return task.evaluate(outputs, inputs, targets, info).get(metric)


def measure_together(files: dict[str, tuple[Path, str]], reference: Path, bench, threads: int, seconds: float
                     ) -> dict[str, dict[str, Any]]:
    """Batch-1 latency of every file (name -> (path, provider)) beside the unpruned FP32 file (CPU
    provider) and an A/A session of it, all in the same alternating rounds."""
    batch = tile_batch(bench, 1)
    result, noise = beside_reference(ort_runner(ort_session(reference, threads), batch),
                                     ort_runner(ort_session(reference, threads), batch),
                                     {name: ort_runner(ort_session(path, threads, [PROVIDERS[provider]]), batch)
                                      for name, (path, provider) in files.items()}, 1, seconds)
    return {name: {"p50_ms": result.stats[name].p50, "p90_ms": result.stats[name].p90,
                   "reference_p50_ms": result.stats["reference"].p50,
                   "speedup": result.speedup("reference", name).as_dict(), "noise_floor": noise} for name in files}


def measure_point(path: Path, reference: Path, provider: str, bench, threads: int, seconds: float) -> dict[str, Any]:
    return measure_together({"point": (path, provider)}, reference, bench, threads, seconds)["point"]


def point_name(point: Point) -> str:
    return f"{level_name(point.level)} {point.variant} {point.provider}"


NOISY = 0.10  # an A/A spread above this: the machine was busy during the measurement
FINAL_TRIES = 3
FINAL_BAND = 0.15  # points within the budget whose p50 lies within this of the fastest's meet in the final round
MEASURED = ("p50_ms", "p90_ms", "reference_p50_ms", "speedup", "noise_floor")


def _remeasured(point: Point, figures: dict[str, Any]) -> None:
    """Replace a point's figures by a new measurement, keeping its first one (``first``)."""
    if point.first is None:
        point.first = {k: getattr(point, k) for k in MEASURED}
    for k, v in figures.items():
        setattr(point, k, v)


def retake_drifting(points: list[Point], out: Path, reference: Path, bench, threads: int, seconds: float) -> float | None:
    """Every point was timed beside its own measurement of the FP32 reference. A point whose reference
    ran more than REFERENCE_DRIFT from the median reference of the search (a neighbour's memory traffic slows
    a 45 MB FP32 file more than a 10 MB INT8 one, and the ratio flatters the point: ResNet-18 once
    read 10.55x against a 6.60 ms reference that ran at 4.02-4.61 ms beside every other point) is
    measured again, up to RETAKES times; one still off is flagged (``reference_drift``). Returns
    the median reference p50."""
    refs = [p.reference_p50_ms for p in points if p.reference_p50_ms]
    if not refs:
        return None
    median = float(np.median(refs))
    for p in points:
        while (off := drifted(p.reference_p50_ms, median)) is not None and p.retakes < RETAKES:
            log.info("  %s: its reference ran at %.3f ms, %+.0f%% from the median %.3f ms: measured again",
                     point_name(p), p.reference_p50_ms, 100 * off, median)
            _remeasured(p, measure_point(out / p.path, reference, p.provider, bench, threads, seconds))
            p.retakes += 1
        p.reference_drift = drifted(p.reference_p50_ms, median)
    return median


def final_round(points: list[Point], cfg: OptimizeConfig, out: Path, reference: Path, bench, threads: int
                ) -> list[str]:
    """Always: the fastest point within the budget on the first measurements, and every point within
    the budget whose p50 lies within FINAL_BAND of its, timed again together beside the reference, in
    the same rounds and twice as long; the choice is made on that round (each point's first
    measurement kept as ``first``). Each point was timed apart, beside its own reference
    measurement: a tie check on those ratios compares the distorted part (one point once read
    3.28x, timed while the machine was busy, and tied with 3.96x). A round whose own A/A spread
    says the machine was busy (above NOISY) is taken again, up to FINAL_TRIES times, and the
    quietest kept. Returns the names timed again."""
    within = [p for p in points if p.metric_drop_points <= cfg.max_metric_drop]
    if not within:
        return []
    fastest = min(within, key=lambda p: p.p50_ms)
    finalists = sorted((p for p in within if p.p50_ms <= fastest.p50_ms * (1 + FINAL_BAND)), key=compression_order)
    files = {point_name(p): (out / p.path, p.provider) for p in finalists}
    again: dict[str, dict[str, Any]] = {}
    for _ in range(FINAL_TRIES):
        figures = measure_together(files, reference, bench, threads, 2 * cfg.latency_seconds)
        noise = figures[point_name(finalists[0])]["noise_floor"]
        if not again or noise < again[point_name(finalists[0])]["noise_floor"]:
            again = figures
        if noise <= NOISY:
            break
    for p in finalists:
        _remeasured(p, again[point_name(p)])
    return [point_name(p) for p in finalists]


def choose(points: list[Point], cfg: OptimizeConfig) -> Point | None:
    """The point to ship: within the metric budget, the least compressed one meeting the target
    when there is a target, else the fastest (a speedup within the noise floor of its own or the
    fastest point's measurement is a tie, won by the least compressed).

    >>> def pt(level, variant, drop, speedup, noise):
    ...     return Point(level=level, variant=variant, provider="cpu", path="x", metric_value=0.9 - drop / 100,
    ...                  metric_drop_points=drop, p50_ms=10 / speedup, speedup={"median": speedup}, noise_floor=noise)
    >>> pts = [pt(1.0, "fp32", 0.0, 1.0, 0.05), pt(1.0, "int8", 0.4, 2.0, 0.05), pt(0.5, "int8", 0.8, 2.05, 0.05),
    ...        pt(0.35, "int8", 0.9, 2.6, 0.01)]
    >>> c = choose(pts[:3], OptimizeConfig(max_metric_drop=1.0)); (c.level, c.variant)
    (1.0, 'int8')
    >>> pts[0].noise_floor = 0.4  # a noisy measurement of another point ties nothing else
    >>> c = choose(pts, OptimizeConfig(max_metric_drop=1.0)); (c.level, c.variant)
    (0.35, 'int8')
    >>> c = choose(pts, OptimizeConfig(max_metric_drop=1.0, target_latency_ms=4.95)); (c.level, c.variant)
    (0.5, 'int8')
    """
    within = [p for p in points if p.metric_drop_points <= cfg.max_metric_drop]
    order = sorted(within, key=compression_order)  # least compressed first
    if cfg.target_speedup is not None or cfg.target_latency_ms is not None:
        return next((p for p in order if (cfg.target_speedup is None or p.speedup["median"] >= cfg.target_speedup)
                     and (cfg.target_latency_ms is None or p.p50_ms <= cfg.target_latency_ms)), None)
    if not order:
        return None
    best = max(order, key=lambda p: p.speedup["median"])
    # A tie is judged on the noise of the two measurements compared, not the largest A/A spread of
    # any point: one noisy point (35 %, timed while the machine was busy) once made 8.1x tie with 10.8x.
    return next(p for p in order if p.speedup["median"] >= best.speedup["median"] * (1 - max(p.noise_floor, best.noise_floor)))


def compression_order(point: Point) -> tuple:
    return (-point.level, point.variant != "fp32", point.provider != "cpu")


def pareto_front(points: list[Point]) -> list[Point]:
    """Points no other point beats on both latency and the metric."""
    return [p for p in points if not any(q.p50_ms <= p.p50_ms and q.metric_value >= p.metric_value
                                         and (q.p50_ms, q.metric_value) != (p.p50_ms, p.metric_value) for q in points)]


def optimize(run_dir: str | Path, output_dir: str | Path, cfg: OptimizeConfig | None = None) -> Path:
    """Search pruning level x INT8 configuration x execution provider for ``run_dir``'s model; see
    the module docstring. Returns ``output_dir``."""
    cfg = cfg or OptimizeConfig()
    started = time.monotonic()
    run = load_run(run_dir)
    if held_out_test(run.config.data, run.preprocessing, run.task) is None:
        raise ConfigError(f"{run.path} has no test split: optimize judges its choice on data the search never saw",
                          "train the run with --set data.test_fraction=0.2 (held out of the validation split)")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    wanted = list(cfg.providers)
    providers = [p for p in wanted if p in installed_providers()]
    skipped_providers = sorted(set(wanted) - set(providers))
    earlier = load_record(PointsRecord, out / POINTS) if (out / POINTS).is_file() else PointsRecord()
    done = {(p.level, p.variant, p.provider): p for p in earlier.points}
    threads = cfg.threads or physical_cores()
    reference = bench = None
    stopped = None
    metric = cfg.metric or run.task.metric
    for level in [1.0, *sorted(cfg.levels, reverse=True)]:
        if cfg.time_budget_s is not None and time.monotonic() - started > cfg.time_budget_s:
            stopped = f"time budget of {cfg.time_budget_s:.0f} s spent before level {level_name(level)}"
            break
        export_dir = build_level(run.path, out, level, cfg)
        src = load_export(export_dir)
        if reference is None:  # level 1.0: the unpruned FP32 file, the yardstick of every point
            reference = src.variant_path("fp32")
            val = EvalData.from_export(src, VAL_SAMPLES, calibration_samples=1)
            bench = val.bench
            unpruned = done.get((1.0, "fp32", "cpu"))
            fp32_figure = unpruned.metric_value if unpruned else file_metric(
                reference, "cpu", val.task, val.inputs, val.targets, val.info, threads, metric)
        for variant in ("fp32", "int8"):
            path = src.variant_path(variant)
            for provider in providers if path is not None else []:
                key = (level, variant, provider)
                if key not in done:
                    value = file_metric(path, provider, val.task, val.inputs, val.targets, val.info, threads, metric)
                    done[key] = Point(level=level, variant=variant, provider=provider, path=relative(path, out),
                                      metric_value=value, metric_drop_points=100 * (fp32_figure - value),
                                      **measure_point(path, reference, provider, bench, threads, cfg.latency_seconds))
                    write_record(out / POINTS, PointsRecord(points=list(done.values()),
                                                            seconds=earlier.seconds + time.monotonic() - started))
                    log.info("  level %s %s on %s: %.2f ms = %.2fx unpruned fp32, %s %.2f%% (%+.2f pts)",
                             level_name(level), variant, provider, done[key].p50_ms, done[key].speedup["median"],
                             metric, 100 * value, done[key].metric_drop_points)
        if level < 1.0 and all(p.metric_drop_points > cfg.max_metric_drop + cfg.give_up_drop
                               for p in done.values() if p.level == level):
            stopped = f"level {level_name(level)} lost more than {cfg.give_up_drop} points beyond the budget: deeper levels skipped"
            break
    points = [p.model_copy(deep=True) for p in done.values()]  # points.json keeps each point's first measurement
    median_reference = (retake_drifting(points, out, reference, bench, threads, cfg.latency_seconds)
                        if reference is not None else None)
    timed_again = final_round(points, cfg, out, reference, bench, threads) if reference is not None else []
    points.sort(key=lambda p: p.p50_ms)
    chosen = choose(points, cfg)
    test = chosen_on_test(run, out, chosen, reference, metric) if chosen else None
    record = ParetoRecord(run=relative(run.path, out), machine=machine_info(threads), settings=cfg.model_dump(mode="json"),
                          metric=metric, points=points, front=pareto_front(points), final_round=timed_again,
                          median_reference_p50_ms=median_reference,
                          chosen=chosen, test=test, stopped=stopped, providers_not_installed=skipped_providers,
                          # the whole search, interrupted runs included: what a user waited for in all
                          seconds=earlier.seconds + time.monotonic() - started,
                          seconds_this_run=time.monotonic() - started)
    write_record(out / "pareto.json", record)
    plot_pareto(record, cfg, out / "pareto.png")
    write_text(out / "summary.md", summary(record, cfg))
    if chosen is not None:
        best = out / "best"
        shutil.rmtree(best, ignore_errors=True)
        shutil.copytree(out / "levels" / level_name(chosen.level) / "export", best)
        write_manifest(best, manifest("optimize", out / "levels" / level_name(chosen.level) / "export",
                                      config=cfg, chosen=chosen.model_dump(mode="json"),
                                      test=test.model_dump(mode="json") if test else None))
    log.info("%s", summary(record, cfg))
    return out


def chosen_on_test(run, out: Path, chosen: Point, reference: Path, metric: str) -> HeldOutRecord:
    """The chosen file and the unpruned FP32 file on the test split no stage saw."""
    src = load_export(out / "levels" / level_name(chosen.level) / "export")
    inputs, targets = held_out_test(src.data, src.preprocessing, src.task)
    figures = {name: file_metric(path, provider, src.task, inputs, targets, src.info, physical_cores(), metric)
               for name, path, provider in (("chosen", out / chosen.path, chosen.provider),
                                            ("unpruned_fp32", reference, "cpu"))}
    return HeldOutRecord(samples=len(inputs), metric_value=figures["chosen"], unpruned_fp32_metric=figures["unpruned_fp32"],
                      metric_drop_points=100 * (figures["unpruned_fp32"] - figures["chosen"]))


def summary(record: ParetoRecord, cfg: OptimizeConfig) -> str:
    c, t, metric = record.chosen, record.test, record.metric
    lines = [f"# ftdeploy optimize ({record.machine['cpu']}, {record.machine['threads']} threads)", "",
             f"{len(record.points)} points, {len(record.front)} on the front; budget {cfg.max_metric_drop} "
             f"points of {metric}" + (f"; target {cfg.target_speedup}x" if cfg.target_speedup else "")
             + (f"; target {cfg.target_latency_ms} ms" if cfg.target_latency_ms else "") + ".", ""]
    if c is None:
        lines.append("**No point meets the budget and target.**")
    else:
        lines += [f"**Chosen**: level {level_name(c.level)} (MACs fraction), {c.variant}, {c.provider}: "
                  f"{c.p50_ms:.2f} ms at batch 1 = {c.speedup['median']:.2f}x "
                  f"[{c.speedup['low']:.2f}-{c.speedup['high']:.2f}] the unpruned FP32 file; validation {metric} "
                  f"{100 * c.metric_value:.2f}% ({c.metric_drop_points:+.2f} pts); test split {100 * t.metric_value:.2f}% "
                  f"against the unpruned FP32's {100 * t.unpruned_fp32_metric:.2f}% ({t.samples} examples "
                  f"no stage saw). Files: best/."]
    if record.final_round:
        lines += ["", f"Final round: {', '.join(record.final_round)} (within the budget, and within "
                      f"{100 * FINAL_BAND:.0f} % of the fastest's first p50) timed again together beside the reference, "
                      "twice as long; the choice is made on it. First speedups in brackets."]
    drifted = [p for p in record.points if p.reference_drift is not None]
    if drifted:
        lines += ["", f"**Reference drift**: beside {', '.join(point_name(p) for p in drifted)}, the FP32 reference ran "
                      f"more than {100 * REFERENCE_DRIFT:.0f} % from the median reference ({record.median_reference_p50_ms:.3f} ms) "
                      f"even after {RETAKES} retakes: their ratios are less sure than the others' (flagged ⚠)."]
    if record.stopped:
        lines += ["", f"Stopped: {record.stopped}."]
    if record.providers_not_installed:
        lines += ["", f"Providers requested but not installed: {', '.join(record.providers_not_installed)}."]
    lines += ["", f"| level | variant | provider | p50 ms | x unpruned fp32 (first) | reference p50 ms | val {metric} % "
                  "| drop pts | front |", "|---:|---|---|---:|---:|---:|---:|---:|---|"]
    front = {(p.level, p.variant, p.provider) for p in record.front}
    for p in record.points:
        first = f" ({p.first['speedup']['median']:.2f})" if p.first else ""
        flag = " ⚠" if p.reference_drift is not None else ""
        retakes = f", {p.retakes} retake{'s' * (p.retakes > 1)}" if p.retakes else ""
        lines.append(f"| {level_name(p.level)} | {p.variant} | {p.provider} | {p.p50_ms:.2f} | "
                     f"{p.speedup['median']:.2f}{first} | {p.reference_p50_ms or 0:.3f}{flag}{retakes} | "
                     f"{100 * p.metric_value:.2f} | {p.metric_drop_points:+.2f} | "
                     f"{'yes' if (p.level, p.variant, p.provider) in front else ''} |")
    return "\n".join(lines) + "\n"


def plot_pareto(record: ParetoRecord, cfg: OptimizeConfig, path: Path) -> None:
    """Latency (log, ms) against the validation metric: every point, the front joined, the budget
    line, the unpruned FP32 file and the chosen point labelled."""
    plt = pyplot()
    points, metric = record.points, record.metric
    if plt is None or not points:
        return
    fig, ax = plt.subplots(figsize=(9, 4.8))
    markers, colors = {"fp32": "o", "int8": "s"}, {"cpu": "tab:blue", "openvino": "tab:purple"}
    for variant, provider in sorted({(p.variant, p.provider) for p in points}):
        mine = [p for p in points if (p.variant, p.provider) == (variant, provider)]
        ax.scatter([p.p50_ms for p in mine], [100 * p.metric_value for p in mine], marker=markers[variant],
                   s=36, label=f"{variant}, {provider} provider", alpha=0.8, edgecolors=colors[provider],
                   facecolors="none" if variant == "fp32" else colors[provider])
        for p in mine:
            ax.annotate(f"{level_name(p.level)}", (p.p50_ms, 100 * p.metric_value), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    again = [p for p in points if p.first]
    for p in again:  # the first measurement, beside the one the choice was made on
        ax.plot([p.first["p50_ms"], p.p50_ms], [100 * p.metric_value] * 2, color="tab:gray", lw=0.8, ls=":")
    if again:
        ax.scatter([p.first["p50_ms"] for p in again], [100 * p.metric_value for p in again], marker="x", s=20,
                   color="tab:gray", label="first measurement (measured again)")
    drifted = [p for p in points if p.reference_drift is not None]
    if drifted:
        ax.scatter([p.p50_ms for p in drifted], [100 * p.metric_value for p in drifted], marker="^", s=60,
                   facecolors="none", edgecolors="tab:red", label="reference drifted (flagged)")
    front = sorted(record.front, key=lambda p: p.p50_ms)
    ax.plot([p.p50_ms for p in front], [100 * p.metric_value for p in front], color="tab:gray", lw=1, label="front")
    unpruned = next((p for p in points if p.level == 1.0 and p.variant == "fp32" and p.provider == "cpu"), None)
    if unpruned:
        budget = 100 * unpruned.metric_value - cfg.max_metric_drop
        ax.axhline(budget, color="tab:red", ls="--", lw=1, label=f"budget: -{cfg.max_metric_drop} pts")
        ax.scatter([unpruned.p50_ms], [100 * unpruned.metric_value], s=120, facecolors="none", edgecolors="black",
                   label="unpruned FP32")
    c = record.chosen
    if c:
        ax.scatter([c.p50_ms], [100 * c.metric_value], s=200, marker="*", color="gold", edgecolors="black",
                   zorder=5, label="chosen")
        ax.annotate(f"chosen: {level_name(c.level)} {c.variant} on {c.provider}, {c.speedup['median']:.2f}x",
                    (c.p50_ms, 100 * c.metric_value), xytext=(8, -14), textcoords="offset points", fontsize=8)
    ax.set(xscale="log", xlabel="latency at batch 1, p50 (ms, log scale)", ylabel=f"validation {metric} (%)",
           title="ftdeploy optimize: pruning level (MACs fraction) x INT8 x provider")
    from matplotlib.ticker import FuncFormatter

    for axis_format in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):  # 3, not 3x10^0
        axis_format(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: no point hidden
    fig.tight_layout()
    from .files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
