"""Boxes in numpy, torch-free (the server runs them): the anchors of torchvision's one-stage detectors
(``AnchorGenerator`` for FCOS and RetinaNet, ``DefaultBoxGenerator`` for SSD), decoding their raw head
outputs into scored boxes (the same formulas as their ``postprocess_detections``), non-maximum
suppression, and the tiles a large image is cut into.

A decoder is described by a plain dict (stored in the run and in the ONNX file)::

    {"kind": "fcos" | "retinanet" | "ssd", "strides": [8, 16, 32],
     "anchor_sizes": [[8], [16], [32]], "aspect_ratios": [[1.0], ...],   # fcos, retinanet
     "ssd": {"aspect_ratios": ..., "scales": ..., "steps": ..., "clip": true},   # ssd
     "score_thresh": 0.05, "nms_thresh": 0.5, "topk_candidates": 1000, "detections_per_img": 300}

>>> boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], float)
>>> nms(boxes, np.array([0.9, 0.8, 0.7]), 0.5).tolist()
[0, 2]
>>> tile_starts(1000, 400, 100)
[0, 300, 600]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BBOX_XFORM_CLIP = math.log(1000.0 / 16)  # torchvision's clamp of log-scale box deltas
# the raw outputs of each kind of head, in the order the ONNX file gives them
OUTPUTS = {"fcos": ("cls_logits", "bbox_regression", "bbox_ctrness"), "retinanet": ("cls_logits", "bbox_regression"),
           "ssd": ("cls_logits", "bbox_regression")}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (N x 4, x1 y1 x2 y2) with every box of ``b`` (M x 4)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept boxes, highest score first (one pass of
    array arithmetic per kept box, over the boxes still in the running)."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (boxes[:, k].astype(np.float64) for k in range(4))
    area = (x2 - x1) * (y2 - y1)
    keep = []
    while len(order):
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        order = rest[inter / np.maximum(area[i] + area[rest] - inter, 1e-12) <= iou]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float) -> np.ndarray:
    """NMS within each label (boxes of different labels never suppress each other)."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    offsets = labels.astype(np.float64)[:, None] * (boxes.max() + 1)
    return nms(boxes + offsets, scores, iou)


def level_sizes(height: int, width: int, strides: list[int]) -> list[tuple[int, int]]:
    """Feature map sizes of an image: each stride-2 stage of torchvision's backbones rounds up."""
    return [(-(-height // s), -(-width // s)) for s in strides]


def cell_anchors(sizes: list[float], aspect_ratios: list[float]) -> np.ndarray:
    """``AnchorGenerator.generate_anchors``: zero-centred anchors of one level."""
    scales, ratios = np.asarray(sizes, np.float32), np.asarray(aspect_ratios, np.float32)
    h_ratios = np.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / 2)


def grid_anchors(decoder: dict, height: int, width: int) -> list[np.ndarray]:
    """The anchors of every level, as ``AnchorGenerator`` lays them (its stride is image size // grid size)."""
    out = []
    for (h, w), sizes, ratios in zip(level_sizes(height, width, decoder["strides"]), decoder["anchor_sizes"],
                                     decoder["aspect_ratios"]):
        sy, sx = height // h, width // w
        shift_y, shift_x = np.meshgrid(np.arange(h) * sy, np.arange(w) * sx, indexing="ij")
        shifts = np.stack([shift_x.ravel(), shift_y.ravel()] * 2, axis=1).astype(np.float32)
        out.append((shifts[:, None, :] + cell_anchors(sizes, ratios)[None]).reshape(-1, 4))
    return out


def default_boxes(decoder: dict, height: int, width: int) -> list[np.ndarray]:
    """``DefaultBoxGenerator``: SSD's default boxes of every level, in pixels (x1 y1 x2 y2)."""
    ssd = decoder["ssd"]
    scales, ratios, steps = ssd["scales"], ssd["aspect_ratios"], ssd.get("steps")
    out = []
    for k, (fh, fw) in enumerate(level_sizes(height, width, decoder["strides"])):
        s_k, s_prime = scales[k], math.sqrt(scales[k] * scales[k + 1])
        pairs = [[s_k, s_k], [s_prime, s_prime]]
        for ar in ratios[k]:
            pairs += [[s_k * math.sqrt(ar), s_k / math.sqrt(ar)], [s_k / math.sqrt(ar), s_k * math.sqrt(ar)]]
        wh = np.asarray(pairs, np.float32)
        wh = np.clip(wh, 0, 1) if ssd.get("clip", True) else wh
        x_f, y_f = (width / steps[k], height / steps[k]) if steps else (fw, fh)
        cy, cx = np.meshgrid((np.arange(fh) + 0.5) / y_f, (np.arange(fw) + 0.5) / x_f, indexing="ij")
        centres = np.repeat(np.stack([cx.ravel(), cy.ravel()], axis=1).astype(np.float32), len(wh), axis=0)
        boxes = np.concatenate([centres, np.tile(wh, (fh * fw, 1))], axis=1)
        size = np.asarray([width, height], np.float32)
        out.append(np.concatenate([(boxes[:, :2] - 0.5 * boxes[:, 2:]) * size, (boxes[:, :2] + 0.5 * boxes[:, 2:]) * size], 1))
    return out


def anchors_for(decoder: dict, height: int, width: int) -> list[np.ndarray]:
    return default_boxes(decoder, height, width) if decoder["kind"] == "ssd" else grid_anchors(decoder, height, width)


def linear_decode(deltas: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """FCOS's ``BoxLinearCoder(normalize_by_size=True)``: distances to the sides, in anchor sizes."""
    cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    return np.stack([cx - deltas[:, 0] * w, cy - deltas[:, 1] * h, cx + deltas[:, 2] * w, cy + deltas[:, 3] * h], 1)


def delta_decode(deltas: np.ndarray, anchors: np.ndarray, weights: tuple[float, ...]) -> np.ndarray:
    """RetinaNet's and SSD's ``BoxCoder.decode_single``: centre offsets and log-scale sizes."""
    w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cx, cy = anchors[:, 0] + 0.5 * w, anchors[:, 1] + 0.5 * h
    dx, dy = deltas[:, 0] / weights[0], deltas[:, 1] / weights[1]
    dw = np.minimum(deltas[:, 2] / weights[2], BBOX_XFORM_CLIP)
    dh = np.minimum(deltas[:, 3] / weights[3], BBOX_XFORM_CLIP)
    px, py, pw, ph = dx * w + cx, dy * h + cy, np.exp(dw) * w, np.exp(dh) * h
    return np.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph], 1)


def sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp overflows to inf for very negative logits: the score is then 0
        return 1 / (1 + np.exp(-x))


@dataclass
class Detections:
    """Boxes (x1 y1 x2 y2, float), scores and labels (0-based) of one image."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.scores)

    def take(self, index) -> "Detections":
        return Detections(self.boxes[index], self.scores[index], self.labels[index])

    @classmethod
    def concat(cls, parts: list["Detections"]) -> "Detections":
        if not parts:
            return cls.empty()
        return cls(np.concatenate([p.boxes for p in parts]), np.concatenate([p.scores for p in parts]),
                   np.concatenate([p.labels for p in parts]))


def decode(decoder: dict, outputs: list[np.ndarray], height: int, width: int,
           score_thresh: float | None = None) -> list[Detections]:
    """Every image of a batch of raw head outputs (inputs of ``height`` x ``width``) as detections in
    the input's pixels: scored, thresholded, the best ``topk_candidates`` per level, clipped, NMS per
    label, the best ``detections_per_img`` kept. FCOS outputs are (class logits, box regression,
    centre-ness), RetinaNet's and SSD's (class logits, box regression)."""
    kind = decoder["kind"]
    thresh = decoder["score_thresh"] if score_thresh is None else score_thresh
    anchors = anchors_for(decoder, height, width)
    counts = [len(a) for a in anchors]
    if sum(counts) != outputs[0].shape[1]:
        raise ValueError(f"the outputs hold {outputs[0].shape[1]} anchors; a {height}x{width} input has {sum(counts)} "
                         f"at strides {decoder['strides']}")
    starts = np.cumsum([0] + counts)
    out = []
    for i in range(len(outputs[0])):
        parts = []
        if kind == "ssd":
            parts.append(_decode_ssd(decoder, outputs[0][i], outputs[1][i], np.concatenate(anchors), thresh))
        else:
            for level, level_anchors in enumerate(anchors):
                a, b = starts[level], starts[level + 1]
                parts.append(_decode_level(decoder, [o[i, a:b] for o in outputs], level_anchors, thresh))
        dets = Detections.concat(parts)
        dets.boxes[:, 0::2] = np.clip(dets.boxes[:, 0::2], 0, width)
        dets.boxes[:, 1::2] = np.clip(dets.boxes[:, 1::2], 0, height)
        keep = batched_nms(dets.boxes, dets.scores, dets.labels, decoder["nms_thresh"])[:decoder["detections_per_img"]]
        out.append(dets.take(keep))
    return out


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores, largest first (all when fewer)."""
    if len(scores) > k:
        part = np.argpartition(-scores, k - 1)[:k]
        return part[np.argsort(-scores[part], kind="stable")]
    return np.argsort(-scores, kind="stable")


def _level_scores(decoder: dict, outputs: list[np.ndarray]) -> np.ndarray:
    """Every (point or anchor, class) score of one level of one image, flattened."""
    logits = outputs[0].astype(np.float64)
    if decoder["kind"] == "fcos":
        return np.sqrt(sigmoid(logits) * sigmoid(outputs[2].astype(np.float64))).ravel()
    return sigmoid(logits).ravel()


def topk_cuts(decoder: dict, outputs: list[np.ndarray], height: int, width: int) -> list[list[float]]:
    """Per image, the scores at which ``topk_candidates`` cut a level (where more candidates passed the
    threshold): like the threshold, a candidate scoring about that is kept or not by float32 noise."""
    if decoder["kind"] == "ssd":
        return [[] for _ in outputs[0]]  # one cut per class over every box; SSD files are compared at one size
    starts = np.cumsum([0] + [len(a) for a in anchors_for(decoder, height, width)])
    k, out = decoder["topk_candidates"], []
    for i in range(len(outputs[0])):
        cuts = []
        for a, b in zip(starts[:-1], starts[1:]):
            scores = _level_scores(decoder, [o[i, a:b] for o in outputs])
            scores = scores[scores > decoder["score_thresh"]]
            if len(scores) > k:
                cuts.append(float(np.partition(scores, len(scores) - k)[len(scores) - k]))
        out.append(cuts)
    return out


def _decode_level(decoder: dict, outputs: list[np.ndarray], anchors: np.ndarray, thresh: float) -> Detections:
    num_classes = outputs[0].shape[-1]
    scores = _level_scores(decoder, outputs)
    candidates = np.flatnonzero(scores > thresh)
    candidates = candidates[_topk(scores[candidates], decoder["topk_candidates"])]
    index, labels = candidates // num_classes, candidates % num_classes
    deltas = outputs[1][index].astype(np.float64)
    boxes = (linear_decode(deltas, anchors[index]) if decoder["kind"] == "fcos"
             else delta_decode(deltas, anchors[index], (1.0, 1.0, 1.0, 1.0)))
    return Detections(boxes.astype(np.float32), scores[candidates].astype(np.float32), labels.astype(np.int64))


def _decode_ssd(decoder: dict, logits: np.ndarray, deltas: np.ndarray, anchors: np.ndarray, thresh: float) -> Detections:
    z = logits.astype(np.float64)
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    boxes = delta_decode(deltas.astype(np.float64), anchors, (10.0, 10.0, 5.0, 5.0)).astype(np.float32)
    parts = []
    for label in range(1, probs.shape[-1]):  # class 0 is the background
        score = probs[:, label]
        keep = np.flatnonzero(score > thresh)
        keep = keep[_topk(score[keep], decoder["topk_candidates"])]
        parts.append(Detections(boxes[keep], score[keep].astype(np.float32), np.full(len(keep), label - 1, np.int64)))
    return Detections.concat(parts)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of ``tile`` pixels start along a side of ``length``, overlapping by at least ``overlap``
    (the last one flush with the end; one tile when the side fits)."""
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]
