"""Stage ``train``: the config's data -> a run directory holding the fine-tuned model.

``python -m ftdeploy.train`` is the same entry point as ``ftdeploy train``, so
``accelerate launch -m ftdeploy.train --config configs/digits.yaml`` runs it on every process.

Example::

    from ftdeploy.config import load_config
    cfg = load_config("configs/digits.yaml", ["train.epochs=1"])
    run_dir = train(cfg, "runs/quick")
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..config import PipelineConfig
from ..rundir import manifest, write_manifest
from ..training import Callback, Job, fine_tune, make_accelerator, setup, start


def train(cfg: PipelineConfig, output_dir: str | Path | None = None, resume: bool = False,
          callbacks: Iterable[Callback] = ()) -> Path:
    """Fine-tune ``cfg.model`` on ``cfg.data`` into ``output_dir`` (default ``cfg.output_dir``).

    ``resume`` continues from ``output_dir/checkpoints/last`` exactly where it stopped.
    """
    from accelerate.utils import set_seed

    out = Path(output_dir or cfg.output_dir)
    # what the run stores of its inputs names them wherever it is read from: data and a starting
    # checkpoint (or run) as absolute paths
    weights = Path(cfg.model.weights)
    model = cfg.model.model_copy(update={"weights": str(weights.absolute())}) if weights.exists() else cfg.model
    cfg = cfg.model_copy(update={"output_dir": out, "data": cfg.data.resolved(), "model": model})
    accelerator = make_accelerator(cfg, out)
    set_seed(cfg.train.seed)  # before the model is built: a fresh head (or model) is initialized at random
    built, spec, parent = start(cfg)
    splits = setup(cfg, out, built, spec, accelerator)
    fine_tune(Job(cfg, out, built, spec, splits), accelerator, resume, callbacks)
    if accelerator.is_main_process:
        data = {"name": splits.name, "root": str(cfg.data.root) if cfg.data.root else None, "train": len(splits.train),
                "val": len(splits.val), "skipped": len(splits.skipped)}
        write_manifest(out, manifest("train", parent, config=cfg, data=data))
    accelerator.wait_for_everyone()  # the next stage reads the finished directory on every process
    return out
