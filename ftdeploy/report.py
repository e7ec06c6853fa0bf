"""report.json (the machine-readable record), report.md (a table a person reads) and latency.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .latency import format_table
from .rundir import write_json


def variant_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, v in report["variants"].items():
        row = {"variant": name, "accuracy": 100 * v["accuracy"],
               "size_mb": v["size_bytes"] / 1e6 if "size_bytes" in v else None}
        p = v.get("parity") or {}
        row.update(reference=p.get("reference", "-"), max_abs_diff=p.get("max_abs_diff"), agreement=
                   100 * p["top1_agreement"] if "top1_agreement" in p else None)
        for bs, lat in v["latency_ms"].items():
            row[f"p50_{bs}"], row[f"p99_{bs}"] = lat["p50"], lat["p99"]
            row[f"tput_{bs}"] = v["throughput"][bs]
        rows.append(row)
    return rows


def markdown(report: dict[str, Any]) -> str:
    batch_sizes = list(next(iter(report["variants"].values()))["latency_ms"])
    columns = [("variant", "variant", ""), ("accuracy", "accuracy %", ".2f"), ("size_mb", "size MB", ".2f"),
               ("reference", "parity vs", ""), ("max_abs_diff", "max abs diff", ".2e"), ("agreement", "top-1 agree %", ".2f")]
    for bs in batch_sizes:
        columns += [(f"p50_{bs}", f"p50 ms @{bs}", ".2f"), (f"p99_{bs}", f"p99 ms @{bs}", ".2f"),
                    (f"tput_{bs}", f"items/s @{bs}", ".0f")]
    m, d, g = report["machine"], report["dataset"], report["gates"]
    lines = [
        f"# ftdeploy report: {report['source_run']}", "",
        f"**Gates: {'PASSED' if g['passed'] else 'FAILED'}**", "",
        *[f"- {f}" for f in g["failures"]], *([""] if g["failures"] else []),
        f"Data: {d['name']} ({d['split']}, {d['num_samples']} images). "
        f"Machine: {m['cpu']}, {m['threads']} thread(s), ISA {', '.join(m['isa']) or 'baseline'}; "
        f"onnxruntime {m['onnxruntime']}, torch {m['torch']}.", "",
        format_table(variant_rows(report), columns), "",
    ]
    for name, v in report["variants"].items():
        if v.get("exporter"):
            why = f" (dynamo failed: {v['exporter_fallback_reason']})" if v.get("exporter_fallback_reason") else ""
            optimized = f", onnxruntime optimization '{v['optimization']}'" if v.get("optimization") else ""
            lines.append(f"- {name}: exported with the {v['exporter']} exporter{why}, opset {v.get('opset')}{optimized}.")
    q = report.get("quantization")
    if q:
        lines += ["", "## INT8", "",
                  f"Preflight: {q['preflight']['reason']}.", "",
                  f"Mode {q['mode']}, activations {q['activation_type']}, weights {q['weight_type']}, "
                  f"calibration {q['calibration']} on {q['calibration_samples']} training images, "
                  f"per-channel {q['per_channel']}, reduce_range {q['reduce_range']}. Chosen: {q['chosen'] or 'none'}; "
                  f"kept in FP32: {', '.join(q['excluded_nodes']) if q['excluded_nodes'] else 'nothing'}.", "",
                  format_table(q["tried"], [("name", "configuration tried", ""), ("accuracy_drop_points", "accuracy drop (pts)", "+.2f"),
                                            ("latency_ms", "p50 ms @1", ".2f"), ("speedup", "vs fp32", ".2f"),
                                            ("passed", "passed", "")])]
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is not installed
    (plots are extras: a serving or minimal install skips them)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_latency(report: dict[str, Any], path: Path) -> None:
    """p50 latency per variant and batch size, with p99 as the error bar."""
    plt = pyplot()
    if plt is None:
        return
    variants = report["variants"]
    batch_sizes = list(next(iter(variants.values()))["latency_ms"])
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(4 * len(batch_sizes), 3.2), squeeze=False)
    for ax, bs in zip(axes[0], batch_sizes):
        names = list(variants)
        p50 = [variants[n]["latency_ms"][bs]["p50"] for n in names]
        p99 = [variants[n]["latency_ms"][bs]["p99"] for n in names]
        ax.bar(names, p50, yerr=[[0] * len(names), [b - a for a, b in zip(p50, p99)]], capsize=4,
               color=["tab:gray", "tab:blue", "tab:green", "tab:orange", "tab:purple"][: len(names)])
        ax.set(title=f"batch {bs}: p50 latency (bar to p99)", ylabel="ms")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> None:
    write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown(report))
    plot_latency(report, out / "latency.png")
