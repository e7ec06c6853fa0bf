"""The exported ONNX file as a self-contained classifier: weights, class names and preprocessing.

Torch-free: serving and the metadata round-trip need nothing but this file.

Example::

    clf = OnnxClassifier("out/model.onnx")
    clf.classes[:3], clf.predict([Image.open("cat.png")])
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import FtdeployError
from .preprocessing import Preprocessing, preprocess

PREFIX = "ftdeploy."


def write_metadata(model, metadata: dict[str, object]) -> None:
    """Store ``metadata`` (JSON-encoded values) in an ``onnx.ModelProto``'s metadata_props."""
    keep = [p for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = PREFIX + key, json.dumps(value)


def onnx_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _decode(props: dict[str, str]) -> dict[str, object]:
    return {k[len(PREFIX):]: json.loads(v) for k, v in props.items() if k.startswith(PREFIX)}


def model_metadata(model) -> dict[str, object]:
    """ftdeploy's metadata from an ``onnx.ModelProto`` (no session needed)."""
    return _decode({p.key: p.value for p in model.metadata_props})


def read_metadata(session) -> dict[str, object]:
    """ftdeploy's metadata from an onnxruntime session (the file as shipped)."""
    return _decode(session.get_modelmeta().custom_metadata_map)


def open_session(path: str | Path, threads: int | None = None, providers: list[str] | None = None):
    """An onnxruntime session for ``path`` built as serving builds it, or an FtdeployError saying why not."""
    from .latency import ort_session
    from .machine import physical_cores

    path = Path(path)
    if not path.is_file():
        raise FtdeployError(f"ONNX file {str(path)!r} not found", "pass the model.onnx written by ftdeploy export")
    try:
        return ort_session(path, threads or physical_cores(), providers)
    except Exception as e:  # onnxruntime raises its own exception types for unreadable files
        raise FtdeployError(f"onnxruntime cannot load {path}: {str(e).strip().splitlines()[0][:300]}",
                            "pass an ONNX file written by ftdeploy export") from None


class OnnxClassifier:
    """An onnxruntime session plus what the file says about its input and classes."""

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None):
        self.session = open_session(path, threads, providers)
        self.path = Path(path)
        self.metadata = read_metadata(self.session)
        missing = [k for k in ("classes", "preprocessing") if k not in self.metadata]
        if missing:
            raise FtdeployError(f"{path} lacks ftdeploy metadata ({', '.join(missing)})",
                                "export it with ftdeploy export, which stores class names and preprocessing in the file")
        self.classes: list[str] = list(self.metadata["classes"])
        self.preprocessing = Preprocessing(**{**self.metadata["preprocessing"],
                                              "mean": tuple(self.metadata["preprocessing"]["mean"]),
                                              "std": tuple(self.metadata["preprocessing"]["std"])})
        self.input_name = self.session.get_inputs()[0].name

    def preprocess(self, images: list[Image.Image]) -> np.ndarray:
        return np.stack([preprocess(img, self.preprocessing) for img in images])

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]

    def samples(self) -> np.ndarray | None:
        """The sample inputs the file carries (validation images stored at export), preprocessed."""
        encoded = self.metadata.get("samples")
        if not encoded:
            return None
        return self.preprocess([Image.open(io.BytesIO(base64.b64decode(b))) for b in encoded])

    def predict(self, images: list[Image.Image]) -> np.ndarray:
        """Class indices for PIL images, preprocessed exactly as in training."""
        return self.logits(self.preprocess(images)).argmax(-1)


def encode_samples(inputs: np.ndarray, spec: Preprocessing) -> list[str]:
    """Preprocessed inputs back to the images they were made from (PNG, base64), to store in the
    file: whoever runs the file elsewhere (another execution provider) can check its outputs on
    real inputs without the dataset."""
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    std = np.asarray(spec.std, np.float32)[:, None, None]
    out = []
    for x in inputs:
        pixels = np.clip((x * std + mean) * 255, 0, 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels[0] if len(pixels) == 1 else pixels.transpose(1, 2, 0)).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out
