"""A task that is not a classifier, written the way a user would add one, outside ``ftdeploy/``: find
the peaks of a 1-D signal. Each signal (32 samples) holds 0 to 3 bumps; the model (1-D convolutions)
answers a score per sample; postprocessing keeps the local maxima above a threshold, so each input
gives a variable number of points; the metric is its own (points found within one sample, F1).
``register()`` adds the task, its dataset and its model family to ftdeploy's registries;
``unregister()`` takes them out again."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel, Field

from ftdeploy.codecs import Codec, Parsed, parse_json
from ftdeploy.errors import BadInput, FtdeployError
from ftdeploy.figures import fmt, table
from ftdeploy.registry import Registry
from ftdeploy.tasks.base import Decisions, Scores, Task, output_errors, row_errors, tile

LENGTH = 32
NAME = "toy_peaks"


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x.astype(np.float64)))


def peaks(scores: np.ndarray, threshold: float) -> list[list[tuple[int, float]]]:
    """Per signal: the positions (and scores) that are local maxima above ``threshold``."""
    out = []
    for row in scores:
        padded = np.concatenate([[-np.inf], row, [-np.inf]])
        found = [(i, float(row[i])) for i in range(len(row))
                 if row[i] > threshold and row[i] >= padded[i] and row[i] >= padded[i + 2]]
        out.append(found)
    return out


def point_f1(found: list[list[tuple[int, float]]], targets: list[list[int]], slack: int = 1) -> dict[str, float]:
    """Points found within ``slack`` samples of a true one, each true point matched at most once."""
    tp = n_found = n_true = 0
    for points, truth in zip(found, targets):
        free = list(truth)
        for position, _ in points:
            match = next((t for t in free if abs(t - position) <= slack), None)
            if match is not None:
                free.remove(match)
                tp += 1
        n_found, n_true = n_found + len(points), n_true + len(truth)
    precision, recall = tp / max(1, n_found), tp / max(1, n_true)
    return {"point_f1": 2 * precision * recall / max(1e-12, precision + recall), "precision": precision, "recall": recall}


@dataclass
class SignalSpec:
    length: int = LENGTH

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "signal", "length": self.length}


class Signals:
    """Signals and their true peak positions (the dataset's items: (signal, positions))."""

    def __init__(self, signals: np.ndarray, positions: list[list[int]]):
        self.signals, self.positions = signals, positions

    def __len__(self) -> int:
        return len(self.signals)

    def __getitem__(self, i: int):
        return self.signals[i], self.positions[i]

    def raw(self, i: int) -> np.ndarray:
        return self.signals[i][0]

    def subset(self, indices: list[int]) -> "Signals":
        return Signals(self.signals[indices], [self.positions[i] for i in indices])


def make_signals(n: int, seed: int) -> Signals:
    rng = np.random.default_rng(seed)
    x = np.arange(LENGTH)
    signals, positions = [], []
    for _ in range(n):
        where = sorted(rng.choice(np.arange(3, LENGTH - 3), size=rng.integers(0, 4), replace=False).tolist())
        bumps = sum((np.exp(-0.5 * (x - p) ** 2) for p in where), np.zeros(LENGTH))
        signals.append((bumps + rng.normal(0, 0.1, LENGTH)).astype(np.float32)[None])
        positions.append(where)
    return Signals(np.stack(signals), positions)


def dataset(cfg, spec):
    from ftdeploy.data import DatasetSplits

    everything = make_signals(cfg.num_samples, cfg.split_seed)
    n_val = round(cfg.val_fraction * len(everything))
    order = list(range(len(everything)))
    return DatasetSplits(everything.subset(order[n_val:]), everything.subset(order[:n_val]), ["peak"], cfg.name)


def model_family(arch: str, weights: str, _recorded: dict, _options: dict):
    import torch
    from torch import nn

    from ftdeploy.models import BuiltModel

    class PeakNet(nn.Module):
        def __init__(self, width: int = 16):
            super().__init__()
            self.body = nn.Sequential(nn.Conv1d(1, width, 5, padding=2), nn.ReLU(), nn.Conv1d(width, width, 5, padding=2),
                                      nn.ReLU())
            self.head = nn.Conv1d(width, 1, 3, padding=1)

        def forward(self, signal: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(signal))[:, 0]  # one score per sample: [batch, length]

    return BuiltModel(PeakNet(), "head", {"length": LENGTH}, fit_labels=lambda model, head, n: None)


class Threshold(BaseModel):
    threshold: float = Field(0.5, gt=0, lt=1, description="score a peak must exceed")


class PeakRequests:
    accepts = 'Send JSON {"signals": [[32 numbers], ...]}.'
    request_body = {"content": {"application/json": {"schema": {"type": "object", "properties": {
        "signals": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}}}}}}

    def parse(self, body: bytes, content_type: str, limits) -> Parsed:
        payload = parse_json(body)
        signals = payload.get("signals") if isinstance(payload, dict) else None
        if not isinstance(signals, list) or not signals:
            raise BadInput(400, "invalid_json", 'JSON bodies must be {"signals": [[...], ...]}')
        if any(not isinstance(s, list) or len(s) != LENGTH for s in signals):
            raise BadInput(400, "invalid_signal", f"every signal must hold {LENGTH} numbers")
        return Parsed([np.asarray(s, np.float32) for s in signals], lambda s: s)

    def warmup(self, spec) -> list:
        return [np.zeros(LENGTH, np.float32)]

    def encode(self, raw: list) -> tuple[bytes, str]:
        return json.dumps({"signals": [np.asarray(r).tolist() for r in raw]}).encode(), "application/json"


class PeakResponses:
    params = Threshold
    schema = {"type": "object", "properties": {"points": {"type": "array"}}}

    def respond(self, predictions, params: Threshold, info: dict[str, Any]) -> dict[str, Any]:
        return {"points": [[{"position": p, "score": s} for p, s in found] for found in peaks(predictions, params.threshold)]}


corruptions: Registry = Registry("signal corruption", FtdeployError)
corruptions.register("identity")(lambda x, severity, rng: x)
corruptions.register("noise")(lambda x, severity, rng: x + rng.normal(0, 0.1 * severity, x.shape).astype(np.float32))


class PeakSuite:
    """The toy's usability suite: the validation signals and their peaks."""

    corrupted = "to the signal"

    def __init__(self, task: "PeakTask", signals: Signals):
        self.task, self.signals, self.corruptions = task, signals, corruptions

    def inputs(self, corruption: str = "identity", severity: int = 1) -> np.ndarray:
        rng = np.random.default_rng(severity)
        return corruptions.get(corruption)(self.signals.signals, severity, rng).astype(np.float32)

    def score(self, outputs, inputs) -> Scores:
        return self.task.evaluate(outputs, None, self.signals.positions)

    def performance(self, outputs, inputs) -> dict[str, Any]:
        return point_f1(peaks(sigmoid(outputs[0]), 0.5), self.signals.positions)

    def calibration(self, outputs, inputs) -> dict[str, Any]:
        probs, truth = sigmoid(outputs[0]).ravel(), np.zeros(outputs[0].shape)
        for row, where in enumerate(self.signals.positions):
            truth[row, where] = 1
        bins = np.clip((probs * 10).astype(int), 0, 9)
        ece = sum(abs(truth.ravel()[bins == b].mean() - probs[bins == b].mean()) * (bins == b).mean()
                  for b in range(10) if (bins == b).any())
        return {"ece": float(ece)}

    def saliency_samples(self, reference, n: int) -> list[int]:
        return list(range(min(n, len(self.signals))))

    def target(self, reference, i: int) -> int:
        return int(reference[0][i].argmax())

    def saliency_method(self, clean) -> dict[str, Any]:
        return {"method": "occlusion", "window": 4}

    def occlusion(self, predict, clean: np.ndarray, i: int, target: int) -> np.ndarray:
        hidden = np.repeat(clean[i:i + 1], LENGTH // 4, 0)
        for w in range(LENGTH // 4):
            hidden[w, :, 4 * w:4 * w + 4] = 0
        base = sigmoid(predict(clean[i:i + 1])[0])[0, target]
        return base - sigmoid(predict(hidden)[0])[:, target]

    def integrated_gradients(self, model, clean: np.ndarray, i: int, target: int) -> np.ndarray:
        import torch

        x = torch.from_numpy(clean[i:i + 1]).requires_grad_(True)
        model(x)[0, target].backward()
        return (x.grad * x).abs()[0, 0].detach().numpy()

    def explained(self, samples: list[int], reference) -> dict[str, Any]:
        return {"signals": [self.signals.raw(i).round(3).tolist() for i in samples]}

    def grid(self, clean, cfg, cores: int):
        for bs in cfg.batch_sizes:
            yield {"threads": cores, "batch_size": bs}, tile(clean, bs), cores

    def probe_shape(self, clean, cfg) -> tuple[int, ...]:
        return (max(cfg.batch_sizes), 1, LENGTH)

    def sections(self, data: dict[str, Any]) -> list[str]:
        rows = [[n, fmt(x["performance"]["point_f1"], ".3f")] for n, x in data["variants"].items()]
        return ["<h2>Peaks found</h2>" + table(["variant", "point F1"], rows)]


class PeakTask(Task):
    name = NAME
    description = "Peaks of a 1-D signal"
    input_names = ("signal",)
    output_names = ("scores",)
    metric = metric_label = "point_f1"
    decision = "peaks"
    unit = "signals"
    default_corruptions = ["noise"]
    exporter_order = ("torchscript",)
    codec = Codec(PeakRequests(), PeakResponses())

    def resolve_preprocessor(self, cfg, defaults: dict[str, Any]) -> SignalSpec:
        return SignalSpec(defaults["length"])

    def preprocessor_from_dict(self, d: dict[str, Any]) -> SignalSpec:
        return SignalSpec(int(d["length"]))

    def preprocess(self, raw: list, spec) -> np.ndarray:
        return np.stack([np.asarray(r, np.float32)[None] for r in raw])

    def stack(self, items: list) -> np.ndarray:
        return np.stack(items).astype(np.float32)

    def stack_targets(self, targets: list) -> list[list[int]]:
        return [list(t) for t in targets]

    def collate(self, items: list):
        import torch

        signals, positions = zip(*items)
        heat = torch.zeros(len(items), LENGTH)
        for row, where in enumerate(positions):
            heat[row, list(where)] = 1.0
        return (torch.from_numpy(np.stack(signals)),), heat

    def loss(self, outputs, targets, train_cfg):
        import torch

        return torch.nn.functional.binary_cross_entropy_with_logits(outputs, targets, pos_weight=torch.tensor(8.0))

    def distillation_loss(self, outputs, teacher_outputs, targets, train_cfg, alpha: float, temperature: float):
        import torch

        taught = torch.nn.functional.binary_cross_entropy_with_logits(outputs, teacher_outputs.sigmoid())
        return (1 - alpha) * self.loss(outputs, targets, train_cfg) + alpha * taught

    def postprocess(self, outputs, inputs, info: dict[str, Any]) -> np.ndarray:
        return sigmoid(outputs[0])

    def score(self, predictions: np.ndarray, targets: list[list[int]]) -> Scores:
        return Scores(self.metric, point_f1(peaks(predictions, 0.5), targets))

    def decisions(self, reference, torch32, onnx32, inputs, info) -> Decisions:
        """Above or below the threshold (logit 0), per sample; a flip where the float64 logit lies
        within both errors of 0 is a near-tie."""
        ref = reference[0]
        flipped = (torch32[0] > 0) != (onnx32[0] > 0)
        margin = np.abs(ref)
        errors = np.maximum(row_errors(reference, torch32), row_errors(reference, onnx32))[:, None]
        counted = flipped & (margin > errors)
        return Decisions(self.decision, flipped.size, float(1 - flipped.mean()), int(counted.sum()),
                         int((flipped & ~counted).sum()))

    def agreement(self, reference, candidate, inputs, info) -> dict[str, float]:
        a, b = sigmoid(reference[0]), sigmoid(candidate[0])
        return {"decision_agreement": float(((a > 0.5) == (b > 0.5)).mean()), "max_score_diff": float(np.abs(a - b).max()),
                "max_abs_diff": output_errors(reference, candidate)[0]}

    def dynamic_axes(self, names: Sequence[str]) -> dict[str, dict[int, str]]:
        return {names[0]: {0: "batch"}}

    def example_inputs(self, spec, names: Sequence[str]) -> list[np.ndarray]:
        return [np.zeros((2, 1, spec.length), np.float32)]

    def encode_samples(self, inputs: np.ndarray, spec) -> list:
        return inputs[:, 0].tolist()

    def decode_samples(self, samples: list, spec) -> np.ndarray:
        return self.preprocess(samples, spec)

    def usability_suite(self, splits, spec, limit: int, info: dict[str, Any]) -> PeakSuite:
        return PeakSuite(self, splits.val.subset(list(range(min(limit, len(splits.val))))))


def register() -> None:
    from ftdeploy.data import datasets
    from ftdeploy.models import families
    from ftdeploy.tasks import tasks

    tasks.register(NAME)(PeakTask())
    datasets.register(NAME)(dataset)
    families.register("toy")(model_family)


def unregister() -> None:
    from ftdeploy.data import datasets
    from ftdeploy.models import families
    from ftdeploy.tasks import tasks

    for registry, name in ((tasks, NAME), (datasets, NAME), (families, "toy")):
        registry.unregister(name)

