"""Figures and the small HTML pieces reports are made of: matplotlib (optional), an inline PNG, a
table, a number. On the base floor, so that a task draws its own report sections.

>>> fmt(0.12345, ".2f", 100), fmt(None)
('12.35', '-')
"""

from __future__ import annotations

import html
from typing import Any


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


def inline_png(fig) -> str:
    """A finished matplotlib figure as an inline <img> (laid out, encoded, closed)."""
    import base64
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """An HTML table that scrolls sideways on a narrow screen; a cell written as ``<td...>`` is kept as is."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(c if str(c).startswith("<td") else f"<td>{html.escape(str(c))}</td>" for c in r)
                   + "</tr>" for r in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def saliency_agreement_table(variants: dict[str, Any], each: str) -> str:
    """Each variant's saliency agreement with FP32: the mean and one figure per explained ``each``."""
    return table(["variant", "agreement with fp32", f"per {each}"],
                 [[n, fmt(x["saliency"]["agreement_with_fp32"], ".3f"),
                   " ".join(fmt(a, ".2f") for a in x["saliency"]["agreement_per_sample"])] for n, x in variants.items()])


def fmt(value: Any, spec: str = ".2f", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


escape = html.escape
