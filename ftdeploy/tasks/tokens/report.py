"""A token classifier's part of the usability report: entity F1 per type and a confusion between types;
F1 under corruptions that keep the tags aligned with the words (typos inside words, word dropout that
drops the word's tag with it, punctuation noise on ``O`` words; casing only for a cased model);
calibration of the word tags' confidences; token occlusion (and integrated gradients) of a chosen
entity's tag; latency over batch size x sequence length; and sentences with the gold and predicted
spans highlighted."""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import numpy as np

from ...errors import FtdeployError
from ...figures import escape, fmt, inline_png, pyplot, table
from ...registry import Registry
from ..base import Outputs, Scores, softmax
from ..classification import calibration, calibration_section
from ..text import Texts, text_corruptions, token_saliency_section
from .data import Sentence, TokenDataset
from .metric import entity_scores, entity_types, gold_and_predicted
from .spans import TokenPreprocessing, Windows, entities, word_logits

SHOWN = 12  # validation texts drawn with their spans
NONE = "(none)"

Words = tuple[list[str], list[str]]  # words and their tags
TagCorruption = Callable[[list[str], list[str], int, np.random.Generator], Words]
corruptions: Registry[TagCorruption] = Registry("token corruption", FtdeployError)


@corruptions.register("identity")
def _identity(words, tags, severity, rng):
    return words, tags


def _inside_words(name: str) -> TagCorruption:
    """The text corruption ``name`` applied to each word alone (a word that loses every letter stays)."""
    def corrupt(words, tags, severity, rng):
        return [text_corruptions.get(name)(w, severity, rng) or w for w in words], tags

    corrupt.__doc__ = f"{name} inside each word: the words, and so the tags, stay where they are"
    return corrupt


for _name in ("typo_swap", "typo_delete", "typo_insert", "casing"):
    corruptions.register(_name)(_inside_words(_name))


@corruptions.register("word_dropout")
def _word_dropout(words, tags, severity, rng):
    """Words dropped with their tags (an entity that loses its first word starts at the next)."""
    keep = rng.random(len(words)) >= [0.05, 0.1, 0.2, 0.3, 0.4][severity - 1]
    keep[rng.integers(len(words))] |= not keep.any()
    return [w for w, k in zip(words, keep) if k], [t for t, k in zip(tags, keep) if k]


@corruptions.register("punctuation")
def _punctuation(words, tags, severity, rng):
    """Punctuation on ``O`` words only: punctuation words dropped, and marks added after others."""
    p = [0.1, 0.2, 0.3, 0.45, 0.6][severity - 1]
    out_w, out_t = [], []
    for w, t in zip(words, tags):
        if t == "O" and all(c in string.punctuation for c in w) and rng.random() < p:
            continue
        out_w.append(w)
        out_t.append(t)
        if t == "O" and rng.random() < p / 2:
            out_w.append(str(rng.choice(list("!?.,;:"))) * int(rng.integers(1, 4)))
            out_t.append("O")
    return (out_w, out_t) if out_w else (words, tags)


TOKEN_CORRUPTIONS = ["typo_swap", "typo_delete", "typo_insert", "word_dropout", "punctuation"]


@dataclass
class TokenSuite:
    """Validation texts as words with their gold tags, the tokenizer and the file's classes."""

    task: Any
    sentences: list[Sentence]
    classes: list[str]
    spec: TokenPreprocessing
    info: dict[str, Any]
    corruptions = corruptions
    corrupted = "to the words, with their tags kept aligned"

    @classmethod
    def of(cls, task, val: TokenDataset, spec: TokenPreprocessing, limit: int, info: dict[str, Any]) -> "TokenSuite":
        """Up to ``limit`` validation texts, whole (all their windows)."""
        texts: dict[int, tuple[Any, list[int]]] = {}
        for w, gold in (val[i] for i in range(len(val))):
            if id(w.text) not in texts and len(texts) >= limit:
                break
            texts.setdefault(id(w.text), (w.text, []))[1].extend(gold.tolist())
        sentences = [([t.text[a:b] for a, b in t.spans], [info["classes"][k] for k in gold], "")
                     for t, gold in texts.values()]
        return cls(task, sentences, info["classes"], spec, info)

    @property
    def uncased(self) -> bool:
        """Whether the tokenizer lowercases (all-MiniLM-L6-v2's does): then casing never reaches the model."""
        return self.spec.compiled.encode("Ab").ids == self.spec.compiled.encode("ab").ids

    def inputs(self, corruption: str = "identity", severity: int = 1) -> Windows:
        """Every text's windows under ``corruption`` at ``severity``, with the gold tags that follow it
        (``targets``); seeded, so that every variant reads the same words."""
        fn = corruptions.get(corruption)
        rng = np.random.default_rng(1000 * severity + sorted(corruptions.names()).index(corruption))
        corrupted = [(*fn(list(words), list(tags), severity, rng), at) for words, tags, at in self.sentences]
        data = TokenDataset(corrupted, self.classes, self.spec)
        batch = Windows([w for w, _ in data.items], self.spec.pad_id)
        batch.targets = [gold for _, gold in data.items]
        return batch

    @cached_property
    def clean(self) -> Windows:
        """The uncorrupted inputs, made once for saliency (which asks for them per explained text)."""
        return self.inputs()

    def score(self, outputs: Outputs, inputs: Windows) -> Scores:
        return self.task.evaluate(outputs, inputs, inputs.targets, self.info)

    def _tagged(self, outputs: Outputs, inputs: Windows):
        return self.task.postprocess(outputs, inputs, self.info)

    def performance(self, outputs: Outputs, inputs: Windows) -> dict[str, Any]:
        """Per type precision, recall and F1; a confusion of gold entities against the predicted ones of
        the same span (``(none)``: missed, or predicted where there is none); the first texts' spans."""
        tagged = self._tagged(outputs, inputs)
        gold, predicted = gold_and_predicted(tagged, inputs.targets)
        kinds = entity_types(self.classes)
        s = entity_scores(gold, predicted, kinds)
        names = kinds + [NONE]
        confusion = np.zeros((len(names), len(names)), int)
        for g, p in zip(gold, predicted):
            gs = {(a, b): k for k, a, b, _ in entities(g, np.ones(len(g)))}
            ps = {(a, b): k for k, a, b, _ in entities(p, np.ones(len(p)))}
            for span in gs.keys() | ps.keys():
                confusion[names.index(gs.get(span, NONE)), names.index(ps.get(span, NONE))] += 1
        shown = [{"text": t.text.text, "gold": spans_of(t, g), "predicted": [
            {"label": e["label"], "start": e["start"], "end": e["end"]} for e in t.entities()]}
            for t, g in zip(tagged[:SHOWN], gold[:SHOWN])]
        return {**{k: v for k, v in s.items() if k != "per_type"}, "per_type": s["per_type"], "types": names,
                "confusion_matrix": confusion.tolist(), "shown": shown}

    def calibration(self, outputs: Outputs, inputs: Windows) -> dict[str, Any]:
        """Calibration of the word tags (the logits at each word's first subword), as for a classifier."""
        logits = np.concatenate(word_logits(outputs[0], inputs))
        return calibration(logits, np.concatenate(inputs.targets))

    # --- saliency -------------------------------------------------------------------------------
    def saliency_samples(self, reference: Outputs, n: int) -> list[int]:
        """The first ``n`` rows where the reference (FP32) finds an entity."""
        clean = self.clean
        return [r for r in range(len(clean)) if self._entity(reference, clean, r) is not None][:n]

    def _entity(self, reference: Outputs, clean: Windows, row: int):
        tagged = self._tagged([reference[0][row:row + 1]], clean[[row]])[0]
        found = entities(tagged.tags, tagged.probs.max(-1))
        if not found:
            return None
        kind, a, b, score = max(found, key=lambda e: e[3])
        return {"position": int(clean.windows[row].heads[a]), "tag": self.classes.index(tagged.tags[a]),
                "label": kind, "words": [a, b], "score": score}

    def target(self, reference: Outputs, i: int) -> dict[str, Any]:
        """The reference's most confident entity in row ``i``: saliency explains its first word's tag."""
        return self._entity(reference, self.clean, i)

    def saliency_method(self, clean) -> dict[str, Any]:
        return {"method": "token occlusion of a chosen entity's tag", "mask_token": self.mask_token}

    @property
    def mask_token(self) -> str:
        return Texts.mask_token.fget(self)

    def probability(self, outputs: Outputs, target: dict[str, Any]) -> np.ndarray:
        """The probability of the chosen entity's first word's tag, per row of ``outputs``."""
        return softmax(outputs[0][:, target["position"]])[:, target["tag"]]

    def occlusion(self, predict, clean: Windows, i: int, target: dict[str, Any]) -> np.ndarray:
        """Drop of that probability when each token in turn is replaced by the mask token (as for a
        text classifier)."""
        return Texts.occlusion(self, predict, clean, i, target)

    def integrated_gradients(self, model, clean: Windows, i: int, target: dict[str, Any], steps: int = 32) -> np.ndarray:
        """Integrated gradients of the tag's logit on the word embeddings (see the text classifier's)."""
        pos, tag = target["position"], target["tag"]

        class Picked:  # the token's tag logit, as a text classifier's class logit
            def __init__(self, model):
                self.encoder = model.encoder

            def zero_grad(self):
                model.zero_grad()

            def __call__(self, *args):
                return model(*args)[:, pos]

        return Texts.integrated_gradients(self, Picked(model), clean, i, tag, steps)

    def explained(self, samples: list[int], reference: Outputs) -> dict[str, Any]:
        clean = self.clean
        chosen = [self._entity(reference, clean, i) for i in samples]
        texts = [clean.windows[i].text for i in samples]
        words = [[t.text[a:b] for a, b in t.spans] for t in texts]
        return {"labels": [" ".join(w) for w in words],
                "fp32_predictions": [f"{c['label']}: " + " ".join(w[c["words"][0]:c["words"][1]]) for c, w in zip(chosen, words)],
                "tokens": [[self.spec.compiled.id_to_token(int(t)) for t in clean.ids[i]] for i in samples]}

    def grid(self, clean: Windows, cfg, cores: int):
        return Texts.grid(self, clean, cfg, cores)

    def probe_shape(self, clean: Windows, cfg) -> tuple[int, ...]:
        return (max(cfg.batch_sizes), self.spec.max_length)

    def sections(self, data: dict[str, Any]) -> list[str]:
        note = ("<p class='meta'>Casing is no corruption here: the tokenizer lowercases every text, so the model "
                "never sees it (it is left out of the robustness section).</p>" if self.uncased else "")
        return [performance_section(data) + note, spans_section(data), calibration_section(data),
                token_saliency_section(data, "the tag FP32 gives the first word of its most confident entity "
                                       "in the sentence (named above each sentence)", " where FP32 finds an entity")]


def spans_of(tagged, gold: list[str]) -> list[dict[str, Any]]:
    """The gold entities of a text as characters (its words' spans)."""
    spans = tagged.text.spans
    return [{"label": k, "start": int(spans[tagged.first + a, 0]), "end": int(spans[tagged.first + b - 1, 1])}
            for k, a, b, _ in entities(gold, np.ones(len(gold)))]


def performance_section(data: dict[str, Any]) -> str:
    v = data["variants"]
    kinds = next(iter(v.values()))["performance"]["types"][:-1]
    rows = [[n, fmt(p["f1"], ".3f"), f"{fmt(p['f1_low'], '.3f')}–{fmt(p['f1_high'], '.3f')}", fmt(p["untyped_f1"], ".3f"),
             fmt(p["precision"], ".3f"), fmt(p["recall"], ".3f")] + [fmt(p["per_type"][k]["f1"], ".2f") for k in kinds]
            for n, x in v.items() for p in [x["performance"]]]
    support = next(iter(v.values()))["performance"]["per_type"]
    out = ["<h2>Task performance</h2><p>Entity F1 (seqeval, strict IOB2, micro) with its bootstrap 95 % interval over "
           "texts, untyped F1 (the spans alone), precision, recall, and F1 per type (gold entities: "
           + ", ".join(f"{k} {support[k]['support']}" for k in kinds) + "). The confusion matrices pair each gold "
           "entity with the predicted one of exactly the same words (rows: gold type, columns: predicted; "
           f"{NONE}: missed, or predicted where no entity is).</p>",
           table(["variant", "F1", "95 % interval", "untyped F1", "precision", "recall"] + kinds, rows)]
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, len(v), figsize=(4.2 * len(v), 4.2), squeeze=False)
        for ax, (n, x) in zip(axes[0], v.items()):
            m, names = np.asarray(x["performance"]["confusion_matrix"]), x["performance"]["types"]
            ax.imshow(np.log1p(m), cmap="Blues")
            for (r, c), count in np.ndenumerate(m):
                if count:
                    ax.text(c, r, str(count), ha="center", va="center", fontsize=6)
            ax.set(title=n, xticks=range(len(names)), yticks=range(len(names)), xlabel="predicted", ylabel="gold")
            ax.set_xticklabels(names, fontsize=7, rotation=90)
            ax.set_yticklabels(names, fontsize=7)
        out.append(inline_png(fig))
    return "\n".join(out)


def _marked(text: str, spans: list[dict[str, Any]], css: str) -> str:
    out, at = [], 0
    for s in sorted(spans, key=lambda s: s["start"]):
        out.append(escape(text[at:s["start"]]))
        out.append(f'<span class="{css}">{escape(text[s["start"]:s["end"]])}<sub>{escape(s["label"])}</sub></span>')
        at = s["end"]
    return "".join(out) + escape(text[at:])


def spans_section(data: dict[str, Any]) -> str:
    """The first validation texts: gold spans, then each variant's, highlighted in the text."""
    v = data["variants"]
    style = ("<style>.gold{border-bottom:2px solid #2a7;background:#e7f7ee}.pred{background:#fde9c8}"
             ".pred sub,.gold sub{font-size:65%;color:#555;margin-left:2px}.spans td{text-align:left}</style>")
    first = next(iter(v.values()))["performance"]["shown"]
    rows = []
    for k, shown in enumerate(first):
        rows.append(f"<td><b>gold</b></td><td>{_marked(shown['text'], shown['gold'], 'gold')}</td>")
        for n, x in v.items():
            mine = x["performance"]["shown"][k]
            rows.append(f"<td>{escape(n)}</td><td>{_marked(mine['text'], mine['predicted'], 'pred')}</td>")
    body = "".join(f"<tr>{r}</tr>" for r in rows)
    return (f"{style}<h2>Entities in context</h2><p>The first {len(first)} validation texts: the gold entities (green), "
            "then each variant's (amber), with their types.</p>"
            f"<div class='scroll'><table class='spans'>{body}</table></div>")
