"""Image classification: one float input ``input`` (N x C x H x W), preprocessed by
:mod:`ftdeploy.preprocessing` (numpy + Pillow, the same function in training and serving), and a
classifier's outputs (:mod:`ftdeploy.tasks.classification`). For the usability report: corruptions
of the image before normalization (a registry), occlusion maps and integrated gradients on pixels,
and latency over batch size x threads. Requests: multipart uploads, base64 JSON or a raw image body."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter

from ..codecs import Parsed, Tensor, TensorSpec, byte_items, decode_image, float_batch, image_blobs, one_input, open_image
from ..errors import FtdeployError
from ..preprocessing import Preprocessing, normalize, prepare, preprocess, resolve_preprocessing
from ..registry import Registry
from .base import Outputs, Task, softmax, tile
from ..figures import inline_png, pyplot, saliency_agreement_table
from .classification import ClassifierOutputs, ClassifierSuite, classifier_codec, logits_of

IMAGE_CORRUPTIONS = ["gaussian_noise", "blur", "brightness", "contrast", "jpeg", "rotation", "translation", "occlusion"]


class ImageRequests:
    """Images in a request -> opened images (headers checked); decoded on demand. Under the Open
    Inference Protocol the model's input takes either the FP32 tensor itself, already preprocessed
    (``tensor_batch`` makes the task's batch of it), or BYTES holding encoded images, decoded and
    preprocessed by the file's own preprocessing (OpenVINO Model Server's convention)."""

    def __init__(self, tensor_batch: Callable[[np.ndarray], Any] = lambda array: array, square: bool = True):
        self.tensor_batch, self.square = tensor_batch, square

    accepts = ('Send images as a multipart upload (one or more files), JSON {"images": ["<base64>", ...]} '
               "or a raw image body.")
    request_body = {"content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "byte"},
                       "description": "base64-encoded image files"}}}},
        "image/png": {"schema": {"type": "string", "format": "binary"}}}}

    def parse(self, body: bytes, content_type: str, limits) -> Parsed:
        opened = [open_image(b, limits) for b in image_blobs(body, content_type, limits)]  # headers only
        return Parsed(opened, decode_image, sum(img.width * img.height for img in opened))

    def warmup(self, spec: Preprocessing) -> list:
        return [Image.new("RGB", (spec.input_size, spec.input_size))]

    def tensor_inputs(self, model) -> list[TensorSpec]:
        name, shape = model.input_names[0], model.session.get_inputs()[0].shape
        fixed = [d if isinstance(d, int) and self.square else -1 for d in shape[1:]]
        return [TensorSpec(name, "FP32", (-1, *fixed), accepts="BYTES [N] holding encoded images (PNG, JPEG...)")]

    def from_tensors(self, tensors: list[Tensor], model, limits) -> Parsed:
        spec = self.tensor_inputs(model)[0]
        tensor = one_input(tensors, [spec])
        if tensor.datatype == "BYTES":
            opened = [open_image(b, limits) for b in byte_items(tensor, limits, "encoded image")]
            return Parsed(opened, decode_image, sum(img.width * img.height for img in opened),
                          notes={"input": "encoded images, preprocessed by the file"})
        array = float_batch(tensor, spec, limits)
        return Parsed([], decode_image, batch=self.tensor_batch(array), notes={"input": "a preprocessed tensor"})

    def encode_tensor(self, raw: list, model) -> Tensor:
        """The client's side: images as PNG files in a BYTES tensor."""
        return Tensor(model.input_names[0], "BYTES", [len(raw)], [png_bytes(img) for img in raw])

    def encode(self, raw: list) -> tuple[bytes, str]:
        """The client's side: images as a multipart upload of PNG files."""
        boundary = "ftdeploy-images"
        parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{i}.png\"\r\n"
                 f"Content-Type: image/png\r\n\r\n".encode() + png_bytes(img) + b"\r\n" for i, img in enumerate(raw)]
        return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class ImageInputs:
    """The input side of an image model: one float input, the image preprocessing, image requests."""

    input_names = ("input",)
    unit = "images"
    default_corruptions = IMAGE_CORRUPTIONS

    def resolve_preprocessor(self, cfg, defaults: dict[str, Any]) -> Preprocessing:
        return resolve_preprocessing(cfg, defaults)

    def preprocessor_from_dict(self, d: dict[str, Any]) -> Preprocessing:
        return Preprocessing.from_dict(d)

    def preprocess(self, raw: list, spec: Preprocessing) -> np.ndarray:
        return np.stack([preprocess(img, spec) for img in raw])

    def stack(self, items: list) -> np.ndarray:
        return np.stack([np.asarray(x) for x in items]).astype(np.float32)

    def dynamic_axes(self, names: Sequence[str]) -> dict[str, dict[int, str]]:
        return {names[0]: {0: "batch"}}

    def example_inputs(self, spec: Preprocessing, names: Sequence[str]) -> list[np.ndarray]:
        return [np.zeros((2, *spec.input_shape), np.float32)]

    def encode_samples(self, inputs: np.ndarray, spec: Preprocessing) -> list[str]:
        """Preprocessed inputs back to the images they were made from (PNG, base64)."""
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
        return self.preprocess([Image.open(io.BytesIO(base64.b64decode(b))) for b in samples], spec)


class ImageClassification(ImageInputs, ClassifierOutputs, Task):
    name = "image_classification"
    description = "Image classification"
    codec = classifier_codec(ImageRequests())

    def collate(self, items: list) -> tuple[tuple, Any]:
        import torch

        xs, ys = zip(*items)
        return (torch.stack([torch.as_tensor(x) for x in xs]),), torch.as_tensor(ys)

    def usability_suite(self, splits, spec: Preprocessing, limit: int, info: dict[str, Any]) -> "Images":
        return validation_images(self, splits, spec, limit)


Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]  # HxWxC in [0, 1] -> same
corruptions: Registry[Corruption] = Registry("corruption", FtdeployError)


def _fill(x: np.ndarray) -> tuple:
    """The colour of the image's border: what rotation and translation bring in."""
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    return tuple(int(round(v * 255)) for v in np.median(border, axis=0))


def _pil(x: np.ndarray) -> Image.Image:
    return Image.fromarray((x * 255).round().clip(0, 255).astype(np.uint8))


def _array(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32) / 255.0


@corruptions.register("identity")
def _identity(x, severity, rng):
    """No change: the clean images through the corruption path (a check of the path itself)."""
    return x


@corruptions.register("gaussian_noise")
def _gaussian_noise(x, severity, rng):
    return np.clip(x + rng.normal(0, [0.08, 0.12, 0.18, 0.26, 0.38][severity - 1], x.shape), 0, 1).astype(np.float32)


@corruptions.register("blur")
def _blur(x, severity, rng):
    radius = [0.5, 1.0, 1.5, 2.0, 3.0][severity - 1] * x.shape[0] / 64
    return _array(_pil(x).filter(ImageFilter.GaussianBlur(radius)))


@corruptions.register("brightness")
def _brightness(x, severity, rng):
    return np.clip(x + [0.1, 0.2, 0.3, 0.4, 0.5][severity - 1], 0, 1).astype(np.float32)


@corruptions.register("contrast")
def _contrast(x, severity, rng):
    c = [0.4, 0.3, 0.2, 0.1, 0.05][severity - 1]
    mean = x.mean(axis=(0, 1), keepdims=True)
    return np.clip((x - mean) * c + mean, 0, 1).astype(np.float32)


@corruptions.register("jpeg")
def _jpeg(x, severity, rng):
    buf = io.BytesIO()
    _pil(x).save(buf, format="JPEG", quality=[25, 18, 15, 10, 7][severity - 1])
    return _array(Image.open(buf))


@corruptions.register("rotation")
def _rotation(x, severity, rng):
    angle = [5, 10, 15, 20, 30][severity - 1] * rng.choice([-1, 1])
    return _array(_pil(x).rotate(float(angle), resample=Image.BILINEAR, fillcolor=_fill(x)))


@corruptions.register("translation")
def _translation(x, severity, rng):
    shift = round([0.03, 0.06, 0.1, 0.15, 0.2][severity - 1] * x.shape[0])
    dx, dy = rng.choice([-1, 1], size=2) * shift
    return _array(_pil(x).rotate(0, translate=(int(dx), int(dy)), fillcolor=_fill(x)))


@corruptions.register("occlusion")
def _occlusion(x, severity, rng):
    side = max(1, round([0.1, 0.2, 0.3, 0.4, 0.5][severity - 1] * x.shape[0]))
    top, left = rng.integers(0, x.shape[0] - side + 1), rng.integers(0, x.shape[1] - side + 1)
    out = x.copy()
    out[top:top + side, left:left + side] = 0.5  # a mid-gray patch
    return out


@dataclass
class Images(ClassifierSuite):
    """The image classifier's usability suite: the validation images prepared to the network's input
    size (before normalization), labels, class names and the preprocessing that normalizes them."""

    task: Any
    pixels: list[np.ndarray]  # HxWxC in [0, 1]
    labels: np.ndarray
    classes: list[str]
    spec: Preprocessing
    corruptions = corruptions
    corrupted = "to the image before normalization"

    def inputs(self, corruption: str = "identity", severity: int = 1) -> np.ndarray:
        """Normalized network inputs of every image under ``corruption`` at ``severity``; seeded, so
        every variant sees exactly the same corrupted images."""
        fn = corruptions.get(corruption)
        rng = np.random.default_rng(1000 * severity + sorted(corruptions.names()).index(corruption))
        return np.stack([normalize(_as_channels(fn(p, severity, rng), p), self.spec) for p in self.pixels])

    def saliency_method(self, clean: np.ndarray) -> dict[str, Any]:
        size = clean.shape[-1]
        return {"method": "occlusion", "patch": max(2, size // 8), "stride": max(1, size // 16)}

    def occlusion(self, predict, clean: np.ndarray, i: int, target: int) -> np.ndarray:
        method = self.saliency_method(clean)
        return occlusion_map(predict, clean[i], target, method["patch"], method["stride"])

    def integrated_gradients(self, model, clean: np.ndarray, i: int, target: int) -> np.ndarray:
        return integrated_gradients(model, clean[i], target)

    def explained(self, samples: list[int], reference: Outputs) -> dict[str, Any]:
        return {**self.described(samples, reference), "images": [self.pixels[i].round(4).tolist() for i in samples]}

    def grid(self, clean: np.ndarray, cfg, cores: int):
        """Scalability cells: (their fields, batch, threads) over batch size x threads."""
        for t in cfg.threads or sorted({1, cores}):
            for bs in cfg.batch_sizes:
                yield {"threads": t, "batch_size": bs}, tile(clean, bs), t

    def probe_shape(self, clean: np.ndarray, cfg) -> tuple[int, ...]:
        """The largest batch's shape, for the memory probe."""
        return (max(cfg.batch_sizes), *clean.shape[1:])

    def sections(self, data: dict[str, Any]) -> list[str]:
        return [*super().sections(data), saliency_section(data)]


def _as_channels(x: np.ndarray, like: np.ndarray) -> np.ndarray:
    return x[:, :, None] if x.ndim == 2 and like.ndim == 3 else x


def validation_images(task, splits, spec: Preprocessing, limit: int) -> Images:
    val = splits.val
    n = min(limit, len(val))
    pixels = []
    for i in range(n):
        p = _array(prepare(val.load(i), spec))
        pixels.append(p[:, :, None] if p.ndim == 2 else p)
    return Images(task, pixels, np.asarray(val.labels[:n]), splits.classes, spec)


def occlusion_map(predict, x: np.ndarray, target: int, patch: int, stride: int) -> np.ndarray:
    """Drop of the ``target`` class probability when a ``patch`` square (set to 0: the mean colour after
    normalization) covers each position; a (rows x cols) map, larger = more important."""
    _, h, w = x.shape
    tops, lefts = range(0, h - patch + 1, stride), range(0, w - patch + 1, stride)
    batch = np.repeat(x[None], len(tops) * len(lefts), axis=0)
    for i, (t, l) in enumerate((t, l) for t in tops for l in lefts):
        batch[i, :, t:t + patch, l:l + patch] = 0
    base = softmax(logits_of(predict(x[None])))[0, target]
    probs = softmax(np.concatenate([logits_of(predict(batch[i:i + 64])) for i in range(0, len(batch), 64)]))[:, target]
    return (base - probs).reshape(len(tops), len(lefts))


def integrated_gradients(model, x: np.ndarray, target: int, steps: int = 32) -> np.ndarray:
    """Integrated gradients of the PyTorch model from the all-zero input (the mean colour), summed
    over channels as |attribution|."""
    import torch

    inputs = torch.from_numpy(x)[None]
    alphas = torch.linspace(1 / steps, 1, steps).view(-1, 1, 1, 1)
    path = (alphas * inputs).requires_grad_(True)
    model(path)[:, target].sum().backward()
    return (inputs[0] * path.grad.mean(0)).abs().sum(0).numpy()


def saliency_section(data: dict[str, Any]) -> str:
    """Occlusion maps of every variant beside each explained image (and integrated gradients for PyTorch)."""
    v, inputs = data["variants"], data["saliency_inputs"]
    method = next(iter(v.values()))["saliency"]
    out = [f"<h2>Interpretability</h2><p>Occlusion sensitivity through each variant's own predictor (a "
           f"{method['patch']}-pixel gray square, stride {method['stride']}): how much the probability of FP32's "
           f"predicted class drops when each region is hidden. Agreement is the Spearman rank correlation with "
           f"FP32's map, averaged over the {len(inputs['samples'])} images (misclassified ones among them, when "
           f"there are any). The last column for the PyTorch model shows integrated gradients.</p>",
           saliency_agreement_table(v, "image")]
    plt = pyplot()
    if plt is not None:
        ig = "integrated_gradients" in v.get("torch", {}).get("saliency", {})
        cols = 1 + len(v) + (1 if ig else 0)
        n = len(inputs["samples"])
        fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.6 * n), squeeze=False)
        for r in range(n):
            image = np.asarray(inputs["images"][r])
            axes[r][0].imshow(image.squeeze(), cmap="gray" if image.shape[-1] == 1 else None)
            axes[r][0].set_title(f"{inputs['labels'][r]} → {inputs['fp32_predictions'][r]}", fontsize=7)
            for c, (name, x) in enumerate(v.items(), start=1):
                axes[r][c].imshow(np.asarray(x["saliency"]["maps"][r]), cmap="magma")
                if r == 0:
                    axes[r][c].set_title(name, fontsize=7)
            if ig:
                axes[r][-1].imshow(np.asarray(v["torch"]["saliency"]["integrated_gradients"][r]), cmap="magma")
                if r == 0:
                    axes[r][-1].set_title("torch: IG", fontsize=7)
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
        out.append(inline_png(fig))
    return "\n".join(out)
