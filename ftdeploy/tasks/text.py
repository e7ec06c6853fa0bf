"""Text classification: int64 ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the
model has them), batch and sequence axes dynamic, and a classifier's outputs
(:mod:`ftdeploy.tasks.classification`). The preprocessor is a Hugging Face ``tokenizers`` tokenizer
(``tokenizer.json``) with a ``max_length``; it travels in the run directory and in the ONNX file, so
the file alone serves (``tokenizers`` only: no torch, no transformers). For the usability report:
text corruptions (typos, word dropout, casing, punctuation, truncation), token occlusion and
integrated gradients on the word embeddings, latency over batch size x sequence length. Requests:
JSON ``{"text"}`` / ``{"texts"}`` or a text/plain body."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..codecs import Parsed, Tensor, TensorSpec, byte_items, one_input, texts_of
from ..errors import BadInput, ConfigError, DependencyError, FtdeployError
from ..figures import escape, saliency_agreement_table
from ..registry import Registry
from .base import Outputs, Task, softmax, tile
from .classification import ClassifierOutputs, ClassifierSuite, classifier_codec, logits_of

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PARITY_LENGTHS = (8, 16, 32, 64, 128)  # sequence lengths the FP32 gate checks besides the sentences' own
PARITY_PER_LENGTH = 64  # sentences per fixed length
# Hugging Face model types whose graphs onnxruntime's transformer optimizer fuses, by its name for them
FUSABLE = {"bert": "bert", "roberta": "bert", "distilbert": "bert", "xlm-roberta": "bert", "electra": "bert"}


@dataclass
class TextPreprocessing:
    """A tokenizer (the text of its ``tokenizer.json``) and the length texts are truncated to."""

    tokenizer: str
    max_length: int = 128
    _compiled: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "text", "max_length": self.max_length, "tokenizer": self.tokenizer}

    @property
    def compiled(self):
        if self._compiled is None:
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise DependencyError("text models need the tokenizers package", "pip install tokenizers") from None
            tok = Tokenizer.from_str(self.tokenizer)
            tok.no_padding()
            self.cut(tok)
            self._compiled = tok
        return self._compiled

    def cut(self, tok) -> None:
        """How long texts are cut: truncated to ``max_length``."""
        tok.enable_truncation(self.max_length)

    @property
    def pad_id(self) -> int:
        for token in ("[PAD]", "<pad>"):
            i = self.compiled.token_to_id(token)
            if i is not None:
                return i
        return 0

    def encode(self, texts: Sequence[str]) -> "Tokens":
        """Tokenize (truncated to ``max_length``, special tokens added), unpadded."""
        encodings = self.compiled.encode_batch(list(texts))
        return Tokens([np.asarray(e.ids, np.int64) for e in encodings],
                      [np.asarray(e.type_ids, np.int64) for e in encodings], self.pad_id)


def picked(index, n: int) -> list[int]:
    """The rows a slice or an index array picks out of ``n``."""
    return list(range(n))[index] if isinstance(index, slice) else [int(i) for i in np.asarray(index).reshape(-1)]


class Tokens:
    """Token ids of many texts, unpadded. Sliced and indexed like an array; :meth:`feeds` pads them
    to the longest in the batch (or to ``length``) with an attention mask.

    >>> t = Tokens([np.array([101, 7, 102]), np.array([101, 102])])
    >>> f = t.feeds(["input_ids", "attention_mask"])
    >>> f["input_ids"].tolist(), f["attention_mask"].tolist()
    ([[101, 7, 102], [101, 102, 0]], [[1, 1, 1], [1, 1, 0]])
    >>> t.at_length(2).feeds(["input_ids"])["input_ids"].tolist()
    [[101, 102], [101, 102]]
    """

    def __init__(self, ids: list[np.ndarray], type_ids: list[np.ndarray] | None = None, pad_id: int = 0,
                 length: int | None = None):
        self.ids, self.pad_id, self.length = list(ids), pad_id, length
        self.type_ids = list(type_ids) if type_ids is not None else [np.zeros_like(i) for i in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def concat(cls, batches: list["Tokens"]) -> "Tokens":
        return cls([i for b in batches for i in b.ids], [t for b in batches for t in b.type_ids], batches[0].pad_id)

    def __getitem__(self, index) -> "Tokens":
        pick = picked(index, len(self.ids))
        return Tokens([self.ids[i] for i in pick], [self.type_ids[i] for i in pick], self.pad_id, self.length)

    def lengths(self) -> list[int]:
        return [len(i) for i in self.ids]

    def at_length(self, length: int) -> "Tokens":
        """Every text truncated to ``length`` tokens (its last, the separator, kept) and padded to it."""
        def cut(a: np.ndarray) -> np.ndarray:
            return a if len(a) <= length else np.concatenate([a[:length - 1], a[-1:]])

        return Tokens([cut(a) for a in self.ids], [cut(a) for a in self.type_ids], self.pad_id, length)

    def feeds(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        width = self.length or max(self.lengths(), default=1)
        ids = np.full((len(self), width), self.pad_id, np.int64)
        mask = np.zeros((len(self), width), np.int64)
        types = np.zeros((len(self), width), np.int64)
        for row, (a, t) in enumerate(zip(self.ids, self.type_ids)):
            ids[row, :len(a)], mask[row, :len(a)], types[row, :len(t)] = a, 1, t
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {n: arrays[n] for n in names}


TextCorruption = Callable[[str, int, np.random.Generator], str]
text_corruptions: Registry[TextCorruption] = Registry("text corruption", FtdeployError)
TEXT_CORRUPTIONS = ["typo_swap", "typo_delete", "typo_insert", "word_dropout", "casing", "punctuation", "truncation"]


def _typos(text: str, severity: int, rng: np.random.Generator, edit) -> str:
    """``edit`` applied at each letter with a probability that grows with ``severity``."""
    p = [0.02, 0.04, 0.07, 0.1, 0.15][severity - 1]
    chars = list(text)
    out: list[str] = []
    i = 0
    while i < len(chars):
        if chars[i].isalpha() and rng.random() < p:
            i = edit(chars, i, out, rng)
        else:
            out.append(chars[i])
            i += 1
    return "".join(out)


@text_corruptions.register("identity")
def _identity(text, severity, rng):
    """No change: the clean texts through the corruption path."""
    return text


@text_corruptions.register("typo_swap")
def _typo_swap(text, severity, rng):
    def swap(chars, i, out, _rng):
        if i + 1 < len(chars) and chars[i + 1].isalpha():
            out += [chars[i + 1], chars[i]]
            return i + 2
        out.append(chars[i])
        return i + 1

    return _typos(text, severity, rng, swap)


@text_corruptions.register("typo_delete")
def _typo_delete(text, severity, rng):
    return _typos(text, severity, rng, lambda chars, i, out, _rng: i + 1)


@text_corruptions.register("typo_insert")
def _typo_insert(text, severity, rng):
    def insert(chars, i, out, r):
        out += [chars[i], string.ascii_lowercase[r.integers(26)]]
        return i + 1

    return _typos(text, severity, rng, insert)


@text_corruptions.register("word_dropout")
def _word_dropout(text, severity, rng):
    words = text.split()
    kept = [w for w in words if rng.random() >= [0.05, 0.1, 0.2, 0.3, 0.4][severity - 1]]
    return " ".join(kept or words[:1])


@text_corruptions.register("casing")
def _casing(text, severity, rng):
    """Words turned to upper or lower case at random (severity 5: the whole text in capitals)."""
    if severity == 5:
        return text.upper()
    p = [0.1, 0.25, 0.5, 0.75][severity - 1]
    return " ".join((w.upper() if rng.random() < 0.5 else w.lower()) if rng.random() < p else w for w in text.split())


@text_corruptions.register("punctuation")
def _punctuation(text, severity, rng):
    """Punctuation removed with a probability that grows with severity."""
    p = [0.2, 0.4, 0.6, 0.8, 1.0][severity - 1]
    return "".join(c for c in text if c not in string.punctuation or rng.random() >= p)


@text_corruptions.register("truncation")
def _truncation(text, severity, rng):
    """Only the first part of the text: 90 % of its words down to 30 %."""
    words = text.split()
    return " ".join(words[:max(1, round(len(words) * [0.9, 0.75, 0.6, 0.45, 0.3][severity - 1]))])


@dataclass
class Texts(ClassifierSuite):
    """The text classifier's usability suite: validation texts, labels, classes and the tokenizer."""

    task: Any
    texts: list[str]
    labels: np.ndarray
    classes: list[str]
    spec: TextPreprocessing
    corruptions = text_corruptions
    corrupted = "to the text before tokenization"

    def inputs(self, corruption: str = "identity", severity: int = 1) -> Tokens:
        """Token ids of every text under ``corruption`` at ``severity``; seeded, so every variant sees
        exactly the same corrupted texts."""
        fn = text_corruptions.get(corruption)
        rng = np.random.default_rng(1000 * severity + sorted(text_corruptions.names()).index(corruption))
        return self.spec.encode([fn(t, severity, rng) for t in self.texts])

    def saliency_method(self, clean: Tokens) -> dict[str, Any]:
        return {"method": "token occlusion", "mask_token": self.mask_token}

    @property
    def mask_token(self) -> str:
        return "[MASK]" if self.spec.compiled.token_to_id("[MASK]") is not None else "[UNK]"

    def probability(self, outputs: Outputs, target: int) -> np.ndarray:
        """The probability of what saliency explains, per row of ``outputs``: the class ``target``."""
        return softmax(logits_of(outputs))[:, target]

    def occlusion(self, predict, clean: Tokens, i: int, target: Any) -> np.ndarray:
        """Drop of the ``target`` probability (:meth:`probability`) when each token in turn is replaced
        by the mask token (the special tokens around the text are left alone: 0)."""
        ids = clean.ids[i]
        mask_id = self.spec.compiled.token_to_id(self.mask_token) or 0
        variants = []
        for j in range(1, len(ids) - 1):
            occluded = ids.copy()
            occluded[j] = mask_id
            variants.append(occluded)
        base = self.probability(predict(clean[[i]]), target)[0]
        if not variants:
            return np.zeros(len(ids))
        occluded = Tokens(variants, [clean.type_ids[i]] * len(variants), clean.pad_id)
        probs = np.concatenate([self.probability(predict(occluded[j:j + 32]), target) for j in range(0, len(occluded), 32)])
        return np.concatenate([[0.0], base - probs, [0.0]])

    def integrated_gradients(self, model, clean: Tokens, i: int, target: int, steps: int = 32) -> np.ndarray:
        """Integrated gradients on the word embeddings (from all-zero embeddings; positions and token
        types kept), per token as |attribution| summed over the hidden size."""
        import torch

        arrays = clean[[i]].feeds(TEXT_INPUTS)
        args = [torch.from_numpy(np.repeat(arrays[n], steps, 0)) for n in TEXT_INPUTS]
        embeddings = model.encoder.get_input_embeddings()
        alphas = torch.linspace(1 / steps, 1, steps).view(-1, 1, 1)
        captured = {}

        def scale(_module, _inputs, output):
            captured["embedded"] = output[0].detach()
            scaled = output * alphas
            scaled.retain_grad()
            captured["path"] = scaled
            return scaled

        hook = embeddings.register_forward_hook(scale)
        try:
            model.zero_grad()
            model(*args)[:, target].sum().backward()
        finally:
            hook.remove()
        grads = captured["path"].grad.mean(0)
        return (captured["embedded"] * grads).sum(-1).abs().numpy()

    def explained(self, samples: list[int], reference: Outputs) -> dict[str, Any]:
        tokens = self.spec.encode([self.texts[i] for i in samples])  # only the explained ones
        return {**self.described(samples, reference),
                "tokens": [[self.spec.compiled.id_to_token(int(t)) for t in ids] for ids in tokens.ids]}

    def grid(self, clean: Tokens, cfg, cores: int):
        """Scalability cells: (their fields, batch, threads) over batch size x sequence length, at
        every core (serving's setting)."""
        for length in [n for n in cfg.lengths if n <= self.spec.max_length] or [self.spec.max_length]:
            at_length = clean.at_length(length)
            for bs in cfg.batch_sizes:
                yield {"threads": cores, "sequence_length": length, "batch_size": bs}, tile(at_length, bs), cores

    def probe_shape(self, clean: Tokens, cfg) -> tuple[int, ...]:
        return (max(cfg.batch_sizes), self.spec.max_length)

    def sections(self, data: dict[str, Any]) -> list[str]:
        return [*super().sections(data), token_saliency_section(data)]


def token_saliency_section(data: dict[str, Any], explained: str = "FP32's predicted class",
                           chosen: str = " (misclassified ones among them, when there are any)") -> str:
    """Each explained sentence once per variant, its tokens shaded by how much hiding them lowers the
    probability of FP32's prediction (``explained``; and, for PyTorch, by integrated gradients)."""
    v, inputs = data["variants"], data["saliency_inputs"]
    method = next(iter(v.values()))["saliency"]
    out = [f"<h2>Interpretability</h2><p>Token occlusion through each variant's own predictor: each token in turn "
           f"replaced by <code>{escape(method['mask_token'])}</code>; the shade is how much the probability of "
           f"{explained} drops (red: the token supports it). Agreement is the Spearman rank correlation "
           f"with FP32's scores, averaged over the {len(inputs['samples'])} sentences{chosen}. The PyTorch "
           f"model's last row shows integrated gradients on the word embeddings.</p>",
           saliency_agreement_table(v, "sentence")]

    def shaded(tokens: list[str], scores: list[float]) -> str:
        top = max((abs(x) for x in scores), default=0.0) or 1.0
        return " ".join(f'<span class="tok" style="background:rgba({"220,50,47" if x >= 0 else "38,139,210"},'
                        f'{abs(x) / top:.2f})">{escape(t)}</span>' for t, x in zip(tokens, scores))

    for r, tokens in enumerate(inputs["tokens"]):
        lines = [f"<p class='meta'>{escape(inputs['labels'][r])} → {escape(inputs['fp32_predictions'][r])}</p>"]
        for name, x in v.items():
            lines.append(f"<div class='toks'><b>{escape(name)}</b> {shaded(tokens, x['saliency']['maps'][r])}</div>")
        ig = v.get("torch", {}).get("saliency", {}).get("integrated_gradients")
        if ig:
            lines.append(f"<div class='toks'><b>torch: IG</b> {shaded(tokens, ig[r])}</div>")
        out.append("<div class='sentence'>" + "".join(lines) + "</div>")
    return "\n".join(out)


def _attentions(model) -> list:
    """The self-attention modules of a Hugging Face encoder (query/key/value projections and a head count)."""
    return [m for m in model.modules() if hasattr(m, "num_attention_heads") and hasattr(m, "query")
            and hasattr(m, "key") and hasattr(m, "value")]


def validation_texts(task, splits, spec: TextPreprocessing, limit: int) -> Texts:
    n = min(limit, len(splits.val))
    return Texts(task, splits.val.texts[:n], np.asarray(splits.val.labels[:n]), splits.classes, spec)


class TextRequests:
    """Texts in a request (JSON or text/plain); tokenized by the task's preprocess. A text longer than
    the file's max_length is truncated to it, as in training; the body limit bounds what is read."""

    accepts = ('Send JSON {"text": "..."} or {"texts": ["...", ...]}, or one text as a text/plain body (UTF-8). '
               "Texts longer than the model's max_length tokens are truncated, as in training.")
    request_body = {"content": {
        "application/json": {"schema": {"oneOf": [
            {"type": "object", "required": ["text"], "properties": {"text": {"type": "string", "minLength": 1}}},
            {"type": "object", "required": ["texts"], "properties": {
                "texts": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}}}]},
            "example": {"texts": ["A warm, funny and moving film.", "Two hours I will never get back."]}},
        "text/plain": {"schema": {"type": "string"}, "example": "A warm, funny and moving film."}}}

    def parse(self, body: bytes, content_type: str, limits) -> Parsed:
        return Parsed(texts_of(body, content_type, limits), lambda text: text)

    def warmup(self, spec) -> list:
        return ["warm up"]

    def tensor_inputs(self, model) -> list[TensorSpec]:
        return [TensorSpec("text", "BYTES", (-1,), accepts="one UTF-8 text per element")]

    def from_tensors(self, tensors: list[Tensor], model, limits) -> Parsed:
        tensor = one_input(tensors, self.tensor_inputs(model))
        texts = []
        for i, item in enumerate(byte_items(tensor, limits, "UTF-8 text")):
            try:
                texts.append(item.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise BadInput(400, "invalid_encoding", f"text {i} is not UTF-8 ({e.reason} at byte {e.start})") from None
            if not texts[-1].strip():
                raise BadInput(400, "empty_text", f"text {i} is empty")
        return Parsed(texts, lambda text: text)

    def encode_tensor(self, raw: list[str], model) -> Tensor:
        """The client's side: texts as UTF-8 in a BYTES tensor."""
        return Tensor("text", "BYTES", [len(raw)], [t.encode() for t in raw])

    def encode(self, raw: list[str]) -> tuple[bytes, str]:
        """The client's side: texts as JSON."""
        import json

        return json.dumps({"texts": list(raw)}).encode(), "application/json"


class TextInputs:
    """The input side of a text model: token ids from the file's tokenizer, text requests."""

    input_names = TEXT_INPUTS
    unit = "texts"
    # onnxruntime's transformer fusions (Attention, EmbedLayerNormalization) recognize the TorchScript
    # exporter's BERT graphs, not the dynamo exporter's (checked with transformers 5 and onnxruntime 1.32)
    exporter_order = ("torchscript", "dynamo")
    default_corruptions = TEXT_CORRUPTIONS

    def resolve_preprocessor(self, cfg, defaults: dict[str, Any]) -> TextPreprocessing:
        tokenizer = defaults.get("tokenizer")
        if tokenizer is None:
            raise ConfigError(f"{self.name} needs a model that ships a tokenizer.json",
                              "use model.name=hf:<dir> with a Hugging Face directory holding tokenizer.json")
        return TextPreprocessing(tokenizer, cfg.max_length)

    def preprocessor_from_dict(self, d: dict[str, Any]) -> TextPreprocessing:
        return TextPreprocessing(d["tokenizer"], int(d.get("max_length", 128)))

    def preprocess(self, raw: list, spec: TextPreprocessing) -> Tokens:
        return spec.encode(raw)

    def stack(self, items: list) -> Tokens:
        return Tokens([np.asarray(ids) for ids, _ in items], [np.asarray(t) for _, t in items])

    def train_sampler(self, dataset, batch_size: int, seed: int):
        """Batches of texts of similar length: each batch pads to its longest text, and random
        batches of short snippets pad to the rare long one (2x the work on movie reviews)."""
        from .length_grouping import LengthGroupedSampler

        return LengthGroupedSampler([len(dataset[i][0][0]) for i in range(len(dataset))], batch_size, seed)

    def dynamic_axes(self, names: Sequence[str]) -> dict[str, dict[int, str]]:
        return {n: {0: "batch", 1: "sequence"} for n in names}

    def example_inputs(self, spec: TextPreprocessing, names: Sequence[str]) -> list[np.ndarray]:
        tokens = spec.encode(["an example sentence to trace the export", "another one"])
        return list(tokens.at_length(min(16, spec.max_length)).feeds(names).values())

    def pruning_options(self, model, ratio: float) -> tuple[dict[str, Any], list]:
        """Whole attention heads (every layer keeps at least one) and FFN channels; the hidden size,
        which every residual connection and LayerNorm shares, stays: the word embeddings are left
        whole, and with them every group that reaches them."""
        attentions = _attentions(model)
        num_heads = {layer: m.num_attention_heads for m in attentions for layer in (m.query, m.key, m.value)}
        fewest = min((m.num_attention_heads for m in attentions), default=1)
        options = {"num_heads": num_heads, "prune_num_heads": True, "prune_head_dims": False,
                   "head_pruning_ratio": min(ratio, 1 - 1 / fewest)}
        return options, [model.encoder.get_input_embeddings()]

    def after_pruning(self, model) -> None:
        for m in _attentions(model):
            m.all_head_size = m.query.out_features
            m.num_attention_heads = m.all_head_size // m.attention_head_size

    def fusion_options(self, architecture: dict[str, Any]) -> dict[str, Any] | None:
        config = architecture.get("hf_config") or {}
        if config.get("model_type") not in FUSABLE:
            return None
        heads, width = config["num_attention_heads"], config["hidden_size"]
        pruned = {(m["attrs"]["num_attention_heads"], m["attrs"]["all_head_size"])
                  for m in (architecture.get("pruned") or {}).values() if "num_attention_heads" in m["attrs"]}
        if pruned:  # fewer heads than the config says: the same in every layer, or none fused (0: not known)
            heads, width = pruned.pop() if len(pruned) == 1 else (0, 0)
        return {"model_type": FUSABLE[config["model_type"]], "num_heads": heads, "hidden_size": width}

    def parity_sets(self, inputs: Tokens, spec: TextPreprocessing) -> dict[str, Tokens]:
        sets: dict[str, Tokens] = {"validation": inputs}
        for length in PARITY_LENGTHS:
            if length <= spec.max_length:
                sets[f"length {length}"] = inputs[:PARITY_PER_LENGTH].at_length(length)
        return sets

    def bench_inputs(self, inputs: Tokens, spec: TextPreprocessing) -> Tokens:
        return inputs.at_length(spec.max_length)

    def encode_samples(self, inputs: Tokens, spec: TextPreprocessing) -> list[list[int]]:
        return [ids.tolist() for ids in inputs.ids]

    def decode_samples(self, samples: list, spec: TextPreprocessing) -> Tokens:
        return Tokens([np.asarray(s, np.int64) for s in samples], None, spec.pad_id)


class TextClassification(TextInputs, ClassifierOutputs, Task):
    name = "text_classification"
    description = "Text classification"
    # Magnitude ranks heads poorly: MiniLM at 0.47x MACs, the same recovery, 81.55 % (l2) against 83.85 %
    pruning_importance = "taylor"
    codec = classifier_codec(TextRequests())

    def collate(self, items: list) -> tuple[tuple, Any]:
        import torch

        inputs, labels = zip(*items)
        arrays = self.stack(list(inputs)).feeds(TEXT_INPUTS)
        return tuple(torch.from_numpy(arrays[n]) for n in TEXT_INPUTS), torch.as_tensor(labels)

    def usability_suite(self, splits, spec: TextPreprocessing, limit: int, info: dict[str, Any]) -> Texts:
        return validation_texts(self, splits, spec, limit)
