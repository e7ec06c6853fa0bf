"""Image preprocessing shared by training, validation, export and serving.

It depends on numpy and Pillow only, so the torch-free server applies exactly the transform the
model was trained with: the spec is stored in the run directory and in the ONNX metadata.

>>> from PIL import Image
>>> spec = Preprocessing(input_size=32, resize_size=32, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
>>> preprocess(Image.new("L", (8, 8), 255), spec).shape
(3, 32, 32)
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
from PIL import Image

from .errors import ConfigError

log = logging.getLogger(__name__)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to ``resize_size``, center-crop ``input_size``, scale to [0, 1], normalize."""

    input_size: int
    resize_size: int
    channels: Literal[1, 3]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Preprocessing":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        """The spec a run directory or an ONNX file stores. Keys this version does not know (a file
        written by a newer one) are left out with a warning rather than failing the load.

        >>> Preprocessing.from_dict({"input_size": 8, "resize_size": 8, "channels": 1, "mean": [0.5],
        ...                          "std": [0.5], "antialias": True}).mean
        (0.5,)
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            log.warning("preprocessing keys %s are not known to this version of ftdeploy and are ignored", unknown)
        kept = {k: v for k, v in d.items() if k in known}
        return cls(**{**kept, "mean": tuple(kept["mean"]), "std": tuple(kept["std"])})

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.input_size, self.input_size)


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Grayscale, palette and alpha images become ``channels``-channel images; alpha is composited on white."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("L" if channels == 1 else "RGB")


def prepare(img: Image.Image, spec: Preprocessing) -> Image.Image:
    """The geometric part: ``spec.channels`` channels, shorter side resized, center crop of ``input_size``.
    Corruptions for robustness checks are applied to this image, before normalization."""
    img = to_mode(img, spec.channels)
    w, h = img.size
    scale = spec.resize_size / min(w, h)
    new_w, new_h = max(spec.input_size, round(w * scale)), max(spec.input_size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _RESAMPLE[spec.interpolation])
    left, top = (new_w - spec.input_size) // 2, (new_h - spec.input_size) // 2
    return img.crop((left, top, left + spec.input_size, top + spec.input_size))


def normalize(pixels: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """HxW or HxWxC values in [0, 1] -> a normalized float32 CxHxW array."""
    x = np.asarray(pixels, dtype=np.float32)
    x = x[:, :, None] if x.ndim == 2 else x
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(img: Image.Image, spec: Preprocessing) -> np.ndarray:
    """One PIL image -> a float32 array of shape ``spec.input_shape``."""
    return normalize(np.asarray(prepare(img, spec), dtype=np.float32) / 255.0, spec)


def resolve_preprocessing(cfg, defaults: dict[str, Any]) -> Preprocessing:
    """A new run's image preprocessing (``cfg``: the config's preprocessing section): the config's
    values where set, otherwise the ones that match the model's pretrained weights."""
    input_size = cfg.input_size or defaults["input_size"]
    resize = cfg.resize_size or (input_size if cfg.input_size else defaults["resize_size"])
    mean, std = cfg.mean or defaults["mean"], cfg.std or defaults["std"]
    if cfg.channels == 1:  # one channel: average the per-channel statistics of the weights
        mean, std = mean if len(mean) == 1 else (sum(mean) / len(mean),), std if len(std) == 1 else (sum(std) / len(std),)
    if len(mean) != cfg.channels or len(std) != cfg.channels:
        raise ConfigError(f"preprocessing.mean/std have {len(mean)}/{len(std)} values for {cfg.channels} channel(s)",
                          "give one value per channel")
    if resize < input_size:
        raise ConfigError(f"preprocessing.resize_size {resize} is smaller than input_size {input_size}")
    return Preprocessing(input_size, resize, cfg.channels, tuple(mean), tuple(std),
                         cfg.interpolation or defaults.get("interpolation", "bilinear"))
