"""Image classification: one float input ``input`` (N x C x H x W), preprocessed by
:mod:`ftdeploy.preprocessing` (numpy + Pillow, the same function in training and serving)."""

from __future__ import annotations

import base64
import io
from typing import Any, Sequence

import numpy as np

from ..preprocessing import Preprocessing, preprocess, resolve_preprocessing
from .base import Task


class ImageClassification(Task):
    name = "image_classification"
    input_names = ("input",)
    codec = "image"
    description = "Image classification"

    def resolve_preprocessor(self, cfg, defaults: dict[str, Any]) -> Preprocessing:
        return resolve_preprocessing(cfg, defaults)

    def preprocessor_from_dict(self, d: dict[str, Any]) -> Preprocessing:
        return Preprocessing.from_dict(d)

    def preprocess(self, raw: list, spec: Preprocessing) -> np.ndarray:
        return np.stack([preprocess(img, spec) for img in raw])

    def stack(self, items: list) -> np.ndarray:
        return np.stack([np.asarray(x) for x in items]).astype(np.float32)

    def collate(self, items: list) -> tuple[tuple, Any]:
        import torch

        xs, ys = zip(*items)
        return (torch.stack([torch.as_tensor(x) for x in xs]),), torch.as_tensor(ys)

    def dynamic_axes(self, names: Sequence[str]) -> dict[str, dict[int, str]]:
        return {names[0]: {0: "batch"}}

    def example_inputs(self, spec: Preprocessing, names: Sequence[str]) -> list[np.ndarray]:
        return [np.zeros((2, *spec.input_shape), np.float32)]

    def encode_samples(self, inputs: np.ndarray, spec: Preprocessing) -> list[str]:
        """Preprocessed inputs back to the images they were made from (PNG, base64)."""
        from PIL import Image

        mean = np.asarray(spec.mean, np.float32)[:, None, None]
        std = np.asarray(spec.std, np.float32)[:, None, None]
        out = []
        for x in inputs:
            pixels = np.clip((x * std + mean) * 255, 0, 255).round().astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels[0] if len(pixels) == 1 else pixels.transpose(1, 2, 0)).save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode())
        return out

    def decode_samples(self, samples: list[str], spec: Preprocessing) -> np.ndarray:
        from PIL import Image

        return self.preprocess([Image.open(io.BytesIO(base64.b64decode(b))) for b in samples], spec)
