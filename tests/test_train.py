import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY, cli, tiny_config
from ftdeploy.rundir import load_run
from ftdeploy.train import train


def fresh_accuracy(run_dir) -> float:
    """The saved model's accuracy on its run's validation split, computed here and now."""
    from ftdeploy.evaluation import EvalData, torch_predictor

    run = load_run(run_dir)
    data = EvalData.from_run(run, 2000, 1)
    return data.score(data.outputs(torch_predictor(run.load_model()), 64)).get("accuracy")


def test_training_learns_and_writes_the_run_directory(tiny_run):
    for name in ("model.safetensors", "model.json", "config.yaml", "classes.json", "preprocessing.json",
                 "metrics.json", "metrics.jsonl", "metrics.csv", "manifest.json", "training_curves.png"):
        assert (tiny_run / name).is_file(), name
    assert not (tiny_run / "checkpoints").exists()  # train.checkpoint=false: nothing to resume from
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    assert metrics["schema_version"] == 1 and metrics["metric"] == "accuracy" and metrics["unit"] == "images"
    assert metrics["val_metric"] >= 0.9  # 3 well separated classes; chance is 0.33
    assert metrics["val_metric"] == fresh_accuracy(tiny_run)  # the weights saved are the ones reported
    assert metrics["train_items_per_second"] > 0
    assert len((tiny_run / "metrics.jsonl").read_text().splitlines()) == 2
    assert (tiny_run / "metrics.csv").read_text().splitlines()[0].startswith("epoch,train_loss")
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["stage"] == "train" and "torch" in manifest["versions"] and manifest["path"] == "."
    assert json.loads((tiny_run / "classes.json").read_text()) == ["class_0", "class_1", "class_2"]
    assert oct(os.stat(tiny_run / "model.safetensors").st_mode & 0o777) == oct(0o666 & ~current_umask())


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_resume_without_checkpoints_says_why(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    result = cli("train", *[a for item in TINY for a in ("--set", item)], "-o", str(run), "--resume")
    assert result.returncode == 2 and "no checkpoint" in result.stderr and "train.checkpoint=false" in result.stderr


@pytest.mark.slow
def test_reloaded_run_predicts_the_same_in_a_new_process(tiny_run, tmp_path):
    run = load_run(tiny_run)
    x = torch.randn(5, 3, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    expected = run.load_model()(x)
    code = (f"import torch; from ftdeploy.rundir import load_run; "
            f"x = torch.load({str(tmp_path / 'x.pt')!r}); "
            f"torch.save(load_run({str(tiny_run)!r}).load_model()(x), {str(tmp_path / 'y.pt')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)  # another working directory too
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


class CrashAfter:
    def __init__(self, epochs):
        self.epochs = epochs

    def on_epoch_end(self, state):
        if state.epoch + 1 == self.epochs:
            raise KeyboardInterrupt("simulated crash")


def test_resume_continues_exactly(tmp_path):
    extra = ["train.epochs=3", "train.checkpoint=true", "data.augment=true"]  # dropout and augmentation: RNG matters
    straight = train(tiny_config(tmp_path / "straight", *extra))
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "resumed", *extra), callbacks=[CrashAfter(1)])
    assert json.loads((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 1
    resumed = train(tiny_config(tmp_path / "resumed", *extra), resume=True)
    a, b = load_file(straight / "checkpoints/last/model.safetensors"), load_file(resumed / "checkpoints/last/model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]


@pytest.mark.parametrize("cache", [True, False], ids=["cached features", "backbone run every step"])
def test_head_mode_trains_only_the_head(tmp_path, cache):
    from ftdeploy.models import build_model

    cfg = tiny_config(tmp_path / "head", "train.mode=head", "train.lr=0.05", f"train.cache_features={cache}",
                      "train.epochs=3")
    torch.manual_seed(cfg.train.seed)
    before = build_model(cfg.model, None).model.state_dict()
    out = train(cfg)
    after = load_run(out).load_model().state_dict()
    changed = {k for k in after if k in before and before[k].shape == after[k].shape and not torch.equal(before[k], after[k])}
    assert changed == set()  # backbone weights and BatchNorm statistics untouched
    assert not torch.equal(after["fc.weight"], build_model(cfg.model, 3).model.state_dict()["fc.weight"])
    assert json.loads((out / "metrics.json").read_text())["val_metric"] >= 0.9


def test_a_dataloader_with_spawned_workers_trains(tmp_path):
    """Datasets pickle: two DataLoader workers under the spawn start method (macOS; Linux from Python
    3.14) train an epoch."""
    import multiprocessing

    from ftdeploy.train import train

    before = multiprocessing.get_start_method()
    multiprocessing.set_start_method("spawn", force=True)
    try:
        train(tiny_config(tmp_path / "run", "data.num_workers=2", "train.epochs=1"))
    finally:
        multiprocessing.set_start_method(before, force=True)
    assert multiprocessing.get_start_method() == before
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 1


def test_lower_backbone_lr_uses_two_parameter_groups(tmp_path):
    from ftdeploy.models import build_model
    from ftdeploy.training import make_optimizer

    cfg = tiny_config(tmp_path / "x", "train.mode=full_lower_backbone_lr", "train.backbone_lr_scale=0.1",
                      "train.optimizer=sgd")
    built = build_model(cfg.model, 3)
    opt = make_optimizer(cfg, built)
    assert isinstance(opt, torch.optim.SGD)
    head, backbone = opt.param_groups
    assert head["lr"] == pytest.approx(0.01) and backbone["lr"] == pytest.approx(0.001)
    assert len(head["params"]) == 2 and len(backbone["params"]) == len(list(built.model.parameters())) - 2


def test_cosine_schedule_warms_up_then_decays():
    from ftdeploy.training import lr_lambda

    f = lr_lambda(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_batchnorm_statistics_are_re_estimated_as_a_plain_average():
    """A BatchNorm with torchvision MobileNetV3's momentum (0.01) barely moves in a few steps; the
    re-estimation replaces its running statistics by the average over the given batches."""
    from accelerate import Accelerator

    from ftdeploy.training import reestimate_batchnorm

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1, bias=False), torch.nn.BatchNorm2d(2, momentum=0.01))
    torch.nn.init.ones_(model[0].weight)
    # batches as the loop gets them from the task's collation: ((inputs, ...), labels)
    batches = [((torch.full((4, 1, 3, 3), float(v)) + torch.randn(4, 1, 3, 3),), torch.zeros(4)) for v in (4, 6, 8)]
    model.train()
    model(*batches[0][0])
    assert model[1].running_mean[0] < 0.1  # one step at momentum 0.01
    assert reestimate_batchnorm(Accelerator(cpu=True), model, batches, batches=2)
    expected = torch.stack([x.mean() for (x,), _ in batches[:2]]).mean()
    assert model[1].running_mean[0] == pytest.approx(float(expected), rel=1e-5)
    assert model[1].momentum == 0.01 and not model.training
    assert not reestimate_batchnorm(Accelerator(cpu=True), torch.nn.Linear(2, 2), batches, batches=2)


@pytest.mark.slow
def test_briefly_trained_mobilenet_v3_evaluates_with_its_re_estimated_statistics(tmp_path):
    """torchvision's MobileNetV3 (BatchNorm momentum 0.01) trained from scratch for a few steps: its
    running statistics lag far behind. `auto` re-estimates them and keeps the result only where it
    does not lose accuracy: the saved model is never worse than without, and reports what it scores."""
    extra = ["model.name=torchvision:mobilenet_v3_small", "train.epochs=2"]
    never = train(tiny_config(tmp_path / "never", *extra, "train.bn_reestimate=never"))
    auto = train(tiny_config(tmp_path / "auto", *extra))
    never_metrics, auto_metrics = (json.loads((d / "metrics.json").read_text()) for d in (never, auto))
    assert (never_metrics["bn_reestimate"]["policy"], never_metrics["bn_reestimate"]["applied"]) == ("never", False)
    assert auto_metrics["bn_reestimate"]["val_metric_before"] == never_metrics["val_metric"]  # same training
    assert fresh_accuracy(auto) == auto_metrics["val_metric"] >= fresh_accuracy(never)
    bn = lambda run: next(m for m in load_run(run).load_model().modules() if isinstance(m, torch.nn.BatchNorm2d))  # noqa: E731
    assert bn(auto).momentum == 0.01  # the architecture's own momentum is back for further training
    stats_differ = not np.allclose(bn(auto).running_mean.numpy(), bn(never).running_mean.numpy())
    assert stats_differ == auto_metrics["bn_reestimate"]["applied"]  # kept statistics are new ones


class AutocastSeen:
    """What autocast was inside the model's forward during training: a hook on the head, placed at
    the first batch (the loop's own forward, wherever Accelerate wraps the model)."""

    def __init__(self):
        self.dtypes: set = set()
        self.hook = None

    def record(self, *_):
        self.dtypes.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)

    def on_train_batch(self, state, batch):
        if self.hook is None:
            self.hook = state.model.fc.register_forward_hook(self.record)


def launched(tmp_path, monkeypatch, launcher: str, *overrides: str) -> tuple[dict, set]:
    """Train the shipped digits config (on the tiny model and data) as ``accelerate launch
    --mixed_precision <launcher>`` leaves the process: ACCELERATE_MIXED_PRECISION set."""
    from ftdeploy.config import load_config

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    cfg = load_config(REPO / "configs/digits.yaml", TINY + ["preprocessing.resize_size=16", "train.epochs=1",
                                                            f"output_dir={tmp_path / 'run'}", *overrides])
    seen = AutocastSeen()
    out = train(cfg, callbacks=[seen])
    return json.loads((out / "metrics.json").read_text()), seen.dtypes


def test_the_launchers_precision_is_the_one_that_trains(tmp_path, monkeypatch):
    """The shipped configs leave train.mixed_precision unset, so the launcher's bf16 is what runs
    (the configs' old "no" silently overrode it: fp32 in the loop, "no" in metrics.json)."""
    metrics, dtypes = launched(tmp_path, monkeypatch, "bf16")
    assert dtypes == {torch.bfloat16}
    assert metrics["mixed_precision"] == "bf16" and metrics["mixed_precision_configured"] is None


def test_a_precision_set_in_the_config_wins_and_says_so(tmp_path, monkeypatch, caplog):
    metrics, dtypes = launched(tmp_path, monkeypatch, "bf16", "train.mixed_precision=no")
    assert dtypes == {torch.float32}
    assert metrics["mixed_precision"] == "no" and metrics["mixed_precision_configured"] == "no"
    assert [r.getMessage() for r in caplog.records if "overrides the launcher" in r.getMessage()] == [
        "train.mixed_precision=no overrides the launcher's bf16 (unset it to follow the launcher)"]
