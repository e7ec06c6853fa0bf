import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, tiny_config

SIZE = ["data.num_samples=80", "data.batch_size=8"]  # 64 training images: 4 batches per rank, none left over


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
@pytest.mark.slow
def test_two_cpu_processes_train_data_parallel(tmp_path):
    """2 ranks on gloo: each is fed its own half of every epoch and both end with the same weights."""
    out = tmp_path / "ddp"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29517",
                             str(REPO / "tests" / "dist_worker.py"), str(out), *SIZE],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["weights"] and ranks[0]["weights"] == ranks[1]["weights"]

    from ftdeploy.data import build_datasets
    from ftdeploy.training import resolve_preprocessing
    from ftdeploy.models import build_model

    cfg = tiny_config(out, *SIZE)
    spec = resolve_preprocessing(cfg.preprocessing, build_model(cfg.model, None).defaults)
    train_set = build_datasets(cfg.data, spec).train
    everything = {hashlib.sha1(train_set[i][0].numpy().tobytes()).hexdigest() for i in range(len(train_set))}
    for epoch in ("1", "2"):
        a, b = (set(r["images"][epoch]) for r in ranks)
        assert len(a) == len(ranks[0]["images"][epoch]) == len(train_set) // 2  # no repeats within a rank
        assert a.isdisjoint(b) and a | b == everything
    assert ranks[0]["images"]["1"] != ranks[0]["images"]["2"]  # reshuffled each epoch
    assert json.loads((out / "metrics.json").read_text())["num_processes"] == 2
