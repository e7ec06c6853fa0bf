"""Tagged sentences made in the test: places, people and companies among filler words, as a CoNLL
column file, for a tiny BERT whose vocabulary holds every word."""

from __future__ import annotations

import random
from pathlib import Path

PLACES = ["paris", "london", "boston", "tokyo", "berlin", "madrid"]
FIRST = ["anna", "omar", "lena", "ravi"]
LAST = ["smith", "garcia", "khan", "novak"]
COMPANIES = ["acme", "globex", "initech"]
FILLER = ["we", "met", "in", "at", "today", "with", "love", "the", "new", "office", "and", "for", "lunch", "rt",
          "lol", "so", "good", "!", ".", "@", "#", ":", "/", "http", "t", "co"]
WORDS = PLACES + FIRST + LAST + COMPANIES + FILLER


def sentence(rng: random.Random) -> tuple[list[str], list[str]]:
    tokens, tags = [], []
    for _ in range(rng.randint(3, 9)):
        r = rng.random()
        if r < 0.15:
            tokens.append(rng.choice(PLACES))
            tags.append("B-loc")
        elif r < 0.25:
            tokens += [rng.choice(FIRST).capitalize(), rng.choice(LAST).capitalize()]
            tags += ["B-per", "I-per"]
        elif r < 0.32:
            tokens.append(rng.choice(COMPANIES))
            tags.append("B-org")
        else:
            tokens.append(rng.choice(FILLER))
            tags.append("O")
    return tokens, tags


def write_conll(path: Path, n: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = ["-DOCSTART- -X- O O", ""]
    for _ in range(n):
        tokens, tags = sentence(rng)
        lines += [f"{t}\t{g}" for t, g in zip(tokens, tags)] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
