"""Detection data (registered in the dataset registry): the embedded aerial tree crowns
(``deepforest``), and a user's own images with COCO JSON (``coco``), Pascal VOC XML (``voc``) or YOLO
txt (``yolo``) annotations. Large images are cut into tiles of ``preprocessing.input_size`` pixels and
their boxes clipped to each tile (a box mostly outside a tile is dropped there). Items are
``(image array, {"boxes": x1 y1 x2 y2 in tile pixels, "labels": 0-based})``; training tiles are
augmented with torchvision.transforms.v2 on ``tv_tensors.BoundingBoxes`` (flips, 90-degree rotations,
which aerial images allow, and random resized crops that clip boxes).

A bad annotation (a box beyond its image by more than a pixel, a box of zero or negative size, an
unknown category, a missing image file) stops the run naming the file and the annotation, or is
skipped and counted with ``data.on_corrupt: skip``.
"""

from __future__ import annotations

import importlib.util
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ...data import IMAGE_EXTENSIONS, DatasetSplits, datasets
from ...errors import DataError
from .boxes import tile_starts

VISIBLE = 0.5  # a box keeps a tile when at least this share of its area lies inside it
MIN_SIDE = 2.0  # pixels: a narrower box left by a crop is no object to learn
EDGE_SLACK = 1.0  # pixels a box may pass the image's edge (DeepForest's own crops end at the width)


@dataclass
class Annotated:
    """One source image: where it is (or the image), its boxes (x1 y1 x2 y2, pixels) and labels."""

    path: Path
    boxes: np.ndarray
    labels: np.ndarray
    size: tuple[int, int] | None = None  # (width, height) when the annotation says
    _image: Image.Image | None = field(default=None, repr=False)

    def image(self) -> Image.Image:
        if self._image is None:
            from ...data import load_image

            self._image = load_image(self.path).convert("RGB")
        return self._image


@dataclass
class Tile:
    """A window of a source image and the boxes in it, in the window's pixels."""

    source: Annotated
    window: tuple[int, int, int, int]  # x0 y0 x1 y1 in the source
    boxes: np.ndarray
    labels: np.ndarray

    def image(self, size: int) -> Image.Image:
        """The window, padded (bottom and right, black) to ``size`` x ``size``."""
        x0, y0, x1, y1 = self.window
        crop = self.source.image().crop((x0, y0, x1, y1))
        if crop.size == (size, size):
            return crop
        canvas = Image.new("RGB", (size, size))
        canvas.paste(crop, (0, 0))
        return canvas


def clip_to_window(boxes: np.ndarray, labels: np.ndarray, window: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Boxes in a window's pixels, clipped to it; those with less than VISIBLE of their area inside left out."""
    x0, y0, x1, y1 = window
    clipped = np.stack([np.clip(boxes[:, 0], x0, x1), np.clip(boxes[:, 1], y0, y1),
                        np.clip(boxes[:, 2], x0, x1), np.clip(boxes[:, 3], y0, y1)], 1) - [x0, y0, x0, y0]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = inside >= VISIBLE * np.maximum(area, 1e-9)
    return clipped[keep].astype(np.float32), labels[keep]


def tiles_of(source: Annotated, size: int, overlap: int, region: tuple[int, int, int, int] | None = None) -> list[Tile]:
    """``source`` (or a ``region`` of it) cut into tiles of ``size`` pixels overlapping by ``overlap``
    (0: side by side, the last one padded)."""
    width, height = source.size or source.image().size
    rx0, ry0, rx1, ry1 = region or (0, 0, width, height)
    out = []

    def starts(length: int) -> list[int]:
        return tile_starts(length, size, overlap) if overlap else list(range(0, length, size))

    for ty in starts(ry1 - ry0):
        for tx in starts(rx1 - rx0):
            window = (rx0 + tx, ry0 + ty, min(rx0 + tx + size, rx1), min(ry0 + ty + size, ry1))
            # boxes of the region only: a crown across the region's edge belongs to neither side
            inside = ((source.boxes[:, 0] >= rx0 - EDGE_SLACK) & (source.boxes[:, 1] >= ry0 - EDGE_SLACK)
                      & (source.boxes[:, 2] <= rx1 + EDGE_SLACK) & (source.boxes[:, 3] <= ry1 + EDGE_SLACK))
            boxes, labels = clip_to_window(source.boxes[inside], source.labels[inside], window)
            out.append(Tile(source, window, boxes, labels))
    return out


class DetectionDataset:
    """Tiles as the stages take them: normalized arrays and targets; ``augment`` for training."""

    def __init__(self, tiles: list[Tile], spec, augment: bool = False):
        self.tiles, self.spec, self.augment = list(tiles), spec, augment
        self._transform = _augmentation(spec.input_size) if augment else None

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def labels(self) -> list[np.ndarray]:
        return [t.labels for t in self.tiles]

    def raw(self, i: int) -> Image.Image:
        """Tile ``i`` as a user would send it."""
        return self.tiles[i].image(self.spec.input_size)

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        from .preprocessing import normalize_image

        tile = self.tiles[i]
        image, boxes, labels = self.raw(i), tile.boxes, tile.labels
        if self._transform is not None:
            image, boxes, labels = self._transform(image, boxes, labels)
        return normalize_image(image, self.spec), {"boxes": boxes.astype(np.float32), "labels": labels.astype(np.int64)}

    def subset(self, indices: list[int]) -> "DetectionDataset":
        return DetectionDataset([self.tiles[i] for i in indices], self.spec, self.augment)


def _augmentation(size: int):
    """Box-aware augmentation for nadir images: flips, 90-degree rotations, random resized crops, all
    by torchvision.transforms.v2 on ``tv_tensors.BoundingBoxes``. A box the crop cuts is clipped, and
    dropped when less than VISIBLE of it is left (as a tile's are): the same boxes, transformed
    unclipped, say how much was."""
    import torch
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    class Rot90(v2.Transform):
        """A random multiple of 90 degrees: an aerial image has no up."""

        def make_params(self, flat_inputs):
            return {"angle": 90 * int(torch.randint(0, 4, ()))}

        def transform(self, inpt, params):
            return v2.functional.rotate(inpt, params["angle"], expand=True) if params["angle"] else inpt

    pipeline = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), Rot90(),
                           v2.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(0.8, 1.25), antialias=True)])

    def area(b: np.ndarray) -> np.ndarray:
        return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])

    def apply(image: Image.Image, boxes: np.ndarray, labels: np.ndarray):
        def boxes_of(clamping):
            return tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY", canvas_size=(image.height, image.width),
                                            clamping_mode=clamping)

        out_image, out = pipeline(image, {"boxes": boxes_of("soft"), "whole": boxes_of(None)})
        clipped, whole = out["boxes"].numpy(), out["whole"].numpy()
        keep = (area(clipped) >= VISIBLE * np.maximum(area(whole), 1e-9)) & (np.minimum(
            clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]) >= MIN_SIDE)
        return out_image, clipped[keep], labels[keep]

    return apply


# --- the embedded default ---------------------------------------------------------------------------

DEEPFOREST = "deepforest"
LARGE = "2019_YELL_2_528000_4978000_image_crop2"  # 2299 x 2472, 574 crowns: training above, test below
# Training takes the large image above TRAIN_BELOW; the test split lies below TEST_FROM: the 128-pixel
# band between them is wider than the largest crown (108 px), so no crown is on both sides.
TRAIN_BELOW, TEST_FROM = 1792, 1920


def deepforest_files() -> Path:
    found = importlib.util.find_spec("deepforest")
    folder = Path(found.origin).parent / "data" if found and found.origin else None
    if folder is None or not (folder / f"{LARGE}.xml").is_file():
        raise DataError("the tree-crown images ship inside the deepforest package, which is not installed",
                        "pip install --no-deps deepforest==2.1.0")
    return folder


@datasets.register(DEEPFOREST)
def deepforest(cfg, spec) -> DatasetSplits:
    """The annotated aerial images that ``deepforest==2.1.0`` ships (NEON, 10 cm pixels), read without
    importing the package (its imports pull in Lightning): 4 RGB images, 951 crowns, Alive/Dead/Tree
    merged into one class, "tree". Split by source and region, so no crown is on two sides:

    - train: the 2299 x 2472 image above y=1792 (overlapping tiles), and SOAP_061 (37 crowns);
    - validation: the 1249 x 1035 image (279 crowns) and OSBS_029 (61): 340 crowns of two other sites'
      images, tiled side by side;
    - test, which no stage sees: the large image below y=1920 (about 140 crowns), side by side.
    """
    folder = deepforest_files()
    sources = {p.stem: voc_file(p, folder, {}, cfg.on_corrupt, [])[0] for p in sorted(folder.glob("*.xml"))}
    size = spec.input_size
    large = sources[LARGE]
    width, height = large.size
    train = tiles_of(large, size, size // 2, (0, 0, width, TRAIN_BELOW)) + tiles_of(sources["SOAP_061"], size, 0)
    val = tiles_of(sources["2019_YELL_2_541000_4977000_image_crop"], size, 0) + tiles_of(sources["OSBS_029"], size, 0)
    test = tiles_of(large, size, 0, (0, TEST_FROM, width, height))
    return DatasetSplits(DetectionDataset(train, spec, cfg.augment), DetectionDataset(val, spec),
                         ["tree"], cfg.name, test=DetectionDataset(test, spec))


# --- a user's own data ------------------------------------------------------------------------------

def _problem(on_corrupt: str, skipped: list[str], message: str) -> None:
    if on_corrupt == "error":
        raise DataError(message, "fix or delete the annotation, or set data.on_corrupt=skip to leave it out")
    skipped.append(message)


def checked(path: Path, boxes: list[list[float]], names: list[str], where: list[str], size: tuple[int, int] | None,
            classes: dict[str, int], on_corrupt: str, skipped: list[str]) -> Annotated | None:
    """An image's annotations, each checked: inside the image (a pixel of slack), of positive size, of a
    known category; the image file there. Bad ones stop the run (naming the file and the annotation)
    or are skipped and counted; an image whose file is missing is skipped whole."""
    if not path.is_file():
        _problem(on_corrupt, skipped, f"{path}: the image file is missing")
        return None
    width, height = size or Image.open(path).size
    good_boxes, good_labels = [], []
    for box, name, label in zip(boxes, names, where):
        x1, y1, x2, y2 = box
        if name not in classes:
            _problem(on_corrupt, skipped, f"{label}: unknown category {name!r} (known: {', '.join(classes)})")
        elif x2 <= x1 or y2 <= y1:
            _problem(on_corrupt, skipped, f"{label}: a box of zero or negative size {box}")
        elif x1 < -EDGE_SLACK or y1 < -EDGE_SLACK or x2 > width + EDGE_SLACK or y2 > height + EDGE_SLACK:
            _problem(on_corrupt, skipped, f"{label}: box {box} lies beyond the {width}x{height} image")
        else:
            good_boxes.append([max(0, x1), max(0, y1), min(width, x2), min(height, y2)])
            good_labels.append(classes[name])
    return Annotated(path, np.asarray(good_boxes, np.float32).reshape(-1, 4), np.asarray(good_labels, np.int64),
                     (width, height))


def voc_file(xml: Path, images: Path, classes: dict[str, int], on_corrupt: str, skipped: list[str]
             ) -> tuple[Annotated | None, dict[str, int]]:
    """A Pascal VOC XML file; ``classes`` empty: every name is one class, "tree" (DeepForest's labels)."""
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as e:
        _problem(on_corrupt, skipped, f"{xml}: not valid XML ({e})")
        return None, classes
    name = root.findtext("filename") or xml.stem
    path = images / name
    if not path.is_file():  # DeepForest's XML names a .tif beside which the .png lies
        path = next((images / f"{Path(name).stem}{ext}" for ext in IMAGE_EXTENSIONS
                     if (images / f"{Path(name).stem}{ext}").is_file()), path)
    size = (int(root.findtext("size/width") or 0), int(root.findtext("size/height") or 0))
    boxes, names, where = [], [], []
    for i, obj in enumerate(root.findall("object")):
        box = obj.find("bndbox")
        try:
            boxes.append([float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
        except (TypeError, ValueError, AttributeError):
            _problem(on_corrupt, skipped, f"{xml}: object {i} has no numeric bndbox")
            continue
        names.append(obj.findtext("name") if classes else "tree")
        where.append(f"{xml}: object {i} ({obj.findtext('name')})")
    known = classes or {"tree": 0}
    return checked(path, boxes, names, where, size if all(size) else None, known, on_corrupt, skipped), known


def _class_list(cfg, found: list[str]) -> dict[str, int]:
    return {name: i for i, name in enumerate(sorted(set(found)))}


@datasets.register("voc")
def voc(cfg, spec) -> DatasetSplits:
    """``data.root``: a folder of images with one Pascal VOC XML file each (``name.xml`` beside ``name.png``)."""
    root = _folder(cfg)
    files = sorted(root.glob("*.xml"))
    if not files:
        raise DataError(f"no Pascal VOC .xml files in {root}", "put one XML file beside each image")
    classes = _class_list(cfg, [o.findtext("name") for f in files for o in _objects(f)])
    skipped: list[str] = []
    sources = [voc_file(f, root, classes, cfg.on_corrupt, skipped)[0] for f in files]
    return _split(cfg, spec, [s for s in sources if s is not None], list(classes), skipped)


def _objects(xml: Path) -> list:
    try:
        return ET.parse(xml).getroot().findall("object")
    except ET.ParseError:
        return []


@datasets.register("coco")
def coco(cfg, spec) -> DatasetSplits:
    """``data.root``: a folder holding ``annotations.json`` (COCO: images, annotations with
    ``bbox`` x y w h, categories) and the images at the ``file_name`` paths it gives."""
    root = _folder(cfg)
    path = root / "annotations.json"
    if not path.is_file():
        raise DataError(f"{path} does not exist", "put the COCO annotation file there, named annotations.json")
    try:
        doc = json.loads(path.read_text())
        categories = {c["id"]: c["name"] for c in doc["categories"]}
        images = {im["id"]: im for im in doc["images"]}
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a COCO annotation file ({type(e).__name__}: {e})") from None
    classes = {name: i for i, name in enumerate(sorted(set(categories.values())))}
    per_image: dict[Any, list] = {i: [] for i in images}
    skipped: list[str] = []
    for n, ann in enumerate(doc.get("annotations", [])):
        if ann.get("image_id") not in images:
            _problem(cfg.on_corrupt, skipped, f"{path}: annotation {ann.get('id', n)} names no image of the file")
            continue
        per_image[ann["image_id"]].append(ann)
    sources = []
    for image_id, anns in per_image.items():
        info = images[image_id]
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                 for a in anns]
        names = [categories.get(a.get("category_id"), f"id {a.get('category_id')}") for a in anns]
        where = [f"{path}: annotation {a.get('id')} of image {info.get('file_name')}" for a in anns]
        size = (info["width"], info["height"]) if "width" in info and "height" in info else None
        source = checked(root / info["file_name"], boxes, names, where, size, classes, cfg.on_corrupt, skipped)
        if source is not None:
            sources.append(source)
    return _split(cfg, spec, sources, list(classes), skipped)


@datasets.register("yolo")
def yolo(cfg, spec) -> DatasetSplits:
    """``data.root``: ``images/`` and ``labels/`` (one ``name.txt`` per image: ``class cx cy w h``,
    normalized to 0..1) and ``classes.txt`` (one name per line, in class-index order)."""
    root = _folder(cfg)
    names_file = root / "classes.txt"
    if not names_file.is_file():
        raise DataError(f"{names_file} does not exist", "list the class names there, one per line, in index order")
    names = [n.strip() for n in names_file.read_text().splitlines() if n.strip()]
    classes = {name: i for i, name in enumerate(names)}
    skipped: list[str] = []
    sources = []
    for image in sorted(p for p in (root / "images").glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        label_file = root / "labels" / f"{image.stem}.txt"
        width, height = Image.open(image).size
        boxes, found, where = [], [], []
        for number, line in enumerate(label_file.read_text().splitlines() if label_file.is_file() else [], 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                index, cx, cy, w, h = int(parts[0]), *map(float, parts[1:5])
            except (ValueError, IndexError):
                _problem(cfg.on_corrupt, skipped, f"{label_file}: line {number} is not 'class cx cy w h'")
                continue
            boxes.append([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
            found.append(names[index] if 0 <= index < len(names) else f"index {index}")
            where.append(f"{label_file}: line {number}")
        source = checked(image, boxes, found, where, (width, height), classes, cfg.on_corrupt, skipped)
        if source is not None:
            sources.append(source)
    return _split(cfg, spec, sources, names, skipped)


def _folder(cfg) -> Path:
    if cfg.root is None or not Path(cfg.root).is_dir():
        raise DataError(f"data.root {str(cfg.root)!r} is not a folder", f"set data.root to the folder of your "
                        f"{cfg.name} data")
    return Path(cfg.root)


def _split(cfg, spec, sources: list[Annotated], classes: list[str], skipped: list[str]) -> DatasetSplits:
    """A seeded split by source image (no object on two sides), then each side cut into tiles:
    training tiles overlap by half, validation tiles lie side by side."""
    if len(sources) < 2:
        raise DataError(f"{cfg.root} holds {len(sources)} usable image(s); a validation split needs at least 2")
    order = np.random.default_rng(cfg.split_seed).permutation(len(sources))
    n_val = max(1, round(cfg.val_fraction * len(sources)))
    size = spec.input_size
    train = [t for i in order[n_val:] for t in tiles_of(sources[i], size, size // 2)]
    val = [t for i in order[:n_val] for t in tiles_of(sources[i], size, 0)]
    return DatasetSplits(DetectionDataset(train, spec, cfg.augment), DetectionDataset(val, spec), classes, cfg.name,
                         skipped)
