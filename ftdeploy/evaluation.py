"""Shared evaluation: a run's data split once, batched inference through the task, PyTorch and ONNX
predictors, scores and the float64-grounded parity gate. Every stage that judges a model (train,
export, quantize, prune, optimize, the usability report) measures it here, the same way: raw outputs
joined by the task, postprocessed by the task, judged by the task's metric.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import DataConfig
from .onnx_model import batch_dependent, session_outputs
from .records import ParityRecord
from .rundir import ExportDir, Run
from .tasks import Decisions, Outputs, Scores, Task, feeds
from .tasks.base import Predictor, output_errors


@dataclass
class EvalData:
    """Validation inputs and targets, and a seeded sample of training inputs for calibration,
    preprocessed as in training and without augmentation, batched by the run's task (image arrays,
    token ids). ``bench`` is the validation inputs at the shape latency is declared for; ``info`` is
    what the task's postprocess needs of the run (its classes). Built once per stage: building an
    image folder decodes every file."""

    inputs: Any
    targets: Any
    calibration: Any
    dataset: str
    task: Task
    bench: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, data: DataConfig, spec: Any, task: Task, info: dict[str, Any], val_limit: int = 2000,
             calibration_samples: int = 256) -> "EvalData":
        from .data import build_datasets

        splits = build_datasets(data.model_copy(update={"augment": False, "max_train_samples": None}), spec)
        inputs, targets = split_arrays(splits.val, val_limit, task)
        calibration, _ = split_arrays(splits.train, calibration_samples, task, shuffle=True)
        return cls(inputs, targets, calibration, splits.name, task, task.bench_inputs(inputs, spec), info)

    @classmethod
    def from_run(cls, run: Run, val_limit: int = 2000, calibration_samples: int = 256) -> "EvalData":
        return cls.load(run.config.data, run.preprocessing, run.task, run.info, val_limit, calibration_samples)

    @classmethod
    def from_export(cls, export: ExportDir, val_limit: int = 2000, calibration_samples: int = 256) -> "EvalData":
        """The data of the run an export directory came from, read from the directory itself."""
        return cls.load(export.data, export.preprocessing, export.task, export.info, val_limit, calibration_samples)

    def __len__(self) -> int:
        return len(self.inputs)

    def head(self, n: int) -> "EvalData":
        """The first ``n`` validation examples (the same ones every stage takes first)."""
        from dataclasses import replace

        return replace(self, inputs=self.inputs[:n], targets=self.targets[:n])

    def outputs(self, predict: Predictor, batch_size: int = 32) -> Outputs:
        return self.task.outputs(predict, self.inputs, batch_size)

    def score(self, outputs: Outputs) -> Scores:
        """The task's scores of outputs on these validation examples."""
        return self.task.evaluate(outputs, self.inputs, self.targets, self.info)


def held_out_test(data: DataConfig, spec: Any, task: Task) -> tuple[Any, Any] | None:
    """The held-out test split (``data.test_fraction``) as (inputs, targets), or None without one."""
    from .data import build_datasets

    splits = build_datasets(data.model_copy(update={"augment": False, "max_train_samples": None}), spec)
    return split_arrays(splits.test, len(splits.test), task) if splits.test is not None else None


def split_arrays(ds, limit: int, task: Task, shuffle: bool = False) -> tuple[Any, Any]:
    """Up to ``limit`` items of a dataset as (inputs batched by ``task``, targets stacked by it) (a
    seeded random subset when shuffled)."""
    order = np.random.default_rng(0).permutation(len(ds)) if shuffle else np.arange(len(ds))
    xs, ys = zip(*(ds[int(i)] for i in order[:limit]))
    return task.stack(list(xs)), task.stack_targets(list(ys))


def as_outputs(result) -> Outputs:
    """A PyTorch model's return value (a tensor, or a tuple or list of them) as raw outputs."""
    items = result if isinstance(result, (tuple, list)) else (result,)
    return [t.detach().float().cpu().numpy() for t in items]


def torch_predictor(model, input_names: list[str] | tuple[str, ...] = ("input",), device=None, autocast=None
                    ) -> Predictor:
    """A PyTorch model as a predictor; ``input_names``: its arguments, in order. ``device`` and
    ``autocast`` (a context manager factory, e.g. Accelerate's) run it where training runs it."""
    import contextlib

    import torch

    def run(x) -> Outputs:
        args = [torch.from_numpy(a) for a in feeds(x, input_names).values()]
        if device is not None:
            args = [a.to(device) for a in args]
        with torch.inference_mode(), (autocast() if autocast else contextlib.nullcontext()):
            return as_outputs(model(*args))

    return run


def onnx_predictor(session) -> Predictor:
    """An onnxruntime session as a predictor; a batch-dependent file (dynamic INT8) answers each
    example alone, as serving runs it."""
    names, alone = [i.name for i in session.get_inputs()], batch_dependent(session)
    return lambda x: session_outputs(session, names, x, alone)


def reference_outputs(model, inputs: Any, task: Task, input_names: list[str] | tuple[str, ...] = ("input",),
                      batch_size: int = 64) -> Outputs:
    """The PyTorch model's outputs computed in float64 (on a copy): the yardstick both float32 answers,
    PyTorch's and onnxruntime's, are measured against."""
    import copy

    import torch

    double = copy.deepcopy(model).double().eval()

    def run(x) -> Outputs:  # float inputs in float64; token ids stay integers
        args = [torch.from_numpy(a) for a in feeds(x, input_names).values()]
        with torch.inference_mode():
            result = double(*(a.double() if a.is_floating_point() else a for a in args))
        items = result if isinstance(result, (tuple, list)) else (result,)
        return [t.numpy() for t in items]

    return task.outputs(run, inputs, batch_size)


@dataclass
class ParitySet:
    """One input set of the FP32 gate: its inputs, the float64 reference and both float32 answers at
    every batch size compared."""

    inputs: Any
    reference: Outputs
    torch32: list[Outputs]
    onnx32: list[Outputs]


def fp32_parity(task: Task, sets: list[ParitySet], error_ratio: float, atol: float,
                info: dict[str, Any] | None = None) -> ParityRecord:
    """Is the ONNX file as exact as PyTorch itself? Both float32 answers are measured against the
    float64 reference: the file passes when its largest error is at most ``error_ratio`` x PyTorch
    float32's own plus ``atol``, and the task's decisions (top-1, detections, tags) differ only where
    the reference is inside both errors (a near-tie has no right answer: counted, excused).

    >>> from ftdeploy.tasks.classification import ClassifierOutputs
    >>> ref = [np.array([[1.0, 0.999999], [3.0, 0.0]])]
    >>> t, o = [ref[0] + [[2e-6, 0.0], [1e-6, 0.0]]], [ref[0] + [[-2e-6, 0.0], [2e-6, 0.0]]]
    >>> r = fp32_parity(ClassifierOutputs(), [ParitySet(None, ref, [t], [o])], 4.0, 1e-6)
    >>> r.decision_agreement, r.disagreements_counted, r.near_ties, r.passed
    (0.5, 0, 1, True)
    """
    torch_error = max(output_errors(s.reference, t)[0] for s in sets for t in s.torch32)
    onnx_error = max(output_errors(s.reference, o)[0] for s in sets for o in s.onnx32)
    between = [output_errors(t, o) for s in sets for t, o in zip(s.torch32, s.onnx32)]
    decisions: Decisions = sum((task.decisions(s.reference, t, o, s.inputs, info or {}) for s in sets
                                for t, o in zip(s.torch32, s.onnx32)), Decisions(task.decision, 0, 1.0, 0, 0))
    bound = error_ratio * torch_error + atol
    return ParityRecord(torch_fp32_error=torch_error, onnx_error=onnx_error,
                        error_ratio=onnx_error / torch_error if torch_error else None, allowed_error=bound,
                        worst_tolerance_fraction=onnx_error / bound, max_abs_diff=max(b[0] for b in between),
                        mean_abs_diff=float(np.mean([b[1] for b in between])), decision=decisions.name,
                        decision_agreement=decisions.agreement, decisions_compared=decisions.compared,
                        disagreements_counted=decisions.counted, near_ties=decisions.excused,
                        passed=bool(onnx_error <= bound and decisions.counted == 0))
