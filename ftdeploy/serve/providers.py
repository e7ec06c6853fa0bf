"""Which onnxruntime execution provider serves a file, and the check that it answers as the CPU
provider does on the file's own sample inputs."""

from __future__ import annotations

from pathlib import Path

from ..errors import FtdeployError
from ..latency import PROVIDERS, installed_providers
from ..onnx_model import OnnxModel
from ..records import ExportReport, load_record

AGREEMENT_MAX_PROB_DIFF = 0.05  # served scores (probabilities); the task's decisions must agree on every sample


def choose_provider(model_path: str | Path, provider: str) -> tuple[str, str]:
    """(provider name, why) for ``--provider``: ``cpu``; ``openvino`` (onnxruntime-openvino must be
    installed); ``auto``: the fastest for this file in the measurements of its export directory
    (``report.json``, written by export and quantize where more than one provider is installed),
    else ``cpu``."""
    installed = installed_providers()
    if provider not in ("auto", *PROVIDERS):
        raise FtdeployError(f"--provider {provider!r} is not known", f"use auto, {', '.join(PROVIDERS)}")
    if provider != "auto":
        if provider not in installed:
            raise FtdeployError(f"--provider {provider}: its onnxruntime execution provider is not installed "
                                f"(installed: {', '.join(installed)})", OPENVINO_HINT)
        return provider, "asked for"
    if installed == ["cpu"]:
        return "cpu", "onnxruntime-openvino is not installed, so the CPU provider is the only one"
    path = Path(model_path)
    report = path.parent / "report.json"
    variants = load_record(ExportReport, report).variants if report.is_file() else {}
    measured = next((v.providers_p50_ms for v in variants.values()
                     if Path(str(v.path or "")).name == path.name and v.providers_p50_ms), None)
    measured = {k: v for k, v in (measured or {}).items() if k in installed}
    if not measured:
        return "cpu", f"no provider measurements for {path.name} in {report}"
    fastest = min(measured, key=measured.get)
    return fastest, "fastest in " + ", ".join(f"{k} {v:.2f} ms" for k, v in measured.items()) + f" (batch-1 p50, {report})"


OPENVINO_HINT = ("pip uninstall -y onnxruntime && pip install onnxruntime-openvino (it replaces onnxruntime), or "
                 "docker build --build-arg PROVIDER=openvino; or serve with --provider cpu")


def check_agreement(model: OnnxModel, reference: OnnxModel) -> dict:
    """The file's own sample inputs through ``model``'s provider and through ``reference`` (the same
    file on the CPU provider), compared by the task: its decisions (a classifier's top-1) must agree
    on every sample and its served scores within AGREEMENT_MAX_PROB_DIFF, or FtdeployError."""
    samples = model.samples()
    provider = model.session.get_providers()[0]
    if samples is None:
        raise FtdeployError(f"{model.path} carries no sample inputs to check {provider} against the CPU provider",
                            "export it again with this version of ftdeploy, or serve with --provider cpu")
    result = {"samples": len(samples),
              **model.task.agreement(reference.outputs(samples), model.outputs(samples), samples, model.info)}
    if result["decision_agreement"] < 1 or result["max_score_diff"] > AGREEMENT_MAX_PROB_DIFF:
        raise FtdeployError(f"{provider} disagrees with the CPU provider on the file's {len(samples)} sample inputs: "
                            f"{model.task.decision} agreement {result['decision_agreement']:.0%}, max score difference "
                            f"{result['max_score_diff']:.3f} (allowed {AGREEMENT_MAX_PROB_DIFF})", "serve with --provider cpu")
    return result

