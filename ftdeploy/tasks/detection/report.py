"""A detector's part of the usability report: mAP@.5 and COCO's figures with AP per class and the
precision-recall curve; mAP@.5 under corruptions of the image that leave the boxes in place;
calibration (the precision of detections in each score bin, and its expected calibration error);
a gallery of validation tiles with the ground truth and every variant's boxes; occlusion saliency of
the top detection's score; latency over batch size x image size."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

from ...figures import escape, fmt, inline_png, pyplot, saliency_agreement_table, table
from ..base import Outputs, Scores, tile
from ..image import corruptions
from .boxes import Detections, box_iou, decode
from .preprocessing import DetectionBatch, DetectionPreprocessing, normalize_image

GALLERY = 4  # validation tiles drawn with their boxes
SHOWN_SCORE = 0.3  # the boxes drawn: the server's default threshold
BINS = 10
POOL = 8  # integrated gradients are stored pooled over POOL x POOL pixels: a tile's full map is megabytes of JSON


def matched_flags(dets: Detections, target: dict[str, np.ndarray], iou: float = 0.5) -> np.ndarray:
    """Which detections (highest score first, as COCO matches) are true positives at IoU ``iou``."""
    hit = np.zeros(len(dets), bool)
    if not len(dets) or not len(target["boxes"]):
        return hit
    overlap = box_iou(dets.boxes, target["boxes"]) * (dets.labels[:, None] == target["labels"][None, :])
    taken = np.zeros(len(target["boxes"]), bool)
    for i in np.argsort(-dets.scores, kind="stable"):
        j = int(np.argmax(np.where(taken, -1, overlap[i])))
        if overlap[i, j] >= iou and not taken[j]:
            taken[j], hit[i] = True, True
    return hit


class DetectionSuite:
    corruptions = corruptions
    corrupted = "to the image (photometric: the boxes stay where they are)"

    def __init__(self, task, val, classes: list[str], spec: DetectionPreprocessing, info: dict[str, Any]):
        self.task, self.classes, self.spec, self.info = task, classes, spec, info
        self.pixels = [np.asarray(val.raw(i).convert("RGB"), np.float32) / 255.0 for i in range(len(val))]
        self.targets = task.stack_targets([t for _, t in (val[i] for i in range(len(val)))])

    def inputs(self, corruption: str = "identity", severity: int = 1) -> DetectionBatch:
        from PIL import Image

        fn = corruptions.get(corruption)
        rng = np.random.default_rng(1000 * severity + sorted(corruptions.names()).index(corruption))
        arrays = [normalize_image(Image.fromarray((np.clip(fn(p, severity, rng), 0, 1) * 255).round().astype(np.uint8)),
                                  self.spec) for p in self.pixels]
        return DetectionBatch.of_tiles(np.stack(arrays))

    def predictions(self, outputs: Outputs) -> list[Detections]:
        return self.task.postprocess(outputs, self.inputs(), self.info)

    def score(self, outputs: Outputs, inputs: Any = None) -> Scores:
        return self.task.score(self.predictions(outputs), self.targets)

    def performance(self, outputs: Outputs, inputs: Any = None) -> dict[str, Any]:
        from .metric import evaluate, per_class, pr_curve, scores

        predictions = self.predictions(outputs)
        coco = evaluate(predictions, self.targets, len(self.classes))
        gallery = [{"boxes": d.boxes[d.scores >= SHOWN_SCORE].round(1).tolist(),
                    "scores": d.scores[d.scores >= SHOWN_SCORE].round(3).tolist()} for d in predictions[:GALLERY]]
        return {**scores(coco), "ap50_per_class": per_class(coco, self.classes), "pr_curve": pr_curve(coco),
                "objects": int(sum(len(t["labels"]) for t in self.targets)), "gallery": gallery}

    def calibration(self, outputs: Outputs, inputs: Any = None) -> dict[str, Any]:
        """Detections binned by score: the share that are true positives (IoU .5) against their mean score;
        the detection ECE weighs each bin's gap by its share of the detections."""
        predictions = self.predictions(outputs)
        scores = np.concatenate([d.scores for d in predictions] + [np.zeros(0)])
        hits = np.concatenate([matched_flags(d, t) for d, t in zip(predictions, self.targets)] + [np.zeros(0, bool)])
        edges = np.linspace(0, 1, BINS + 1)
        which = np.clip(np.digitize(scores, edges[1:-1], right=True), 0, BINS - 1)
        bins, ece = [], 0.0
        for b in range(BINS):
            mask = which == b
            precision = float(hits[mask].mean()) if mask.any() else None
            confidence = float(scores[mask].mean()) if mask.any() else None
            if mask.any():
                ece += mask.mean() * abs(precision - confidence)
            bins.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(mask.sum()),
                         "precision": precision, "confidence": confidence})
        return {"ece": float(ece), "bins": bins, "detections": int(len(scores))}

    def saliency_samples(self, reference: Outputs, n: int) -> list[int]:
        """The first ``n`` tiles where the reference (FP32) detects something."""
        found = [i for i, d in enumerate(self.predictions(reference)) if len(d)]
        return found[:n]

    def target(self, reference: Outputs, i: int) -> dict[str, Any]:
        """The reference's top detection on tile ``i``: what saliency explains."""
        d = self.predictions(reference)[i]
        k = int(np.argmax(d.scores))
        return {"box": d.boxes[k], "label": int(d.labels[k]), "score": float(d.scores[k])}

    def saliency_method(self, clean) -> dict[str, Any]:
        size = clean.width
        return {"method": "occlusion of the top detection's score", "patch": size // 6, "stride": size // 12}

    def _best_overlapping(self, dets: Detections, target: dict[str, Any]) -> float:
        same = dets.labels == target["label"]
        if not same.any():
            return 0.0
        overlap = box_iou(np.asarray([target["box"]]), dets.boxes[same])[0]
        return float(dets.scores[same][overlap >= 0.5].max()) if (overlap >= 0.5).any() else 0.0

    def occlusion(self, predict, clean: DetectionBatch, i: int, target: dict[str, Any]) -> np.ndarray:
        """How much the score of the top detection drops when a gray square hides each region."""
        method = self.saliency_method(clean)
        patch, stride, size = method["patch"], method["stride"], clean.width
        starts = range(0, size - patch + 1, stride)
        hidden = np.repeat(clean.arrays[i:i + 1], len(starts) ** 2, axis=0)
        for n, (t, l) in enumerate((t, l) for t in starts for l in starts):
            hidden[n, :, t:t + patch, l:l + patch] = 0  # the mean colour after normalization
        decoder = {**self.info["decoder"], "score_thresh": 0.01}
        drops = []
        for a in range(0, len(hidden), 16):
            for dets in decode(decoder, predict(DetectionBatch.of_tiles(hidden[a:a + 16])), size, size):
                drops.append(target["score"] - self._best_overlapping(dets, target))
        return np.asarray(drops).reshape(len(starts), len(starts))

    def integrated_gradients(self, model, clean: DetectionBatch, i: int, target: dict[str, Any], steps: int = 16) -> np.ndarray:
        """Integrated gradients (from the all-zero input) of the largest class logit inside the top
        detection's box, summed over channels as |attribution|."""
        import torch

        x = torch.from_numpy(clean.arrays[i])[None]
        alphas = torch.linspace(1 / steps, 1, steps).view(-1, 1, 1, 1)
        path = (alphas * x).requires_grad_(True)
        logits = model(path)[0][:, :, target["label"]]  # [steps, anchors]
        logits.max(dim=1).values.sum().backward()
        attribution = (x[0] * path.grad.mean(0)).abs().sum(0).numpy()
        h, w = (n // POOL * POOL for n in attribution.shape)
        return attribution[:h, :w].reshape(h // POOL, POOL, w // POOL, POOL).mean((1, 3))

    def explained(self, samples: list[int], reference: Outputs) -> dict[str, Any]:
        shown = sorted(set(samples) | set(range(min(GALLERY, len(self.pixels)))))
        return {"images": {str(i): _png(self.pixels[i][::2, ::2]) for i in shown},  # half size, as drawn
                "truth": {str(i): self.targets[i]["boxes"].round(1).tolist() for i in shown},
                "labels": [self.classes[0]] * len(samples), "fp32_predictions": [f"{len(d)} detections" for d in
                                                                                 (self.predictions(reference)[i] for i in samples)]}

    def grid(self, clean: DetectionBatch, cfg, cores: int):
        """Scalability cells over batch size x image size (the tile, and twice it where the file allows)."""
        size = clean.width
        sizes = [size] if self.spec.fixed_size else [size, 2 * size]
        for side in sizes:
            arrays = np.zeros((len(clean), 3, side, side), np.float32)
            arrays[:, :, :size, :size] = clean.arrays
            for bs in cfg.batch_sizes:
                yield {"threads": cores, "image_size": side, "batch_size": bs}, tile(DetectionBatch.of_tiles(arrays), bs), cores

    def probe_shape(self, clean: DetectionBatch, cfg) -> tuple[int, ...]:
        return (max(cfg.batch_sizes), *clean.arrays.shape[1:])

    def sections(self, data: dict[str, Any]) -> list[str]:
        return [performance_section(data), calibration_section(data), gallery_section(data), saliency_section(data)]


def performance_section(data: dict[str, Any]) -> str:
    v, classes = data["variants"], data["classes"]
    rows = [[n, fmt(x["performance"]["map_50"], ".3f"), fmt(x["performance"]["map"], ".3f"),
             fmt(x["performance"]["map_75"], ".3f"), fmt(x["performance"]["recall"], ".3f")]
            + [fmt(x["performance"]["ap50_per_class"].get(c), ".3f") for c in classes] for n, x in v.items()]
    objects = next(iter(v.values()))["performance"]["objects"]
    out = [f"<h2>Detection</h2><p>COCO average precision by pycocotools on {objects} annotated objects: mAP@.5 "
           "(the budgets judge it), mAP@[.5:.95], mAP@.75, recall (up to 1,000 detections per image), and AP@.5 per "
           "class.</p>", table(["variant", "mAP@.5", "mAP", "mAP@.75", "recall"] + [f"AP@.5 {c}" for c in classes], rows)]
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for n, x in v.items():
            curve = x["performance"]["pr_curve"]
            ax.plot(curve["recall"], curve["precision"], label=f"{n} (AP@.5 {x['performance']['map_50']:.3f})")
        ax.set(xlabel="recall", ylabel="precision", title="precision-recall at IoU .5", xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        out.append("<p>The precision-recall curve of every variant at IoU .5 (all classes):</p>" + inline_png(fig))
    return "\n".join(out)


def calibration_section(data: dict[str, Any]) -> str:
    v = data["variants"]
    rows = [[n, fmt(x["calibration"]["ece"], ".4f"), x["calibration"]["detections"]] for n, x in v.items()]
    out = ["<h2>Calibration</h2><p>Detections binned by score: the share of them that match an object (IoU .5) "
           "against their mean score. The detection ECE weighs each bin's gap by its share of the detections.</p>",
           table(["variant", "detection ECE", "detections"], rows)]
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, len(v), figsize=(3 * len(v), 3), squeeze=False)
        for ax, (n, x) in zip(axes[0], v.items()):
            bins = [b for b in x["calibration"]["bins"] if b["count"]]
            ax.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["precision"] for b in bins], width=1 / BINS,
                   edgecolor="k", alpha=0.7)
            ax.plot([0, 1], [0, 1], "k--", lw=1)
            ax.set(title=f"{n} (ECE {x['calibration']['ece']:.3f})", xlabel="score", ylabel="precision",
                   xlim=(0, 1), ylim=(0, 1))
        out.append(inline_png(fig))
    return "\n".join(out)


def _png(pixels: np.ndarray) -> str:
    """An RGB image (0..1 floats) as base64 PNG: a tenth of the JSON that lists of numbers take."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _image(data: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def _draw(ax, image: np.ndarray, boxes: list, color: str, scale: float = 0.5) -> None:
    ax.imshow(image)
    for x1, y1, x2, y2 in boxes:
        ax.add_patch(__import__("matplotlib.patches", fromlist=["Rectangle"]).Rectangle(
            (x1 * scale, y1 * scale), (x2 - x1) * scale, (y2 - y1) * scale, fill=False, color=color, lw=0.8))
    ax.set_xticks([])
    ax.set_yticks([])


def gallery_section(data: dict[str, Any]) -> str:
    v, inputs = data["variants"], data["saliency_inputs"]
    out = [f"<h2>Gallery</h2><p>Validation tiles with the annotated objects (green) and each variant's detections "
           f"scoring at least {SHOWN_SCORE} (orange).</p>"]
    plt = pyplot()
    shown = [k for k in sorted(inputs["images"], key=int)][:GALLERY]
    if plt is None or not shown:
        return "\n".join(out)
    fig, axes = plt.subplots(len(shown), 1 + len(v), figsize=(2.4 * (1 + len(v)), 2.4 * len(shown)), squeeze=False)
    for r, key in enumerate(shown):
        image = _image(inputs["images"][key])
        _draw(axes[r][0], image, inputs["truth"][key], "lime")
        if r == 0:
            axes[r][0].set_title("annotated", fontsize=8)
        for c, (name, x) in enumerate(v.items(), start=1):
            gallery = x["performance"]["gallery"]
            _draw(axes[r][c], image, gallery[int(key)]["boxes"] if int(key) < len(gallery) else [], "orange")
            if r == 0:
                axes[r][c].set_title(name, fontsize=8)
    out.append(inline_png(fig))
    return "\n".join(out)


def saliency_section(data: dict[str, Any]) -> str:
    v, inputs = data["variants"], data["saliency_inputs"]
    method = next(iter(v.values()))["saliency"]
    out = [f"<h2>Interpretability</h2><p>{escape(method['method'].capitalize())}: a {method['patch']}-pixel gray "
           f"square hides each region in turn (stride {method['stride']}), and the map is how much the score of "
           f"FP32's top detection drops. Agreement is the Spearman rank correlation with FP32's map. The last "
           f"column shows the PyTorch model's integrated gradients (from the all-zero input, of the largest class "
           f"logit inside that detection), averaged over {POOL}x{POOL} pixels.</p>",
           saliency_agreement_table(v, "tile")]
    plt = pyplot()
    samples = inputs["samples"]
    if plt is not None and samples:
        gradients = [(n, x["saliency"]["integrated_gradients"]) for n, x in v.items()
                     if x["saliency"].get("integrated_gradients")]
        columns = 1 + len(v) + len(gradients)
        fig, axes = plt.subplots(len(samples), columns, figsize=(2 * columns, 2 * len(samples)), squeeze=False)
        for r, i in enumerate(samples):
            axes[r][0].imshow(_image(inputs["images"][str(i)]))
            maps = [(name, x["saliency"]["maps"][r]) for name, x in v.items()]
            for c, (name, m) in enumerate(maps + [(f"{n} IG", g[r]) for n, g in gradients], start=1):
                axes[r][c].imshow(np.asarray(m), cmap="magma")
                if r == 0:
                    axes[r][c].set_title(name, fontsize=7)
            for ax in axes[r]:
                ax.set_xticks([])
                ax.set_yticks([])
        out.append(inline_png(fig))
    return "\n".join(out)
