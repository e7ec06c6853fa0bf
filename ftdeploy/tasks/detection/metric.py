"""COCO-style average precision by pycocotools' COCOeval (not reimplemented): mAP@.5, the primary
figure tree-crown and pedestrian users read, with mAP@[.5:.95], mAP@.75 and recall beside it, AP per
class and the precision-recall curve. Dense scenes hold hundreds of objects per image, so the
detections kept per image are 10, 100 and 1,000 (COCO's 1, 10, 100 would cut recall short)."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np

from ...errors import DependencyError

MAX_DETECTIONS = [10, 100, 1000]


def evaluate(predictions: list, targets: list[dict[str, np.ndarray]], num_classes: int) -> Any:
    """A finished COCOeval (evaluated, accumulated, summarized; its printing swallowed) of predictions
    (``Detections`` per image) against ``targets`` ({"boxes", "labels"} per image)."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise DependencyError("detection metrics need pycocotools", "pip install 'ftdeploy[train]'") from None
    images, annotations, results = [], [], []
    for i, (dets, target) in enumerate(zip(predictions, targets)):
        images.append({"id": i, "width": 1, "height": 1})
        for box, label in zip(target["boxes"], target["labels"]):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(label) + 1, "iscrowd": 0,
                                "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h})
        for box, score, label in zip(dets.boxes, dets.scores, dets.labels):
            results.append({"image_id": i, "category_id": int(label) + 1, "score": float(score),
                            "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]})
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and summary
        truth = COCO()
        truth.dataset = {"images": images, "annotations": annotations,
                         "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}
        truth.createIndex()
        found = truth.loadRes(results) if results else COCO()
        if not results:
            found.dataset = {"images": images, "annotations": [], "categories": truth.dataset["categories"]}
            found.createIndex()
        coco_eval = COCOeval(truth, found, "bbox")
        coco_eval.params.maxDets = MAX_DETECTIONS
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def scores(coco_eval) -> dict[str, float]:
    """COCO's summary figures: -1 (no objects to judge) reads as 0."""
    s = [max(0.0, float(v)) for v in coco_eval.stats]
    return {"map_50": s[1], "map": s[0], "map_75": s[2], "recall": s[8]}


def per_class(coco_eval, classes: list[str]) -> dict[str, float]:
    """AP at IoU .5 per class, over all areas and the most detections."""
    precision = coco_eval.eval["precision"][0, :, :, 0, -1]  # [recall thresholds, classes]
    out = {}
    for k, name in enumerate(classes):
        column = precision[:, k] if k < precision.shape[1] else np.array([-1.0])
        valid = column[column > -1]
        out[name] = float(valid.mean()) if len(valid) else 0.0
    return out


def pr_curve(coco_eval, step: int = 5) -> dict[str, list[float]]:
    """Precision at COCO's 101 recall thresholds (every ``step``-th), IoU .5, averaged over classes."""
    precision = coco_eval.eval["precision"][0, :, :, 0, -1]
    mean = np.where(precision > -1, precision, np.nan)
    curve = np.nan_to_num(np.nanmean(mean, axis=1) if mean.size else np.zeros(101))
    recall = coco_eval.params.recThrs
    return {"recall": [float(r) for r in recall[::step]], "precision": [float(p) for p in curve[::step]]}
