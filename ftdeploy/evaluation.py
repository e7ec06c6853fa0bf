"""Shared evaluation: a run's data split once, batched inference, PyTorch and ONNX predictors,
accuracy and parity. Every stage that judges a model (export, quantize, prune, the usability report)
measures it here, the same way.

>>> logits = np.array([[2.0, 0.1], [0.3, 0.9]])
>>> accuracy(logits, np.array([0, 0]))
0.5
>>> parity(logits, logits)["top1_agreement"]
1.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .rundir import Run

Predictor = Callable[[np.ndarray], np.ndarray]


@dataclass
class EvalData:
    """Validation images (inputs, labels) and a seeded sample of training images for calibration,
    preprocessed as in training and without augmentation. Built once per stage: building an image
    folder decodes every file."""

    inputs: np.ndarray
    labels: np.ndarray
    calibration: np.ndarray
    dataset: str

    @classmethod
    def from_run(cls, run: Run, val_limit: int = 2000, calibration_samples: int = 256) -> "EvalData":
        from .data import build_datasets

        splits = build_datasets(run.config.data.model_copy(update={"augment": False}), run.preprocessing)
        inputs, labels = split_arrays(splits.val, val_limit)
        calibration, _ = split_arrays(splits.train, calibration_samples, shuffle=True)
        return cls(inputs, labels, calibration, splits.name)


def split_arrays(ds, limit: int, shuffle: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``limit`` items of a dataset as (inputs, labels) arrays (a seeded random subset when shuffled)."""
    order = np.random.default_rng(0).permutation(len(ds)) if shuffle else np.arange(len(ds))
    xs, ys = zip(*(ds[int(i)] for i in order[:limit]))
    return np.stack([np.asarray(x) for x in xs]).astype(np.float32), np.asarray(ys)


def batched(fn: Predictor, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([fn(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])


def logits_at_batch_sizes(predict: Predictor, inputs: np.ndarray, batch_sizes: list[int]) -> list[np.ndarray]:
    return [batched(predict, inputs, bs) for bs in batch_sizes]


def torch_predictor(model) -> Predictor:
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return run


def onnx_predictor(session) -> Predictor:
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Logit agreement of two models on the same inputs."""
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    num = (reference * candidate).sum(-1)
    den = np.linalg.norm(reference, axis=-1) * np.linalg.norm(candidate, axis=-1)
    cosine = num / np.maximum(den, 1e-12)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "cosine": float(cosine.mean()),
            "min_cosine": float(cosine.min()),
            "top1_agreement": float((reference.argmax(-1) == candidate.argmax(-1)).mean())}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == labels).mean())
