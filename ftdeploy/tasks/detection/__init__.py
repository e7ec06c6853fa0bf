"""Object detection: images in (any size: tiles of ``input_size`` pixels), boxes out, in the pixels of
the image sent. The file outputs the head's raw outputs (class logits and box regressions of every
level, concatenated; FCOS adds centre-ness), with batch and image size dynamic; decoding, the score
threshold and NMS run outside the graph, in numpy (:mod:`.boxes`): NMS inside an ONNX graph breaks
with dynamic shapes and runs slowly, and the same code then serves every runtime. A large image is
predicted in overlapping tiles whose boxes are merged by NMS (:mod:`.preprocessing`). Judged by
pycocotools (:mod:`.metric`): mAP@.5 first.
"""

from __future__ import annotations

import base64
import io
from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ...codecs import Codec, Tensor, TensorSpec
from ...errors import BadInput
from ..base import Decisions, Outputs, Scores, Task
from . import data  # noqa: F401  (registers the deepforest, coco, voc and yolo datasets)
from .boxes import OUTPUTS, Detections, batched_nms, box_iou, decode, topk_cuts
from .preprocessing import STRIDE, DetectionBatch, DetectionPreprocessing, preprocess_images, resolve

# Corruptions of the image that leave the boxes where they are (rotation and translation would move
# the objects away from their annotated boxes, and measure the annotation, not the model)
PHOTOMETRIC = ["gaussian_noise", "blur", "brightness", "contrast", "jpeg", "occlusion"]
BOX_TOLERANCE = 0.01  # pixels
MERGE_IOU = 0.3  # boxes of the same object from two overlapping tiles, one of them cut by a tile's edge


def decoder_of(info: dict[str, Any]) -> dict[str, Any]:
    return info["decoder"]


def to_image_pixels(per_tile: list[Detections], batch: DetectionBatch, decoder: dict[str, Any]) -> list[Detections]:
    """Detections of tiles (in tile pixels) as detections of the images they came from, in the pixels
    of the images as sent: shifted by each tile's offset, merged across tiles by NMS, scaled back and
    clipped."""
    out = []
    for image in range(len(batch.sizes)):
        parts = []
        for tile in np.flatnonzero(batch.image == image):
            d = per_tile[tile]
            parts.append(Detections(d.boxes + np.tile(batch.offsets[tile], 2).astype(np.float32), d.scores, d.labels))
        merged = Detections.concat(parts)
        if len(parts) > 1:
            keep = batched_nms(merged.boxes, merged.scores, merged.labels, min(MERGE_IOU, decoder["nms_thresh"]))
            merged = merged.take(keep[:decoder["detections_per_img"]])
        width, height = batch.sizes[image]
        boxes = merged.boxes / batch.scales[image]
        boxes[:, 0::2], boxes[:, 1::2] = np.clip(boxes[:, 0::2], 0, width), np.clip(boxes[:, 1::2], 0, height)
        out.append(Detections(boxes.astype(np.float32), merged.scores, merged.labels))
    return out


def match(a: Detections, b: Detections, iou: float) -> list[tuple[int, int]]:
    """Pairs of detections of ``a`` and ``b`` with the same label and IoU of at least ``iou`` (or the same
    box within BOX_TOLERANCE: a box of no area, clipped to an image's edge, overlaps nothing), greedy by score."""
    if not len(a) or not len(b):
        return []
    same = np.abs(a.boxes[:, None] - b.boxes[None]).max(-1) <= BOX_TOLERANCE
    overlap = np.maximum(box_iou(a.boxes, b.boxes), same) * (a.labels[:, None] == b.labels[None, :])
    overlap[overlap < iou] = -1
    pairs, used = [], np.zeros(len(b), bool)
    for i in np.argsort(-a.scores, kind="stable"):
        row = np.where(used, -1, overlap[i])
        j = int(np.argmax(row))
        if row[j] >= 0:
            used[j] = True
            pairs.append((int(i), j))
    return pairs


class DetectionParams(BaseModel):
    """Query parameters of a detector's answer."""

    model_config = ConfigDict(extra="forbid")
    score_threshold: float = Field(0.3, ge=0, le=1, description="the least score a detection answered has")
    max_detections: int = Field(300, ge=1, description="detections answered per image (the highest scores)")


class DetectionResponses:
    """Detections (in the pixels of the images sent) -> ``{"detections": [{"label", "score", "box"}]}``
    for one image, ``{"predictions": [{"detections": [...]}, ...]}`` for several."""

    params = DetectionParams
    schema = {"type": "object", "properties": {"detections": {"type": "array", "items": {"type": "object", "properties": {
        "label": {"type": "string"}, "score": {"type": "number"},
        "box": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                "description": "x1, y1, x2, y2 in the pixels of the image sent"}}}}}}

    def respond(self, predictions: list[Detections], params: DetectionParams, info: dict[str, Any]) -> dict[str, Any]:
        classes = info["classes"]
        images = []
        for dets in predictions:
            keep = np.flatnonzero(dets.scores >= params.score_threshold)[:params.max_detections]
            images.append({"detections": [{"label": classes[int(dets.labels[k])], "score": float(dets.scores[k]),
                                           "box": [round(float(v), 2) for v in dets.boxes[k]]} for k in keep]})
        return images[0] if len(images) == 1 else {"predictions": images}

    def compare(self, got: dict[str, Any], expected: dict[str, Any], iou: float = 0.99, tol: float = 1e-4
                ) -> tuple[bool, int]:
        """A served answer against the offline one (default parameters): every detection matched by one
        of the same label with IoU at least ``iou`` and a score within ``tol``; one that only one side
        has counts as a near-tie when its score lies within ``tol`` of the threshold (another batch
        size's float32 rounding puts it on the other side)."""
        threshold = self.params().score_threshold
        images_got, images_expected = (a.get("predictions", [a]) for a in (got, expected))
        if len(images_got) != len(images_expected):
            return False, 0
        near = 0
        for a, b in zip(images_got, images_expected):
            if "detections" not in a:
                return False, 0
            labels: dict[str, int] = {}
            left, right = _as_detections(a["detections"], labels), _as_detections(b["detections"], labels)
            pairs = [(i, j) for i, j in match(left, right, iou) if abs(left.scores[i] - right.scores[j]) <= tol]
            for side, matched in ((left, {i for i, _ in pairs}), (right, {j for _, j in pairs})):
                for k in set(range(len(side))) - matched:
                    if abs(float(side.scores[k]) - threshold) > tol:
                        return False, near
                    near += 1
        return True, near


    def tensor_outputs(self, info: dict[str, Any]) -> list[TensorSpec]:
        return [TensorSpec("boxes", "FP32", (-1, -1, 4)), TensorSpec("scores", "FP32", (-1, -1)),
                TensorSpec("labels", "INT64", (-1, -1)), TensorSpec("num_detections", "INT32", (-1,))]

    def to_tensors(self, predictions: list[Detections], params: DetectionParams, info: dict[str, Any]) -> dict[str, Tensor]:
        """The detections ``/v1/predict`` answers (``score_threshold``, ``max_detections``), padded to the
        most any image has: boxes x1, y1, x2, y2 (zeros past ``num_detections``), scores (zeros) and
        label indices into the file's classes (-1)."""
        kept = [np.flatnonzero(d.scores >= params.score_threshold)[:params.max_detections] for d in predictions]
        n, most = len(predictions), max((len(k) for k in kept), default=0)
        boxes, scores = np.zeros((n, most, 4), np.float32), np.zeros((n, most), np.float32)
        labels = np.full((n, most), -1, np.int64)
        for i, (d, k) in enumerate(zip(predictions, kept)):
            boxes[i, :len(k)], scores[i, :len(k)], labels[i, :len(k)] = d.boxes[k], d.scores[k], d.labels[k]
        counts = np.asarray([len(k) for k in kept], np.int32)
        return {name: Tensor(name, dtype, list(a.shape), a) for name, dtype, a in (
            ("boxes", "FP32", boxes), ("scores", "FP32", scores), ("labels", "INT64", labels),
            ("num_detections", "INT32", counts))}


def _tiles(array: np.ndarray) -> DetectionBatch:
    """A preprocessed tensor sent as it is: each image one tile, boxes answered in its pixels."""
    n, _, height, width = array.shape
    if height % STRIDE or width % STRIDE:
        raise BadInput(400, "invalid_shape", f"a detector's input tensor must be a multiple of {STRIDE} pixels high and "
                       f"wide; got {height}x{width} (send BYTES holding the encoded image to have it tiled)")
    return DetectionBatch.of_tiles(array, np.tile([width, height], (n, 1)))


def _as_detections(answered: list[dict[str, Any]], labels: dict[str, int]) -> Detections:
    """Answered detections as arrays, their labels numbered by ``labels``."""
    return Detections(np.asarray([d["box"] for d in answered], np.float32).reshape(-1, 4),
                      np.asarray([d["score"] for d in answered], np.float32),
                      np.asarray([labels.setdefault(d["label"], len(labels)) for d in answered], np.int64))


def _codec() -> Codec:
    from ..image import ImageRequests

    class DetectionRequests(ImageRequests):
        def from_tensors(self, tensors: list[Tensor], model, limits):
            """As for any image model; the answer says which pixels its boxes are in."""
            parsed = super().from_tensors(tensors, model, limits)
            parsed.notes["box_pixels"] = ("the input tensor's (no tiling, no scaling)" if parsed.batch is not None
                                          else "the original image's")
            return parsed

    return Codec(DetectionRequests(_tiles, square=False), DetectionResponses())


class ObjectDetection(Task):
    name = "object_detection"
    description = "Object detection"
    input_names = ("images",)
    output_names = OUTPUTS["fcos"]
    metric = "map_50"
    metric_label = "mAP@.5"
    decision = "detections"
    unit = "images"
    default_corruptions = PHOTOMETRIC
    # the dynamo exporter fails on torchvision's detectors (pytorch/vision#9306): TorchScript first
    exporter_order = ("torchscript", "dynamo")
    codec = _codec()

    # --- inputs -------------------------------------------------------------------------------
    def resolve_preprocessor(self, cfg, defaults: dict[str, Any]) -> DetectionPreprocessing:
        return resolve(cfg, defaults)

    def preprocessor_from_dict(self, d: dict[str, Any]) -> DetectionPreprocessing:
        return DetectionPreprocessing.from_dict(d)

    def preprocess(self, raw: list, spec: DetectionPreprocessing) -> DetectionBatch:
        return preprocess_images(raw, spec)

    def stack(self, items: list) -> DetectionBatch:
        return DetectionBatch.of_tiles(np.stack([np.asarray(x) for x in items]).astype(np.float32))

    def stack_targets(self, targets: list) -> list[dict[str, np.ndarray]]:
        return [{"boxes": np.asarray(t["boxes"], np.float32).reshape(-1, 4), "labels": np.asarray(t["labels"], np.int64)}
                for t in targets]

    def collate(self, items: list) -> tuple[tuple, Any]:
        """(images, targets) in: a detector computes its own losses, which need the targets."""
        import torch

        images, targets = zip(*items)
        targets = [{"boxes": torch.as_tensor(t["boxes"]).reshape(-1, 4), "labels": torch.as_tensor(t["labels"])}
                   for t in targets]
        return (torch.stack([torch.as_tensor(x) for x in images]), targets), targets

    def dynamic_axes(self, names: Sequence[str]) -> dict[str, dict[int, str]]:
        return {names[0]: {0: "batch", 2: "height", 3: "width"}}

    def example_inputs(self, spec: DetectionPreprocessing, names: Sequence[str]) -> list[np.ndarray]:
        return [np.zeros((2, *spec.input_shape), np.float32)]

    def parity_sets(self, inputs: DetectionBatch, spec: DetectionPreprocessing) -> dict[str, DetectionBatch]:
        """The validation tiles, and the same tiles cropped and padded to other sizes: the file keeps
        the image size dynamic (not for SSD, whose default boxes fit its own size only)."""
        sets = {"validation": inputs}
        if spec.fixed_size:
            return sets
        size = spec.input_size
        small = max(STRIDE, size - 2 * STRIDE)
        if small < size:
            sets[f"{small} px"] = DetectionBatch.of_tiles(np.ascontiguousarray(inputs.arrays[:, :, :small, :small]))
        larger = np.zeros((*inputs.arrays.shape[:2], size + 2 * STRIDE, size + 2 * STRIDE), np.float32)
        larger[:, :, :size, :size] = inputs.arrays
        sets[f"{size + 2 * STRIDE} px"] = DetectionBatch.of_tiles(larger)
        return sets

    def encode_samples(self, inputs: DetectionBatch, spec: DetectionPreprocessing) -> list[str]:
        from PIL import Image

        mean, std = np.asarray(spec.mean, np.float32)[:, None, None], np.asarray(spec.std, np.float32)[:, None, None]
        out = []
        for x in inputs.arrays:
            pixels = np.clip((x * std + mean) * 255, 0, 255).round().astype(np.uint8).transpose(1, 2, 0)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode())
        return out

    def decode_samples(self, samples: list[str], spec: DetectionPreprocessing) -> DetectionBatch:
        from PIL import Image

        return self.preprocess([Image.open(io.BytesIO(base64.b64decode(s))) for s in samples], spec)

    def pruning_options(self, model, ratio: float) -> tuple[dict[str, Any], list]:
        """The backbone's channels; the FPN (its outputs feed the head at every level), the head (the
        run's head) and the layers the model keeps frozen (recovery could not retrain them) stay whole."""
        from torch import nn

        fpn = getattr(model.net.backbone, "fpn", None)
        frozen = [m for m in model.net.backbone.modules() if isinstance(m, nn.Conv2d) and not m.weight.requires_grad]
        return {}, ([fpn] if fpn is not None else []) + frozen

    # --- training ---------------------------------------------------------------------------------
    def loss(self, outputs, targets, train_cfg):
        """The detector's own losses (FCOS: focal, GIoU and centre-ness; RetinaNet: focal and L1; SSD)."""
        return sum(outputs["losses"].values())

    def distillation_loss(self, outputs, teacher_outputs, targets, train_cfg, alpha: float, temperature: float):
        """The losses, and the teacher's class scores (soft, at ``temperature``) and box regressions where
        the teacher is confident."""
        import torch
        from torch.nn import functional as F

        student, teacher = outputs["outputs"], teacher_outputs["outputs"] if isinstance(teacher_outputs, dict) else teacher_outputs
        soft = torch.sigmoid(teacher[0] / temperature)
        kd = F.binary_cross_entropy_with_logits(student[0] / temperature, soft) * temperature ** 2
        confident = soft.max(-1).values > 0.3
        if confident.any():
            kd = kd + F.smooth_l1_loss(student[1][confident], teacher[1][confident])
        return (1 - alpha) * self.loss(outputs, targets, train_cfg) + alpha * kd

    # --- outputs ------------------------------------------------------------------------------------
    def outputs_for(self, info: dict[str, Any]) -> dict[str, dict[int, str]]:
        return {name: {0: "batch", 1: "anchors"} for name in OUTPUTS[decoder_of(info)["kind"]]}

    def postprocess(self, outputs: Outputs, inputs: DetectionBatch, info: dict[str, Any]) -> list[Detections]:
        """Detections of every image of ``inputs``, in the pixels of the image as sent."""
        decoder = decoder_of(info)
        return to_image_pixels(decode(decoder, outputs, inputs.height, inputs.width), inputs, decoder)

    def score(self, predictions: list[Detections], targets: list[dict[str, np.ndarray]]) -> Scores:
        from .metric import evaluate, scores

        classes = 1 + max([int(t["labels"].max()) for t in targets if len(t["labels"])]
                          + [int(p.labels.max()) for p in predictions if len(p)] + [0])
        return Scores(self.metric, scores(evaluate(predictions, targets, classes)))

    def decisions(self, reference: Outputs, torch32: Outputs, onnx32: Outputs, inputs: DetectionBatch,
                  info: dict[str, Any]) -> Decisions:
        """The detections of PyTorch float32 and of the file, after decoding and NMS: a detection one has
        and the other lacks counts, unless float32 noise explains it (a near-tie, see :func:`near_ties`)."""
        decoder = decoder_of(info)
        h, w = inputs.height, inputs.width
        ref, mine, theirs = (decode(decoder, o, h, w) for o in (reference, torch32, onnx32))
        pairs = [(match(a, b, 0.9), a, b) for a, b in zip(mine, theirs)]
        error = max([_score_error(r, c) for r, a, b in zip(ref, mine, theirs) for c in (a, b)]
                    + [_score_error(a, b) for a, b in zip(mine, theirs)] + [0.0])
        iou_error = max([1 - _iou(a, i, b, j) for found, a, b in pairs for i, j in found] + [0.0])
        cuts = [m + t for m, t in zip(topk_cuts(decoder, torch32, h, w), topk_cuts(decoder, onnx32, h, w))]
        compared = counted = excused = 0
        for (found, a, b), image_cuts in zip(pairs, cuts):
            compared += max(len(a), len(b))
            near, lacking = near_ties(a, b, found, decoder, 2 * error, 2 * iou_error, image_cuts)
            excused += near
            counted += lacking - near
        return Decisions(self.decision, compared, 1 - (counted + excused) / max(1, compared), counted, excused)

    def agreement(self, reference: Outputs, candidate: Outputs, inputs: DetectionBatch,
                  info: dict[str, Any]) -> dict[str, float]:
        """A variant's detections against its reference's (score at least 0.3 on both sides): the share
        matched (same label, IoU at least .5), their mean IoU and the largest score difference."""
        decoder = decoder_of(info)
        a_all, b_all = self.postprocess(reference, inputs, info), self.postprocess(candidate, inputs, info)
        matched = total = 0
        ious, diffs = [], [0.0]
        for a, b in zip(a_all, b_all):
            a, b = a.take(a.scores >= 0.3), b.take(b.scores >= 0.3)
            pairs = match(a, b, 0.5)
            matched += 2 * len(pairs)
            total += len(a) + len(b)
            for i, j in pairs:
                ious.append(float(box_iou(a.boxes[i:i + 1], b.boxes[j:j + 1])[0, 0]))
                diffs.append(abs(float(a.scores[i] - b.scores[j])))
        largest = max(float(np.abs(r.astype(np.float64) - c).max()) for r, c in zip(reference, candidate))
        return {"decision_agreement": matched / total if total else 1.0, "max_score_diff": max(diffs),
                "mean_iou": float(np.mean(ious)) if ious else 1.0, "max_abs_diff": largest,
                "detections": total / 2, "nms_thresh": decoder["nms_thresh"]}

    # --- the usability report -----------------------------------------------------------------------
    def usability_suite(self, splits, spec: DetectionPreprocessing, limit: int, info: dict[str, Any]):
        from .report import DetectionSuite

        return DetectionSuite(self, splits.val.subset(list(range(min(limit, len(splits.val))))), splits.classes, spec,
                              info)


def _score_error(reference: Detections, candidate: Detections) -> float:
    """The largest score difference between a float32 answer and the float64 one, over the
    detections both have (same label, nearly the same box)."""
    pairs = match(reference, candidate, 0.9)
    return max([abs(float(reference.scores[i] - candidate.scores[j])) for i, j in pairs] + [0.0])


def _iou(a: Detections, i: int, b: Detections, j: int) -> float:
    return float(box_iou(a.boxes[i:i + 1], b.boxes[j:j + 1])[0, 0])


def near_ties(a: Detections, b: Detections, found: list[tuple[int, int]], decoder: dict[str, Any],
              score_margin: float, iou_margin: float, cuts: Sequence[float] = ()) -> tuple[int, int]:
    """(the detections one answer has and the other lacks that float32 noise explains, all those it lacks).

    Explained: a score within ``score_margin`` of the threshold or of a cut of ``topk_candidates``
    (``cuts``); a detection that overlaps one of the other answer whose score is within ``score_margin`` of
    its own, or whose IoU with it is within ``iou_margin`` of NMS's threshold (which of the two NMS keeps is
    a coin toss); in turn, a detection that the other answer suppressed with an explained one (a different
    toss changes what NMS keeps after it: in a uniform region, such as an image's padding, a whole lattice
    of equal boxes shifts); and one that the other answer, full at ``detections_per_img``, had no room
    for (its score not above that answer's last)."""
    sides = ((a, b, set(range(len(a))) - {i for i, _ in found}), (b, a, set(range(len(b))) - {j for _, j in found}))
    nms, cap = decoder["nms_thresh"], decoder["detections_per_img"]
    lines = np.asarray([decoder["score_thresh"], *cuts])
    explained: list[set[int]] = []
    for side, other, lacking in sides:
        overlap = box_iou(side.boxes, other.boxes) * (side.labels[:, None] == other.labels[None, :])
        last = float(other.scores.min()) if len(other) >= cap else -1.0
        explained.append({k for k in lacking if (np.abs(lines - side.scores[k]) <= score_margin).any()
                          or side.scores[k] <= last + score_margin or any(
            (overlap[k] > 0.3) & ((np.abs(other.scores - side.scores[k]) <= score_margin)
                                  | (np.abs(overlap[k] - nms) <= iou_margin)))})
    while True:  # what an explained detection suppressed in its own answer is explained too
        grown = []
        for s, (side, other, lacking) in enumerate(sides):
            causes = sorted(explained[1 - s])
            overlap = box_iou(side.boxes, other.boxes[causes]) * (side.labels[:, None] == other.labels[causes][None])
            louder = other.scores[causes][None] >= side.scores[:, None] - score_margin
            grown.append(explained[s] | {k for k in lacking if ((overlap[k] > nms - iou_margin) & louder[k]).any()})
        if grown == explained:
            return sum(map(len, explained)), sum(len(lacking) for _, _, lacking in sides)
        explained = grown


