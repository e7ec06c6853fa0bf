"""ftdeploy optimize with set latencies (by level and variant), so that a killed and resumed search
can be compared with an uninterrupted one apart from this machine's timing noise. test_optimize.py
runs ``search`` in its own process, and this file as a script to be killed: argv RUN OUT SLOW_LEVEL,
it sleeps while building SLOW_LEVEL."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import ftdeploy.optimize as stage  # noqa: E402
from ftdeploy.config import OptimizeConfig  # noqa: E402

LATENCY = {("1.00", "fp32"): 4.0, ("1.00", "int8"): 2.5, ("0.50", "fp32"): 2.2, ("0.50", "int8"): 1.6}
SETTINGS = {"levels": [0.5], "finetune_epochs": 1, "round_to": None, "max_accuracy_drop": 30.0, "latency_seconds": 0.05,
            "export": {"exporter": "torchscript", "batch_sizes": [1], "latency_seconds": 0.05, "parity_samples": 32},
            # INT8 never ships: whether a tiny model's INT8 file is faster is timing noise, and the
            # uninterrupted and the resumed search must see the same files
            "quantize": {"search": "off", "latency_seconds": 0.05, "min_speedup": 1000.0}}


def set_figures(path, reference, provider, bench, threads, seconds):
    level, variant = Path(path).parts[-3], "int8" if Path(path).name == "model.int8.onnx" else "fp32"
    ms = LATENCY[(level, variant)]
    return {"p50_ms": ms, "p90_ms": ms, "reference_p50_ms": 4.0, "noise_floor": 0.02,
            "speedup": {"median": 4.0 / ms, "low": 4.0 / ms, "high": 4.0 / ms, "rounds": []}}


def set_together(files, reference, bench, threads, seconds):
    """The final round's measurement, with the same set latencies."""
    return {name: set_figures(path, reference, provider, bench, threads, seconds) for name, (path, provider) in files.items()}


def search(run, out) -> None:
    """The search with set latencies (the caller replaces ``measure_point`` and ``measure_together``, as
    below or by monkeypatch)."""
    stage.optimize(run, out, OptimizeConfig.model_validate(SETTINGS))


if __name__ == "__main__":
    run, out, slow_level = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    stage.measure_point, stage.measure_together = set_figures, set_together
    build = stage.build_level

    def slow(run_dir, out_dir, level, cfg):
        """Hold the search inside this level's stages until the test kills it."""
        if f"{level:.2f}" == slow_level:
            (out_dir / "levels" / slow_level).mkdir(parents=True, exist_ok=True)
            (out_dir / "levels" / slow_level / "half-made").write_text("killed here")
            print("BUILDING", flush=True)
            time.sleep(600)
        return build(run_dir, out_dir, level, cfg)

    stage.build_level = slow
    search(run, out)
