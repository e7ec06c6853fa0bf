"""PyTorch -> ONNX: export with the task's input and output names and dynamic axes, check, optimize
offline, store metadata.

Shared by the export stage (the shipped file) and pruning (temporary files it times): the
conversion is one code path, whoever asks for it.

>>> import onnx
>>> with temporary_onnx(torch.nn.Conv2d(3, 4, 3), [torch.zeros(2, 3, 8, 8)]) as path:
...     [i.name for i in onnx.load(str(path)).graph.input]
['input']
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from . import __version__
from .errors import ExportError
from .files import relative
from .onnx_model import TWO_GB, save_onnx, write_metadata
from .rundir import Run

OUTPUTS = ("output",)  # a model exported without a task's output names: one output


def export_onnx(model: torch.nn.Module, args: list[torch.Tensor], path: Path, opset: int = 18,
                exporter: str = "auto", input_names: list[str] | None = None,
                dynamic_axes: dict[str, dict[int, str]] | None = None,
                auto_order: tuple[str, ...] = ("dynamo", "torchscript"), output_names: tuple[str, ...] = OUTPUTS,
                output_axes: dict[str, dict[int, str]] | None = None) -> tuple[str, str | None]:
    """Export ``model`` called on ``args`` (its positional inputs, named ``input_names``) with
    ``dynamic_axes`` (default: the batch axis of one input) and its outputs named ``output_names``
    (``output_axes``: their dynamic axes, default the batch axis); ``exporter`` ``auto`` tries
    ``auto_order`` (the task's) until one succeeds. Returns (exporter used, why the first choice was
    not used)."""
    model = model.eval()
    names = list(input_names or ["input"])
    axes = dynamic_axes or {names[0]: {0: "batch"}}
    outputs = list(output_names)
    out_axes = output_axes or {n: {0: "batch"} for n in outputs}
    dims: dict[str, torch.export.Dim] = {}

    def dim(label: str) -> torch.export.Dim:  # one Dim per axis name: inputs that share an axis share it
        return dims.setdefault(label, torch.export.Dim(label, min=1, max=65536))

    shapes = tuple({axis: dim(label) for axis, label in axes.get(n, {}).items()} for n in names)
    runs = {"dynamo": lambda: torch.onnx.export(
                model, tuple(args), str(path), dynamo=True, opset_version=opset, input_names=names,
                output_names=outputs, dynamic_shapes=shapes, external_data=_too_big(model)),
            "torchscript": lambda: torch.onnx.export(
                model, tuple(args), str(path), dynamo=False, opset_version=opset, input_names=names,
                output_names=outputs, dynamic_axes={**axes, **out_axes})}
    errors: list[BaseException] = []
    for kind in auto_order if exporter == "auto" else (exporter,):
        try:
            _quiet(runs[kind])
            return kind, _first_line(errors[0]) if errors else None
        except Exception as e:  # the exporters raise many types; the next one (or the error) decides
            errors.append(e)
    raise _export_error(model, *errors) from None


def _quiet(fn) -> None:
    """The exporters print progress and deprecation chatter; keep it out of the user's terminal."""
    import warnings

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn()


def _too_big(model: torch.nn.Module) -> bool:
    return sum(p.numel() * p.element_size() for p in model.state_dict().values()) > TWO_GB


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


_OP_PATTERNS = (r"No ONNX function found for <OpOverload\(op='([\w.:]+)'", r"target=torch\.ops\.([\w.]+?)\.default",
                r"unrecognized namespace ([\w:]+)", r"Exporting the operator '?([\w:]+)'? to ONNX")


def _export_error(model: torch.nn.Module, *errors: BaseException | None) -> ExportError:
    text = "\n".join(str(e) for e in errors if e is not None)
    ops = sorted({m for pattern in _OP_PATTERNS for m in re.findall(pattern, text)})
    name = type(model).__name__
    if ops:
        return ExportError(f"cannot export {name} to ONNX: no ONNX translation for operator(s) {', '.join(ops)}",
                           "replace the op with supported ones, or register an ONNX translation for it")
    return ExportError(f"cannot export {name} to ONNX: " + "; ".join(_first_line(e) for e in errors if e is not None))


def outputs_of(task, info: dict[str, Any]) -> tuple[tuple[str, ...], dict[str, dict[int, str]]]:
    """(output names, their dynamic axes) of a task's model with the architecture ``info`` records."""
    axes = task.outputs_for(info)
    return tuple(axes), axes


def finalize(raw: Path, out: Path, metadata: dict[str, Any], optimization: str = "extended") -> None:
    """Check the raw export, apply onnxruntime's graph optimizations offline, store the metadata."""
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(raw), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(raw))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"the exported graph is not valid ONNX: {_first_line(e)}") from None
    large = sum(f.stat().st_size for f in raw.parent.iterdir()) > TWO_GB
    optimized = raw.with_name("optimized.onnx")
    if optimization == "none":
        shutil.copy(raw, optimized)
    else:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                         "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[optimization]
        opts.optimized_model_filepath = str(optimized)
        if large:
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        ort.InferenceSession(str(raw), opts, providers=["CPUExecutionProvider"])
    model = onnx.load(str(optimized))
    write_metadata(model, metadata)
    save_onnx(model, out)


def onnx_metadata(run: Run, variant: str, out: Path) -> dict[str, Any]:
    """What the file says about itself (what its task's postprocess reads included); ``source_run`` is
    relative to ``out``, the file's directory."""
    return {**run.info, "task": run.config.task, "preprocessing": run.preprocessing.to_dict(), "variant": variant,
            "source_run": relative(run.path, out), "model": run.architecture["name"], "version": __version__,
            "metric": run.metrics.metric, "val_metric": run.metrics.val_metric}


@contextlib.contextmanager
def temporary_onnx(model: torch.nn.Module, args: list[torch.Tensor], input_names: list[str] | None = None,
                   dynamic_axes: dict[str, dict[int, str]] | None = None, output_names: tuple[str, ...] = OUTPUTS,
                   output_axes: dict[str, dict[int, str]] | None = None) -> Iterator[Path]:
    """The model as a temporary, optimized ONNX file (TorchScript exporter: fast, and only measured)."""
    with tempfile.TemporaryDirectory() as tmp:
        raw, shipped = Path(tmp) / "raw.onnx", Path(tmp) / "model.onnx"
        export_onnx(model.eval(), args, raw, exporter="torchscript", input_names=input_names, dynamic_axes=dynamic_axes,
                    output_names=output_names, output_axes=output_axes)
        finalize(raw, shipped, {})
        yield shipped
