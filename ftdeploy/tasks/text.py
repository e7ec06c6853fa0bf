"""Text classification: int64 ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the
model has them), batch and sequence axes dynamic. The preprocessor is a Hugging Face ``tokenizers``
tokenizer (``tokenizer.json``) with a ``max_length``; it travels in the run directory and in the
ONNX file, so the file alone serves (``tokenizers`` only: no torch, no transformers)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, DependencyError
from .base import Task

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PARITY_LENGTHS = (8, 16, 32, 64, 128)  # sequence lengths the FP32 gate checks besides the sentences' own
PARITY_PER_LENGTH = 64  # sentences per fixed length


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
            tok.enable_truncation(self.max_length)
            self._compiled = tok
        return self._compiled

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
        if isinstance(index, slice):
            pick = list(range(len(self.ids)))[index]
        else:
            pick = [int(i) for i in np.asarray(index).reshape(-1)]
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


class TextClassification(Task):
    name = "text_classification"
    input_names = TEXT_INPUTS
    codec = "text"
    description = "Text classification"

    def resolve_preprocessor(self, cfg, defaults: dict[str, Any]) -> TextPreprocessing:
        tokenizer = defaults.get("tokenizer")
        if tokenizer is None:
            raise ConfigError("text_classification needs a model that ships a tokenizer.json",
                              "use model.name=hf:<dir> with a Hugging Face directory holding tokenizer.json")
        return TextPreprocessing(tokenizer, cfg.max_length)

    def preprocessor_from_dict(self, d: dict[str, Any]) -> TextPreprocessing:
        return TextPreprocessing(d["tokenizer"], int(d.get("max_length", 128)))

    def preprocess(self, raw: list, spec: TextPreprocessing) -> Tokens:
        return spec.encode(raw)

    def stack(self, items: list) -> Tokens:
        return Tokens([np.asarray(ids) for ids, _ in items], [np.asarray(t) for _, t in items])

    def collate(self, items: list) -> tuple[tuple, Any]:
        import torch

        inputs, labels = zip(*items)
        arrays = self.stack(list(inputs)).feeds(TEXT_INPUTS)
        return tuple(torch.from_numpy(arrays[n]) for n in TEXT_INPUTS), torch.as_tensor(labels)

    def dynamic_axes(self, names: Sequence[str]) -> dict[str, dict[int, str]]:
        return {n: {0: "batch", 1: "sequence"} for n in names}

    def example_inputs(self, spec: TextPreprocessing, names: Sequence[str]) -> list[np.ndarray]:
        tokens = spec.encode(["an example sentence to trace the export", "another one"])
        return list(tokens.at_length(min(16, spec.max_length)).feeds(names).values())

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


def tokenizer_text(path) -> str:
    """The text of a ``tokenizer.json``, checked to be one."""
    from pathlib import Path

    text = Path(path).read_text()
    json.loads(text)
    return text
