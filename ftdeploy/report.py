"""Rendering only: report.json (the machine-readable record), report.md (a table a person reads) and
latency.png for the export directory, and the usability report's self-contained HTML page, from the
typed records the stages fill in (:mod:`ftdeploy.records`). The task's own sections of the HTML page
(a classifier's confusion matrix, a text model's shaded tokens) come from its usability suite.
Nothing here measures anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .figures import escape, fmt, inline_png, pyplot, table
from .files import atomic_path, write_text
from .latency import format_table
from .records import ExportReport, UsabilityRecord, write_record


def variant_rows(report: ExportReport) -> list[dict[str, Any]]:
    rows = []
    for name, v in report.variants.items():
        row = {"variant": name, "metric": 100 * v.scores[report.metric] if report.metric in v.scores else None,
               "size_mb": v.size_bytes / 1e6 if v.size_bytes else None}
        if v.parity is not None:
            row.update(reference="torch", max_abs_diff=v.parity.max_abs_diff, agreement=100 * v.parity.decision_agreement)
        elif v.agreement is not None:
            row.update(reference=v.agreement.get("reference", "-"), max_abs_diff=v.agreement.get("max_abs_diff"),
                       agreement=100 * v.agreement["decision_agreement"])
        else:
            row["reference"] = "-"
        for bs, lat in v.latency_ms.items():
            row[f"p50_{bs}"], row[f"p99_{bs}"] = lat.p50, lat.p99
            row[f"tput_{bs}"] = v.throughput[bs]
        rows.append(row)
    return rows


def markdown(report: ExportReport, run: str) -> str:
    """``run``: the name of the run directory the file came from (its stored path is relative to the
    export directory, often ``..``, which names nothing)."""
    fp32 = report.variants["fp32"]
    decision = fp32.parity.decision if fp32.parity else "decision"
    columns = [("variant", "variant", ""), ("metric", f"{report.metric} %", ".2f"), ("size_mb", "size MB", ".2f"),
               ("reference", "parity vs", ""), ("max_abs_diff", "max abs diff", ".2e"),
               ("agreement", f"{decision} agree %", ".2f")]
    for bs in fp32.latency_ms:
        columns += [(f"p50_{bs}", f"p50 ms @{bs}", ".2f"), (f"p99_{bs}", f"p99 ms @{bs}", ".2f"),
                    (f"tput_{bs}", f"items/s @{bs}", ".0f")]
    m, d, g = report.machine, report.dataset, report.gates
    session = report.latency_session
    measured = {v.latency_measured_by for v in report.variants.values()} - {None}
    lines = [
        f"# ftdeploy report: {report.source.model} from run `{run}`", "",
        f"**Gates: {'PASSED' if g.passed else 'FAILED'}**", "",
        *[f"- {f}" for f in g.failures], *([""] if g.failures else []),
        f"Data: {d.name} ({d.split}, {d.num_samples} {d.unit}). "
        f"Machine: {m['cpu']}, {m['threads']} thread(s), ISA {', '.join(m['isa']) or 'baseline'}; "
        f"onnxruntime {m['onnxruntime']}, torch {m['torch']}. Sessions: {session.get('intra_op_threads')} intra-op "
        f"thread(s), spinning {'on' if session.get('allow_spinning') else 'off'}; variants timed side by side in "
        f"alternating blocks.", "",
        format_table(variant_rows(report), columns), "",
    ]
    rescored = {n: v.metric_samples for n, v in report.variants.items()
                if v.metric_samples is not None and v.metric_samples != d.num_samples}
    if rescored:
        lines += [f"{report.metric.capitalize()} of {', '.join(rescored)} on {max(rescored.values())} validation "
                  f"{d.unit} (quantize's); the others on the {d.num_samples} above.", ""]
    if len(measured) > 1:
        lines += [f"Latency was measured by stages {', '.join(sorted(measured))}: compare rows of the same stage.", ""]
    parity = fp32.parity
    if parity is not None:
        lines += [f"FP32 parity against a {parity.error_reference} run of the PyTorch model: PyTorch float32 is off by "
                  f"{parity.torch_fp32_error:.2e}, the file by {parity.onnx_error:.2e} (allowed: "
                  f"{parity.parity_error_ratio:g}x PyTorch's + {parity.atol:g} = {parity.allowed_error:.2e}); "
                  f"{parity.decision} agreement with PyTorch {100 * parity.decision_agreement:.2f} %, {parity.near_ties} "
                  f"near-tie(s) inside both errors excused.", ""]
    for name, v in report.variants.items():
        if v.exporter:
            why = f" (the first choice failed: {v.exporter_fallback_reason})" if v.exporter_fallback_reason else ""
            optimized = f", onnxruntime optimization '{v.optimization}'" if v.optimization else ""
            lines.append(f"- {name}: exported with the {v.exporter} exporter{why}, opset {v.opset}{optimized}.")
    if report.quantization is not None:
        lines += int8_section(report.quantization.model_dump(mode="json"))
    return "\n".join(lines) + "\n"


FUSED = ", on the graph fused by onnxruntime's transformer optimizer"


def int8_section(q: dict[str, Any]) -> list[str]:
    shipped = (f"**Shipped** `{q['chosen']}`: {q['search_speedup']['median']:.2f}x in the search, "
               f"{q['final_speedup']['median']:.2f}x [{q['final_speedup']['low']:.2f}-{q['final_speedup']['high']:.2f}] "
               f"in the final measurement at batch {q['final_speedup']['batch_size']} "
               f"({'they agree within' if q['search_final_agree'] else 'they differ by more than'} the noise floor)."
               if q.get("shipped") else f"**INT8 not shipped**: {q.get('not_shipped_reason')}. FP32 ships alone.")
    path = f"Search: {q['search']} ({q['search_why']})." if q.get("search") else ""
    return ["", "## INT8", "", f"Preflight: {q['preflight']['reason']}.", "", path, "",
            f"Mode {q['mode']}, activations {q['activation_type']}, weights {q['weight_type']}, "
            + (f"calibration {q['calibration']} on {q['calibration_samples']} training samples, " if q["calibration"]
               else "no calibration (activation ranges measured at run time), ")
            + f"per-channel {q['per_channel']}, reduce_range {q['reduce_range']}{FUSED if q.get('graph') == 'fused' else ''}. "
            f"Kept in FP32: "
            f"{', '.join(q['excluded_nodes']) if q['excluded_nodes'] else 'nothing'}.", "",
            f"Noise floor (FP32 against itself, same protocol, before the search, beside every configuration "
            f"and beside the final measurement; the largest): ±{q['noise_floor']:.3f}. A configuration passes "
            f"when it loses at most {q['max_metric_drop']} points of {q['metric']} and the low end of its speedup "
            f"clears {q['min_speedup']}x outside the noise floor. The configurations within the budget "
            "that were faster in their first measurement are timed again, together and twice as long (the final "
            "round); they are judged on that, and their first figure is kept beside it. A configuration whose FP32 "
            "ran more than 20 % from the median FP32 of the search is measured again (up to twice) and marked ⚠ "
            "when still off."
            + (f" The final measurement is judged on the noise of the chosen file's own two measurements: "
               f"±{q['noise_floor_judged']:.3f}." if q.get("noise_floor_judged") is not None else ""), "", shipped, "",
            format_table([{**t, "first": (t.get("first_pass") or {}).get("median"),
                           "fp32_ms": f"{t['reference_p50_ms']:.2f}" + (" ⚠" if t.get("reference_drift") is not None else "")
                           + (f" ({t['retakes']} retakes)" if t.get("retakes") else "") if t.get("reference_p50_ms") else ""}
                          for t in q["tried"]],
                         [("name", "configuration tried", ""), ("graph", "graph", ""),
                          ("metric_drop_points", f"{q['metric']} drop (pts)", "+.2f"),
                          ("latency_ms", "p50 ms @1", ".2f"), ("fp32_ms", "fp32 p50 ms beside it", ""),
                          ("first", "first pass", ".2f"), ("speedup", "vs fp32", ".2f"),
                          ("speedup_low", "low", ".2f"), ("speedup_high", "high", ".2f"),
                          ("verdict", "verdict", ""), ("passed", "passed", "")])]


def plot_latency(report: ExportReport, path: Path) -> None:
    """p50 latency per variant and batch size, with p99 as the error bar."""
    plt = pyplot()
    if plt is None:
        return
    variants = {n: v for n, v in report.variants.items() if v.latency_ms}
    batch_sizes = list(report.variants["fp32"].latency_ms)
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(4 * len(batch_sizes), 3.2), squeeze=False)
    for ax, bs in zip(axes[0], batch_sizes):
        names = [n for n in variants if bs in variants[n].latency_ms]
        p50 = [variants[n].latency_ms[bs].p50 for n in names]
        p99 = [variants[n].latency_ms[bs].p99 for n in names]
        ax.bar(names, p50, yerr=[[0] * len(names), [b - a for a, b in zip(p50, p99)]], capsize=4,
               color=["tab:gray", "tab:blue", "tab:green", "tab:orange", "tab:purple"][: len(names)])
        ax.set(title=f"batch {bs}: p50 latency (bar to p99)", ylabel="ms")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def write_report(report: ExportReport, out: Path) -> None:
    write_record(out / "report.json", report)
    write_text(out / "report.md", markdown(report, (out / report.source_run).resolve().name))
    plot_latency(report, out / "latency.png")


# --- the usability report: one self-contained HTML page ------------------------------------------

CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1d2330;margin:0;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:16px}
h1{font-size:1.5em;margin:.2em 0} h2{font-size:1.2em;margin:1.6em 0 .4em;border-bottom:1px solid #d8dce3}
.meta{color:#5a6272;font-size:.9em} .badge{display:inline-block;padding:2px 10px;border-radius:12px;color:#fff;font-weight:600}
.pass{background:#2e7d32} .fail{background:#c62828}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;margin:.5em 0}
table{border-collapse:collapse;font-size:.88em;background:#fff;white-space:nowrap}
th,td{border:1px solid #d8dce3;padding:4px 8px;text-align:right} th:first-child,td:first-child{text-align:left}
th{background:#eef1f5} td.bad{color:#c62828;font-weight:600} td.good{color:#2e7d32}
img{max-width:100%;height:auto;background:#fff;border:1px solid #e3e6eb;display:block;margin:.5em 0}
ul{padding-left:1.2em} p{max-width:75ch}
.sentence{background:#fff;border:1px solid #e3e6eb;padding:6px 10px;margin:.6em 0}
.toks{margin:.2em 0;line-height:1.9;overflow-wrap:anywhere} .toks b{display:inline-block;min-width:7em;font-size:.85em}
.tok{padding:1px 2px;border-radius:3px}
@media (max-width:600px){body{font-size:14px} main{padding:8px} h1{font-size:1.25em}}
"""


def usability_html(record: UsabilityRecord, task_sections: list[str], run: str) -> str:
    """The usability report as one HTML page: inline images, no network, readable on a phone. The
    generic sections (summary, budgets, robustness, scalability) are drawn here; ``task_sections``
    are the task's own (its performance, calibration and saliency figures); ``run`` names the run
    directory the variants came from."""
    data = record.model_dump(mode="json")
    v, m, metric = data["variants"], data["machine"], data["metric"]
    label = data.get("metric_label") or metric
    status = ('<span class="badge pass">budgets passed</span>' if data["passed"]
              else '<span class="badge fail">budgets failed</span>')
    source = "the files of this export directory" if data["source"] in (".", "") else data["source"]
    parts = [f"<h1>Usability report</h1><p class='meta'>{escape(source)} (run "
             f"{escape(run)}); {data['dataset']['num_samples']} validation "
             f"{data['dataset']['unit']} of {escape(data['dataset']['name'])}; "
             f"{escape(m['cpu'])}, {m['threads']} thread(s), onnxruntime {m['onnxruntime']}.</p><p>{status}</p>"]
    if data.get("torch_variant_missing"):
        parts.append(f"<p class='meta'>The PyTorch variant is left out: {escape(data['torch_variant_missing'])}.</p>")
    parts.append("<h2>Summary</h2>" + table(
        ["variant", f"{label} %", f"mean corruption {label} %", "robustness drop vs fp32 (pts)", "ECE",
         "saliency agreement", "p50 ms @1", "p99 ms @1", "peak MB", "size MB"],
        [[n, fmt(x["scores"].get(metric), ".2f", 100), fmt(x["robustness"]["mean_corruption_metric"], ".2f", 100),
          fmt(x["robustness"]["drop_vs_fp32_points"], "+.2f"), fmt(x["calibration"].get("ece"), ".3f"),
          fmt(x["saliency"]["agreement_with_fp32"], ".3f"), fmt(_bs1(x, "p50_ms")), fmt(x["latency"]["p99_ms_bs1"]),
          fmt(x["latency"]["peak_memory_mb"], ".0f"), fmt(x["size_bytes"], ".2f", 1e-6)] for n, x in v.items()]))
    if data["budgets"]:
        rows = [[k, fmt(b["limit"], ".4g"), fmt(b["value"], ".4g"),
                 f'<td class="{"good" if b["passed"] else "bad"}">{"passed" if b["passed"] else "FAILED"}</td>']
                for k, b in data["budgets"].items()]
        parts.append("<h2>Budgets</h2>" + table(["budget:variant", "limit", "value", ""], rows))
    sections = list(task_sections)
    parts.append(sections.pop(0) if sections else "")  # the task's performance first, beside the summary
    parts.append(_robustness_section(data))
    parts += sections
    parts.append(_scalability_section(data))
    body = "\n".join(parts)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>ftdeploy usability report</title>'
            f"<style>{CSS}</style></head><body><main>{body}</main></body></html>\n")


def _bs1(x: dict[str, Any], key: str) -> float | None:
    rows = [r for r in x["latency"]["grid"] if r["batch_size"] == 1]
    return max(rows, key=lambda r: r["threads"])[key] if rows else None


def _robustness_section(data: dict[str, Any]) -> str:
    v, metric = data["variants"], data["metric"]
    label = data.get("metric_label") or metric
    corruptions = list(next(iter(v.values()))["robustness"]["by_corruption"])
    rows = [[n] + [fmt(np.mean(list(x["robustness"]["by_corruption"][c].values())), ".1f", 100) for c in corruptions]
            + [fmt(x["robustness"]["drop_vs_fp32_points"], "+.2f"), fmt(x["robustness"]["clean_minus_corrupted_points"], ".1f")]
            for n, x in v.items()]
    out = [f"<h2>Robustness</h2><p>{label[0].upper() + label[1:]} (%) under each corruption, averaged over severities; "
           f"corruptions are applied {data['dataset']['corrupted']}, with the same seeds for every variant. "
           f"<em>drop vs fp32</em>: points of mean corruption {label} lost against FP32; <em>clean − corrupted</em>: "
           "how much the variant loses under corruption compared with its own clean figure.</p>",
           table(["variant"] + corruptions + ["drop vs fp32 (pts)", "clean − corrupted (pts)"], rows)]
    plt = pyplot()
    if plt is not None:
        cols = min(4, len(corruptions))
        rows_n = -(-len(corruptions) // cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.6 * rows_n), squeeze=False)
        for ax, c in zip(axes.ravel(), corruptions):
            for n, x in v.items():
                sev = x["robustness"]["by_corruption"][c]
                ax.plot([int(s) for s in sev], [100 * a for a in sev.values()], marker="o", label=n)
            ax.set(title=c, xlabel="severity", ylabel=f"{label} %", ylim=(0, 102))
            ax.grid(alpha=0.3)
        for ax in axes.ravel()[len(corruptions):]:
            ax.axis("off")
        axes[0][0].legend(fontsize=7)
        out.append(inline_png(fig))
    return "\n".join(out)


def _scalability_section(data: dict[str, Any]) -> str:
    v = data["variants"]
    extra = [k for k in next(iter(v.values()))["latency"]["grid"][0] if k not in
             ("threads", "batch_size", "p50_ms", "p99_ms", "throughput")]  # the task's own axis (text: length)
    axis = extra[0] if extra else "threads"
    axis_label = axis.replace("_", " ")
    rows = [[n, r[axis], r["batch_size"], fmt(r["p50_ms"]), fmt(r["p99_ms"]), fmt(r["throughput"], ".0f")]
            for n, x in v.items() for r in x["latency"]["grid"]]
    s = data["latency_session"]
    out = [f"<h2>Scalability</h2><p>Variants timed side by side in alternating blocks at each batch size and "
           f"{axis_label} (sessions as <code>ftdeploy serve</code> builds them, spinning "
           f"{'on' if s['allow_spinning'] else 'off'}). Peak memory: what a fresh process gains by loading the "
           f"model and running the largest batch.</p>",
           table(["variant", axis_label, "batch", "p50 ms", "p99 ms", "items/s"], rows),
           table(["variant", "peak memory MB", "file MB"],
                 [[n, fmt(x["latency"]["peak_memory_mb"], ".0f"), fmt(x["size_bytes"], ".2f", 1e-6)] for n, x in v.items()])]
    plt = pyplot()
    if plt is not None:
        groups = sorted({r[axis] for x in v.values() for r in x["latency"]["grid"]})
        unit = data["dataset"]["unit"]
        fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3), squeeze=False)
        for ax, g in zip(axes[0], groups):
            for n, x in v.items():
                grid = [r for r in x["latency"]["grid"] if r[axis] == g]
                ax.plot([r["batch_size"] for r in grid], [r["throughput"] for r in grid], marker="o", label=n)
            ax.set(title=f"{axis_label} {g}", xlabel="batch size", ylabel=f"{unit}/s", xscale="log")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        out.append(inline_png(fig))
    return "\n".join(out)
