import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_config
from ftdeploy.rundir import load_run
from ftdeploy.train import train


def test_training_learns_and_writes_the_run_directory(tiny_run):
    for name in ("model.safetensors", "model.json", "config.yaml", "classes.json", "preprocessing.json",
                 "metrics.json", "metrics.jsonl", "metrics.csv", "manifest.json", "training_curves.png"):
        assert (tiny_run / name).is_file(), name
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    assert metrics["val_accuracy"] >= 0.9  # 3 well separated classes; chance is 0.33
    assert metrics["train_images_per_second"] > 0
    bn = metrics["bn_reestimate"]  # kept only when validation accuracy does not drop
    assert bn["applied"] == (bn["val_accuracy_after"] >= bn["val_accuracy_before"])
    assert len((tiny_run / "metrics.jsonl").read_text().splitlines()) == 2
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["stage"] == "train" and "torch" in manifest["versions"]
    assert json.loads((tiny_run / "classes.json").read_text()) == ["class_0", "class_1", "class_2"]


@pytest.mark.slow
def test_reloaded_run_predicts_the_same_in_a_new_process(tiny_run, tmp_path):
    run = load_run(tiny_run)
    x = torch.randn(5, 3, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    expected = run.load_model()(x)
    code = (f"import torch; from ftdeploy.rundir import load_run; "
            f"x = torch.load({str(tmp_path / 'x.pt')!r}); "
            f"torch.save(load_run({str(tiny_run)!r}).load_model()(x), {str(tmp_path / 'y.pt')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


class CrashAfter:
    def __init__(self, epochs):
        self.epochs = epochs

    def on_epoch_end(self, state):
        if state.epoch + 1 == self.epochs:
            raise KeyboardInterrupt("simulated crash")


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    extra = ["train.epochs=3", "model.name=torchvision:mobilenet_v3_small"]  # has dropout: RNG state matters
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


def test_head_mode_trains_only_the_head_on_cached_features(tmp_path):
    from ftdeploy.models import build_model

    cfg = tiny_config(tmp_path / "head", "train.mode=head", "train.lr=0.05")
    torch.manual_seed(cfg.train.seed)
    before = build_model(cfg.model, None).model.state_dict()
    out = train(cfg)
    after = load_run(out).load_model().state_dict()
    changed = {k for k in after if k in before and before[k].shape == after[k].shape and not torch.equal(before[k], after[k])}
    assert changed == set()  # backbone weights and BN statistics untouched
    assert json.loads((out / "metrics.json").read_text())["val_accuracy"] >= 0.9


def test_lower_backbone_lr_uses_two_parameter_groups(tmp_path):
    from ftdeploy.models import build_model
    from ftdeploy.training import make_optimizer

    cfg = tiny_config(tmp_path / "x", "train.mode=full_lower_backbone_lr", "train.backbone_lr_scale=0.1",
                      "train.optimizer=sgd")
    built = build_model(cfg.model, 3)
    opt = make_optimizer(cfg, built)
    assert isinstance(opt, torch.optim.SGD)
    head, backbone = opt.param_groups
    assert head["lr"] == pytest.approx(0.003) and backbone["lr"] == pytest.approx(0.0003)
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
    batches = [(torch.full((4, 1, 3, 3), float(v)) + torch.randn(4, 1, 3, 3), torch.zeros(4)) for v in (4, 6, 8)]
    model.train()
    model(batches[0][0])
    assert model[1].running_mean[0] < 0.1  # one step at momentum 0.01
    assert reestimate_batchnorm(Accelerator(cpu=True), model, batches, batches=2)
    expected = torch.stack([x.mean() for x, _ in batches[:2]]).mean()
    assert model[1].running_mean[0] == pytest.approx(float(expected), rel=1e-5)
    assert model[1].momentum == 0.01 and not model.training
    assert not reestimate_batchnorm(Accelerator(cpu=True), torch.nn.Linear(2, 2), batches, batches=2)


@pytest.mark.slow
def test_briefly_trained_mobilenet_v3_evaluates_with_its_re_estimated_statistics(tmp_path):
    """torchvision's MobileNetV3 trained from scratch for a few steps: with `auto` the statistics are
    re-estimated and kept only when validation accuracy does not drop."""
    extra = ["model.name=torchvision:mobilenet_v3_small", "train.epochs=2"]
    never = json.loads((train(tiny_config(tmp_path / "never", *extra, "train.bn_reestimate=never")) / "metrics.json")
                       .read_text())
    auto = json.loads((train(tiny_config(tmp_path / "auto", *extra)) / "metrics.json").read_text())
    assert never["bn_reestimate"] == {"policy": "never", "applied": False}
    record = auto["bn_reestimate"]
    assert record["val_accuracy_before"] == never["val_accuracy"]  # the same training up to that point
    assert auto["val_accuracy"] == max(record["val_accuracy_before"], record["val_accuracy_after"])
    assert record["applied"] == (record["val_accuracy_after"] >= record["val_accuracy_before"])
    model = load_run(tmp_path / "auto").load_model()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.momentum == 0.01  # the architecture's own momentum is back for further training
