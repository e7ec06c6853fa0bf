import json
import os
import subprocess
import sys

import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import FAST_EXPORT, REPO, cli
from ftdeploy.config import ExportConfig, PruneConfig, load_config
from ftdeploy.errors import ConfigError
from ftdeploy.prune import prune
from ftdeploy.rundir import load_run


@pytest.fixture(scope="module")
def trained(resnet_run):
    """ResNet-18: pruning's dependency groups (residual additions, BatchNorm) are the point here."""
    return resnet_run


@pytest.fixture(scope="module")
def pruned(trained, tmp_path_factory):
    return prune(trained, tmp_path_factory.mktemp("pruned") / "run-pruned",
                 PruneConfig(target_macs=0.5, finetune_epochs=1, latency_seconds=0.2, distill_alpha=0.5))


def layer_weights(model):
    return sorted(tuple(m.weight.shape) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))


@pytest.mark.slow
def test_channels_are_removed_and_the_report_says_so(trained, pruned):
    report = json.loads((pruned / "prune_report.json").read_text())
    assert report["ratios"]["macs"] <= 0.5 and report["ratios"]["params"] < 0.7
    assert report["after"]["macs"] < report["before"]["macs"]
    manifest = json.loads((pruned / "manifest.json").read_text())
    assert manifest["parent"] == os.path.relpath(trained, pruned) and [e["stage"] for e in manifest["lineage"]] == ["data", "train"]
    assert manifest["stage"] == "prune" and manifest["config"]["distill_alpha"] == 0.5
    assert {"model.safetensors", "prune_report.json"} <= set(manifest["files"])
    assert report["speedup"]["speedup_low"] <= report["speedup"]["speedup"] <= report["speedup"]["speedup_high"]
    small, big = load_run(pruned).load_model(), load_run(trained).load_model()
    assert sum(p.numel() for p in small.parameters()) == report["after"]["params"]
    assert small.fc.out_features == big.fc.out_features == 3  # the classifier's outputs are never pruned
    convs = [m for m in small.modules() if isinstance(m, torch.nn.Conv2d)][1:]  # the stem keeps 3 input channels
    assert all(c.out_channels % 8 == 0 for c in convs)  # rounded for fast kernels


@pytest.mark.slow
def test_exported_onnx_has_exactly_the_pruned_weights(pruned, tmp_path):
    from ftdeploy.export import export

    export(pruned, tmp_path, ExportConfig(**FAST_EXPORT, optimization="none"))
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    onnx_weights = sorted(tuple(inits[n.input[1]].shape) for n in graph.node
                          if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in inits)
    model = load_run(pruned).load_model()
    assert [w if len(w) == 4 else tuple(sorted(w)) for w in onnx_weights] == \
           [w if len(w) == 4 else tuple(sorted(w)) for w in layer_weights(model)]  # Gemm may store W transposed
    # no mask tensors ride along: the file's parameters are the model's
    assert sum(v.size for v in inits.values()) <= sum(v.numel() for v in model.state_dict().values())


@pytest.mark.slow
def test_pruned_run_reloads_in_a_fresh_process_with_identical_outputs(pruned, tmp_path):
    x = torch.randn(3, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    expected = load_run(pruned).load_model()(x)
    code = (f"import torch; from ftdeploy.rundir import load_run; x = torch.load({str(tmp_path / 'x.pt')!r}); "
            f"torch.save(load_run({str(pruned)!r}).load_model()(x), {str(tmp_path / 'y.pt')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


@pytest.mark.slow
def test_pruned_run_fine_tunes_again_like_any_run(pruned, tmp_path):
    """A pruned run directory as model.weights: the new run keeps the pruned architecture."""
    from conftest import TINY

    out = tmp_path / "again"
    args = [a for item in [*TINY, "preprocessing.input_size=32", "data.image_size=32", "train.epochs=1",
                           f"model.weights={pruned}"] for a in ("--set", item)]
    result = cli("train", *args, "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert layer_weights(load_run(out).load_model()) == layer_weights(load_run(pruned).load_model())
    assert json.loads((out / "manifest.json").read_text())["parent"] == os.path.relpath(pruned, out)


def test_target_speedup_picks_the_least_pruning_whose_low_end_reaches_it(monkeypatch):
    """Set speedups per ratio (median, low end): 0.3 has a median over 1.5 but a low end under it;
    0.4 is the least ratio whose low end reaches 1.5. A target nothing reaches says the best found."""
    import ftdeploy.prune as stage
    from ftdeploy.models import TinyConvNet

    figures = {0.1: (1.1, 1.0), 0.2: (1.3, 1.2), 0.3: (1.6, 1.45), 0.4: (1.7, 1.55), 0.5: (2.0, 1.9)}
    measured = []

    def speedup(base, candidate, probe, threads, seconds):
        ratio = round(1 - candidate.fc.in_features / base.fc.in_features, 1)  # channels kept at the head
        measured.append(ratio)
        median, low = figures.get(ratio, (1.2, 1.1))
        return {"base_ms": 1.0, "latency_ms": 1 / median, "speedup": median, "speedup_low": low, "speedup_high": median}

    monkeypatch.setattr(stage, "onnx_speedup", speedup)
    from ftdeploy.tasks import get_task

    model = TinyConvNet(3, width=40).eval()
    example = stage.Probe((torch.zeros(1, 3, 16, 16),), ["input"], {}, None, get_task(None))
    cfg = PruneConfig(target_speedup=1.5, round_to=None, global_pruning=False)
    ratio, trials = stage.choose_ratio(model, "fc", example, cfg, progress=lambda _: None)
    assert ratio == pytest.approx(0.4) and measured == [0.1, 0.2, 0.3, 0.4]
    assert [t["speedup_low"] for t in trials] == [1.0, 1.2, 1.45, 1.55]
    with pytest.raises(ConfigError, match=r"no pruning ratio up to 0.9 reaches a 5.0x .*best 2.00x"):
        stage.choose_ratio(model, "fc", example, cfg.model_copy(update={"target_speedup": 5.0}), progress=lambda _: None)


@pytest.mark.slow
def test_target_speedup_on_this_machine_prunes_to_the_ratio_it_measured(trained, tmp_path):
    """Measured for real: the pruned run has the MACs of the trial the search chose."""
    out = prune(trained, tmp_path / "fast", PruneConfig(target_speedup=1.1, finetune_epochs=0, latency_seconds=0.1))
    report = json.loads((out / "prune_report.json").read_text())
    chosen = next(t for t in report["search"] if t["ratio"] == report["ratio"])
    assert report["after"]["macs"] / report["before"]["macs"] == pytest.approx(chosen["macs_fraction"])
    assert report["ratios"]["macs"] < 1


def test_an_unreachable_macs_target_says_so_instead_of_pruning_to_an_untested_ratio(trained, tmp_path):
    with pytest.raises(ConfigError, match=r"target unreachable: best 0\.\d+x MACs at ratio 0\.\d+ \(target_macs 0.001\)"):
        prune(trained, tmp_path / "none", PruneConfig(target_macs=0.001, finetune_epochs=0))
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_unstructured_is_reported_honestly(tiny_run, tmp_path):
    out = prune(tiny_run, tmp_path / "sparse", PruneConfig(method="unstructured", ratio=0.7, latency_seconds=0.05))
    report = json.loads((out / "prune_report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.7, abs=0.01)
    assert report["after"]["params"] == report["before"]["params"]  # dense tensors, zeros inside
    assert report["after"]["onnx_gzip_bytes"] < 0.6 * report["before"]["onnx_gzip_bytes"]
    assert report["note"].startswith("unstructured sparsity zeroes weights but keeps every tensor dense")
    assert "latency does not improve" in report["note"] and report["ratios"]["macs"] == 1.0
    assert "Note: unstructured sparsity" in (out / "prune_report.md").read_text()


def test_prune_config_takes_one_target():
    with pytest.raises(ConfigError, match="give one of target_macs, target_speedup, ratio"):
        load_config(None, ["prune.target_macs=0.5", "prune.ratio=0.3"])
    assert load_config(None, ["prune.method=structured"]).prune.target_macs == 0.5


def test_unstructured_method_is_a_valid_config():
    """It used to die with a RecursionError: the default target was assigned inside its own validator."""
    assert load_config(None, ["prune.method=unstructured"]).prune.target_macs is None
    assert PruneConfig(method="unstructured", ratio=0.6).ratio == 0.6
    cfg = PruneConfig()
    cfg.finetune_epochs = 1  # assignment is validated and still terminates
    assert cfg.target_macs == 0.5
