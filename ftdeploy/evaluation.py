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
from typing import Any, Callable

import numpy as np

from .config import DataConfig
from .onnx_model import batch_dependent, session_logits
from .rundir import ExportDir, Run
from .tasks import Task, feeds
from .tasks.base import batched

Predictor = Callable[[Any], np.ndarray]  # a batch of inputs (sliced from EvalData.inputs) -> logits


@dataclass
class EvalData:
    """Validation inputs and labels, and a seeded sample of training inputs for calibration,
    preprocessed as in training and without augmentation, batched by the run's task (image arrays,
    token ids). ``bench`` is the validation inputs at the shape latency is declared for. Built once
    per stage: building an image folder decodes every file."""

    inputs: Any
    labels: np.ndarray
    calibration: Any
    dataset: str
    bench: Any = None

    @classmethod
    def load(cls, data: DataConfig, spec: Any, task: Task, val_limit: int = 2000,
             calibration_samples: int = 256) -> "EvalData":
        from .data import build_datasets

        splits = build_datasets(data.model_copy(update={"augment": False, "max_train_samples": None}), spec)
        inputs, labels = split_arrays(splits.val, val_limit, task)
        calibration, _ = split_arrays(splits.train, calibration_samples, task, shuffle=True)
        return cls(inputs, labels, calibration, splits.name, task.bench_inputs(inputs, spec))

    @classmethod
    def from_run(cls, run: Run, val_limit: int = 2000, calibration_samples: int = 256) -> "EvalData":
        return cls.load(run.config.data, run.preprocessing, run.task, val_limit, calibration_samples)

    @classmethod
    def from_export(cls, export: ExportDir, val_limit: int = 2000, calibration_samples: int = 256) -> "EvalData":
        """The data of the run an export directory came from, read from the directory itself."""
        return cls.load(export.data, export.preprocessing, export.task, val_limit, calibration_samples)


def held_out_test(data: DataConfig, spec: Any, task: Task) -> tuple[Any, np.ndarray] | None:
    """The held-out test split (``data.test_fraction``) as (inputs, labels), or None without one."""
    from .data import build_datasets

    splits = build_datasets(data.model_copy(update={"augment": False, "max_train_samples": None}), spec)
    return split_arrays(splits.test, len(splits.test), task) if splits.test is not None else None


def split_arrays(ds, limit: int, task: Task, shuffle: bool = False) -> tuple[Any, np.ndarray]:
    """Up to ``limit`` items of a dataset as (inputs batched by ``task``, labels) (a seeded random
    subset when shuffled)."""
    order = np.random.default_rng(0).permutation(len(ds)) if shuffle else np.arange(len(ds))
    xs, ys = zip(*(ds[int(i)] for i in order[:limit]))
    return task.stack(list(xs)), np.asarray(ys)


def logits_at_batch_sizes(predict: Predictor, inputs: Any, batch_sizes: list[int]) -> list[np.ndarray]:
    return [batched(predict, inputs, bs) for bs in batch_sizes]


def torch_predictor(model, input_names: list[str] | tuple[str, ...] = ("input",)) -> Predictor:
    """A PyTorch model as a predictor; ``input_names``: its arguments, in order."""
    import torch

    def run(x) -> np.ndarray:
        with torch.inference_mode():
            return model(*(torch.from_numpy(a) for a in feeds(x, input_names).values())).numpy()

    return run


def onnx_predictor(session) -> Predictor:
    """An onnxruntime session as a predictor; a batch-dependent file (dynamic INT8) answers each
    example alone, as serving runs it."""
    names, alone = [i.name for i in session.get_inputs()], batch_dependent(session)
    return lambda x: session_logits(session, names, x, alone)


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


def reference_logits(model, inputs: Any, input_names: list[str] | tuple[str, ...] = ("input",),
                     batch_size: int = 64) -> np.ndarray:
    """The PyTorch model's logits computed in float64 (on a copy): the yardstick both float32 answers,
    PyTorch's and onnxruntime's, are measured against."""
    import copy

    import torch

    double = copy.deepcopy(model).double().eval()

    def run(x) -> np.ndarray:  # float inputs in float64; token ids stay integers
        args = [torch.from_numpy(a) for a in feeds(x, input_names).values()]
        with torch.inference_mode():
            return double(*(a.double() if a.is_floating_point() else a for a in args)).numpy()

    return batched(run, inputs, batch_size)


def fp32_parity(reference: np.ndarray, torch32: np.ndarray, onnx32: np.ndarray, error_ratio: float,
                atol: float) -> dict[str, float]:
    """Is the ONNX file as exact as PyTorch itself? Both float32 answers are measured against the
    float64 ``reference`` (rows repeat it when the answers were computed at several batch sizes):
    the file passes when its largest error is at most ``error_ratio`` x PyTorch float32's own plus
    ``atol``. A top-1 disagreement between the two counts only where the reference's top-2 margin
    exceeds both errors on that input: a near-tie inside float32 noise has no right answer.

    >>> ref = np.array([[1.0, 0.999999], [3.0, 0.0]])
    >>> torch32, onnx32 = ref + [[2e-6, 0.0], [1e-6, 0.0]], ref + [[-2e-6, 0.0], [2e-6, 0.0]]
    >>> r = fp32_parity(ref, torch32, onnx32, error_ratio=4.0, atol=1e-6)
    >>> r["top1_agreement"], r["top1_disagreements_counted"], r["passed"]
    (0.5, 0, True)
    """
    reps = len(torch32) // len(reference)
    reference = np.concatenate([reference] * reps).astype(np.float64)
    err_torch = np.abs(torch32.astype(np.float64) - reference)
    err_onnx = np.abs(onnx32.astype(np.float64) - reference)
    torch_error, onnx_error = float(err_torch.max()), float(err_onnx.max())
    bound = error_ratio * torch_error + atol
    top2 = np.sort(reference, -1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    disagree = torch32.argmax(-1) != onnx32.argmax(-1)
    counted = disagree & (margin > np.maximum(err_torch.max(-1), err_onnx.max(-1)))
    return {**parity(torch32, onnx32), "reference": "torch", "error_reference": "torch float64",
            "torch_fp32_error": torch_error,
            "onnx_error": onnx_error, "error_ratio": onnx_error / torch_error if torch_error else None,
            "allowed_error": bound, "worst_tolerance_fraction": onnx_error / bound,
            "near_ties": int((disagree & ~counted).sum()), "top1_disagreements_counted": int(counted.sum()),
            "passed": bool(onnx_error <= bound and not counted.any())}
