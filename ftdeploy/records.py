"""The records the stages write, typed (pydantic) and versioned: ``metrics.json`` (train),
``prune_report.json`` (prune), ``report.json`` (export and quantize), ``usability.json`` (report),
``points.json`` and ``pareto.json`` (optimize). Every stage writes through these models and every
reader loads through them, so a field has one name and one meaning everywhere.

Each record carries ``schema_version``. A file without one was written before records were typed
(schema 0: a classifier's ``accuracy`` where records now name the task's metric); it is upgraded as
it is read, so run and export directories written by earlier versions still load. A file from a
newer ftdeploy is refused with a message that says so. Fields a task defines for itself (its
per-class table, its calibration figures, its saliency method) are plain JSON objects inside them.

>>> m = TrainMetrics.read({"val_accuracy": 0.9, "best_epoch": 2, "epochs": 3})  # a file of schema 0
>>> m.schema_version, m.metric, m.val_metric, m.val_scores
(1, 'accuracy', 0.9, {'accuracy': 0.9})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import RunDirError
from .files import write_json

SCHEMA_VERSION = 1
R = TypeVar("R", bound="Versioned")
Json = dict[str, Any]


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema0_names: ClassVar[dict[str, str]] = {}  # a field's name in schema-0 files -> its name now
    # what schema-0 files leave unsaid: they were all written by classifiers, whose metric is accuracy
    schema0_defaults: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="before")
    @classmethod
    def _schema0_names(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(k in data for k in cls.schema0_names):
            data = {**cls.schema0_defaults, **_renamed(data, cls.schema0_names)}
        return data


class Versioned(Record):
    """A record file: its schema version, and the upgrade of a schema-0 file (written before typing)."""

    schema_version: int = SCHEMA_VERSION

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        version = data.get("schema_version", SCHEMA_VERSION)
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise ValueError(f"schema_version {version} was written by a newer ftdeploy (this one reads up to "
                             f"{SCHEMA_VERSION}): upgrade ftdeploy")
        if version == 0:
            data = {**cls.from_schema0({k: v for k, v in data.items() if k != "schema_version"}),
                    "schema_version": SCHEMA_VERSION}
        return data

    @classmethod
    def from_schema0(cls, data: Json) -> Json:
        return {**{k: v for k, v in CLASSIFIER.items() if k in cls.model_fields}, **data}

    @classmethod
    def read(cls: type[R], data: Json) -> R:
        """A record as a file holds it: one without ``schema_version`` was written before records were
        typed (schema 0), and is upgraded."""
        return cls.model_validate({"schema_version": 0, **data})


def load_record(cls: type[R], path: str | Path) -> R:
    """``path`` as a ``cls`` record, or a RunDirError naming the file and what is wrong in it."""
    import json

    path = Path(path)
    try:
        return cls.read(json.loads(path.read_text()))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'the file'}: {err['msg']}" for err in e.errors()[:3])
        raise RunDirError(f"{path} is not a valid {cls.__name__} record ({problems[:400]})",
                          "it may have been written by another version of ftdeploy, or edited by hand") from None
    except ValueError as e:  # not JSON
        raise RunDirError(f"{path} is not JSON ({e})", "restore the file the stage wrote") from None


def write_record(path: str | Path, record: Versioned) -> None:
    write_json(Path(path), record.model_dump(mode="json"))


CLASSIFIER = {"metric": "accuracy"}  # what a schema-0 record leaves unsaid: every one was written by a classifier


def _renamed(data: Json, names: dict[str, str]) -> Json:
    return {names.get(k, k): v for k, v in data.items()}


def _accuracy_scores(data: Json, key: str = "accuracy", into: str = "scores") -> Json:
    """A schema-0 classifier figure (``accuracy``) as the task's named scores."""
    if key in data:
        value = data.pop(key)
        data[into] = {"accuracy": value} if value is not None else {}
    return data


# --- metrics.json ----------------------------------------------------------------------------------

class BatchNormRecord(Record):
    policy: str
    applied: bool
    reason: str | None = None
    val_metric_before: float | None = None
    val_metric_after: float | None = None


class TrainMetrics(Versioned):
    """What a training run (or a pruning recovery) reached: the best epoch by the task's metric."""

    metric: str  # the task's primary metric: what the best epoch was judged on
    val_metric: float | None = None  # the best epoch's validation figure of ``metric``
    val_scores: dict[str, float] = Field(default_factory=dict)
    best_epoch: int = -1
    epochs: int = 0
    final_val_metric: float | None = None
    train_items_per_second: float | None = None
    unit: str  # what the items are: images, texts
    num_processes: int = 1
    mixed_precision: str | None = None  # what ran
    mixed_precision_configured: str | None = None  # what the config said (None: the launcher's)
    device: str | None = None
    peak_device_memory_mb: float | None = None
    mode: str | None = None
    bn_reestimate: BatchNormRecord | None = None
    note: str | None = None

    @classmethod
    def from_schema0(cls, data: Json) -> Json:
        data = _renamed({**CLASSIFIER, "unit": "images", **data},
                        {"val_accuracy": "val_metric", "final_val_accuracy": "final_val_metric",
                         "train_images_per_second": "train_items_per_second"})
        if data.get("val_metric") is not None:
            data["val_scores"] = {"accuracy": data["val_metric"]}
        if isinstance(data.get("bn_reestimate"), dict):
            data["bn_reestimate"] = _renamed(data["bn_reestimate"], {"val_accuracy_before": "val_metric_before",
                                                                     "val_accuracy_after": "val_metric_after"})
        return data


# --- report.json (export, quantize) ---------------------------------------------------------------

class ParityRecord(Record):
    """The FP32 gate: both float32 answers against a float64 run of the PyTorch model, and the task's
    decisions (top-1, detections, tags) where they differ."""

    reference: str = "torch"
    error_reference: str = "torch float64"
    error_reference_note: str | None = None
    torch_fp32_error: float
    onnx_error: float
    error_ratio: float | None = None
    allowed_error: float
    worst_tolerance_fraction: float
    max_abs_diff: float  # PyTorch float32 against the file
    mean_abs_diff: float
    decision: str
    decision_agreement: float
    decisions_compared: int
    disagreements_counted: int
    near_ties: int  # disagreements inside both errors: excused
    passed: bool
    batch_sizes: list[int] = Field(default_factory=list)
    parity_error_ratio: float | None = None
    atol: float | None = None
    input_sets: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _schema0(cls, data: Any) -> Any:
        if isinstance(data, dict) and "top1_agreement" in data:
            data = _renamed({k: v for k, v in data.items() if k not in ("cosine", "min_cosine")},
                            {"top1_agreement": "decision_agreement",
                             "top1_disagreements_counted": "disagreements_counted"})
            data.setdefault("decision", "top-1")
            data.setdefault("decisions_compared", 0)
        return data


class LatencyFigures(Record):
    p50: float
    p90: float
    p99: float


class VariantRecord(Record):
    """One file (or the PyTorch model) of an export directory: its scores, parity and latency."""

    path: str | None = None
    size_bytes: int | None = None
    scores: dict[str, float] = Field(default_factory=dict)
    metric_samples: int | None = None  # examples the scores are over, when not the report's dataset
    parity: ParityRecord | None = None  # fp32 against PyTorch
    agreement: Json | None = None  # a variant against another file (int8 against fp32): the task's figures
    latency_ms: dict[str, LatencyFigures] = Field(default_factory=dict)
    throughput: dict[str, float] = Field(default_factory=dict)
    iterations: dict[str, int] = Field(default_factory=dict)
    latency_measured_by: str | None = None
    providers_p50_ms: dict[str, float] | None = None
    exporter: str | None = None
    exporter_fallback_reason: str | None = None
    opset: int | None = None
    optimization: str | None = None
    unoptimized_path: str | None = None
    fusions: Json | None = None

    @model_validator(mode="before")
    @classmethod
    def _schema0(cls, data: Any) -> Any:
        if isinstance(data, dict) and "accuracy" in data:
            data = _accuracy_scores(_renamed(dict(data), {"accuracy_samples": "metric_samples"}))
            parity = data.get("parity") or {}
            if parity.get("reference") not in (None, "torch"):  # int8 against fp32: an agreement, not the gate
                data["agreement"] = {**_renamed(parity, {"top1_agreement": "decision_agreement"})}
                data["parity"] = None
        return data

    def figure(self, metric: str) -> float | None:
        return self.scores.get(metric)


def latency_fields(figures: Json) -> Json:
    """The latency protocol's figures (``latency.profile``) as a variant record's fields."""
    return {"latency_ms": {bs: LatencyFigures(**v) for bs, v in figures["latency_ms"].items()},
            "throughput": figures["throughput"], "iterations": figures["iterations"]}


class Attempt(Record):
    """One INT8 configuration the search measured."""

    schema0_names = {"accuracy": "metric_value", "accuracy_drop_points": "metric_drop_points"}

    name: str
    mode: str
    excluded_nodes: list[str]
    op_types: list[str] | None = None
    scheme: Json | None = None
    metric_value: float | None = None
    latency_ms: float | None = None
    speedup: float | None = None  # median of per-round ratios against FP32
    speedup_low: float | None = None
    speedup_high: float | None = None
    noise_floor: float = 0.0
    graph: str = "exported"
    first_pass: Json | None = None
    verdict: str = ""
    metric_drop_points: float | None = None
    passed: bool = False
    note: str = ""
    reference_p50_ms: float | None = None  # the FP32 file's p50 in the rounds this configuration was timed in
    retakes: int = 0  # measured again: its reference ran far from the search's median reference
    reference_drift: float | None = None  # set when still off after the retakes: its reference / the median - 1


class QuantizationRecord(Record):
    """The INT8 search: what was tried, what was chosen and measured again, and whether it shipped."""

    schema0_names = {"max_accuracy_drop": "max_metric_drop"}
    schema0_defaults = CLASSIFIER

    mode: str
    activation_type: str
    weight_type: str
    calibration: str | None = None
    calibration_samples: int
    per_channel: bool
    reduce_range: bool
    preflight: Json
    metric: str
    noise_floor: float
    noise_floor_before_search: float
    min_speedup: float
    max_metric_drop: float
    excluded_nodes: list[str] | None = None
    chosen: str | None = None
    graph: str | None = None
    search_speedup: Json | None = None
    tried: list[Attempt]
    search: str
    search_why: str
    seconds: float | None = None
    final_measured_by: str | None = None
    noise_floor_final: float | None = None
    noise_floor_judged: float | None = None
    final_speedup: Json | None = None
    search_final_agree: bool | None = None
    shipped: bool | None = None
    not_shipped_reason: str | None = None
    file: str | None = None


class SourceRecord(Record):
    """What later stages need of the run an export came from, so the directory works on its own."""

    schema0_names = {"val_accuracy": "val_metric"}
    schema0_defaults = CLASSIFIER

    task: str | None = None
    input_names: list[str] | None = None
    data: Json
    classes: list[str]
    preprocessing: Json
    model: str
    metric: str
    val_metric: float | None = None
    info: Json = Field(default_factory=dict)  # what the task's postprocess needs besides the classes


class DatasetRecord(Record):
    name: str
    split: str
    num_samples: int
    unit: str = "images"


class UsabilityDataset(DatasetRecord):
    corrupted: str = "to the image before normalization"  # where the corruptions are applied


class GatesRecord(Record):
    passed: bool
    failures: list[str] = Field(default_factory=list)


class ExportReport(Versioned):
    """``report.json`` of an export directory: every variant, the FP32 gate and the INT8 search."""

    source_run: str
    source: SourceRecord
    dataset: DatasetRecord
    metric: str
    machine: Json
    latency_session: Json = Field(default_factory=dict)
    variants: dict[str, VariantRecord]
    gates: GatesRecord
    quantization: QuantizationRecord | None = None


# --- prune_report.json -------------------------------------------------------------------------------

class ModelMeasure(Record):
    macs: int
    params: int
    scores: dict[str, float] = Field(default_factory=dict)
    onnx_bytes: int
    onnx_gzip_bytes: int
    fp32_latency_ms: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _schema0(cls, data: Any) -> Any:
        return _accuracy_scores(dict(data)) if isinstance(data, dict) else data


class PruneRecord(Versioned):
    source_run: str
    method: str
    importance: str | None = None
    metric: str
    before: ModelMeasure | None = None
    after: ModelMeasure | None = None
    ratio: float | None = None
    search: list[Json] = Field(default_factory=list)
    iterative_steps: int = 1
    speedup: Json | None = None
    latency_session: Json = Field(default_factory=dict)
    ratios: dict[str, float] = Field(default_factory=dict)
    metric_drop_points: float | None = None
    sparsity: float | None = None
    note: str | None = None

    @classmethod
    def from_schema0(cls, data: Json) -> Json:
        return _renamed({**CLASSIFIER, **data}, {"accuracy_drop_points": "metric_drop_points"})


# --- usability.json --------------------------------------------------------------------------------

class Robustness(Record):

    schema0_names = {"mean_corruption_accuracy": "mean_corruption_metric"}
    mean_corruption_metric: float
    by_corruption: dict[str, dict[str, float]]
    drop_vs_fp32_points: float | None = None
    clean_minus_corrupted_points: float | None = None


class LatencyGrid(Record):
    grid: list[Json]
    peak_memory_mb: float | None = None
    p99_ms_bs1: float | None = None


class UsabilityVariant(Record):
    kind: str
    path: str
    scores: dict[str, float] = Field(default_factory=dict)
    performance: Json = Field(default_factory=dict)  # the task's own figures (per class, per type)
    calibration: Json = Field(default_factory=dict)  # the task's; "ece" always
    size_bytes: int | None = None
    robustness: Robustness | None = None
    saliency: Json | None = None
    latency: LatencyGrid | None = None

    @model_validator(mode="before")
    @classmethod
    def _schema0(cls, data: Any) -> Any:
        if isinstance(data, dict) and "accuracy" in data:
            data = dict(data)
            data["performance"] = {k: data.pop(k) for k in ("accuracy", "per_class", "macro_f1", "confusion_matrix")
                                   if k in data}
            data["scores"] = {"accuracy": data["performance"]["accuracy"]}
        return data


class BudgetCheck(Record):
    limit: float
    value: float
    passed: bool


class UsabilityRecord(Versioned):
    """``usability.json``: is each variant still a usable model?"""

    source: str
    source_run: str
    torch_variant_missing: str | None = None
    dataset: UsabilityDataset
    metric: str
    metric_label: str
    machine: Json
    latency_session: Json
    settings: Json
    classes: list[str]
    variants: dict[str, UsabilityVariant]
    saliency_inputs: Json
    budgets: dict[str, BudgetCheck] = Field(default_factory=dict)
    passed: bool = True
    failures: list[str] = Field(default_factory=list)

    @classmethod
    def from_schema0(cls, data: Json) -> Json:
        return {**CLASSIFIER, "metric_label": "accuracy", **data}


# --- points.json, pareto.json (optimize) -------------------------------------------------------------

class Point(Record):
    """One file on one provider at one pruning level, timed beside the unpruned FP32 file."""

    schema0_names = {"accuracy": "metric_value", "accuracy_drop_points": "metric_drop_points"}

    level: float
    variant: str
    provider: str
    path: str
    metric_value: float
    metric_drop_points: float
    p50_ms: float
    p90_ms: float | None = None
    reference_p50_ms: float | None = None
    speedup: Json
    noise_floor: float
    first: Json | None = None  # the first measurement, when it was measured again (a retake, the final round)
    retakes: int = 0  # measured again because its reference ran far from the search's median reference
    reference_drift: float | None = None  # set when still off after the retakes: its reference / the median - 1


class PointsRecord(Versioned):
    points: list[Point] = Field(default_factory=list)
    seconds: float = 0.0


class HeldOutRecord(Record):

    schema0_names = {"accuracy": "metric_value", "unpruned_fp32_accuracy": "unpruned_fp32_metric",
                     "accuracy_drop_points": "metric_drop_points"}
    samples: int
    metric_value: float
    unpruned_fp32_metric: float
    metric_drop_points: float


class ParetoRecord(Versioned):
    run: str
    machine: Json
    settings: Json
    metric: str
    points: list[Point]
    front: list[Point]
    final_round: list[str] = Field(default_factory=list)
    median_reference_p50_ms: float | None = None  # of every point's reference measurement: what drift is judged against
    chosen: Point | None = None
    test: HeldOutRecord | None = None
    stopped: str | None = None
    providers_not_installed: list[str] = Field(default_factory=list)
    seconds: float = 0.0
    seconds_this_run: float = 0.0
