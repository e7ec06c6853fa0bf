"""Rendering only: report.json (the machine-readable record), report.md (a table a person reads) and
latency.png for the export directory, and the usability report's self-contained HTML page, from the
dicts the stages fill in. Nothing here measures anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .files import atomic_path, write_json, write_text
from .latency import format_table


def variant_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, v in report["variants"].items():
        row = {"variant": name, "accuracy": 100 * v["accuracy"],
               "size_mb": v["size_bytes"] / 1e6 if "size_bytes" in v else None}
        p = v.get("parity") or {}
        row.update(reference=p.get("reference", "-"), max_abs_diff=p.get("max_abs_diff"), agreement=
                   100 * p["top1_agreement"] if "top1_agreement" in p else None)
        for bs, lat in v.get("latency_ms", {}).items():
            row[f"p50_{bs}"], row[f"p99_{bs}"] = lat["p50"], lat["p99"]
            row[f"tput_{bs}"] = v["throughput"][bs]
        rows.append(row)
    return rows


def markdown(report: dict[str, Any]) -> str:
    batch_sizes = list(report["variants"]["fp32"]["latency_ms"])
    columns = [("variant", "variant", ""), ("accuracy", "accuracy %", ".2f"), ("size_mb", "size MB", ".2f"),
               ("reference", "parity vs", ""), ("max_abs_diff", "max abs diff", ".2e"), ("agreement", "top-1 agree %", ".2f")]
    for bs in batch_sizes:
        columns += [(f"p50_{bs}", f"p50 ms @{bs}", ".2f"), (f"p99_{bs}", f"p99 ms @{bs}", ".2f"),
                    (f"tput_{bs}", f"items/s @{bs}", ".0f")]
    m, d, g = report["machine"], report["dataset"], report["gates"]
    session = report.get("latency_session", {})
    measured = {v.get("latency_measured_by") for v in report["variants"].values()} - {None}
    lines = [
        f"# ftdeploy report: {report['source']['model']} from run `{report['source_run']}`", "",
        f"**Gates: {'PASSED' if g['passed'] else 'FAILED'}**", "",
        *[f"- {f}" for f in g["failures"]], *([""] if g["failures"] else []),
        f"Data: {d['name']} ({d['split']}, {d['num_samples']} {d.get('unit', 'images')}). "
        f"Machine: {m['cpu']}, {m['threads']} thread(s), ISA {', '.join(m['isa']) or 'baseline'}; "
        f"onnxruntime {m['onnxruntime']}, torch {m['torch']}. Sessions: {session.get('intra_op_threads')} intra-op "
        f"thread(s), spinning {'on' if session.get('allow_spinning') else 'off'}; variants timed side by side in "
        f"alternating blocks.", "",
        format_table(variant_rows(report), columns), "",
    ]
    rescored = {n: v["accuracy_samples"] for n, v in report["variants"].items()
                if v.get("accuracy_samples", d["num_samples"]) != d["num_samples"]}
    if rescored:
        lines += [f"Accuracy of {', '.join(rescored)} on {max(rescored.values())} validation {d.get('unit', 'images')} "
                  f"(quantize's); the others on the {d['num_samples']} above.", ""]
    if len(measured) > 1:
        lines += [f"Latency was measured by stages {', '.join(sorted(measured))}: compare rows of the same stage.", ""]
    parity = report["variants"]["fp32"].get("parity") or {}
    if "onnx_error" in parity:
        lines += [f"FP32 parity against a {parity['error_reference']} run of the PyTorch model: PyTorch float32 is off by "
                  f"{parity['torch_fp32_error']:.2e}, the file by {parity['onnx_error']:.2e} (allowed: "
                  f"{parity['parity_error_ratio']:g}x PyTorch's + {parity['atol']:g} = {parity['allowed_error']:.2e}); "
                  f"top-1 agreement with PyTorch {100 * parity['top1_agreement']:.2f} %, {parity['near_ties']} "
                  f"near-tie(s) inside both errors excused.", ""]
    for name, v in report["variants"].items():
        if v.get("exporter"):
            why = f" (dynamo failed: {v['exporter_fallback_reason']})" if v.get("exporter_fallback_reason") else ""
            optimized = f", onnxruntime optimization '{v['optimization']}'" if v.get("optimization") else ""
            lines.append(f"- {name}: exported with the {v['exporter']} exporter{why}, opset {v.get('opset')}{optimized}.")
    if report.get("quantization"):
        lines += int8_section(report["quantization"])
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
            f"when it loses at most {q['max_accuracy_drop']} points and the low end of its speedup clears "
            f"{q['min_speedup']}x outside the noise floor. The configurations within the accuracy budget "
            "that were faster in their first measurement are timed again, together and twice as long (the final "
            "round); they are judged on that, and their first figure is kept beside it."
            + (f" The final measurement is judged on the noise of the chosen file's own two measurements: "
               f"±{q['noise_floor_judged']:.3f}." if q.get("noise_floor_judged") is not None else ""), "", shipped, "",
            format_table([{**t, "first": (t.get("first_pass") or {}).get("median")} for t in q["tried"]],
                         [("name", "configuration tried", ""), ("graph", "graph", ""),
                          ("accuracy_drop_points", "accuracy drop (pts)", "+.2f"),
                          ("latency_ms", "p50 ms @1", ".2f"), ("first", "first pass", ".2f"), ("speedup", "vs fp32", ".2f"),
                          ("speedup_low", "low", ".2f"), ("speedup_high", "high", ".2f"),
                          ("verdict", "verdict", ""), ("passed", "passed", "")])]


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
    variants = {n: v for n, v in report["variants"].items() if v.get("latency_ms")}
    batch_sizes = list(report["variants"]["fp32"]["latency_ms"])
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(4 * len(batch_sizes), 3.2), squeeze=False)
    for ax, bs in zip(axes[0], batch_sizes):
        names = [n for n in variants if bs in variants[n]["latency_ms"]]
        p50 = [variants[n]["latency_ms"][bs]["p50"] for n in names]
        p99 = [variants[n]["latency_ms"][bs]["p99"] for n in names]
        ax.bar(names, p50, yerr=[[0] * len(names), [b - a for a, b in zip(p50, p99)]], capsize=4,
               color=["tab:gray", "tab:blue", "tab:green", "tab:orange", "tab:purple"][: len(names)])
        ax.set(title=f"batch {bs}: p50 latency (bar to p99)", ylabel="ms")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> None:
    write_json(out / "report.json", report)
    write_text(out / "report.md", markdown(report))
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


def _figure(fig) -> str:
    """A finished matplotlib figure as an inline <img> (laid out, encoded, closed)."""
    import base64
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    import html

    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(c if str(c).startswith("<td") else f"<td>{html.escape(str(c))}</td>" for c in r)
                   + "</tr>" for r in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _f(value: Any, spec: str = ".2f", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def usability_html(data: dict[str, Any]) -> str:
    """The usability report as one HTML page: inline images, no network, readable on a phone."""
    import html

    plt = pyplot()
    v = data["variants"]
    m = data["machine"]
    status = '<span class="badge pass">budgets passed</span>' if data["passed"] else '<span class="badge fail">budgets failed</span>'
    parts = [f"<h1>Usability report</h1><p class='meta'>{html.escape(data['source'])} (run {html.escape(data['source_run'])}); "
             f"{data['dataset']['num_samples']} validation {data['dataset'].get('unit', 'images')} of "
             f"{html.escape(data['dataset']['name'])}; "
             f"{html.escape(m['cpu'])}, {m['threads']} thread(s), onnxruntime {m['onnxruntime']}.</p><p>{status}</p>"]
    if data.get("torch_variant_missing"):
        parts.append(f"<p class='meta'>The PyTorch variant is left out: {html.escape(data['torch_variant_missing'])}.</p>")
    parts.append("<h2>Summary</h2>" + _table(
        ["variant", "accuracy %", "macro F1", "mean corruption acc %", "robustness drop vs fp32 (pts)", "ECE",
         "ECE after T", "saliency agreement", "p50 ms @1", "p99 ms @1", "peak MB", "size MB"],
        [[n, _f(x["accuracy"], ".2f", 100), _f(x["macro_f1"], ".3f"),
          _f(x["robustness"]["mean_corruption_accuracy"], ".2f", 100), _f(x["robustness"]["drop_vs_fp32_points"], "+.2f"),
          _f(x["calibration"]["ece"], ".3f"), _f(x["calibration"]["ece_after_temperature"], ".3f"),
          _f(x["saliency"]["agreement_with_fp32"], ".3f"), _f(_bs1(x, "p50_ms")), _f(x["latency"]["p99_ms_bs1"]),
          _f(x["latency"]["peak_memory_mb"], ".0f"), _f(x["size_bytes"], ".2f", 1e-6)] for n, x in v.items()]))
    if data["budgets"]:
        rows = [[k, _f(b["limit"], ".4g"), _f(b["value"], ".4g"),
                 f'<td class="{"good" if b["passed"] else "bad"}">{"passed" if b["passed"] else "FAILED"}</td>']
                for k, b in data["budgets"].items()]
        parts.append("<h2>Budgets</h2>" + _table(["budget:variant", "limit", "value", ""], rows))
    parts.append(_task_section(data, plt))
    parts.append(_robustness_section(data, plt))
    parts.append(_calibration_section(data, plt))
    parts.append(_saliency_section(data, plt))
    parts.append(_scalability_section(data, plt))
    body = "\n".join(parts)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>ftdeploy usability report</title>'
            f"<style>{CSS}</style></head><body><main>{body}</main></body></html>\n")


def _bs1(x: dict[str, Any], key: str) -> float | None:
    rows = [r for r in x["latency"]["grid"] if r["batch_size"] == 1]
    return max(rows, key=lambda r: r["threads"])[key] if rows else None


def _task_section(data: dict[str, Any], plt) -> str:
    v, classes = data["variants"], data["classes"]
    rows = [[n] + [_f(x["per_class"][c]["f1"], ".3f") for c in classes] for n, x in v.items()]
    out = ["<h2>Task performance</h2><p>F1 per class (precision and recall are in usability.json), and the "
           "confusion matrices (rows: true class, columns: predicted).</p>", _table(["variant"] + classes, rows)]
    if plt is not None:
        fig, axes = plt.subplots(1, len(v), figsize=(3.2 * len(v), 3.2), squeeze=False)
        for ax, (n, x) in zip(axes[0], v.items()):
            cm = np.asarray(x["confusion_matrix"])
            ax.imshow(cm, cmap="Blues")
            ax.set(title=n, xticks=range(len(classes)), yticks=range(len(classes)))
            ax.set_xticklabels(classes, fontsize=7, rotation=90)
            ax.set_yticklabels(classes, fontsize=7)
        out.append(_figure(fig))
    return "\n".join(out)


def _robustness_section(data: dict[str, Any], plt) -> str:
    v = data["variants"]
    corruptions = list(next(iter(v.values()))["robustness"]["by_corruption"])
    rows = [[n] + [_f(np.mean(list(x["robustness"]["by_corruption"][c].values())), ".1f", 100) for c in corruptions]
            + [_f(x["robustness"]["drop_vs_fp32_points"], "+.2f"), _f(x["robustness"]["clean_minus_corrupted_points"], ".1f")]
            for n, x in v.items()]
    where = data["dataset"].get("corrupted", "to the image before normalization")
    out = ["<h2>Robustness</h2><p>Accuracy (%) under each corruption, averaged over severities; corruptions are "
           f"applied {where}, with the same seeds for every variant. <em>drop vs fp32</em>: "
           "points of mean corruption accuracy lost against FP32; <em>clean − corrupted</em>: how much the variant "
           "loses under corruption compared with its own clean accuracy.</p>",
           _table(["variant"] + corruptions + ["drop vs fp32 (pts)", "clean − corrupted (pts)"], rows)]
    if plt is not None:
        cols = min(4, len(corruptions))
        rows_n = -(-len(corruptions) // cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.6 * rows_n), squeeze=False)
        for ax, c in zip(axes.ravel(), corruptions):
            for n, x in v.items():
                sev = x["robustness"]["by_corruption"][c]
                ax.plot([int(s) for s in sev], [100 * a for a in sev.values()], marker="o", label=n)
            ax.set(title=c, xlabel="severity", ylabel="accuracy %", ylim=(0, 102))
            ax.grid(alpha=0.3)
        for ax in axes.ravel()[len(corruptions):]:
            ax.axis("off")
        axes[0][0].legend(fontsize=7)
        out.append(_figure(fig))
    return "\n".join(out)


def _calibration_section(data: dict[str, Any], plt) -> str:
    v = data["variants"]
    rows = [[n, _f(c["ece"], ".4f"), _f(c["brier"], ".4f"), _f(c["nll"], ".4f"), _f(c["temperature"], ".3f"),
             _f(c["ece_held_out"], ".4f"), _f(c["ece_after_temperature"], ".4f"), _f(c["nll_held_out"], ".4f"),
             _f(c["nll_after_temperature"], ".4f"), "yes" if c.get("temperature_stored") else "no"]
            for n, x in v.items() for c in [x["calibration"]]]
    unit = data["dataset"].get("unit", "images")
    out = ["<h2>Calibration</h2><p>ECE over 15 confidence bins, Brier score and NLL on all validation "
           f"{unit}. The temperature is fitted on one half of the {unit} and evaluated on the other (<em>held-out</em> "
           "columns, before and after). With <code>--calibrate</code> it is stored in the ONNX file and "
           "<code>ftdeploy serve</code> applies it.</p>",
           _table(["variant", "ECE", "Brier", "NLL", "T", "ECE held-out", "ECE after T", "NLL held-out", "NLL after T",
                   "T in file"], rows)]
    if plt is not None:
        fig, axes = plt.subplots(1, len(v), figsize=(3 * len(v), 3), squeeze=False)
        for ax, (n, x) in zip(axes[0], v.items()):
            bins = [b for b in x["calibration"]["reliability"] if b["count"]]
            ax.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["accuracy"] for b in bins], width=1 / 15,
                   edgecolor="k", alpha=0.7, label="accuracy")
            ax.plot([0, 1], [0, 1], "k--", lw=1)
            ax.set(title=f"{n} (ECE {x['calibration']['ece']:.3f})", xlabel="confidence", ylabel="accuracy",
                   xlim=(0, 1), ylim=(0, 1))
        out.append(_figure(fig))
    return "\n".join(out)


def _saliency_section(data: dict[str, Any], plt) -> str:
    v, inputs = data["variants"], data["saliency_inputs"]
    rows = [[n, _f(x["saliency"]["agreement_with_fp32"], ".3f"),
             " ".join(_f(a, ".2f") for a in x["saliency"]["agreement_per_sample"])] for n, x in v.items()]
    method = next(iter(v.values()))["saliency"]
    if "tokens" in inputs:
        return _token_saliency(v, inputs, method, rows)
    out = [f"<h2>Interpretability</h2><p>Occlusion sensitivity through each variant's own predictor (a "
           f"{method['patch']}-pixel gray square, stride {method['stride']}): how much the probability of FP32's "
           f"predicted class drops when each region is hidden. Agreement is the Spearman rank correlation with "
           f"FP32's map, averaged over the {len(inputs['samples'])} images (misclassified ones among them, when "
           f"there are any). The last "
           f"column for the PyTorch model shows integrated gradients.</p>",
           _table(["variant", "agreement with fp32", "per image"], rows)]
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
        out.append(_figure(fig))
    return "\n".join(out)


def _token_saliency(v: dict[str, Any], inputs: dict[str, Any], method: dict[str, Any], rows: list[list[Any]]) -> str:
    """Each explained sentence once per variant, its tokens shaded by how much hiding them lowers the
    probability of FP32's prediction (and, for PyTorch, by integrated gradients)."""
    import html

    out = [f"<h2>Interpretability</h2><p>Token occlusion through each variant's own predictor: each token in turn "
           f"replaced by <code>{html.escape(method['mask_token'])}</code>; the shade is how much the probability of "
           f"FP32's predicted class drops (red: the token supports it). Agreement is the Spearman rank correlation "
           f"with FP32's scores, averaged over the {len(inputs['samples'])} sentences (misclassified ones among "
           f"them, when there are any). The PyTorch model's last row shows integrated gradients on the word "
           f"embeddings.</p>", _table(["variant", "agreement with fp32", "per sentence"], rows)]

    def shaded(tokens: list[str], scores: list[float]) -> str:
        top = max((abs(x) for x in scores), default=0.0) or 1.0
        return " ".join(f'<span class="tok" style="background:rgba({"220,50,47" if x >= 0 else "38,139,210"},'
                        f'{abs(x) / top:.2f})">{html.escape(t)}</span>' for t, x in zip(tokens, scores))

    for r, tokens in enumerate(inputs["tokens"]):
        lines = [f"<p class='meta'>{html.escape(inputs['labels'][r])} → {html.escape(inputs['fp32_predictions'][r])}</p>"]
        for name, x in v.items():
            lines.append(f"<div class='toks'><b>{html.escape(name)}</b> {shaded(tokens, x['saliency']['maps'][r])}</div>")
        ig = v.get("torch", {}).get("saliency", {}).get("integrated_gradients")
        if ig:
            lines.append(f"<div class='toks'><b>torch: IG</b> {shaded(tokens, ig[r])}</div>")
        out.append("<div class='sentence'>" + "".join(lines) + "</div>")
    return "\n".join(out)


def _scalability_section(data: dict[str, Any], plt) -> str:
    v = data["variants"]
    by_length = any("sequence_length" in r for x in v.values() for r in x["latency"]["grid"])
    axis, axis_label = ("sequence_length", "sequence length") if by_length else ("threads", "threads")
    rows = [[n, r[axis], r["batch_size"], _f(r["p50_ms"]), _f(r["p99_ms"]), _f(r["throughput"], ".0f")]
            for n, x in v.items() for r in x["latency"]["grid"]]
    s = data["latency_session"]
    out = [f"<h2>Scalability</h2><p>Variants timed side by side in alternating blocks at each batch size and "
           f"{axis_label} (sessions as <code>ftdeploy serve</code> builds them, spinning "
           f"{'on' if s['allow_spinning'] else 'off'}). Peak memory: what a fresh process gains by loading the "
           f"model and running the largest batch.</p>",
           _table(["variant", axis_label, "batch", "p50 ms", "p99 ms", "items/s"], rows),
           _table(["variant", "peak memory MB", "file MB"],
                  [[n, _f(x["latency"]["peak_memory_mb"], ".0f"), _f(x["size_bytes"], ".2f", 1e-6)] for n, x in v.items()])]
    if plt is not None:
        groups = sorted({r[axis] for x in v.values() for r in x["latency"]["grid"]})
        unit = data["dataset"].get("unit", "images")
        fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3), squeeze=False)
        for ax, g in zip(axes[0], groups):
            for n, x in v.items():
                grid = [r for r in x["latency"]["grid"] if r[axis] == g]
                ax.plot([r["batch_size"] for r in grid], [r["throughput"] for r in grid], marker="o", label=n)
            ax.set(title=f"{g} tokens" if by_length else f"{g} thread(s)", xlabel="batch size", ylabel=f"{unit}/s",
                   xscale="log")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        out.append(_figure(fig))
    return "\n".join(out)
