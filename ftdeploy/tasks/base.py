"""The task seam: the interface every task implements, and how a batch of inputs becomes the named
arrays a model runs on. Torch-free: the server uses it.

A batch of inputs is whatever the task's :meth:`Task.stack` makes of dataset items: a float array
for images, a :class:`~ftdeploy.tasks.text.Tokens` for text. Stages slice it (``inputs[a:b]``,
``inputs[index_array]``), take its ``len`` and hand it to :func:`feeds`; nothing else.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def feeds(batch: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``batch`` gives the model inputs ``names``: a float array is an image model's one
    input; any other batch (token ids) makes its own arrays, padded, and keeps the names asked for.

    >>> list(feeds(np.zeros((2, 3, 8, 8), np.float32), ["input"]))
    ['input']
    """
    if isinstance(batch, np.ndarray):
        return {names[0]: batch}
    return batch.feeds(names)


def batched(fn, inputs: Any, batch_size: int) -> np.ndarray:
    """``fn`` (a batch of inputs -> an array) over ``inputs`` in batches, concatenated."""
    return np.concatenate([fn(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])


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


class Task:
    """One kind of model. Subclasses set ``name``, ``input_names``, ``codec`` and implement the rest."""

    name: str = ""
    input_names: tuple[str, ...] = ()
    codec: str = ""  # the server's request codec for this task's inputs (serve.CODECS)
    unit: str = "examples"  # what reports count: images, texts
    pruning_importance: str = "l2"  # prune.importance unless the config names one
    exporter_order: tuple[str, ...] = ("dynamo", "torchscript")  # what export.exporter=auto tries, in order
    description: str = ""

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
        """Dataset inputs (without labels) -> one batch of inputs, as stages slice and feed it."""
        raise NotImplementedError

    def collate(self, items: list) -> tuple[tuple, Any]:
        """Dataset items -> ((input tensors in the model's argument order), label tensor) for training."""
        raise NotImplementedError

    def model_inputs(self, batch: Any, names: Sequence[str] | None = None) -> list[np.ndarray]:
        """A batch as the positional arguments of the PyTorch model (numpy arrays, in order)."""
        return list(feeds(batch, list(names or self.input_names)).values())

    def train_sampler(self, dataset, batch_size: int, seed: int):
        """The order training batches are drawn in (a torch Sampler with ``set_epoch``), or None: shuffled."""
        return None

    # --- export -------------------------------------------------------------------------------
    def dynamic_axes(self, names: Sequence[str]) -> dict[str, dict[int, str]]:
        """Axis names per input that the ONNX file keeps dynamic."""
        raise NotImplementedError

    def example_inputs(self, spec, names: Sequence[str]) -> list[np.ndarray]:
        """Dummy inputs for tracing the export (batch 2: batch 1 invites specializing the batch axis)."""
        raise NotImplementedError

    def pruning_options(self, model, ratio: float) -> tuple[dict[str, Any], list]:
        """(extra Torch-Pruning MetaPruner arguments, layers it must leave whole) for pruning ``model``."""
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
