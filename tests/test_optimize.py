"""ftdeploy optimize: a loop over the stages that resumes where it was killed, chooses by the
budget, and judges its choice on a test split no stage saw."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, tiny_config

DRIVER = REPO / "tests" / "optimize_driver.py"


def driver(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(DRIVER), *map(str, args)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, **kwargs)


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    """The tiny run with a test split held out of validation."""
    from ftdeploy.train import train

    return train(tiny_config(tmp_path_factory.mktemp("opt") / "run", "data.test_fraction=0.25", "data.num_samples=128"))


@pytest.mark.slow
def test_a_killed_search_resumes_to_the_same_front_and_choice(split_run, tmp_path, monkeypatch):
    import ftdeploy.optimize as stage
    from optimize_driver import search, set_figures

    monkeypatch.setattr(stage, "measure_point", set_figures)
    killed = driver(split_run, tmp_path / "resumed", "0.50")  # only the killed search needs a process of its own
    search(split_run, tmp_path / "whole")
    reference = json.loads((tmp_path / "whole" / "pareto.json").read_text())
    deadline = time.time() + 300
    while "BUILDING" not in (killed.stdout.readline() or "") and time.time() < deadline:
        pass
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(30)
    finished = json.loads((tmp_path / "resumed" / "points.json").read_text())["points"]
    assert {(p["level"], p["variant"]) for p in finished} == {(1.0, "fp32")}
    level1 = tmp_path / "resumed" / "levels" / "1.00" / "export" / "model.onnx"
    made = level1.stat().st_mtime_ns

    search(split_run, tmp_path / "resumed")
    result = json.loads((tmp_path / "resumed" / "pareto.json").read_text())
    assert level1.stat().st_mtime_ns == made  # the finished level was not made again
    assert result["seconds"] > result["seconds_this_run"]  # the killed run's time counts in the search's
    assert not (tmp_path / "resumed" / "levels" / "0.50" / "half-made").exists()  # the killed one was, whole
    assert [p for p in result["points"] if p["level"] == 1.0] == [p for p in reference["points"] if p["level"] == 1.0]

    def key(points):
        return sorted((p["level"], p["variant"], p["metric_value"], p["p50_ms"]) for p in points)

    assert key(result["front"]) == key(reference["front"]) and key(result["points"]) == key(reference["points"])
    chosen = result["chosen"]
    assert (chosen["level"], chosen["variant"]) == (reference["chosen"]["level"], reference["chosen"]["variant"])
    assert (chosen["level"], chosen["variant"]) == (0.5, "fp32")  # the fastest (set figures) within the budget
    assert result["test"]["samples"] == 6 and 0 <= result["test"]["metric_value"] <= 1  # a quarter of 26 validation images
    assert result["schema_version"] == 1 and result["metric"] == "accuracy"
    best = json.loads((tmp_path / "resumed" / "best" / "manifest.json").read_text())
    assert best["stage"] == "optimize" and [e["stage"] for e in best["lineage"]][:3] == ["data", "train", "prune"]
    assert (tmp_path / "resumed" / "pareto.png").stat().st_size > 10_000
    assert "Chosen**: level 0.50 (MACs fraction), fp32" in (tmp_path / "resumed" / "summary.md").read_text()


def test_a_run_without_a_test_split_is_refused_with_the_fix(tiny_run, tmp_path):
    from ftdeploy.errors import ConfigError
    from ftdeploy.optimize import optimize

    with pytest.raises(ConfigError, match="no test split.*data.test_fraction=0.2"):
        optimize(tiny_run, tmp_path / "out")


def test_the_choice_rule_on_set_figures():
    from ftdeploy.config import OptimizeConfig
    from ftdeploy.optimize import choose, pareto_front
    from ftdeploy.records import Point

    def point(level, variant, drop, speedup):
        return Point(level=level, variant=variant, provider="cpu", path="x", metric_drop_points=drop,
                     metric_value=0.9 - drop / 100, speedup={"median": speedup}, p50_ms=10 / speedup, noise_floor=0.05)

    points = [point(1.0, "fp32", 0.0, 1.0), point(1.0, "int8", 0.3, 2.0), point(0.5, "fp32", 0.5, 1.8),
              point(0.5, "int8", 0.9, 3.5), point(0.35, "int8", 2.5, 5.0)]
    pick = lambda **kw: (lambda c: c and (c.level, c.variant))(choose(points, OptimizeConfig(**kw)))  # noqa: E731
    assert pick() == (0.5, "int8")  # the fastest within 1 point; 0.35 loses 2.5
    assert pick(max_metric_drop=3.0) == (0.35, "int8") and pick(max_accuracy_drop=3.0) == (0.35, "int8")  # old name
    assert pick(target_speedup=1.9) == (1.0, "int8")  # the least compressed reaching the target
    assert pick(target_latency_ms=5.2) == (1.0, "int8") and pick(target_latency_ms=3.0) == (0.5, "int8")
    assert pick(target_speedup=10.0) is None
    assert {(p.level, p.variant) for p in pareto_front(points)} == {
        (1.0, "fp32"), (1.0, "int8"), (0.5, "int8"), (0.35, "int8")}  # 0.5 fp32: slower and less accurate than 1.0 int8


def test_points_that_tie_on_measurements_taken_apart_are_timed_again_together(monkeypatch, tmp_path):
    """MiniLM: 0.50 INT8 measured 3.28x while the machine was busy (A/A ±0.29) and tied with 0.40
    INT8's 3.96x (±0.03), so the least compressed won. Timed again together, the faster one wins."""
    import ftdeploy.optimize as stage
    from ftdeploy.config import OptimizeConfig
    from ftdeploy.records import Point

    def point(level, variant, speedup, noise, drop=0.0):
        return Point(level=level, variant=variant, provider="cpu", path=f"levels/{level}/{variant}.onnx",
                     metric_drop_points=drop, metric_value=0.8, p50_ms=18 / speedup, p90_ms=20 / speedup,
                     reference_p50_ms=18.0, speedup={"median": speedup}, noise_floor=noise)

    points = [point(1.0, "fp32", 1.0, 0.06), point(0.5, "int8", 3.28, 0.29), point(0.4, "int8", 3.96, 0.03),
              point(0.35, "int8", 5.0, 0.03, drop=2.0)]  # outside the budget: never timed again
    cfg = OptimizeConfig(max_metric_drop=1.0)
    assert (stage.choose(points, cfg).level, stage.choose(points, cfg).variant) == (0.5, "int8")
    timed, rounds = [], iter([(0.3, (3.3, 3.5)), (0.02, (3.9, 3.3))])  # a busy round first: taken again

    def together(files, reference, bench, threads, seconds):
        timed.append((sorted(files), seconds))
        noise, speedups = next(rounds)
        return {name: {"p50_ms": 18 / s, "p90_ms": 20 / s, "reference_p50_ms": 18.0, "speedup": {"median": s},
                       "noise_floor": noise} for name, s in zip(sorted(files), speedups)}

    monkeypatch.setattr(stage, "measure_together", together)
    assert stage.final_round(points, cfg, tmp_path, tmp_path / "ref.onnx", None, 2) == ["0.50 int8 cpu", "0.40 int8 cpu"]
    assert timed == [(["0.40 int8 cpu", "0.50 int8 cpu"], 2 * cfg.latency_seconds)] * 2
    chosen = stage.choose(points, cfg)
    assert (chosen.level, chosen.speedup["median"], chosen.first["speedup"]["median"]) == (0.4, 3.9, 3.96)
    assert stage.final_round([p for p in points if p.level != 0.5], cfg, tmp_path, tmp_path, None, 2) == []
