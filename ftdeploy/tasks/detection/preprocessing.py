"""A detector's preprocessing: images become tiles of ``input_size`` pixels (a large aerial photo in
overlapping tiles, as DeepForest's ``predict_tile`` does, a small one padded to one tile), normalized
with the weights' mean and std. The same code runs in training (the dataset's tiles), evaluation, the
report and the server, so the boxes a file answers are in the pixels of the image that was sent.

>>> spec = DetectionPreprocessing(64, 16, (0.5,) * 3, (0.25,) * 3)
>>> batch = preprocess_images([Image.new("RGB", (100, 40))], spec)
>>> len(batch), batch.offsets.tolist(), batch.sizes.tolist()
(2, [[0, 0], [36, 0]], [[100, 40]])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ...errors import ConfigError
from .boxes import tile_starts

STRIDE = 32  # the deepest level's stride: a tile side of a multiple of it makes every level's grid exact


@dataclass(frozen=True)
class DetectionPreprocessing:
    """Tiles of ``input_size`` pixels overlapping by ``overlap``, normalized with ``mean`` and ``std``;
    ``scale``: a resize applied to an image before it is tiled (1: its own pixels); ``fixed_size``:
    the network takes tiles of exactly this size (SSD's default boxes follow no stride elsewhere)."""

    input_size: int
    overlap: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1.0
    fixed_size: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "detection", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DetectionPreprocessing":
        return cls(int(d["input_size"]), int(d["overlap"]), tuple(d["mean"]), tuple(d["std"]), float(d.get("scale", 1.0)),
                   bool(d.get("fixed_size", False)))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.input_size, self.input_size)


def resolve(cfg, defaults: dict[str, Any]) -> DetectionPreprocessing:
    """From the config's preprocessing section and the weights' defaults."""
    size = cfg.input_size or defaults["input_size"]
    if size % STRIDE:
        raise ConfigError(f"preprocessing.input_size={size}: a detector's tile side must be a multiple of {STRIDE}",
                          f"use {size // STRIDE * STRIDE or STRIDE} or {(size // STRIDE + 1) * STRIDE}")
    overlap = cfg.tile_overlap if cfg.tile_overlap is not None else size // 6
    if not 0 <= overlap < size:
        raise ConfigError(f"preprocessing.tile_overlap={overlap} must lie in 0..{size - 1}")
    return DetectionPreprocessing(size, overlap, tuple(cfg.mean or defaults["mean"]), tuple(cfg.std or defaults["std"]),
                                  fixed_size=bool(defaults.get("fixed_size", False)))


def normalize_image(image: Image.Image, spec: DetectionPreprocessing) -> np.ndarray:
    """An RGB image (any size) as a normalized float32 C x H x W array."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))


class DetectionBatch:
    """Tiles of one or more images, as the network runs them, and where each lies: ``arrays`` (tiles x
    C x S x S), ``image`` (the image each tile belongs to), ``offsets`` (its top-left corner, in the
    scaled image's pixels); per image: ``sizes`` (width, height as sent) and ``scales``. Sliced and
    indexed by tile, like the arrays of other tasks."""

    def __init__(self, arrays: np.ndarray, image: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, scales: np.ndarray):
        self.arrays, self.image, self.offsets = arrays, np.asarray(image, np.int64), np.asarray(offsets, np.int64)
        self.sizes, self.scales = np.asarray(sizes, np.int64).reshape(-1, 2), np.asarray(scales, np.float64)

    @classmethod
    def of_tiles(cls, arrays: np.ndarray, sizes: np.ndarray | None = None) -> "DetectionBatch":
        """Tiles that are images of their own (a dataset's): no offset, their own size, scale 1."""
        n, side = len(arrays), arrays.shape[-1]
        return cls(arrays, np.arange(n), np.zeros((n, 2)), sizes if sizes is not None else np.full((n, 2), side),
                   np.ones(n))

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, index) -> "DetectionBatch":
        if isinstance(index, slice):
            index = np.arange(len(self))[index]
        index = np.asarray(index).reshape(-1)
        return DetectionBatch(self.arrays[index], self.image[index], self.offsets[index], self.sizes, self.scales)

    @classmethod
    def concat(cls, batches: list["DetectionBatch"]) -> "DetectionBatch":
        shift = np.cumsum([0] + [len(b.sizes) for b in batches[:-1]])
        return cls(np.concatenate([b.arrays for b in batches]), np.concatenate([b.image + s for b, s in zip(batches, shift)]),
                   np.concatenate([b.offsets for b in batches]), np.concatenate([b.sizes for b in batches]),
                   np.concatenate([b.scales for b in batches]))

    def feeds(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        return {names[0]: self.arrays}

    @property
    def height(self) -> int:
        return self.arrays.shape[-2]

    @property
    def width(self) -> int:
        return self.arrays.shape[-1]


def preprocess_images(images: list[Image.Image], spec: DetectionPreprocessing) -> DetectionBatch:
    """Images as tiles: each scaled by ``spec.scale``, then cut into tiles of ``input_size`` overlapping
    by ``overlap`` (a side that fits is one tile, padded bottom and right)."""
    size = spec.input_size
    arrays, owner, offsets, sizes = [], [], [], []
    for i, image in enumerate(images):
        image = image.convert("RGB")
        sizes.append(image.size)
        if spec.scale != 1.0:
            image = image.resize((max(1, round(image.width * spec.scale)), max(1, round(image.height * spec.scale))),
                                 Image.BILINEAR)
        for y in tile_starts(image.height, size, spec.overlap):
            for x in tile_starts(image.width, size, spec.overlap):
                tile = image.crop((x, y, x + size, y + size))  # beyond the edge: black, as the padding in training
                arrays.append(normalize_image(tile, spec))
                owner.append(i)
                offsets.append((x, y))
    return DetectionBatch(np.stack(arrays), np.asarray(owner), np.asarray(offsets), np.asarray(sizes),
                          np.full(len(images), spec.scale))
