"""Token classification (named-entity recognition): text in, entities out as character spans of the
text sent. The model's inputs are a text model's (``input_ids``, ``attention_mask``, ``token_type_ids``,
batch and sequence axes dynamic); its output is ``logits`` [batch, sequence, tags], both axes dynamic.
Words, windows and the one decoding rule live in :mod:`.spans`; entity F1 through seqeval in
:mod:`.metric`; the datasets (WNUT-16, CoNLL columns, JSON Lines) in :mod:`.data`; the usability suite
in :mod:`.report`.

The model is uncased when its tokenizer lowercases (all-MiniLM-L6-v2 does): casing is no corruption
for it, and the report leaves it out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ...codecs import Codec, Parsed, Tensor, TensorSpec, checked_texts, json_texts, media_type, parse_json, utf8
from ...errors import BadInput, ConfigError
from ..base import Decisions, Outputs, Scores, Task, padded_concat, softmax
from ..text import TextInputs, TextRequests
from . import data  # noqa: F401  (registers the wnut16, conll and tagged_jsonl datasets)
from .metric import entity_scores, entity_types, gold_and_predicted
from .report import TOKEN_CORRUPTIONS
from .spans import IGNORED, Text, TokenPreprocessing, Windows, entities, word_logits

BENCH_LENGTH = 64  # tokens latency is declared at: tweets are short (WNUT-16's longest is 39 words)


@dataclass
class Tagged:
    """One text's predictions: the probability of every tag for each word read (words ``first``,
    ``first + 1``, ...), and the rows of the batch they came from."""

    text: Text
    first: int
    probs: np.ndarray  # [words, tags]
    rows: list[int]
    classes: list[str]

    @property
    def tags(self) -> list[str]:
        return [self.classes[k] for k in self.probs.argmax(-1)]

    def entities(self) -> list[dict[str, Any]]:
        """The entities the decoding rule reads: label, the exact characters, their offsets and score
        (and the user's token indices, for pre-split input)."""
        out = []
        for kind, a, b, score in entities(self.tags, self.probs.max(-1)):
            start, end = int(self.text.spans[self.first + a, 0]), int(self.text.spans[self.first + b - 1, 1])
            entity = {"label": kind, "text": self.text.text[start:end], "start": start, "end": end, "score": score}
            if self.text.tokens is not None:
                entity["tokens"] = self.text.token_indices(start, end)
            out.append(entity)
        return out


def tag_words(outputs: Outputs, inputs: Windows, info: dict[str, Any]) -> list[Tagged]:
    logits = word_logits(outputs[0], inputs)
    temperature = float(info.get("temperature") or 1.0)
    out = []
    for text, rows in inputs.texts():
        stacked = np.concatenate([logits[r] for r in rows]) if rows else np.zeros((0, len(info["classes"])))
        out.append(Tagged(text, inputs.windows[rows[0]].first, softmax(stacked, temperature), rows, info["classes"]))
    return out


class EntityParams(BaseModel):
    """Query parameters of a token classifier's answer."""

    model_config = ConfigDict(extra="forbid")
    score_threshold: float = Field(0.0, ge=0, le=1, description="the least score an entity answered has")


ENTITY_SCHEMA = {"type": "object", "properties": {
    "label": {"type": "string"}, "text": {"type": "string", "description": "exactly text[start:end]"},
    "start": {"type": "integer"}, "end": {"type": "integer"}, "score": {"type": "number"},
    "tokens": {"type": "array", "items": {"type": "integer"}, "description": "pre-split input: the tokens it covers"}}}


class EntityResponses:
    """Word probabilities -> ``{"entities": [{"label", "text", "start", "end", "score"}]}`` for one text,
    ``{"predictions": [{"entities": [...]}, ...]}`` for several. Offsets count characters (Unicode code
    points, as Python indexes a str) of the text sent; for pre-split input, of its tokens joined by
    single spaces, and each entity lists the indices of its tokens."""

    params = EntityParams
    schema = {"type": "object", "properties": {"entities": {"type": "array", "items": ENTITY_SCHEMA}}}

    def answers(self, predictions: list[Tagged], params: EntityParams) -> list[list[dict[str, Any]]]:
        return [[e for e in p.entities() if e["score"] >= params.score_threshold] for p in predictions]

    def respond(self, predictions: list[Tagged], params: EntityParams, info: dict[str, Any]) -> dict[str, Any]:
        texts = [{"entities": found} for found in self.answers(predictions, params)]
        return texts[0] if len(texts) == 1 else {"predictions": texts}

    def tensor_outputs(self, info: dict[str, Any]) -> list[TensorSpec]:
        return [TensorSpec("entities", "BYTES", (-1,))]

    def to_tensors(self, predictions: list[Tagged], params: EntityParams, info: dict[str, Any]) -> dict[str, Tensor]:
        """One element per text: its entities (as ``/v1/predict`` answers them) as UTF-8 JSON, since
        their count varies."""
        found = [json.dumps(e, ensure_ascii=False).encode() for e in self.answers(predictions, params)]
        return {"entities": Tensor("entities", "BYTES", [len(found)], found)}


class TokenRequests(TextRequests):
    """Texts (JSON ``{"text"}`` / ``{"texts"}``, text/plain, or BYTES tensors), or pre-split tokens
    (JSON ``{"tokens": [...]}``, or ``{"tokens": [[...], ...]}`` for several)."""

    accepts = ('Send JSON {"text": "..."}, {"texts": ["...", ...]} or pre-split {"tokens": ["...", ...]}, or one '
               "text as a text/plain body (UTF-8). Long texts are read in overlapping windows: no entity is lost.")
    request_body = {"content": {
        "application/json": {"schema": {"oneOf": [
            {"type": "object", "required": ["text"], "properties": {"text": {"type": "string", "minLength": 1}}},
            {"type": "object", "required": ["texts"], "properties": {
                "texts": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}}},
            {"type": "object", "required": ["tokens"], "properties": {
                "tokens": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}}}]},
            "example": {"text": "Watching the Red Sox at Fenway Park with @jane tonight"}},
        "text/plain": {"schema": {"type": "string"}, "example": "Empire State Building in New York"}}}

    def parse(self, body: bytes, content_type: str, limits) -> Parsed:
        if media_type(content_type) != "application/json":
            return super().parse(body, content_type, limits)
        payload = parse_json(utf8(body))  # read once: texts or pre-split tokens
        if not (isinstance(payload, dict) and "tokens" in payload):
            return Parsed(checked_texts(json_texts(payload), limits), lambda text: text)
        tokens = payload["tokens"]
        many = isinstance(tokens, list) and tokens and all(isinstance(t, list) for t in tokens)
        groups = tokens if many else [tokens]
        if len(payload) != 1 or not isinstance(tokens, list) or not tokens:
            raise BadInput(400, "invalid_json", 'pre-split input must be {"tokens": ["...", ...]} (or a list of such lists)')
        if len(groups) > limits.max_images:
            raise BadInput(413, "too_many_texts", f"the request holds {len(groups)} texts; the limit is {limits.max_images}")
        for i, group in enumerate(groups):
            if not group or not all(isinstance(t, str) and t.strip() and not any(c.isspace() for c in t) for t in group):
                raise BadInput(400, "invalid_tokens", f"tokens {i}: each token must be a non-empty string without "
                               "whitespace, and there must be at least one")
        return Parsed([list(g) for g in groups], lambda tokens: tokens)


class TokenClassification(TextInputs, Task):
    name = "token_classification"
    description = "Token classification (named entities)"
    output_names = ("logits",)
    metric = "f1"
    metric_label = "entity F1"
    decision = "tags"
    unit = "texts"
    pruning_importance = "taylor"
    default_corruptions = TOKEN_CORRUPTIONS
    codec = Codec(TokenRequests(), EntityResponses())

    # --- inputs -------------------------------------------------------------------------------
    def resolve_preprocessor(self, cfg, defaults: dict[str, Any]) -> TokenPreprocessing:
        if cfg.stride is not None and cfg.stride > cfg.max_length // 2:
            raise ConfigError(f"preprocessing.stride {cfg.stride} is more than half of max_length {cfg.max_length}: "
                              "windows would advance by a few tokens", f"set it to at most {cfg.max_length // 2}")
        return TokenPreprocessing(super().resolve_preprocessor(cfg, defaults).tokenizer, cfg.max_length, stride=cfg.stride)

    def preprocessor_from_dict(self, d: dict[str, Any]) -> TokenPreprocessing:
        return TokenPreprocessing(d["tokenizer"], int(d.get("max_length", 128)), stride=d.get("stride"))

    def preprocess(self, raw: list, spec: TokenPreprocessing) -> Windows:
        return spec.encode(raw)

    def stack(self, items: list) -> Windows:
        return Windows(list(items))

    def stack_targets(self, targets: list) -> list[np.ndarray]:
        return [np.asarray(t, np.int64) for t in targets]

    def train_sampler(self, dataset, batch_size: int, seed: int):
        from ..length_grouping import LengthGroupedSampler

        return LengthGroupedSampler([len(dataset[i][0].ids) for i in range(len(dataset))], batch_size, seed)

    def collate(self, items: list) -> tuple[tuple, Any]:
        """(ids, mask, token types) and a label per position (IGNORED where none: special tokens, later subwords)."""
        import torch

        batch = self.stack([w for w, _ in items])
        arrays = batch.feeds(self.input_names)
        labels = np.full(arrays["input_ids"].shape, IGNORED, np.int64)
        for row, (w, _) in enumerate(items):
            labels[row, :len(w.labels)] = w.labels
        return tuple(torch.from_numpy(arrays[n]) for n in self.input_names), torch.from_numpy(labels)

    def bench_inputs(self, inputs: Windows, spec: TokenPreprocessing):
        return inputs.at_length(min(BENCH_LENGTH, spec.max_length))

    # --- training -------------------------------------------------------------------------------
    def loss(self, outputs, targets, train_cfg):
        import torch

        if outputs.dim() != 3:
            raise ConfigError(f"token_classification needs a logit per token ([batch, tokens, tags]); the model gives "
                              f"{list(outputs.shape)}", "set model.options.head=tokens (hf: models)")
        smoothing = train_cfg.label_smoothing if train_cfg is not None else 0.0
        return torch.nn.functional.cross_entropy(outputs.flatten(0, 1), targets.flatten(), ignore_index=IGNORED,
                                                 label_smoothing=smoothing)

    def distillation_loss(self, outputs, teacher_outputs, targets, train_cfg, alpha: float, temperature: float):
        """KL divergence from the teacher's token logits at the labelled positions, mixed with the loss."""
        import torch

        read = targets != IGNORED
        soft = (teacher_outputs[read] / temperature).softmax(-1)
        kl = torch.nn.functional.kl_div((outputs[read] / temperature).log_softmax(-1), soft,
                                        reduction="batchmean") * temperature ** 2
        return (1 - alpha) * self.loss(outputs, targets, train_cfg) + alpha * kl

    # --- outputs ------------------------------------------------------------------------------------
    def output_axes(self) -> dict[str, dict[int, str]]:
        return {"logits": {0: "batch", 1: "sequence"}}

    def outputs(self, predict, inputs: Windows, batch_size: int) -> Outputs:
        """Logits of the set, zero past each row's tokens: what padding gives there depends on the rest
        of the batch, and is never read."""
        chunks = []
        for i in range(0, len(inputs), batch_size):
            part = inputs[i:i + batch_size]
            logits = np.array(predict(part)[0])
            logits[np.arange(logits.shape[1]) >= np.asarray(part.lengths())[:, None]] = 0
            chunks.append([logits])
        return self.join(chunks)

    def join(self, chunks: list[Outputs]) -> Outputs:
        """Logits of batches padded to the longest (positions past a row's tokens are never read)."""
        return [padded_concat([c[0] for c in chunks])]

    def postprocess(self, outputs: Outputs, inputs: Windows, info: dict[str, Any]) -> list[Tagged]:
        """Per text, each word's tag probabilities (with the file's temperature, when it has one)."""
        return tag_words(outputs, inputs, info)

    def score(self, predictions: list[Tagged], targets: list[np.ndarray]) -> Scores:
        gold, predicted = gold_and_predicted(predictions, targets)
        s = entity_scores(gold, predicted, entity_types(predictions[0].classes) if predictions else None)
        values = {k: v for k, v in s.items() if isinstance(v, float)}
        values.update({f"f1:{t}": x["f1"] for t, x in s["per_type"].items()})
        return Scores(self.metric, values)

    def decisions(self, reference: Outputs, torch32: Outputs, onnx32: Outputs, inputs: Any,
                  info: dict[str, Any]) -> Decisions:
        """The tag of every token (padding left out) of PyTorch float32 against the file's; a disagreement
        counts only where the float64 top-2 margin at that token exceeds both errors there."""
        mask = inputs.feeds(["attention_mask"])["attention_mask"].astype(bool)
        ref, mine, theirs = (o[0][mask].astype(np.float64) for o in (reference, torch32, onnx32))
        top2 = np.sort(ref, -1)[:, -2:]
        error = np.maximum(np.abs(ref - mine).max(-1), np.abs(ref - theirs).max(-1))
        disagree = mine.argmax(-1) != theirs.argmax(-1)
        counted = disagree & (top2[:, 1] - top2[:, 0] > error)
        return Decisions(self.decision, len(ref), float(1 - disagree.mean()) if len(ref) else 1.0,
                         int(counted.sum()), int((disagree & ~counted).sum()))

    def agreement(self, reference: Outputs, candidate: Outputs, inputs: Windows, info: dict[str, Any]) -> dict[str, float]:
        """A variant's word tags and entities against its reference's: the share of words tagged alike,
        the largest difference of a word's tag probability, and entity F1 with the reference as gold."""
        a, b = tag_words(reference, inputs, info), tag_words(candidate, inputs, info)
        pa, pb = np.concatenate([p.probs for p in a]), np.concatenate([p.probs for p in b])
        agree = entity_scores([x.tags for x in a], [x.tags for x in b])["f1"]
        largest = float(np.abs(reference[0].astype(np.float64) - candidate[0]).max())
        return {"decision_agreement": float((pa.argmax(-1) == pb.argmax(-1)).mean()) if len(pa) else 1.0,
                "max_score_diff": float(np.abs(pa - pb).max()) if len(pa) else 0.0,
                "entity_agreement_f1": agree, "max_abs_diff": largest}

    # --- the usability report -----------------------------------------------------------------------
    def usability_suite(self, splits, spec: TokenPreprocessing, limit: int, info: dict[str, Any]):
        from .report import TokenSuite

        return TokenSuite.of(self, splits.val, spec, limit, info)

