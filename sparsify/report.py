"""``Report``: the per-layer table of a converted model, built from its Decisions."""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from typing import Any

__all__ = ["Report", "printable", "markdown_text"]

# Bidirectional overrides and isolates reorder what a terminal or viewer shows ("Trojan Source").
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# CommonMark's HTML and entity characters, and every ASCII punctuation that starts an inline construct
# (code, emphasis, links, images, headings, GFM tables / strikethrough, math).
_MARKDOWN = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", **{c: "\\" + c for c in "\\`*_[]()!#|~$"}})


def printable(text: str) -> str:
    r"""``text`` safe to print: control characters (C0, DEL, C1, newlines, line separators, bidi
    overrides) become visible escapes, as ``repr`` writes them.  Names, reasons and notes may come
    from someone else's artifact; they never move the cursor, retitle the window or hide text.

    Example:
        >>> printable("fc\x1b[2J\nnext")
        'fc\\x1b[2J\\nnext'
    """
    text = str(text)
    if text.isascii() and text.isprintable():
        return text
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in _BIDI else c
                   for c in text)


def markdown_text(text: str) -> str:
    r"""``text`` as literal Markdown inline text: :func:`printable`, then ``& < >`` as entities and
    Markdown's punctuation backslash-escaped, so no HTML, link, image or emphasis survives.

    Example:
        >>> markdown_text("![t](http://x/t.png) <b>")
        '\\!\\[t\\]\\(http://x/t.png\\) &lt;b&gt;'
    """
    return printable(text).translate(_MARKDOWN)


def _fmt_count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _g(v: Any, spec: str) -> str:
    """A number formatted, anything else (a missing value) as ``?``."""
    if isinstance(v, str) and v in ("inf", "-inf", "nan"):  # how a saved artifact holds a non-finite measure
        return v
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "?"


def _setting(d: dict) -> str:
    res, params = d.get("result") or {}, d.get("params") or {}
    if d["method"] == "block_sparse":
        dens = res.get("density", params.get("density"))
        s = f"density={_g(dens, '.3g')} b={res.get('block_size', params.get('block_size'))}"
        lay = res.get("layout", params.get("layout", "magnitude"))
        return s if lay == "magnitude" else f"{s} {lay}" + (" fresh" if res.get("init", params.get("init")) == "fresh" else "")
    if "rank" in res:
        r = res["rank"]
        s = f"rank={r}" if not isinstance(r, (list, tuple)) else f"ranks={tuple(r)}"
        if "relative_error" in res:
            s += f" err={_g(res['relative_error'], '.2g')}"
        return s
    return ""


def _fmt_err(r: dict) -> str:
    e = (r.get("result") or {}).get("output_error")
    return "-" if e is None else _g(e, ".3g")


@dataclass
class Report:
    """Rows: name, kind, shape, method, params before -> after, FLOPs before -> after,
    weight bytes before -> after (index buffers included), density or rank, reason.  ``str(report)`` is a table; ``to_dict()`` is JSON-ready.

    With calibration data, each converted layer's relative output error on the calibration
    inputs (``||X (W - W')^T|| / ||X W^T + b||``, the inputs it got in the partly converted
    model) is a column ("out err"), and ``calibration`` holds the model's relative output
    error against the original per output (``sparsify.calibration.model_error``).

    Example:
        >>> import torch, sparsify
        >>> m = torch.nn.Sequential(torch.nn.Linear(256, 256))
        >>> print(sparsify.report(sparsify.sparsify(m, density=0.5)))  # doctest: +ELLIPSIS
        layer ...
    """

    rows: list[dict[str, Any]]
    traced: bool = True
    capture_note: str | None = None
    notes: tuple[str, ...] = ()
    calibration: dict[str, Any] | None = None

    @classmethod
    def from_plan(cls, plan) -> Report:
        return cls([d.to_dict() for d in plan.decisions], plan.traced, plan.capture_note, tuple(plan.notes),
                   getattr(plan, "calibration", None))

    @property
    def model_error(self) -> float | None:
        """The model's worst relative output error against the original on the calibration data
        (None without calibration data)."""
        return None if not self.calibration else self.calibration.get("error")

    def totals(self) -> dict[str, int | None]:
        pb = sum(r["params_before"] for r in self.rows)
        pa = sum(r["params_after"] if r["params_after"] is not None else r["params_before"] for r in self.rows)
        fb = [r["flops_before"] for r in self.rows]
        fa = [r["flops_after"] for r in self.rows]
        bb = sum(r.get("bytes_before", 0) for r in self.rows)
        ba = sum(r["bytes_after"] if r.get("bytes_after") is not None else r.get("bytes_before", 0)
                 for r in self.rows)
        return {
            "params_before": pb,
            "params_after": pa,
            "bytes_before": bb,
            "bytes_after": ba,
            "flops_before": None if None in fb else sum(fb),
            "flops_after": None if None in fa else sum(fa),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.rows, "totals": self.totals(), "traced": self.traced,
                "capture_note": self.capture_note, "notes": list(self.notes), "calibration": self.calibration}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def table(self) -> list[list[str]]:
        errors = any("output_error" in (r.get("result") or {}) for r in self.rows)
        head = ["layer", "kind", "shape", "method", "params", "FLOPs", "bytes", "setting"]
        head += ["out err"] if errors else []
        body = [head + ["reason"]]
        for r in self.rows:
            body.append([
                r["name"], r["layer_type"], "x".join(map(str, r["weight_shape"])), r["method"],
                f"{_fmt_count(r['params_before'])} -> {_fmt_count(r['params_after'])}",
                f"{_fmt_count(r['flops_before'])} -> {_fmt_count(r['flops_after'])}",
                f"{_fmt_count(r.get('bytes_before'))} -> {_fmt_count(r.get('bytes_after'))}",
                _setting(r), *([_fmt_err(r)] if errors else []), r["reason"],
            ])
        t = self.totals()
        model = "" if self.model_error is None else f"{self.model_error:.3g}"
        body.append(["total", "", "", "", f"{_fmt_count(t['params_before'])} -> {_fmt_count(t['params_after'])}",
                     f"{_fmt_count(t['flops_before'])} -> {_fmt_count(t['flops_after'])}",
                     f"{_fmt_count(t['bytes_before'])} -> {_fmt_count(t['bytes_after'])}", "",
                     *([model] if errors else []), ""])
        return body

    def __str__(self) -> str:
        body = [[printable(c) for c in row] for row in self.table()]
        widths = [max(len(row[i]) for row in body) for i in range(len(body[0]))]
        lines = []
        for i, row in enumerate(body):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
            if i == 0 or i == len(body) - 2:
                lines.append("  ".join("-" * w for w in widths))
        if not self.traced:
            lines.append(f"note: not traced ({printable(self.capture_note)}); module-tree fallback")
        lines += [f"note: {printable(n)}" for n in self.notes]
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        # Every cell is literal text (markdown_text): a layer name is never HTML, a link or an image.
        body = [[markdown_text(c) for c in row] for row in self.table()]
        out = ["| " + " | ".join(body[0]) + " |", "|" + "---|" * len(body[0])]
        out += ["| " + " | ".join(row) + " |" for row in body[1:]]
        return "\n".join(out)
