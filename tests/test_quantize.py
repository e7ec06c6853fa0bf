import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import cli

from ftdeploy.config import QuantizeConfig
from ftdeploy.latency import Comparison, LatencyStats, Speedup
from ftdeploy.onnx_model import model_metadata
from ftdeploy.quantize import Evaluator, preflight, search, ship


def test_preflight_follows_the_cpu():
    vnni = preflight({"avx2", "avx512f", "avx512bw", "avx512_vnni"})
    assert (vnni.activation_type, vnni.weight_type, vnni.reduce_range, vnni.expect_speedup) == ("uint8", "int8", False, True)
    assert preflight({"avx2", "avx_vnni"}).isa == "avx_vnni"
    no_vnni = preflight({"avx2", "fma"})  # e.g. an AVX2-only AMD EPYC: vpmaddubsw can saturate
    assert no_vnni.isa == "avx2" and no_vnni.reduce_range is True and no_vnni.expect_speedup
    assert preflight({"avx512f", "avx512bw"}).reduce_range is True
    arm = preflight({"asimd", "asimddp"})
    assert (arm.isa, arm.activation_type) == ("arm_dotprod", "int8")
    amx = preflight({"avx512_vnni", "amx_tile", "amx_int8"})
    assert amx.isa == "amx" and amx.reduce_range is False
    bare = preflight({"sse4_2"})
    assert bare.expect_speedup is False and "cannot be expected" in bare.reason


@pytest.mark.parametrize("fp32_ms,int8_ms,verdict", [
    ([2.0, 2.1, 1.9, 2.0, 2.2], [1.0, 1.1, 0.95, 1.0, 1.05], "faster"),  # clearly faster, in every round
    ([2.0, 2.1, 1.9, 2.0, 2.2], [1.95, 2.05, 1.95, 1.9, 2.2], "not distinguishable"),  # inside the noise floor
    ([2.0, 2.1, 1.9, 2.0, 2.2], [2.6, 2.8, 2.5, 2.6, 2.9], "slower"),
    ([2.0, 2.1, 1.9, 2.0, 2.2], [1.6, 1.95, 1.8, 1.85, 1.7], "faster, below min_speedup"),  # 1.08x: real, too small
])
def test_the_speed_decision_rule_on_fixed_timings(fp32_ms, int8_ms, verdict):
    speedup = Speedup.of(fp32_ms, int8_ms)
    assert speedup.low <= speedup.median <= speedup.high
    assert speedup.verdict(noise_floor=0.05, min_speedup=1.1) == verdict


def test_the_noise_floor_comes_from_an_a_a_comparison():
    same = Speedup.of([2.0] * 5, [1.9, 2.1, 1.8, 2.25, 2.0])
    # the interquartile range sets the floor: the two extreme rounds (1.8, 2.25 ms) do not
    assert same.noise == pytest.approx(max(1 - 2.0 / 2.1, 2.0 / 1.9 - 1))
    # a 5 % gain is faster on a quiet machine and "not distinguishable" on a noisy one
    gain = Speedup.of([1.05] * 4, [1.0] * 4)
    assert gain.verdict(0.02, 1.0) == "faster" and gain.verdict(same.noise, 1.0) == "not distinguishable"


@pytest.fixture(scope="module")
def quantizable(tiny_run, tiny_export):
    from ftdeploy.evaluation import EvalData
    from ftdeploy.rundir import load_run

    run = load_run(tiny_run)
    return run, tiny_export, EvalData.from_run(run, 100, 64)


class SetFigures:
    """An evaluator that returns set accuracies and speedups per configuration name; ``final`` gives
    other (median, low, high) for the final round, where several are timed together."""

    def __init__(self, figures: dict[str, tuple[float, float, float, float]], noise: dict[str, float] | None = None,
                 final: dict[str, tuple[float, float, float]] | None = None):
        self.figures, self.noise, self.final, self.rounds = figures, noise or {}, final or {}, []
        self.latest = None  # the last measurement, as the real evaluator keeps it: FP32 at 2 ms
        self.outputs = {}  # set figures have no outputs: confirm runs the files
        self.metric = "accuracy"

    def noise_floor(self, reference):
        return 0.02

    def score(self, name, path):
        return 0.90 if name == "fp32" else self.figures[name][0]

    def speedups(self, candidates, reference, longer=1.0):
        self.rounds.append(sorted(candidates))
        together = len(candidates) > 1 or longer > 1
        out = {}
        for name in candidates:
            median, low, high = self.final[name] if together and name in self.final else self.figures[name][1:]
            out[name] = (Speedup(median, low, high, [low, median, high]), 2.0 / median)
        ms = {"reference": 2.0, "reference A/A": 2.0, **{name: p50 for name, (_, p50) in out.items()}}
        self.latest = Comparison({n: LatencyStats(1, 5, v, v, v, v, 1000 / v) for n, v in ms.items()},
                                 {n: [v] * 5 for n, v in ms.items()})
        return out, max([self.noise.get(name, 0.0) for name in candidates], default=0.0)


@pytest.mark.slow
def test_the_search_picks_the_fastest_configuration_that_passes(quantizable, tmp_path):
    """Apart from this machine's speed: all ops is fast but loses 3 points; the search times the
    other type schemes too, then keeps the most sensitive nodes in FP32, stops at the first count
    that passes, and picks the fastest passing configuration."""
    _, out, data = quantizable
    evaluator = SetFigures({
        "all ops": (0.87, 1.60, 1.50, 1.70),
        "compute ops only": (0.90, 1.30, 1.20, 1.35),
        "first/last in fp32": (0.90, 1.04, 0.98, 1.10),  # inside the noise floor
        "all ops, u8s8, per-tensor": (0.86, 1.62, 1.55, 1.70),
        "all ops, s8s8, per-channel": (0.90, 0.80, 0.75, 0.85),  # slower
        "all ops + 1 most sensitive in fp32": (0.88, 1.55, 1.45, 1.60),
        "all ops + 2 most sensitive in fp32": (0.898, 1.50, 1.40, 1.55),
        "all ops + 4 most sensitive in fp32": (0.90, 1.45, 1.40, 1.50),
        "all ops + 8 most sensitive in fp32": (0.90, 1.35, 1.30, 1.40),
    }, noise={"compute ops only": 0.02})  # a quiet moment: the floor before the search (0.08) still holds
    vnni = preflight({"avx2", "avx512_vnni"})  # a fixed CPU: the schemes tried do not depend on this one
    chosen, tried, mode = search(out / "model.unoptimized.onnx", out / "model.onnx", tmp_path, QuantizeConfig(search="full"),
                                 data.calibration, evaluator, vnni, noise_floor=0.08, progress=lambda _: None)
    assert mode == "static"
    assert [a.name for a in tried] == ["all ops", "compute ops only", "first/last in fp32", "all ops, u8s8, per-tensor",
                                       "all ops, s8s8, per-channel", "all ops + 8 most sensitive in fp32",
                                       "all ops + 1 most sensitive in fp32", "all ops + 2 most sensitive in fp32"]
    assert [a.verdict for a in tried][:5] == ["faster", "faster", "not distinguishable", "faster", "slower"]
    assert chosen.name == "all ops + 2 most sensitive in fp32" and len(chosen.excluded_nodes) == 2
    assert [a.passed for a in tried] == [False, True, False, False, False, True, False, True]
    assert tried[4].scheme.activation_type == "int8" and tried[3].scheme.per_channel is False
    assert all(a.noise_floor == 0.08 for a in tried)
    # the final round timed the two within budget and faster, together, and judged them on that
    assert evaluator.rounds[-1] == ["all ops + 2 most sensitive in fp32", "all ops + 8 most sensitive in fp32",
                                    "compute ops only"]
    assert tried[1].first_pass["median"] == 1.30 and tried[0].first_pass is None


def test_ties_are_called_within_the_noise_of_the_passing_configurations_only(quantizable, tmp_path):
    """As measured on ResNet-18: the preset loses 0.56 points with an A/A spread of ±0.18 beside it;
    of the two that pass, per-tensor (2.37x) beats first/last in FP32 (1.96x) by more than their own
    noise (±0.07): per-tensor is chosen, not first/last by a tie band widened by the failed preset."""
    _, out, data = quantizable
    evaluator = SetFigures({"all ops": (0.8944, 2.59, 2.51, 2.62), "compute ops only": (0.8944, 2.33, 1.85, 2.4),
                            "first/last in fp32": (0.8972, 1.96, 1.93, 2.0),
                            "all ops, u8s8, per-tensor": (0.90, 2.37, 2.26, 2.45),
                            "all ops, s8s8, per-channel": (0.8944, 0.76, 0.75, 0.8),
                            "all ops + 8 most sensitive in fp32": (0.8944, 2.3, 2.2, 2.4),
                            "all ops + 1 most sensitive in fp32": (0.8944, 2.5, 2.4, 2.6)},
                           noise={"all ops": 0.183, "first/last in fp32": 0.073, "all ops, u8s8, per-tensor": 0.073})
    chosen, tried, _ = search(out / "model.unoptimized.onnx", out / "model.onnx", tmp_path, QuantizeConfig(search="auto"),
                              data.calibration, evaluator, preflight({"avx2", "avx512_vnni"}), noise_floor=0.0,
                              progress=lambda _: None)
    assert not tried[0].passed and len(tried) > 1  # the preset lost 0.56 points: the full search ran
    assert chosen.name == "all ops, u8s8, per-tensor", [(a.name, a.speedup, a.noise_floor, a.passed) for a in tried]


@pytest.mark.slow
def test_when_eight_nodes_in_fp32_do_not_help_fewer_are_not_tried(quantizable, tmp_path):
    _, out, data = quantizable
    evaluator = SetFigures({"all ops": (0.40, 1.60, 1.50, 1.70), "compute ops only": (0.40, 1.50, 1.45, 1.55),
                            "first/last in fp32": (0.40, 1.40, 1.35, 1.45), "all ops, u8s8, per-tensor": (0.30, 1.70, 1.6, 1.8),
                            "all ops, s8s8, per-channel": (0.40, 0.80, 0.75, 0.85),
                            "all ops + 8 most sensitive in fp32": (0.42, 1.45, 1.40, 1.50)})
    chosen, tried, _ = search(out / "model.unoptimized.onnx", out / "model.onnx", tmp_path, QuantizeConfig(search="full"),
                              data.calibration, evaluator, preflight({"avx2", "avx512_vnni"}), noise_floor=0.05,
                              progress=lambda _: None)
    assert chosen is None and tried[-1].name == "all ops + 8 most sensitive in fp32"


@pytest.mark.slow
def test_the_final_round_decides_between_candidates_measured_apart(quantizable, tmp_path):
    """Measured apart, 'compute ops only' looked faster (1.60x) than 'all ops' (1.40x); timed
    together in the final round, it is below min_speedup: 'all ops' ships, whatever the first pass said."""
    _, out, data = quantizable
    evaluator = SetFigures({"all ops": (0.90, 1.40, 1.35, 1.45), "compute ops only": (0.90, 1.60, 1.50, 1.70),
                            "first/last in fp32": (0.90, 1.30, 1.05, 1.35),  # low end below min_speedup
                            "all ops, u8s8, per-tensor": (0.80, 1.55, 1.50, 1.60),  # loses 10 points
                            "all ops, s8s8, per-channel": (0.90, 0.80, 0.75, 0.85)},
                           final={"all ops": (1.38, 1.33, 1.42), "compute ops only": (1.12, 1.05, 1.20),
                                  "first/last in fp32": (1.31, 1.25, 1.36)})
    chosen, tried, _ = search(out / "model.unoptimized.onnx", out / "model.onnx", tmp_path, QuantizeConfig(search="full"),
                              data.calibration, evaluator, preflight({"avx2", "avx512_vnni"}), noise_floor=0.05,
                              progress=lambda _: None)
    assert evaluator.rounds[-1] == ["all ops", "compute ops only", "first/last in fp32"]  # within budget, faster
    by_name = {a.name: a for a in tried}
    assert by_name["compute ops only"].first_pass["verdict"] == "faster"
    assert by_name["compute ops only"].verdict == "faster, below min_speedup" and not by_name["compute ops only"].passed
    assert by_name["first/last in fp32"].passed  # its low end cleared min_speedup in the longer measurement
    assert chosen.name == "all ops" and chosen.speedup == 1.38


@pytest.mark.slow
def test_auto_ships_a_preset_that_passes_after_one_measurement_and_searches_when_it_does_not(quantizable, tmp_path):
    """search=auto: the preset within the budget and faster outside its own A/A noise ships after one
    measurement; a preset that loses 3 points, or one inside the noise floor, gets the full search,
    which chooses as it would have alone."""
    from ftdeploy.quantize import search_path

    _, out, data = quantizable
    vnni = preflight({"avx2", "avx512_vnni"})
    others = {"compute ops only": (0.90, 1.30, 1.25, 1.35), "first/last in fp32": (0.90, 1.20, 1.15, 1.25),
              "all ops, u8s8, per-tensor": (0.80, 1.55, 1.50, 1.60), "all ops, s8s8, per-channel": (0.90, 0.8, 0.75, 0.85),
              "all ops + 8 most sensitive in fp32": (0.90, 1.35, 1.30, 1.40),
              "all ops + 1 most sensitive in fp32": (0.90, 1.45, 1.40, 1.50),
              "all ops, u8s8, per-tensor + 8 most sensitive in fp32": (0.85, 1.50, 1.45, 1.55)}

    def run(preset: tuple[float, float, float, float], noise: float = 0.02):
        evaluator = SetFigures({"all ops": preset, **others}, noise={"all ops": noise})
        chosen, tried, _ = search(out / "model.unoptimized.onnx", out / "model.onnx", tmp_path,
                                  QuantizeConfig(), data.calibration, evaluator, vnni, noise_floor=0.0,
                                  progress=lambda _: None)
        return chosen, tried, evaluator, search_path(QuantizeConfig(), tried)

    chosen, tried, evaluator, path = run((0.90, 1.40, 1.35, 1.45))
    assert chosen.name == "all ops" and len(tried) == 1 and evaluator.rounds == [["all ops"]]
    assert path["search"] == "quick" and "1.40x" in path["search_why"]
    chosen, tried, _, path = run((0.87, 1.60, 1.55, 1.65))  # 3 points lost: the full search and its choice
    assert chosen.name == "all ops + 1 most sensitive in fp32" and len(tried) > 1 and path["search"] == "full search"
    chosen, tried, _, path = run((0.90, 1.10, 1.05, 1.15), noise=0.15)  # inside its own noise floor
    assert tried[0].verdict == "not distinguishable" and path["search"] == "full search"
    assert chosen.name == "compute ops only"


@pytest.mark.slow
def test_noise_measured_beside_a_candidate_raises_its_floor(quantizable, tmp_path):
    """1.30x is faster against the 8 % floor measured before the search, but the A/A spread measured
    in the same rounds as the candidate was 35 %: on that measurement it is not distinguishable."""
    _, out, data = quantizable
    evaluator = SetFigures({"all ops": (0.90, 1.30, 1.25, 1.35)}, noise={"all ops": 0.35})
    chosen, (only,), _ = search(out / "model.unoptimized.onnx", out / "model.onnx", tmp_path,
                                QuantizeConfig(search=False), data.calibration, evaluator,
                                preflight({"avx2", "avx512_vnni"}), noise_floor=0.08, progress=lambda _: None)
    assert chosen is None and only.noise_floor == 0.35 and only.verdict == "not distinguishable"


def test_speedups_within_the_noise_floor_are_a_tie_won_by_the_simplest():
    from ftdeploy.quantize import Attempt, choose

    def tried(name, speedup):
        return Attempt(name, "static", [], None, speedup=speedup, passed=True)

    first, second = tried("all ops", 1.50), tried("first/last in fp32", 1.53)
    assert choose([first, second], noise_floor=0.05) is first  # 1.53 vs 1.50: inside a 5 % noise floor
    assert choose([first, second], noise_floor=0.01) is second
    assert choose([Attempt("x", "static", [], None, speedup=2.0, passed=False)], 0.05) is None


@pytest.mark.slow
def test_refuses_int8_that_breaks_the_accuracy_budget(quantizable, tmp_path):
    """A calibration set of blank images gives useless activation ranges: with a zero budget the
    INT8 model must be refused, and no file written, whatever its speed."""
    run, out, data = quantizable
    evaluator = Evaluator(data, None, 1, 0.1)
    int8 = tmp_path / "model.int8.onnx"
    record, reason = ship(out / "model.unoptimized.onnx", out / "model.onnx", int8,  # the budget's old name
                          QuantizeConfig(max_accuracy_drop=0.0, search=False, latency_seconds=0.1),
                          np.zeros((8, 3, 16, 16), np.float32), evaluator, {"classes": run.classes})
    assert not int8.exists() and "no configuration was both faster" in reason and "points of its accuracy" in reason
    (only,) = record.tried
    assert only.metric_drop_points > 0 and only.passed is False and record.max_metric_drop == 0.0
    assert record.chosen is None and record.calibration_samples == 8
    assert record.noise_floor == max(record.noise_floor_before_search, only.noise_floor)


def measured_as(int8_ms: float):
    """quantize's final measurement, with set block times: int8 at ``int8_ms`` against fp32's 2 ms."""
    import ftdeploy.quantize as stage

    real = stage.profile

    def profile(runners, samples, batch_sizes, seconds, measured=None, only_at=None, report_seconds=None):
        figures, comparisons = real(runners, samples, batch_sizes, 0.02, only_at=only_at, report_seconds=0.01)
        for comparison in comparisons.values():
            comparison.blocks = {"fp32": [2.0] * 5, "fp32 A/A": [2.0] * 5, "int8": [int8_ms] * 5}
        return figures, comparisons

    return profile


def quantize_with(monkeypatch, export_dir, out, accuracy: float, search_speedup: float, final_int8_ms: float,
                  **cfg):
    """ftdeploy quantize (in-process) on this machine's files, with set accuracy and speed figures:
    its decisions and the files it writes, apart from this CPU's speed."""
    import ftdeploy.quantize as stage

    monkeypatch.setattr(stage, "Evaluator", lambda *a: SetFigures(
        {"all ops": (accuracy, search_speedup, search_speedup * 0.95, search_speedup * 1.05)}))
    monkeypatch.setattr(stage, "profile", measured_as(final_int8_ms))
    return stage.quantize(export_dir, out, QuantizeConfig(search=False, latency_seconds=0.05, **cfg))


def test_quantize_ships_a_file_measured_faster_and_within_budget(quantizable, tmp_path, monkeypatch):
    run, export_dir, _ = quantizable
    out = quantize_with(monkeypatch, export_dir, tmp_path / "q", 0.90, 1.6, 1.0)
    report = json.loads((out / "report.json").read_text())
    q = report["quantization"]
    assert q["shipped"] and q["chosen"] == "all ops" and q["file"] == "model.int8.onnx"
    assert q["final_speedup"]["median"] == pytest.approx(2.0) and q["final_speedup"]["verdict"] == "faster"
    int8 = report["variants"]["int8"]
    assert int8["path"] == "model.int8.onnx" and int8["agreement"]["reference"] == "fp32"
    assert int8["agreement"]["decision_agreement"] >= 0.9 and int8["parity"] is None
    assert int8["size_bytes"] < report["variants"]["fp32"]["size_bytes"]
    meta = model_metadata(onnx.load(str(out / "model.int8.onnx")))
    assert meta["variant"] == "int8" and meta["classes"] == run.classes
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["stage"] for e in manifest["lineage"]] == ["data", "train", "export"] and manifest["stage"] == "quantize"
    assert {"model.int8.onnx", "model.onnx"} <= set(manifest["files"])
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_the_quick_path_reports_its_own_batch1_measurement_and_times_only_the_other_sizes(quantizable, tmp_path,
                                                                                           monkeypatch):
    """The preset passed, measured seconds before beside FP32 and an A/A session: its figures are
    the report's batch-1 latency and the final speedup; only the other batch sizes are timed again,
    without the A/A session (it judges the batch-1 speedup alone) and for half as long."""
    import ftdeploy.quantize as stage

    _, export_dir, _ = quantizable
    timed = []
    real = stage.profile

    def profile(runners, samples, batch_sizes, seconds, measured=None, only_at=None, report_seconds=None):
        figures, comparisons = real(runners, samples, batch_sizes, 0.02, measured, only_at, 0.01)
        timed.extend((b, sorted(c.stats), report_seconds) for b, c in comparisons.items() if b not in (measured or {}))
        return figures, comparisons

    monkeypatch.setattr(stage, "Evaluator", lambda *a: SetFigures({"all ops": (0.90, 1.6, 1.5, 1.7)}))
    monkeypatch.setattr(stage, "profile", profile)
    out = stage.quantize(export_dir, tmp_path / "q", QuantizeConfig(latency_seconds=0.05))
    report = json.loads((out / "report.json").read_text())
    q = report["quantization"]
    sizes = [int(b) for b in report["variants"]["fp32"]["latency_ms"]]
    assert q["search"] == "quick" and q["shipped"] and 1 in sizes
    # the other sizes are reported, not judged: half the batch-1 seconds
    assert timed == [(b, ["fp32", "int8"], 0.025) for b in sizes if b != 1]
    assert q["final_speedup"]["median"] == pytest.approx(1.6) and q["final_measured_by"].startswith("the quick path")
    assert report["variants"]["fp32"]["latency_ms"]["1"]["p50"] == pytest.approx(2.0)
    assert report["variants"]["int8"]["latency_ms"]["1"]["p50"] == pytest.approx(1.25)


def test_int8_is_judged_on_eval_samples_not_on_the_exports_few_parity_examples(quantizable, tmp_path, monkeypatch):
    """A text export compares 256 sentences (0.4 points each); quantize judges INT8, and reports both
    files' accuracy, on up to quantize.eval_samples validation examples."""
    import ftdeploy.quantize as stage
    from ftdeploy.config import ExportConfig
    from ftdeploy.export import export

    from conftest import FAST_EXPORT

    run, _, data = quantizable  # data: every validation image (fewer than 100)
    export_dir = export(run.path, tmp_path / "export", ExportConfig(**{**FAST_EXPORT, "parity_samples": 4}))
    given = []
    monkeypatch.setattr(stage, "Evaluator", lambda data, metric, *a: given.append(len(data.targets)) or SetFigures(
        {"all ops": (0.90, 1.6, 1.5, 1.7)}))
    monkeypatch.setattr(stage, "profile", measured_as(1.0))
    report = json.loads((stage.quantize(export_dir, None, QuantizeConfig(search="off", latency_seconds=0.05)
                         ) / "report.json").read_text())
    val = len(data.targets)
    assert report["dataset"]["num_samples"] == val and given == [val] and val > 4  # export scores them all too
    assert report["variants"]["fp32"]["parity"]["input_sets"] == {"validation": 4}  # and compares 4
    assert [report["variants"][v]["metric_samples"] for v in ("fp32", "int8")] == [val, val]
    assert "Accuracy of" not in (export_dir / "report.md").read_text()  # every variant on the same examples


def test_confirm_reuses_the_searchs_logits_of_files_that_answer_alike_at_any_batch(quantizable, tmp_path, monkeypatch):
    """Static INT8 and FP32 answer an image the same beside others: the accuracy and parity the report
    gives come from the logits the search computed, and no file is run again one image at a time."""
    import ftdeploy.quantize as stage

    class SetSpeed(stage.Evaluator):  # this machine's accuracy, set speedups
        def speedups(self, candidates, reference, longer=1.0):
            fake = SetFigures({name: (0.0, 1.6, 1.5, 1.7) for name in candidates})
            measured = fake.speedups(candidates, reference, longer)
            self.latest = fake.latest
            return measured

    from ftdeploy.evaluation import EvalData

    batch_sizes, real = [], EvalData.outputs
    monkeypatch.setattr(EvalData, "outputs", lambda self, predict, bs=32: batch_sizes.append(bs) or real(self, predict, bs))
    monkeypatch.setattr(stage, "Evaluator", SetSpeed)
    monkeypatch.setattr(stage, "profile", measured_as(1.0))
    _, export_dir, _ = quantizable
    report = json.loads((stage.quantize(export_dir, tmp_path / "q", QuantizeConfig(search="off", mode="static"))
                         / "report.json").read_text())
    int8, tried = report["variants"]["int8"], report["quantization"]["tried"]
    assert batch_sizes == [32, 32] and int8["agreement"]["batch_size"] == 32  # fp32 and int8, once each
    assert int8["scores"]["accuracy"] == tried[0]["metric_value"]


def test_a_file_the_final_measurement_refuses_keeps_no_shipping_name(quantizable, tmp_path, monkeypatch, caplog):
    """Faster in the search, slower in the final measurement: INT8 is not shipped, the file is kept as
    model.int8.rejected.onnx for inspection, and the report says why."""
    _, export_dir, _ = quantizable
    out = quantize_with(monkeypatch, export_dir, tmp_path / "q", 0.90, 1.6, 2.6)
    assert not (out / "model.int8.onnx").exists() and (out / "model.int8.rejected.onnx").is_file()
    report = json.loads((out / "report.json").read_text())
    q = report["quantization"]
    assert not q["shipped"] and "the final measurement did not confirm" in q["not_shipped_reason"]
    assert q["file"] == "model.int8.rejected.onnx" and "int8" not in report["variants"]
    assert "INT8 not shipped: the final measurement did not confirm" in caplog.text  # logged: the CLI shows it


def test_a_noisy_measurement_of_another_configuration_does_not_refuse_the_chosen_one(quantizable, tmp_path,
                                                                                      monkeypatch):
    """The final verdict rests on the noise of the chosen file's own measurements: an A/A spread of
    ±0.7 timed beside another configuration (a hiccup, as once seen in a full search on Lite0) does
    not refuse a file measured 1.4x in the search and 1.33x in the final measurement, each with a
    quiet A/A."""
    from collections import defaultdict

    import ftdeploy.quantize as stage

    _, export_dir, _ = quantizable
    figures = defaultdict(lambda: (0.90, 1.02, 0.98, 1.06), {"all ops": (0.90, 1.4, 1.35, 1.45)})
    monkeypatch.setattr(stage, "Evaluator", lambda *a: SetFigures(figures, noise={"compute ops only": 0.7}))
    monkeypatch.setattr(stage, "profile", measured_as(1.5))
    out = stage.quantize(export_dir, tmp_path / "q", QuantizeConfig(search="full", latency_seconds=0.05))
    q = json.loads((out / "report.json").read_text())["quantization"]
    assert q["chosen"] == "all ops" and q["noise_floor"] == pytest.approx(0.7)  # the largest seen, recorded
    assert q["final_speedup"]["verdict"] == "faster" and q["shipped"], q["not_shipped_reason"]
    assert q["noise_floor_judged"] < 0.1


def test_quantize_o_writes_a_complete_export_directory_that_later_commands_accept(quantizable, tmp_path,
                                                                                   monkeypatch):
    """-o OUT: the FP32 files, the INT8 file, the report and the manifest, paths relative to OUT; OUT
    copied elsewhere, without its run, is an export directory that quantize accepts from another
    working directory (report and serve: test_pipeline); the source directory is left as it was."""
    from ftdeploy.rundir import load_export

    _, export_dir, _ = quantizable
    before = json.loads((export_dir / "manifest.json").read_text())["files"]
    out = quantize_with(monkeypatch, export_dir, tmp_path / "q", 0.90, 1.6, 1.0)
    assert {p.name for p in out.iterdir()} >= {"model.onnx", "model.unoptimized.onnx", "model.int8.onnx", "report.json",
                                                "report.md", "manifest.json"}
    moved = Path(shutil.copytree(out, tmp_path / "elsewhere" / "q"))
    assert load_export(moved).variant_path("int8") == moved / "model.int8.onnx"
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    again = cli("quantize", str(moved), "--set", "quantize.min_speedup=1000", "--set", "quantize.search=false",
                    "--set", "quantize.latency_seconds=0.05", cwd=elsewhere)
    assert again.returncode == 0 and "INT8 not shipped" in again.stdout, again.stderr
    manifest = json.loads((moved / "manifest.json").read_text())  # quantize again, in place: its record replaced
    assert [e["stage"] for e in manifest["lineage"]] == ["data", "train", "export"] and manifest["parent"] == "."
    assert json.loads((export_dir / "manifest.json").read_text())["files"] == before
    assert not (export_dir / "model.int8.onnx").exists()


@pytest.mark.slow
def test_strict_refusal_exits_2(quantizable, tmp_path):
    """An impossible speed target: INT8 is refused on every CPU. Without --strict the same refusal
    exits 0 with one line (test_pipeline's runs and test_quantize_o_...'s second quantize)."""
    _, out, _ = quantizable
    args = ["--set", "quantize.min_speedup=1000", "--set", "quantize.search=false", "--set", "quantize.latency_seconds=0.05"]
    strict = cli("quantize", str(out), "-o", str(tmp_path / "b"), "--strict", *args)
    assert strict.returncode == 2 and strict.stderr.strip().splitlines()[-1].startswith("error: INT8 not shipped")


def test_quantize_on_images_does_not_import_torch(tiny_export, tmp_path):
    """Quantize reads data and ONNX files: importing torch (2-9 s on a 2-core VM, the largest single
    cost of the quick path) is no part of it, though torch is installed here."""
    import subprocess
    import sys

    code = "import sys; from ftdeploy.cli import main; main(sys.argv[1:]); print('torch imported:', 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code, "quantize", str(tiny_export), "-o", str(tmp_path / "q"),
                             "--set", "quantize.search=off", "--set", "quantize.latency_seconds=0.05"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "torch imported: False"
    assert json.loads((tmp_path / "q" / "report.json").read_text())["quantization"]["search"] == "preset only"


def test_a_configuration_timed_beside_a_drifting_fp32_is_measured_again_then_flagged():
    """Each configuration is timed beside its own measurement of FP32. One whose FP32 ran more than 20 %
    from the median of those is measured again (up to twice) and judged on the retake; one still off
    is flagged in the record."""
    from pathlib import Path

    from ftdeploy.latency import Comparison, LatencyStats, Speedup
    from ftdeploy.quantize import Attempt, retake_drifting

    class Drifting:
        def __init__(self, references):
            self.references, self.latest, self.calls = references, None, []

        def speedups(self, candidates, reference, longer=1.0):
            (name,) = candidates
            self.calls.append(name)
            ref = self.references[name].pop(0)
            self.latest = Comparison({"reference": LatencyStats(1, 5, ref, ref, ref, ref, 1000 / ref)}, {"reference": [ref]})
            return {name: (Speedup(ref / 1.0, ref / 1.1, ref / 0.9, [ref]), 1.0)}, 0.02

    def attempt(name, reference_ms, speedup):
        return Attempt(name, "static", [], None, speedup=speedup, speedup_low=speedup, speedup_high=speedup,
                       verdict="faster", reference_p50_ms=reference_ms, path=Path(name))

    def judge(a, speedup, latency_ms, noise):
        a.speedup, a.latency_ms = speedup.median, latency_ms

    tried = [attempt("a", 4.0, 4.0), attempt("b", 4.2, 4.2), attempt("c", 6.6, 6.6), attempt("d", 6.4, 6.4),
             attempt("e", 4.1, 4.1)]
    evaluator = Drifting({"c": [4.3], "d": [6.2, 6.0]})  # c comes back at the first retake; d stays off
    retake_drifting(tried, Path("fp32.onnx"), evaluator, judge, progress=lambda line: None)
    c, d = tried[2], tried[3]
    assert evaluator.calls == ["c", "d", "d"]
    assert (c.retakes, c.reference_drift, c.speedup, c.first_pass["median"]) == (1, None, 4.3, 6.6)
    assert d.retakes == 2 and round(d.reference_drift, 2) == 0.43  # 6.0 against the median 4.2
    assert all(a.retakes == 0 and a.reference_drift is None for a in (tried[0], tried[1], tried[4]))
    assert c.record().retakes == 1 and d.record().reference_drift is not None
