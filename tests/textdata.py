"""Text fixtures made in the test: a tiny BERT (2 layers, hidden 32) with a WordPiece tokenizer
built from a small vocabulary, and a CSV of short reviews whose label follows their words."""

from __future__ import annotations

import csv
import random
from pathlib import Path

POSITIVE = ["great", "wonderful", "moving", "funny", "brilliant", "warm", "clever", "superb"]
NEGATIVE = ["dull", "boring", "awful", "tedious", "clumsy", "bland", "messy", "weak"]
FILLER = ["the", "film", "movie", "was", "a", "story", "and", "acting", "plot", "very", "really", "truly",
          "with", "its", "cast", "script", "ending", "music", "is", "."]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tokenizer(path: Path, words: list[str] | None = None) -> int:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    letters = "abcdefghijklmnopqrstuvwxyz"
    words = words if words is not None else POSITIVE + NEGATIVE + FILLER
    tokens = dict.fromkeys(SPECIAL + sorted(words) + list(letters) + [f"##{c}" for c in letters])
    vocab = {t: i for i, t in enumerate(tokens)}  # ids 0..n-1: every letter spelling any typo stays in range
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.save(str(path))
    return len(vocab)


def make_tiny_bert(directory: Path, words: list[str] | None = None) -> Path:
    """A Hugging Face directory: config.json, model.safetensors, tokenizer.json (whose vocabulary is
    ``words``, the reviews' by default, and every letter)."""
    import torch
    from transformers import BertConfig, BertModel

    directory.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(directory / "tokenizer.json", words)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(str(directory))
    return directory


def write_reviews(path: Path, n: int = 240, seed: int = 0) -> Path:
    """Short reviews: a positive word makes it label 'pos', a negative one 'neg'; lengths vary."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        for i in range(n):
            label = "pos" if i % 2 == 0 else "neg"
            words = [rng.choice(FILLER) for _ in range(rng.randint(2, 14))]
            words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
            writer.writerow([" ".join(words), label])
    return path
