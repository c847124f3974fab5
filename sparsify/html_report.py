"""Reports people look at: ``write_report(path, report, module)`` writes HTML or Markdown.

The layer table; for each block-sparse layer a PNG of its block layout (white =
zero block, black = stored block); a bar chart of params and FLOPs before and
after per layer.  Pictures need matplotlib (the ``report`` extra); without it
the report says how to get them.  HTML embeds the pictures; Markdown writes
them into ``<name>_files/`` beside the report.  Every file is written atomically.
"""

from __future__ import annotations

import base64
import html
import io as _io
import os
from pathlib import Path
from typing import Any

from torch import nn

from .errors import InputError
from .io import atomic_write
from .report import Report

__all__ = ["write_report", "REPORT_SUFFIXES", "NO_MATPLOTLIB"]

REPORT_SUFFIXES = (".html", ".htm", ".md")
NO_MATPLOTLIB = ("Pictures (block layouts, params/FLOPs chart) need matplotlib: "
                 "pip install 'sparsify[report]' and re-run with --report.")


def _figure():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def _png(fig, canvas_cls) -> bytes:
    canvas_cls(fig)
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _layout_png(name: str, mask, mpl) -> bytes:
    Figure, Canvas = mpl
    rows, cols = mask.shape
    scale = 4.0 / max(rows, cols)
    fig = Figure(figsize=(max(1.5, cols * scale + 0.6), max(1.5, rows * scale + 0.6)))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(mask.float().numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"{name}\n{int(mask.sum())}/{mask.numel()} blocks", fontsize=8)
    ax.set_xlabel("block column", fontsize=7)
    ax.set_ylabel("block row", fontsize=7)
    ax.tick_params(labelsize=6)
    return _png(fig, Canvas)


def _bars_png(rows: list[dict[str, Any]], mpl) -> bytes:
    Figure, Canvas = mpl
    names = [r["name"] for r in rows]
    n = len(names)
    fig = Figure(figsize=(10, max(2.0, 0.3 * n + 1.2)))
    for i, (what, label) in enumerate((("params", "parameters"), ("flops", "FLOPs"))):
        ax = fig.add_subplot(1, 2, i + 1)
        before = [r[f"{what}_before"] or 0 for r in rows]
        after = [r[f"{what}_after"] if r[f"{what}_after"] is not None else (r[f"{what}_before"] or 0) for r in rows]
        y = list(range(n))
        ax.barh([v + 0.2 for v in y], before, height=0.4, label="before", color="#9aa7b8")
        ax.barh([v - 0.2 for v in y], after, height=0.4, label="after", color="#2f6db5")
        ax.set_yticks(y)
        ax.set_yticklabels(names if i == 0 else [""] * n, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig, Canvas)


def _block_masks(report: Report, module: nn.Module | None) -> list[tuple[str, Any]]:
    out = []
    if module is None:
        return out
    for r in report.rows:
        if r["method"] != "block_sparse":
            continue
        qual = (r.get("result") or {}).get("module", r["name"])
        try:
            layer = module.get_submodule(qual)
        except AttributeError:
            continue
        lay = getattr(layer, "layout", None)
        if lay is not None and hasattr(lay, "block_mask"):
            out.append((r["name"], lay.block_mask().cpu()))
    return out


def write_report(
    path: str | os.PathLike, report: Report, module: nn.Module | None = None, *,
    title: str = "sparsify report", meta: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``report`` as HTML or Markdown at ``path``; return every file written.

    Example:
        >>> import torch, sparsify, tempfile, os
        >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(256, 256)), density=0.5)
        >>> files = write_report(os.path.join(tempfile.mkdtemp(), "r.md"), sparsify.report(m), m)
        >>> files[0].name
        'r.md'
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in REPORT_SUFFIXES:
        raise InputError(f"--report {path}: unknown report format {suffix or '(none)'}; use .html or .md.")
    if not p.parent.resolve().is_dir():
        raise InputError(f"--report {path}: the folder {p.parent} does not exist.")
    mpl = _figure()
    pictures: list[tuple[str, str, bytes]] = []  # (caption, file stem, png)
    if mpl is not None:
        for name, mask in _block_masks(report, module):
            pictures.append((f"block layout of {name} (white = zero block)", f"layout_{name}", _layout_png(name, mask, mpl)))
        if report.rows:
            pictures.append(("params and FLOPs before / after, per layer", "params_flops", _bars_png(report.rows, mpl)))
    table = report.table()
    notes = ([f"not traced ({report.capture_note}); module-tree fallback"] if not report.traced else []) + list(report.notes)
    written: list[Path] = []
    if suffix == ".md":
        lines = [f"# {title}", ""]
        lines += [f"- **{k}**: {v}" for k, v in (meta or {}).items()]
        lines += ["", report._repr_markdown_(), ""]
        lines += [f"> note: {n}" for n in notes]
        files_dir = p.with_name(p.stem + "_files")
        if pictures:
            files_dir.mkdir(exist_ok=True)
        else:
            lines += ["", f"_{NO_MATPLOTLIB if mpl is None else 'No block-sparse layers to draw.'}_"]
        for caption, stem, png in pictures:
            f = files_dir / (_safe(stem) + ".png")
            atomic_write(f, png)
            written.append(f)
            lines += ["", f"![{caption}]({files_dir.name}/{f.name})", f"*{caption}*"]
        atomic_write(p, "\n".join(lines) + "\n")
        return [p, *written]
    esc = html.escape
    rows_html = "".join(
        "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{esc(c)}</{'th' if i == 0 else 'td'}>" for c in row) + "</tr>\n"
        for i, row in enumerate(table)
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>body{{font-family:sans-serif;margin:2em}}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "figure{display:inline-block;margin:1em;vertical-align:top}figcaption{font-size:12px}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        "<ul>" + "".join(f"<li><b>{esc(k)}</b>: {esc(str(v))}</li>" for k, v in (meta or {}).items()) + "</ul>",
        f"<table>{rows_html}</table>",
        "".join(f"<p>note: {esc(n)}</p>" for n in notes),
    ]
    if mpl is None:
        parts.append(f"<p><i>{esc(NO_MATPLOTLIB)}</i></p>")
    for caption, _stem, png in pictures:
        data = base64.b64encode(png).decode()
        parts.append(f"<figure><img alt='{esc(caption)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{esc(caption)}</figcaption></figure>")
    parts.append("</body></html>\n")
    atomic_write(p, "".join(parts))
    return [p]


def _safe(stem: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
