"""The exported ONNX file as a self-contained model: weights, its task, label names, preprocessing
and what the task's postprocessing needs, all in the file.

Torch-free: serving and the metadata round-trip need nothing but this file.

Example::

    model = OnnxModel("out/model.onnx")
    model.classes[:3], model.predict([Image.open("cat.png")])   # a classifier: probabilities
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from .errors import FtdeployError
from .files import atomic_path
from .tasks import feeds, get_task
from .tasks.base import padded_concat

PREFIX = "ftdeploy."
TWO_GB = 2**31 - 2**24  # protobuf's hard limit, less a margin for the graph itself


def write_metadata(model, metadata: dict[str, object]) -> None:
    """Store ``metadata`` (JSON-encoded values) in an ``onnx.ModelProto``'s metadata_props."""
    keep = [p for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = PREFIX + key, json.dumps(value)


def fuse_transformer(path: str | Path, options: dict[str, object]):
    """onnxruntime's transformer fusions (Attention, SkipLayerNormalization, EmbedLayerNormalization,
    Gelu/BiasGelu) on an exported graph: (the fused ``onnx.ModelProto``, {fused operator: count}).
    Raises whatever the optimizer raises on a graph it does not understand."""
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet_logs():
        fused = optimize_model(str(path), use_gpu=False, opt_level=1, **options)
    return fused.model, {op: n for op, n in fused.get_fused_operator_statistics().items() if n}


@contextlib.contextmanager
def _quiet_logs():
    """onnxruntime.transformers logs every fusion pass (from modules it imports by their bare names)."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def onnx_size(path: Path) -> int:
    data = external_data(path)
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def external_data(path: Path) -> Path:
    """Where ftdeploy keeps the weights of a file too large for one protobuf: ``<name>.data`` beside it."""
    return path.with_name(path.name + ".data")


def save_onnx(model, path: str | Path) -> None:
    """Save an ``onnx.ModelProto`` atomically: written in a temporary folder beside ``path``, then moved
    into place (the weights first). A model over 2 GB keeps its weights in ``<name>.data`` (onnx then
    turns ``model``'s tensors into references to that file: load it again to save it elsewhere); a
    stale one from an earlier, larger file is removed."""
    import onnx

    path = Path(path)
    large = sum(t.ByteSize() for t in model.graph.initializer) > TWO_GB
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        onnx.save_model(model, str(tmp / path.name), save_as_external_data=large, all_tensors_to_one_file=True,
                        location=external_data(path).name)
        if large:
            os.replace(tmp / external_data(path).name, external_data(path))
        os.replace(tmp / path.name, path)
        if not large:
            external_data(path).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_onnx(src: str | Path, dst: str | Path) -> None:
    """Copy an ONNX file (and its external weights) atomically. A file names its weights' file, so one
    with external weights copied under another name is saved again instead."""
    import onnx

    src, dst = Path(src), Path(dst)
    if external_data(src).is_file() and src.name != dst.name:
        save_onnx(onnx.load(str(src)), dst)
        return
    for a, b in ((external_data(src), external_data(dst)), (src, dst)):  # the weights first
        if a.is_file():
            with atomic_path(b) as tmp:
                shutil.copyfile(a, tmp)


def move_onnx(src: str | Path, dst: str | Path) -> None:
    """Rename an ONNX file (with its external weights, if any)."""
    src, dst = Path(src), Path(dst)
    if external_data(src).is_file():
        copy_onnx(src, dst)
        external_data(src).unlink()
        src.unlink()
        return
    os.replace(src, dst)
    external_data(dst).unlink(missing_ok=True)


def update_metadata(path: str | Path, values: dict[str, object]) -> None:
    """Add or change ftdeploy metadata keys of a file in place (atomically), keeping every other key."""
    import onnx

    model = onnx.load(str(path))
    write_metadata(model, {**model_metadata(model), **values})
    save_onnx(model, path)


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


def session_outputs(session, names: list[str], batch, one_by_one: bool = False) -> list[np.ndarray]:
    """Every output of ``session`` on ``batch`` (raw outputs, in the file's output order);
    ``one_by_one`` runs each example alone: a file quantized dynamically computes its activation
    scales from the whole batch (padding included), so its answer for one example would depend on
    the examples run beside it. Outputs whose shape follows the example's own (a logit per token) are
    padded with zeros to the largest."""
    if one_by_one and len(batch) > 1:
        runs = [session.run(None, feeds(batch[i:i + 1], names)) for i in range(len(batch))]
        return [padded_concat([r[k] for r in runs]) for k in range(len(runs[0]))]
    return session.run(None, feeds(batch, names))



ANSWERED_SAMPLES = 4  # sample inputs whose answers the file stores (a detector's raw outputs are large)
ANSWER_MARGIN = 2.0  # another CPU rounds float32 (and INT8 requantization) its own way: room for that


def encode_answers(outputs: list[np.ndarray], tolerance: float, reference: str) -> dict[str, object]:
    """The answers a file's first sample inputs should get (metadata ``sample_answers``): every raw
    output as float32, and the largest absolute difference allowed from them."""
    import base64

    return {"reference": reference, "tolerance": float(tolerance), "samples": int(len(outputs[0])),
            "outputs": [{"shape": list(o.shape), "float32": base64.b64encode(np.ascontiguousarray(o, np.float32).tobytes()).decode()}
                        for o in outputs]}


INT8_ANSWER_RTOL = 0.05  # of the largest answer: CPUs without VNNI requantize INT8 differently (saturation)


def store_own_answers(path: str | Path, reference: str) -> None:
    """Store a file's own answers to its sample inputs (an INT8 file is held to what it answered when
    it was chosen, not to FP32's), within INT8_ANSWER_RTOL of its largest answer, or the FP32
    tolerance it inherited when that is larger."""
    model = OnnxModel(path, 1)
    samples = model.samples()
    if samples is None:
        return
    answers = model.outputs(samples[:ANSWERED_SAMPLES])
    inherited = float((model.metadata.get("sample_answers") or {}).get("tolerance", 0.0))
    tolerance = max(inherited, INT8_ANSWER_RTOL * max(float(np.abs(a).max()) for a in answers))
    del model  # the session holds the file open
    update_metadata(path, {"sample_answers": encode_answers(answers, tolerance, reference)})


def decode_answers(stored: dict) -> list[np.ndarray]:
    import base64

    return [np.frombuffer(base64.b64decode(o["float32"]), np.float32).reshape(o["shape"]) for o in stored["outputs"]]


def batch_dependent(session) -> bool:
    return bool(read_metadata(session).get("batch_dependent"))


class OnnxModel:
    """An onnxruntime session plus what the file says about its task, inputs, labels and outputs."""

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None):
        self.session = open_session(path, threads, providers)
        self.path = Path(path)
        self.metadata = read_metadata(self.session)
        missing = [k for k in ("classes", "preprocessing") if k not in self.metadata]
        if missing:
            raise FtdeployError(f"{path} lacks ftdeploy metadata ({', '.join(missing)})",
                                "export it with ftdeploy export, which stores label names and preprocessing in the file")
        self.task = get_task(self.metadata.get("task"))
        self.classes: list[str] = list(self.metadata["classes"])
        self.preprocessing = self.task.preprocessor_from_dict(self.metadata["preprocessing"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.batch_dependent = bool(self.metadata.get("batch_dependent"))

    @property
    def info(self) -> dict[str, object]:
        """What the task's postprocess reads of the file: its labels, temperature, decoding parameters."""
        return self.metadata

    def preprocess(self, raw: list):
        """Raw inputs (PIL images, or strings for a text model) -> a batch, exactly as in training."""
        return self.task.preprocess(raw, self.preprocessing)

    def outputs(self, batch) -> list[np.ndarray]:
        return session_outputs(self.session, self.input_names, batch, self.batch_dependent)

    def samples(self):
        """The sample inputs the file carries (validation inputs stored at export), preprocessed."""
        encoded = self.metadata.get("samples")
        if not encoded:
            return None
        return self.task.decode_samples(encoded, self.preprocessing)

    def check_answers(self) -> dict[str, object]:
        """The file checks itself: its outputs on its own sample inputs against the answers stored
        beside them (an FP32 file: PyTorch FP32's at export; an INT8 file: its own at quantize), within
        the tolerance stored with them. A file with damaged weights loads and answers, and fails
        here. Raises FtdeployError on a mismatch; a file written before answers were stored passes
        with ``checked: False``."""
        stored = self.metadata.get("sample_answers")
        samples = self.samples()
        if not stored or samples is None:
            return {"checked": False, "reason": "the file stores no answers to its sample inputs (exported before they were)"}
        expected = decode_answers(stored)
        got = self.outputs(samples[:stored["samples"]])
        if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
            raise FtdeployError(f"{self.path} answers its sample inputs with outputs of shapes "
                                f"{[list(g.shape) for g in got]}, not the stored {[list(e.shape) for e in expected]}",
                                "export the model again; this file is not the one its answers were stored for")
        diff = max(float(np.abs(g.astype(np.float64) - e).max()) for g, e in zip(got, expected))
        result = {"checked": True, "samples": stored["samples"], "reference": stored["reference"],
                  "max_abs_diff": diff, "tolerance": stored["tolerance"]}
        if not diff <= stored["tolerance"]:  # NaN fails too
            raise FtdeployError(f"{self.path} fails its own check: its outputs on its {stored['samples']} sample inputs are "
                                f"{diff:.3g} from the stored answers ({stored['reference']}), more than the tolerance "
                                f"{stored['tolerance']:.3g}: its weights or graph differ from what was validated",
                                "export (or quantize) it again from its run; do not serve this file")
        return result

    def predict(self, raw: list):
        """The task's predictions for raw inputs, preprocessed exactly as in training (a classifier:
        probabilities)."""
        batch = self.preprocess(raw)
        return self.task.postprocess(self.outputs(batch), batch, self.info)
