import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_config
from dist_worker import HEAD
from ftdeploy.rundir import load_run
from ftdeploy.train import train

SIZE = ["data.num_samples=80", "data.batch_size=8"]  # 64 training images: 4 batches per rank, none left over
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """One torchrun launch, 2 ranks on gloo (a free port from the OS): a data-parallel run (ddp/), then
    a head-mode run whose frozen backbone runs every step (head/)."""
    if not TORCHRUN.exists():
        pytest.skip("torchrun not installed")
    out = tmp_path_factory.mktemp("two-ranks")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2",
                             str(REPO / "tests" / "dist_worker.py"), str(out), *SIZE],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_cpu_processes_train_data_parallel(two_ranks):
    """Each rank is fed its own half of every epoch and both end with the same weights."""
    out = two_ranks / "ddp"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["weights"] and ranks[0]["weights"] == ranks[1]["weights"]

    from ftdeploy.data import build_datasets
    from ftdeploy.models import build_model
    from ftdeploy.preprocessing import resolve_preprocessing

    cfg = tiny_config(out, *SIZE)
    spec = resolve_preprocessing(cfg.preprocessing, build_model(cfg.model, None).defaults)
    train_set = build_datasets(cfg.data, spec).train
    everything = {hashlib.sha1(train_set[i][0].tobytes()).hexdigest() for i in range(len(train_set))}
    for epoch in ("1", "2"):
        a, b = (set(r["images"][epoch]) for r in ranks)
        assert len(a) == len(ranks[0]["images"][epoch]) == len(train_set) // 2  # no repeats within a rank
        assert a.isdisjoint(b) and a | b == everything
    assert ranks[0]["images"]["1"] != ranks[0]["images"]["2"]  # reshuffled each epoch
    assert json.loads((out / "metrics.json").read_text())["num_processes"] == 2


@pytest.mark.slow
def test_frozen_batchnorm_statistics_stay_put_in_one_process_and_in_two(two_ranks, tmp_path):
    """Head mode without cached features: the frozen backbone runs every step, and its BatchNorm
    statistics stay as they were, whether one process trains or two (DDP wraps the model)."""
    single = train(tiny_config(tmp_path / "single", *SIZE, *HEAD))
    assert json.loads((two_ranks / "head" / "metrics.json").read_text())["num_processes"] == 2
    for run in (single, two_ranks / "head"):
        stats = {k: v for k, v in load_run(run).load_model().state_dict().items() if "running_" in k}
        means = [v for k, v in stats.items() if k.endswith("running_mean")]
        variances = [v for k, v in stats.items() if k.endswith("running_var")]
        assert means and all(torch.equal(m, torch.zeros_like(m)) for m in means), run  # as initialized
        assert all(torch.equal(v, torch.ones_like(v)) for v in variances), run
