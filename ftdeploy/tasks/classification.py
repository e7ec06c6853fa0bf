"""What a classifier gives out, whatever it takes in: ``logits`` (batch x classes), probabilities with
the file's temperature, accuracy (and macro F1), cross-entropy and distillation losses, top-1 parity
with its near-ties, top-k answers, and the classifier's part of the usability report (per-class F1,
confusion matrix, softmax calibration). The image and text classifiers are this output side on
their own input side.

>>> from ftdeploy.tasks import get_task
>>> logits = [np.array([[2.0, 0.1], [0.3, 0.9]])]
>>> get_task("image_classification").evaluate(logits, None, np.array([0, 0])).value
0.5
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..codecs import Codec, Tensor, TensorSpec
from ..figures import fmt, inline_png, pyplot, table
from .base import Decisions, Outputs, Scores, output_errors, row_errors, softmax


def logits_of(outputs: Outputs) -> np.ndarray:
    return outputs[0]


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(-1) == labels).mean())


def task_performance(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    pred = probs.argmax(-1)
    k = len(classes)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (labels, pred), 1)
    per_class = {}
    for i, name in enumerate(classes):
        tp = confusion[i, i]
        precision = tp / max(1, confusion[:, i].sum())
        recall = tp / max(1, confusion[i].sum())
        f1 = 2 * precision * recall / max(1e-12, precision + recall)
        per_class[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                           "support": int(confusion[i].sum())}
    return {"accuracy": float((pred == labels).mean()), "per_class": per_class,
            "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
            "confusion_matrix": confusion.tolist()}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Sum over equal-width confidence bins of |accuracy - mean confidence|, weighted by the bin's share.

    >>> round(expected_calibration_error(np.array([[0.9, 0.1], [0.9, 0.1]]), np.array([0, 1])), 3)
    0.4
    """
    confidence, pred = probs.max(-1), probs.argmax(-1)
    correct = (pred == labels).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[dict[str, float]]:
    confidence, correct = probs.max(-1), (probs.argmax(-1) == labels)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    return [{"low": float(edges[b]), "high": float(edges[b + 1]), "count": int((which == b).sum()),
             "accuracy": float(correct[which == b].mean()) if (which == b).any() else None,
             "confidence": float(confidence[which == b].mean()) if (which == b).any() else None} for b in range(bins)]


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    onehot = np.eye(probs.shape[1])[labels]
    return float(((probs - onehot) ** 2).sum(-1).mean())


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimizes NLL, by golden-section search over log T in [-3, 3]."""
    lo, hi = -3.0, 3.0
    g = (5 ** 0.5 - 1) / 2
    f = lambda t: nll(softmax(logits, float(np.exp(t))), labels)  # noqa: E731
    for _ in range(60):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        lo, hi = (lo, b) if f(a) < f(b) else (a, hi)
    return float(np.exp((lo + hi) / 2))


def calibration(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Calibration at T=1 on all examples; temperature fitted on the even-indexed half, evaluated on the odd."""
    probs = softmax(logits)
    fit, held = np.arange(0, len(labels), 2), np.arange(1, len(labels), 2)
    t = fit_temperature(logits[fit], labels[fit])
    before, after = softmax(logits[held]), softmax(logits[held], t)
    return {"ece": expected_calibration_error(probs, labels), "brier": brier(probs, labels), "nll": nll(probs, labels),
            "temperature": t, "ece_held_out": expected_calibration_error(before, labels[held]),
            "ece_after_temperature": expected_calibration_error(after, labels[held]),
            "nll_held_out": nll(before, labels[held]), "nll_after_temperature": nll(after, labels[held]),
            "reliability": reliability(probs, labels)}


class TopK(BaseModel):
    """Query parameters of a classifier's answer."""

    model_config = ConfigDict(extra="forbid")
    k: int = Field(5, ge=1, description="labels to return per input")


class TopKResponses:
    """Probabilities -> the ``k`` most likely labels of every input."""

    params = TopK
    schema = {"type": "object", "properties": {"predictions": {"type": "array", "items": {
        "type": "object", "properties": {"top_k": {"type": "array", "items": {"type": "object", "properties": {
            "label": {"type": "string"}, "index": {"type": "integer"}, "probability": {"type": "number"}}}}}}}}}

    def respond(self, probs: np.ndarray, params: TopK, info: dict[str, Any]) -> dict[str, Any]:
        classes = info["classes"]
        k = min(params.k, len(classes))
        top = np.argsort(-probs, axis=-1)[:, :k]
        return {"predictions": [{"top_k": [{"label": classes[i], "index": int(i), "probability": float(p[i])}
                                           for i in row]} for row, p in zip(top, probs)]}

    def tensor_outputs(self, info: dict[str, Any]) -> list[TensorSpec]:
        return [TensorSpec("probabilities", "FP32", (-1, len(info["classes"])))]

    def to_tensors(self, probs: np.ndarray, params: TopK, info: dict[str, Any]) -> dict[str, Tensor]:
        """The probabilities ``/v1/predict`` serves (with the file's temperature), every label."""
        return {"probabilities": Tensor("probabilities", "FP32", list(probs.shape), probs.astype(np.float32))}

    def classify(self, probs: np.ndarray, k: int, info: dict[str, Any]) -> list[list[str]]:
        """Triton's classification strings, ``"score:index:label"``, best first. The score is the
        probability ``/v1/predict`` answers (the file's temperature applied), written in full
        (``repr`` of the float /v1 serves; Triton prints 6 decimals)."""
        answer = self.respond(probs, TopK(k=k), info)
        return [[f"{float(t['probability'])!r}:{t['index']}:{t['label']}" for t in p["top_k"]] for p in answer["predictions"]]


def classifier_codec(requests) -> Codec:
    return Codec(requests, TopKResponses())


class ClassifierOutputs:
    """The output side of a classifier (mixed into a task with an input side)."""

    output_names = ("logits",)
    metric = "accuracy"
    metric_label = "accuracy"
    decision = "top-1"
    head_features_cacheable = True

    def postprocess(self, outputs: Outputs, inputs: Any, info: dict[str, Any]) -> np.ndarray:
        """Class probabilities, with the file's temperature (``ftdeploy report --calibrate``) when it has one."""
        return softmax(logits_of(outputs), float(info.get("temperature") or 1.0))

    def score(self, probs: np.ndarray, labels: np.ndarray) -> Scores:
        return Scores(self.metric, {"accuracy": accuracy(probs, labels)})

    def decisions(self, reference: Outputs, torch32: Outputs, onnx32: Outputs, inputs: Any,
                  info: dict[str, Any] | None = None) -> Decisions:
        """Top-1 of PyTorch float32 against the file's; a disagreement counts only where the float64
        top-2 margin exceeds both errors on that input.

        >>> ref = [np.array([[1.0, 0.999999], [3.0, 0.0]])]
        >>> t, o = [ref[0] + [[2e-6, 0.0], [1e-6, 0.0]]], [ref[0] + [[-2e-6, 0.0], [2e-6, 0.0]]]
        >>> d = ClassifierOutputs().decisions(ref, t, o, None, {}); (d.agreement, d.counted, d.excused)
        (0.5, 0, 1)
        """
        logits = logits_of(reference).astype(np.float64)
        top2 = np.sort(logits, -1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        disagree = logits_of(torch32).argmax(-1) != logits_of(onnx32).argmax(-1)
        counted = disagree & (margin > np.maximum(row_errors(reference, torch32), row_errors(reference, onnx32)))
        return Decisions(self.decision, len(logits), float(1 - disagree.mean()), int(counted.sum()),
                         int((disagree & ~counted).sum()))

    def agreement(self, reference: Outputs, candidate: Outputs, inputs: Any,
                  info: dict[str, Any] | None = None) -> dict[str, float]:
        a, b = logits_of(reference), logits_of(candidate)
        cosine = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
        largest, mean = output_errors(reference, candidate)
        return {"decision_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
                "max_score_diff": float(np.abs(softmax(a) - softmax(b)).max()), "max_abs_diff": largest,
                "mean_abs_diff": mean, "cosine": float(cosine.mean()), "min_cosine": float(cosine.min())}

    def loss(self, outputs, targets, train_cfg):
        import torch

        smoothing = train_cfg.label_smoothing if train_cfg is not None else 0.0
        return torch.nn.functional.cross_entropy(outputs, targets, label_smoothing=smoothing)

    def distillation_loss(self, outputs, teacher_outputs, targets, train_cfg, alpha: float, temperature: float):
        """Soft-target KL divergence from the teacher's logits, mixed with the usual loss."""
        import torch

        soft = (teacher_outputs / temperature).softmax(-1)
        kl = torch.nn.functional.kl_div((outputs / temperature).log_softmax(-1), soft,
                                        reduction="batchmean") * temperature ** 2
        return (1 - alpha) * self.loss(outputs, targets, train_cfg) + alpha * kl


class ClassifierSuite:
    """The classifier's part of the usability suite: its judgement of a variant's logits on the
    validation examples (``labels``, ``classes``) and the HTML sections that show it. The input side
    (images, texts) adds inputs, corruptions, saliency and the latency grid."""

    task: Any
    labels: np.ndarray
    classes: list[str]

    def score(self, outputs: Outputs, inputs: Any = None) -> Scores:
        return self.task.evaluate(outputs, None, self.labels)

    def performance(self, outputs: Outputs, inputs: Any = None) -> dict[str, Any]:
        return task_performance(logits_of(outputs), self.labels, self.classes)

    def calibration(self, outputs: Outputs, inputs: Any = None) -> dict[str, Any]:
        return calibration(logits_of(outputs), self.labels)

    def saliency_samples(self, reference: Outputs, n: int) -> list[int]:
        """``n`` fixed validation examples, in dataset order: misclassified ones (up to half), then correct ones."""
        pred = logits_of(reference).argmax(-1)
        wrong = [int(i) for i in np.flatnonzero(pred != self.labels)][: n // 2]
        right = [int(i) for i in np.flatnonzero(pred == self.labels)]
        return sorted(wrong + right[: n - len(wrong)])

    def target(self, reference: Outputs, i: int) -> int:
        """What saliency explains: the class the reference (FP32) predicts."""
        return int(logits_of(reference)[i].argmax())

    def described(self, samples: list[int], reference: Outputs) -> dict[str, Any]:
        pred = logits_of(reference).argmax(-1)
        return {"labels": [self.classes[self.labels[i]] for i in samples],
                "fp32_predictions": [self.classes[pred[i]] for i in samples]}

    def sections(self, data: dict[str, Any]) -> list[str]:
        return [performance_section(data), calibration_section(data)]


def performance_section(data: dict[str, Any]) -> str:
    v, classes = data["variants"], data["classes"]
    rows = [[n, fmt(x["performance"]["macro_f1"], ".3f")]
            + [fmt(x["performance"]["per_class"][c]["f1"], ".3f") for c in classes] for n, x in v.items()]
    out = ["<h2>Task performance</h2><p>F1 per class (precision and recall are in usability.json), and the "
           "confusion matrices (rows: true class, columns: predicted).</p>",
           table(["variant", "macro F1"] + classes, rows)]
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, len(v), figsize=(3.2 * len(v), 3.2), squeeze=False)
        for ax, (n, x) in zip(axes[0], v.items()):
            ax.imshow(np.asarray(x["performance"]["confusion_matrix"]), cmap="Blues")
            ax.set(title=n, xticks=range(len(classes)), yticks=range(len(classes)))
            ax.set_xticklabels(classes, fontsize=7, rotation=90)
            ax.set_yticklabels(classes, fontsize=7)
        out.append(inline_png(fig))
    return "\n".join(out)


def calibration_section(data: dict[str, Any]) -> str:
    v = data["variants"]
    rows = [[n, fmt(c["ece"], ".4f"), fmt(c["brier"], ".4f"), fmt(c["nll"], ".4f"),
             fmt(c["temperature"], ".3f"), fmt(c["ece_held_out"], ".4f"), fmt(c["ece_after_temperature"], ".4f"),
             fmt(c["nll_held_out"], ".4f"), fmt(c["nll_after_temperature"], ".4f"),
             "yes" if c.get("temperature_stored") else "no"] for n, x in v.items() for c in [x["calibration"]]]
    unit = data["dataset"]["unit"]
    out = ["<h2>Calibration</h2><p>ECE over 15 confidence bins, Brier score and NLL on all validation "
           f"{unit}. The temperature is fitted on one half of the {unit} and evaluated on the other (<em>held-out</em> "
           "columns, before and after). With <code>--calibrate</code> it is stored in the ONNX file and "
           "<code>ftdeploy serve</code> applies it.</p>",
           table(["variant", "ECE", "Brier", "NLL", "T", "ECE held-out", "ECE after T", "NLL held-out",
                       "NLL after T", "T in file"], rows)]
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, len(v), figsize=(3 * len(v), 3), squeeze=False)
        for ax, (n, x) in zip(axes[0], v.items()):
            bins = [b for b in x["calibration"]["reliability"] if b["count"]]
            ax.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["accuracy"] for b in bins], width=1 / 15,
                   edgecolor="k", alpha=0.7, label="accuracy")
            ax.plot([0, 1], [0, 1], "k--", lw=1)
            ax.set(title=f"{n} (ECE {x['calibration']['ece']:.3f})", xlabel="confidence", ylabel="accuracy",
                   xlim=(0, 1), ylim=(0, 1))
        out.append(inline_png(fig))
    return "\n".join(out)
