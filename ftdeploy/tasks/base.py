"""The task seam: the interface every task implements, from what a model takes in to what it gives
out, and the numpy helpers that every task's outputs go through. Torch-free: the server uses it.

A batch of inputs is whatever the task's :meth:`Task.stack` makes of dataset items: a float array
for images, a :class:`~ftdeploy.tasks.text.Tokens` for text. Stages slice it (``inputs[a:b]``,
``inputs[index_array]``), take its ``len`` and hand it to :func:`feeds`; nothing else.

What a model gives back is *raw outputs*: a list of arrays, one per model output, in the order of
:attr:`Task.output_names`. The task joins the outputs of batches into the outputs of a set
(:meth:`Task.join`: their shapes never depend on how the set was batched), turns them into
predictions (:meth:`Task.postprocess`), judges those (:meth:`Task.score`: a named primary figure,
higher is better, and secondary ones), and compares two models' outputs (:meth:`Task.decisions` for
the float64-grounded parity gate, :meth:`Task.agreement` for a variant against its reference). A
stage speaks of "the metric" and its drop in points; it never looks inside outputs or predictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

Outputs = list  # raw outputs of one batch or one set: np.ndarray per model output, in output order
Predictor = Callable[[Any], Outputs]  # a batch of inputs -> its raw outputs


def feeds(batch: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``batch`` gives the model inputs ``names``: a float array is an image model's one
    input; any other batch (token ids) makes its own arrays, padded, and keeps the names asked for.

    >>> list(feeds(np.zeros((2, 3, 8, 8), np.float32), ["input"]))
    ['input']
    """
    if isinstance(batch, np.ndarray):
        return {names[0]: batch}
    return batch.feeds(names)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def tile(samples: Any, batch_size: int) -> Any:
    """A batch of ``batch_size`` real samples (repeated when there are fewer).

    >>> tile(np.arange(3), 7).tolist()
    [0, 1, 2, 0, 1, 2, 0]
    """
    out = samples[np.arange(batch_size) % len(samples)]
    return np.ascontiguousarray(out) if isinstance(out, np.ndarray) else out


def concat(batches: list) -> Any:
    """Batches of one task's inputs as one batch (the server's micro-batches)."""
    if isinstance(batches[0], np.ndarray):
        return np.concatenate(batches)
    return type(batches[0]).concat(batches)


def padded_concat(arrays: list[np.ndarray]) -> np.ndarray:
    """Arrays concatenated on the first axis, each padded with zeros to the largest on the others.

    >>> padded_concat([np.ones((1, 2)), np.ones((1, 3))]).tolist()
    [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    """
    shape = np.max([a.shape[1:] for a in arrays], axis=0)
    return np.concatenate([np.pad(a, [(0, 0)] + [(0, int(s - d)) for s, d in zip(shape, a.shape[1:])]) for a in arrays])


def slice_outputs(outputs: Outputs, start: int, stop: int) -> Outputs:
    """The raw outputs of examples ``start:stop`` of a batch (the batch axis is every output's first)."""
    return [o[start:stop] for o in outputs]


@dataclass
class Scores:
    """A task's judgement of predictions: every figure by name (rates in 0..1, higher is better) and
    which one is primary: the one budgets, the best epoch and the choice of a variant judge.

    >>> s = Scores("accuracy", {"accuracy": 0.9, "macro_f1": 0.85})
    >>> s.value, round(s.points_below(Scores("accuracy", {"accuracy": 0.95, "macro_f1": 0.9})), 6)
    (0.9, 5.0)
    >>> round(s.points_below(Scores("accuracy", {"accuracy": 0.95, "macro_f1": 0.9}), "macro_f1"), 6)
    5.0
    """

    primary: str
    values: dict[str, float]

    @property
    def value(self) -> float:
        return self.values[self.primary]

    def get(self, name: str | None = None) -> float:
        """The figure ``name`` (None: the primary); an unknown name lists the known ones."""
        from ..errors import ConfigError

        name = name or self.primary
        if name not in self.values:
            raise ConfigError(f"unknown metric {name!r}", f"this task reports {', '.join(self.values)}")
        return self.values[name]

    def points_below(self, reference: "Scores", name: str | None = None) -> float:
        """How many points (100 x the rate) this is below ``reference`` on ``name`` (default: the primary)."""
        return 100 * (reference.get(name) - self.get(name))


@dataclass
class Decisions:
    """Where two float32 answers (PyTorch's and the file's) decide differently, judged against the
    float64 answer: a disagreement counts only where the float64 answer is clear by more than both
    errors (a near-tie inside float32 noise has no right answer, and is excused)."""

    name: str  # what is decided: "top-1", "detections", "tags"
    compared: int
    agreement: float  # share of the compared decisions that agree
    counted: int  # disagreements where the float64 answer is clear: a failure
    excused: int  # disagreements inside both errors (near-ties)

    def __add__(self, other: "Decisions") -> "Decisions":
        n = self.compared + other.compared
        agree = (self.agreement * self.compared + other.agreement * other.compared) / max(1, n)
        return Decisions(self.name, n, agree, self.counted + other.counted, self.excused + other.excused)


def output_errors(reference: Outputs, candidate: Outputs) -> tuple[float, float]:
    """(largest, mean) absolute difference over every output array."""
    diffs = [np.abs(r.astype(np.float64) - c.astype(np.float64)) for r, c in zip(reference, candidate)]
    return float(max(d.max() for d in diffs)), float(np.mean(np.concatenate([d.ravel() for d in diffs])))


def row_errors(reference: Outputs, candidate: Outputs) -> np.ndarray:
    """The largest absolute difference per example (the first axis), over every output."""
    per = [np.abs(r.astype(np.float64) - c.astype(np.float64)).reshape(len(r), -1).max(1)
           for r, c in zip(reference, candidate)]
    return np.max(per, axis=0)


class UsabilitySuite(Protocol):
    """What the usability report asks of a task: validation inputs (clean and corrupted, seeded),
    the task's own judgement of a variant's outputs on those inputs (a corruption may change the
    targets with the inputs: word dropout drops a word's tag), saliency through any predictor, the
    latency grid, and the HTML sections that show the task's own figures (:mod:`ftdeploy.figures`)."""

    corruptions: Any  # a Registry of corruptions of the raw input
    corrupted: str  # where corruptions are applied, for the report

    def inputs(self, corruption: str = "identity", severity: int = 1) -> Any: ...

    def score(self, outputs: Outputs, inputs: Any) -> Scores: ...

    def performance(self, outputs: Outputs, inputs: Any) -> dict[str, Any]: ...

    def calibration(self, outputs: Outputs, inputs: Any) -> dict[str, Any]: ...  # "ece" always; "temperature" when fitted

    def saliency_samples(self, reference: Outputs, n: int) -> list[int]: ...

    def target(self, reference: Outputs, i: int) -> Any: ...  # what saliency explains for example i

    def saliency_method(self, clean: Any) -> dict[str, Any]: ...

    def occlusion(self, predict: Predictor, clean: Any, i: int, target: Any) -> np.ndarray: ...

    def integrated_gradients(self, model, clean: Any, i: int, target: Any) -> np.ndarray: ...

    def explained(self, samples: list[int], reference: Outputs) -> dict[str, Any]: ...

    def grid(self, clean: Any, cfg, cores: int): ...

    def probe_shape(self, clean: Any, cfg) -> tuple[int, ...]: ...

    def sections(self, data: dict[str, Any]) -> list[str]: ...


class Task:
    """One kind of model: its inputs, its outputs, how they are judged and how they are served.
    Subclasses set the class attributes and implement the rest (an input side and an output side:
    see :mod:`ftdeploy.tasks.classification`, :mod:`~ftdeploy.tasks.image`, :mod:`~ftdeploy.tasks.text`)."""

    name: str = ""
    description: str = ""
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    metric: str = ""  # the primary figure of :meth:`score`
    metric_label: str = ""  # how reports name it, e.g. "accuracy"
    decision: str = ""  # what the parity gate compares besides raw outputs, e.g. "top-1"
    unit: str = "examples"  # what reports count: images, texts
    pruning_importance: str = "l2"  # prune.importance unless the config names one
    exporter_order: tuple[str, ...] = ("dynamo", "torchscript")  # what export.exporter=auto tries, in order
    default_corruptions: list[str] = []
    codec: Any = None  # the server's codec (ftdeploy.codecs.Codec), HTTP-free
    head_features_cacheable: bool = False  # train.mode=head may cache the input of the head (one tensor)

    # --- preprocessor -----------------------------------------------------------------------
    def resolve_preprocessor(self, cfg, defaults: dict[str, Any]):
        """The preprocessor of a new run, from the config's preprocessing section and the model's defaults."""
        raise NotImplementedError

    def preprocessor_from_dict(self, d: dict[str, Any]):
        """The preprocessor a run directory, a report or an ONNX file stores (``to_dict`` of it)."""
        raise NotImplementedError

    def preprocess(self, raw: list, spec) -> Any:
        """Raw inputs as a user has them (PIL images, strings) -> one batch of model inputs."""
        raise NotImplementedError

    # --- data ---------------------------------------------------------------------------------
    def stack(self, items: list) -> Any:
        """Dataset inputs (without targets) -> one batch of inputs, as stages slice and feed it."""
        raise NotImplementedError

    def stack_targets(self, targets: list) -> Any:
        """Dataset targets -> what :meth:`score` takes (class indices: an array)."""
        return np.asarray(targets)

    def collate(self, items: list) -> tuple[tuple, Any]:
        """Dataset items -> ((input tensors in the model's argument order), targets) for training."""
        raise NotImplementedError

    def model_inputs(self, batch: Any, names: Sequence[str] | None = None) -> list[np.ndarray]:
        """A batch as the positional arguments of the PyTorch model (numpy arrays, in order)."""
        return list(feeds(batch, list(names or self.input_names)).values())

    def train_sampler(self, dataset, batch_size: int, seed: int):
        """The order training batches are drawn in (a torch Sampler with ``set_epoch``), or None: shuffled."""
        return None

    # --- training (torch) -----------------------------------------------------------------------
    def loss(self, outputs, targets, train_cfg):
        """The training loss of the model's outputs (a tensor, or a tuple of them) against ``targets``."""
        raise NotImplementedError

    def distillation_loss(self, outputs, teacher_outputs, targets, train_cfg, alpha: float, temperature: float):
        """The loss with ``alpha`` of it taken from a frozen teacher's outputs instead of the targets."""
        raise NotImplementedError

    # --- outputs (numpy) ------------------------------------------------------------------------
    def output_axes(self) -> dict[str, dict[int, str]]:
        """Dynamic axes of each output the ONNX file keeps (the batch axis at least)."""
        return {n: {0: "batch"} for n in self.output_names}

    def join(self, chunks: list[Outputs]) -> Outputs:
        """The raw outputs of consecutive batches as those of the whole set: shapes that do not depend
        on how the set was batched (each output concatenated on its batch axis by default)."""
        return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]

    def outputs(self, predict: Predictor, inputs: Any, batch_size: int) -> Outputs:
        """``predict`` over ``inputs`` in batches, joined."""
        return self.join([predict(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])

    def postprocess(self, outputs: Outputs, inputs: Any, info: dict[str, Any]) -> Any:
        """Raw outputs -> predictions, torch-free; ``info``: what the file or run says (classes,
        temperature, decoding parameters)."""
        raise NotImplementedError

    def score(self, predictions: Any, targets: Any) -> Scores:
        raise NotImplementedError

    def evaluate(self, outputs: Outputs, inputs: Any, targets: Any, info: dict[str, Any] | None = None) -> Scores:
        """The scores of raw outputs: postprocessed, then judged."""
        return self.score(self.postprocess(outputs, inputs, info or {}), targets)

    def decisions(self, reference: Outputs, torch32: Outputs, onnx32: Outputs, inputs: Any,
                  info: dict[str, Any]) -> Decisions:
        """Where PyTorch float32 and the file decide differently, against the float64 ``reference``;
        ``info``: what the file says (as for :meth:`postprocess`)."""
        raise NotImplementedError

    def agreement(self, reference: Outputs, candidate: Outputs, inputs: Any, info: dict[str, Any]) -> dict[str, float]:
        """How closely a variant (INT8, another provider) answers as its reference: ``decision_agreement``
        (0..1), ``max_score_diff`` (the largest difference of a served score) and task figures."""
        raise NotImplementedError

    def outputs_for(self, info: dict[str, Any]) -> dict[str, dict[int, str]]:
        """The model's outputs (name -> dynamic axes) for what the run records (``info``): a task whose
        models answer with as many outputs as their architecture has (a detector's head) says which."""
        return self.output_axes()

    # --- export ---------------------------------------------------------------------------------
    def dynamic_axes(self, names: Sequence[str]) -> dict[str, dict[int, str]]:
        """Axis names per input that the ONNX file keeps dynamic."""
        raise NotImplementedError

    def example_inputs(self, spec, names: Sequence[str]) -> list[np.ndarray]:
        """Dummy inputs for tracing the export (batch 2: batch 1 invites specializing the batch axis)."""
        raise NotImplementedError

    def pruning_options(self, model, ratio: float) -> tuple[dict[str, Any], list]:
        """(extra Torch-Pruning MetaPruner arguments, layers it must leave whole besides the run's head)."""
        return {}, []

    def after_pruning(self, model) -> None:
        """Bring attributes that the pruned tensors imply (e.g. attention head counts) up to date."""

    def fusion_options(self, architecture: dict[str, Any]) -> dict[str, Any] | None:
        """Arguments of onnxruntime's transformer optimizer for this model, or None: no fusions apply."""
        return None

    def parity_sets(self, inputs: Any, spec) -> dict[str, Any]:
        """The inputs the FP32 parity gate compares the file on, by name (several shapes where the
        file has dynamic axes beyond the batch)."""
        return {"validation": inputs}

    def bench_inputs(self, inputs: Any, spec) -> Any:
        """Real inputs at the shape latency is declared for (e.g. text padded to max_length)."""
        return inputs

    def encode_samples(self, inputs: Any, spec) -> list:
        """A few validation inputs as JSON values to store in the file (checks where it runs)."""
        raise NotImplementedError

    def decode_samples(self, samples: list, spec) -> Any:
        raise NotImplementedError

    # --- the usability report -------------------------------------------------------------------
    def usability_suite(self, splits, spec, limit: int, info: dict[str, Any]) -> UsabilitySuite:
        """The report's suite on up to ``limit`` validation examples of ``splits``."""
        raise NotImplementedError
