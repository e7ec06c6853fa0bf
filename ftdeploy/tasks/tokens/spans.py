"""Words, windows and entities: what a token classifier reads and what it answers. Torch-free (the
``tokenizers`` library alone): the server uses it.

**Words** are the tokenizer's pre-tokenizer's (BERT's: whitespace and punctuation), everywhere:
training data given as tokens is joined by single spaces and split again, so a WNUT token such as
``@john_doe`` becomes the words ``@ john _ doe``; its tag goes to the first of them and the rest
continue the entity (``B-x`` -> ``B-x I-x I-x I-x``), which keeps every entity's characters. A word's
label is read at its first subword; the other subwords carry no label.

**Windows.** A text longer than ``max_length`` tokens is cut into overlapping windows of
``max_length`` tokens (special tokens included) that share ``stride`` tokens, as the transformers
pipeline's ``stride`` does. Each word is read in the window where its first subword has the most
context on both sides, so that no word, and no entity, is lost or read twice.

**The decoding rule** (:func:`entities`), one for the metric, the report and the server: a word's tag
is the most likely one at its first subword; an entity starts at ``B-x``, or at an ``I-x`` that does
not continue an entity of type x (a stray ``I-``), and goes on over the ``I-x`` that follow; its score
is the mean of its words' probabilities of their tags.

>>> entities(["O", "I-loc", "I-loc", "B-per", "I-org"], np.array([1, .8, .6, .9, .5]))
[('loc', 1, 3, 0.7), ('per', 3, 4, 0.9), ('org', 4, 5, 0.5)]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..text import TextPreprocessing, Tokens, picked

IGNORED = -100  # the label of positions that carry none (special tokens, later subwords): cross-entropy skips it


@dataclass(eq=False)
class Text:
    """One text as its words: the characters of each word in ``text``, and (for pre-split input) of each
    of the user's tokens, which were joined by single spaces into ``text``."""

    text: str
    spans: np.ndarray  # [words, 2]: start and end character of each word
    tokens: np.ndarray | None = None  # [user tokens, 2]: the same for each token the user sent

    def __len__(self) -> int:
        return len(self.spans)

    def token_indices(self, start: int, end: int) -> list[int]:
        """The user's tokens that the characters ``start:end`` overlap."""
        if self.tokens is None:
            return []
        return [int(i) for i in np.flatnonzero((self.tokens[:, 0] < end) & (self.tokens[:, 1] > start))]


def joined(tokens: Sequence[str]) -> tuple[str, np.ndarray]:
    """Tokens joined by single spaces, and each token's characters in the result.

    >>> joined(["New", "York"])
    ('New York', array([[0, 3],
           [4, 8]]))
    """
    starts = np.cumsum([0] + [len(t) + 1 for t in tokens[:-1]])
    return " ".join(tokens), np.stack([starts, starts + [len(t) for t in tokens]], 1).reshape(-1, 2)


@dataclass
class Window:
    """One row of the model's input: token ids (special tokens around a slice of the text's subwords),
    the positions of the first subword of each word this window reads (``heads``, for words
    ``first``, ``first + 1``, ...) and, for training, a label per position."""

    ids: np.ndarray
    heads: np.ndarray
    first: int
    text: Text
    labels: np.ndarray | None = None


class Windows(Tokens):
    """A batch of windows: token ids as :class:`~ftdeploy.tasks.text.Tokens` (padded by ``feeds``), and
    which words of which text each row reads. Sliced and indexed by row, like every batch; the rows of
    one text stay in order, so predictions are put back together per text (:meth:`texts`)."""

    def __init__(self, windows: list[Window], pad_id: int = 0, length: int | None = None):
        super().__init__([w.ids for w in windows], None, pad_id, length)
        self.windows = list(windows)

    @classmethod
    def concat(cls, batches: list["Windows"]) -> "Windows":
        return cls([w for b in batches for w in b.windows], batches[0].pad_id)

    def __getitem__(self, index) -> "Windows":
        return Windows([self.windows[i] for i in picked(index, len(self.windows))], self.pad_id, self.length)

    def texts(self) -> list[tuple[Text, list[int]]]:
        """Each text of the batch (in order of its first row) with its rows."""
        out: dict[int, tuple[Text, list[int]]] = {}
        for row, w in enumerate(self.windows):
            out.setdefault(id(w.text), (w.text, []))[1].append(row)
        return list(out.values())


@dataclass
class TokenPreprocessing(TextPreprocessing):
    """A tokenizer (the text of its ``tokenizer.json``), the window length and the tokens two
    neighbouring windows share."""

    stride: int | None = field(default=None, kw_only=True)  # default: a quarter of the window

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "tokens", "max_length": self.max_length, "stride": self.overlap, "tokenizer": self.tokenizer}

    @property
    def overlap(self) -> int:
        return self.stride if self.stride is not None else self.max_length // 4

    def cut(self, tok) -> None:
        """Nothing is truncated: windows do the cutting."""
        tok.no_truncation()

    def words(self, raw: str | Sequence[str]) -> tuple[Text, Any]:
        """A text (or the user's tokens, joined by spaces) as its words, and its encoding."""
        tokens = None
        if not isinstance(raw, str):
            raw, tokens = joined(list(raw))
        encoding = self.compiled.encode(raw)
        count = max((w for w in encoding.word_ids if w is not None), default=-1) + 1
        spans = np.asarray([encoding.word_to_chars(w) for w in range(count)], np.int64).reshape(-1, 2)
        return Text(raw, spans, tokens), encoding

    def windows(self, text: Text, encoding, word_labels: np.ndarray | None = None) -> list[Window]:
        """The text's windows; ``word_labels``: each word's tag index, for training (per position)."""
        special = np.asarray(encoding.special_tokens_mask, bool)
        ids = np.asarray(encoding.ids, np.int64)
        content = np.flatnonzero(~special)
        before = ids[:content[0]] if len(content) else ids[:1]
        after = ids[content[-1] + 1:] if len(content) else ids[1:]
        word_ids = [encoding.word_ids[i] for i in content]
        firsts = np.asarray([k for k, w in enumerate(word_ids) if w is not None and (k == 0 or word_ids[k - 1] != w)])
        width = max(1, self.max_length - len(before) - len(after))
        step = max(1, width - self.overlap)
        starts = list(range(0, max(1, len(content) - width + step), step))
        # each word is read where its first subword is farthest from the window's edges
        context = np.stack([np.minimum(firsts - s, s + width - 1 - firsts) for s in starts]) if len(firsts) else None
        owner = context.argmax(0) if context is not None else np.zeros(0, int)
        out = []
        for k, s in enumerate(starts):
            piece = ids[content[s:s + width]]
            mine = np.flatnonzero(owner == k)
            heads = firsts[mine] - s + len(before)
            labels = None
            if word_labels is not None:
                labels = np.full(len(before) + len(piece) + len(after), IGNORED, np.int64)
                inside = firsts[(firsts >= s) & (firsts < s + width)]
                labels[inside - s + len(before)] = word_labels[[word_ids[f] for f in inside]]
            out.append(Window(np.concatenate([before, piece, after]), heads.astype(np.int64),
                              int(word_ids[firsts[mine[0]]]) if len(mine) else len(text), text, labels))
        return out

    def encode(self, raw: Sequence[str | Sequence[str]]) -> Windows:
        """Texts (or lists of tokens) as the windows the model reads."""
        return Windows([w for r in raw for w in self.windows(*self.words(r))], self.pad_id)


def entities(tags: Sequence[str], probs: np.ndarray) -> list[tuple[str, int, int, float]]:
    """(type, first word, last word + 1, score) of each entity in word ``tags`` (IOB2, read with the
    rule in this module's docstring); ``probs``: each word's probability of its tag."""
    out: list[tuple[str, int, int, float]] = []
    kind, start = None, 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, name = tag.partition("-")
        if kind is not None and not (prefix == "I" and name == kind):
            out.append((kind, start, i, float(np.mean(probs[start:i]))))
            kind = None
        if kind is None and prefix in ("B", "I"):
            kind, start = name, i
    return out


def repaired(tags: Sequence[str]) -> list[str]:
    """Tags as strict IOB2 that names the same entities as :func:`entities` reads: a stray ``I-x`` becomes
    ``B-x`` (seqeval's strict mode drops it instead: the metric would then miss an entity the server answers).

    >>> repaired(["O", "I-loc", "I-loc", "B-per", "I-org"])
    ['O', 'B-loc', 'I-loc', 'B-per', 'B-org']
    """
    out, kind = [], None
    for tag in tags:
        prefix, _, name = tag.partition("-")
        if prefix == "I" and name != kind:
            tag = f"B-{name}"
        kind = name if prefix in ("B", "I") else None
        out.append(tag)
    return out


def word_logits(logits: np.ndarray, inputs: Windows) -> list[np.ndarray]:
    """Per row, the logits at the first subword of each word it reads."""
    return [logits[row, w.heads] for row, w in enumerate(inputs.windows)]
