"""Entity-level scores through seqeval (strict mode, IOB2, micro averages), per entity type, untyped
(segmentation: every type read as one), and a bootstrap 95 % interval of F1 over texts: entities are
few (about 3 per F1 point on a 300-entity split), so a difference of a point or two is often noise.

Predicted tags are first :func:`~.spans.repaired`, so seqeval counts the entities the decoding rule
(and the server) reads; gold tags are strict IOB2 already (the data readers check them).

>>> s = entity_scores([["B-loc", "I-loc", "O"]], [["B-loc", "I-loc", "B-per"]])
>>> s["f1"], s["precision"], s["recall"]
(0.6666666666666666, 0.5, 1.0)
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ...errors import DependencyError
from .spans import repaired

BOOTSTRAP = 1000  # resamples of the texts
UNTYPED = "entity"


def _seqeval():
    try:
        from seqeval.metrics import f1_score, precision_score, recall_score
        from seqeval.scheme import IOB2, Entities
    except ImportError:
        raise DependencyError("entity F1 needs seqeval", "pip install seqeval") from None
    return f1_score, precision_score, recall_score, IOB2, Entities


def untyped(tags: list[list[str]]) -> list[list[str]]:
    return [[t if t == "O" else f"{t[0]}-{UNTYPED}" for t in seq] for seq in tags]


def per_text_counts(gold: list[list[str]], predicted: list[list[str]], types: list[str]) -> np.ndarray:
    """[texts, types + 1, 3]: true positives, predicted and gold entities per text and type (the last
    row: all types), from seqeval's own strict entity extraction."""
    *_, IOB2, Entities = _seqeval()
    g = Entities(gold, IOB2).entities
    p = Entities(predicted, IOB2).entities
    counts = np.zeros((len(gold), len(types) + 1, 3), np.int64)
    index = {t: k for k, t in enumerate(types)}
    for i, (gi, pi) in enumerate(zip(g, p)):
        gs, ps = {e.to_tuple()[1:] for e in gi}, {e.to_tuple()[1:] for e in pi}
        for k, group in ((0, gs & ps), (1, ps), (2, gs)):
            for kind, *_ in group:
                counts[i, index[kind], k] += 1
                counts[i, -1, k] += 1
    return counts


def f1_of(counts: np.ndarray) -> np.ndarray:
    """F1 from summed (tp, predicted, gold) on the last axis; 0 where there is nothing."""
    tp, pred, gold = counts[..., 0], counts[..., 1], counts[..., 2]
    return np.where(pred + gold > 0, 2 * tp / np.maximum(pred + gold, 1), 0.0)


def entity_scores(gold: list[list[str]], predicted: list[list[str]], types: list[str] | None = None,
                  seed: int = 0) -> dict[str, Any]:
    """Micro precision, recall and F1 (seqeval, strict IOB2), untyped F1, F1's bootstrap interval and,
    per type, precision, recall, F1 and support; ``predicted`` is repaired first."""
    f1_score, precision_score, recall_score, IOB2, _ = _seqeval()
    predicted = [repaired(p) for p in predicted]
    types = types or sorted({t[2:] for seq in gold + predicted for t in seq if t != "O"})
    strict = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
    out: dict[str, Any] = {"f1": float(f1_score(gold, predicted, **strict)),
                           "precision": float(precision_score(gold, predicted, **strict)),
                           "recall": float(recall_score(gold, predicted, **strict)),
                           "untyped_f1": float(f1_score(untyped(gold), untyped(predicted), **strict))}
    counts = per_text_counts(gold, predicted, types)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(gold), (BOOTSTRAP, len(gold))) if len(gold) else np.zeros((BOOTSTRAP, 0), int)
    resampled = f1_of(counts[draws, -1].sum(1))
    out["f1_low"], out["f1_high"] = (float(v) for v in np.percentile(resampled, [2.5, 97.5]))
    totals = counts.sum(0)
    out["per_type"] = {t: {"precision": float(totals[k, 0] / max(1, totals[k, 1])),
                           "recall": float(totals[k, 0] / max(1, totals[k, 2])),
                           "f1": float(f1_of(totals[k])), "support": int(totals[k, 2])} for k, t in enumerate(types)}
    out["entities"] = int(totals[-1, 2])
    return out


def entity_types(classes: Sequence[str]) -> list[str]:
    """The entity types of IOB2 tag names, sorted."""
    return sorted({c[2:] for c in classes if c != "O"})


def gold_and_predicted(predictions: list, targets: list[np.ndarray]) -> tuple[list[list[str]], list[list[str]]]:
    """Word tags per text: the gold ones (the targets of each text's rows) and the predicted ones."""
    gold = [[p.classes[k] for r in p.rows for k in targets[r]] for p in predictions]
    return gold, [p.tags for p in predictions]
