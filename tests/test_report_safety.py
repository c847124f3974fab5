"""Reports of hostile names and someone else's artifact are safe to print, render and write.

Layer names, reasons, notes and meta come from the user's model or from a manifest
anyone may have edited.  Properties: Markdown shows them as literal text (no HTML,
link, image or emphasis survives a CommonMark renderer); the terminal never gets a
control character; picture file names are unique ignoring case and bounded; a
name is drawn as text, never as mathtext; ``--force`` replaces only what
sparsify can prove it wrote; OUT may not be the report's pictures folder; a
report whose name has spaces or parentheses still finds its pictures.
"""

from __future__ import annotations

import html
import importlib.util
import json
import re
import unicodedata
import warnings
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsify
from sparsify.cli import main
from sparsify.html_report import _picture_names, write_report
from sparsify.report import Report, markdown_text, printable

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "tests" / "models" / "zoo.py"

# Pieces an attacker (or an unlucky layer name) puts in a text: HTML, Markdown links and images,
# emphasis, code, math, table pipes, entities, terminal escapes (CSI, OSC 8 links, BEL, C1), newlines.
FRAGMENTS = ["<img src=x onerror=alert(1)>", "<script>alert(3)</script>", "![t](https://evil.example/t.png)",
             "[click](javascript:alert(2))", "<https://evil.example>", "**b**", "_i_", "`c`", "$\\foo$", "# h",
             "|", "\\", "&lt;", "&amp;", "\x1b[2J", "\x1b]0;title\x07", "\x1b]8;;https://evil.example/\x07",
             "\x9b31m", "\x85", "\n", "\r\n", "\t", "\u2028", "\u202e", "\x00", "\x7f", "-> ", "1. ", "> ", "~~s~~"]
hostile = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=6).map("".join)


def _controls(text: str) -> list[str]:
    return [c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in "\u202a\u202b\u202d\u202e"]


class _Tags(HTMLParser):
    """The tags and attributes of rendered HTML."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _render(markdown: str) -> str:
    """``markdown`` as a CommonMark viewer with GFM tables shows it."""
    markdown_it = pytest.importorskip("markdown_it")
    return markdown_it.MarkdownIt("commonmark").enable("table").render(markdown)


def _assert_literal(markdown: str, pictures: Path | None = None) -> list[str]:
    """No raw ``<``, no live link or image (but the report's own pictures), no control character
    in ``markdown`` or what it renders to; returns the rendered images' files."""
    body = markdown.split("\n", 1)[1] if markdown.startswith("<!--") else markdown
    assert "<" not in body and not _controls(body.replace("\n", ""))
    parser = _Tags()
    parser.feed(_render(markdown))
    allowed = {"h1", "p", "ul", "li", "strong", "em", "table", "thead", "tbody", "tr", "th", "td", "blockquote",
               "img", "hr"}
    assert {t for t, _ in parser.tags} <= allowed, parser.tags
    images = [a["src"] for t, a in parser.tags if t == "img"]
    for src in images:
        assert pictures is not None and (pictures.parent / unquote(src)).is_file(), src
    return images


# ------------------------------------------------------------------ 1. Markdown
@given(hostile)
def test_markdown_text_renders_as_exactly_the_printable_text(text):
    md = markdown_text(text)
    assert "<" not in md and ">" not in md and not _controls(md)
    # every Markdown punctuation is escaped: removing the escapes leaves none
    assert not re.search(r"[\\`*_\[\]()!#|~$]", re.sub(r"\\.", "", md))
    out = _render(f"x {md} x")
    assert out.startswith("<p>x ") and out.endswith(" x</p>\n"), out
    assert html.unescape(out[len("<p>x "):-len(" x</p>\n")]) == printable(text)


def _rows(names: list[str], reasons: list[str]) -> list[dict]:
    return [{"name": n, "layer_type": "Linear", "weight_shape": [4, 4], "method": "dense", "params_before": 16,
             "params_after": None, "flops_before": None, "flops_after": None, "reason": r}
            for n, r in zip(names, reasons)]


@given(st.lists(hostile, min_size=1, max_size=4), hostile, hostile)
def test_the_markdown_table_holds_every_cell_as_literal_text(names, reason, note):
    names = [f"|{n}|" for n in names]  # a renderer trims a cell's spaces: the pipes keep its edges
    rep = Report(_rows(names, [reason] * len(names)), notes=(note,))
    md = rep._repr_markdown_()
    _assert_literal(md)
    cells = re.findall(r"<td>(.*?)</td>", _render(md), re.S)
    assert [html.unescape(c) for c in cells[::9]] == [printable(n) for n in names] + ["total"]


def _evil_model(names: list[str]) -> nn.Module:
    class Evil(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for n in names:
                self.add_module(n, nn.Linear(64, 64))

        def forward(self, x):
            for n in names:
                x = getattr(self, n)(x)
            return x

    torch.manual_seed(0)
    with warnings.catch_warnings():  # fx cannot trace getattr of such names: the module tree is converted
        warnings.simplefilter("ignore")
        return sparsify.sparsify(Evil(), density=0.5, block_size=32, min_size=1)


EVIL_NAMES = ["<img src=x onerror=alert(1)>", "![p](http:\\\\evil\\t)", "[click](javascript:alert(2))",
              "x\n<script>alert(3)</script>\n", "cost$\\foo$", "a/b", "a_b", "Fc", "fc", "L" * 300, "fc1"]


@pytest.fixture(scope="module")
def evil() -> nn.Module:
    return _evil_model(EVIL_NAMES)


def test_a_report_of_hostile_layer_names_is_literal_and_draws_them_all(tmp_path, evil):
    pytest.importorskip("matplotlib")  # the names are drawn too: "$\foo$" is text, not mathtext (defect 4)
    written = write_report(tmp_path / "r.md", sparsify.report(evil), evil, meta={"<b>k</b>": "![m](http://x/m)"})
    md = (tmp_path / "r.md").read_text()
    images = _assert_literal(md, tmp_path / "r.md")
    assert len(images) == len(EVIL_NAMES) + 1 == len(written) - 1  # every layer's layout and the chart
    names = [p.name for p in written[1:]]
    assert len({n.lower() for n in names}) == len(names) and max(len(n) for n in names) <= 100
    assert "layout_fc1.png" in names  # a plain name keeps its plain file name
    text = html.unescape(re.sub(r"<[^>]+>", "", _render(md)))
    for n in EVIL_NAMES:
        assert printable(n) in text


def test_the_html_report_stays_escaped(tmp_path, evil):
    write_report(tmp_path / "r.html", sparsify.report(evil), evil)
    text = (tmp_path / "r.html").read_text()
    assert "<img src=x" not in text and "<script>" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "out"
    assert main(["convert", f"{ZOO}:mlp", "-o", str(out), "--density", "0.5", "--no-progress"]) == 0
    return out


def _tampered(artifact: Path, where: Path, edit) -> Path:
    import shutil

    shutil.copytree(artifact, where)
    m = json.loads((where / "manifest.json").read_text())
    edit(m)
    (where / "manifest.json").write_text(json.dumps(m))
    return where


def test_a_report_of_someone_elses_artifact_is_literal(tmp_path, artifact, capsys):
    def edit(m):
        m["plan"]["decisions"][0]["reason"] = '<img src=x onerror="alert(document.cookie)">'
        m["plan"]["notes"].append("[download the fixed model](javascript:alert(1)) ![t](https://evil.example/t.png)")

    loaded = sparsify.load(_tampered(artifact, tmp_path / "theirs", edit))
    write_report(tmp_path / "r.md", sparsify.report(loaded), loaded)
    md = (tmp_path / "r.md").read_text()
    assert all(src.startswith("r_files/") for src in _assert_literal(md, tmp_path / "r.md"))
    assert "download the fixed model" in md


# ------------------------------------------------------------------ 2. terminal
@given(st.lists(hostile, min_size=1, max_size=4), hostile, hostile)
def test_a_printed_report_has_no_control_characters(names, reason, note):
    rep = Report(_rows(names, [reason] * len(names)), traced=False, capture_note=note, notes=(note,))
    text = str(rep)
    assert not _controls(text.replace("\n", ""))
    assert len(text.split("\n")) == len(names) + 6  # head, rule, rows, rule, total, two notes


def test_inspect_prints_no_terminal_escapes_from_a_manifest(tmp_path, artifact, capsys):
    def edit(m):
        d = m["plan"]["decisions"][0]
        d["name"] = "fc\x1b[2J\x1b[H\x1b]0;pwned-title\x07"
        d["reason"] = "ok \x1b]8;;https://evil.example/\x07click here\x1b]8;;\x07"
        m["plan"]["notes"].append("\x1b[8mhidden text\x1b[0m\x9b31m\nnext")
        m["created"] = "2026\x1b[31mRED"
        m["model"]["target"] = "zoo\x1b]0;t\x07"

    theirs = _tampered(artifact, tmp_path / "theirs", edit)
    assert main(["inspect", str(theirs)]) == 0
    out = capsys.readouterr().out
    assert not _controls(out.replace("\n", ""))
    assert "2026\\x1b[31mRED" in out and "fc\\x1b[2J" in out and "hidden text\\x1b[0m\\x9b31m\\nnext" in out


# ------------------------------------------------------------- 3. picture names
@given(st.lists(st.text(max_size=300) | st.sampled_from(["a/b", "a_b", "Fc", "fc", "fc-ab12cd34", "fc1"]),
                max_size=12))
def test_picture_names_are_unique_ignoring_case_and_bounded(names):
    files = _picture_names(names)
    assert len(files) == len(names) and len({f.lower() for f in files}) == len(files)
    assert all(re.fullmatch(r"layout_[A-Za-z0-9_.-]+\.png", f) and len(f) <= 100 for f in files)
    assert "params_flops.png" not in files


def test_a_plain_name_that_looks_hashed_cannot_collide():
    hashed = _picture_names(["Fc", "fc"])
    names = ["Fc", "fc", hashed[0][len("layout_"):-len(".png")], hashed[1][len("layout_"):-len(".png")].upper()]
    files = _picture_names(names)
    assert len({f.lower() for f in files}) == 4


# --------------------------------------------------------------------- 5. force
def _convert(tmp_path, report: Path, *extra: str) -> tuple[int, str]:
    out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
    rc = main(["convert", f"{ZOO}:mlp", "-o", str(out), "--no-export", "--no-progress", "--report", str(report),
               *extra])
    return rc, str(out)


@pytest.mark.parametrize("text", ["# My notes\nThe table below was generated by sparsify.\n",
                                  "<!-- generated by sparsify --> and then my own notes\n",
                                  "my notes\n<!-- generated by sparsify -->\n"])
def test_force_keeps_a_markdown_file_that_only_mentions_the_marker(tmp_path, capsys, text):
    mine = tmp_path / "notes.md"
    mine.write_text(text)
    rc, _ = _convert(tmp_path, mine, "--force")
    assert rc == 2 and "not written by sparsify" in capsys.readouterr().err
    assert mine.read_text() == text


def _bytes_read(monkeypatch) -> list[int]:
    """Every ``os.read`` from now on, by the bytes it returned."""
    import os

    got: list[int] = []
    real = os.read

    def counting(fd, n):
        b = real(fd, n)
        got.append(len(b))
        return b

    monkeypatch.setattr(os, "read", counting)
    return got


@pytest.mark.parametrize("suffix", [".md", ".html"])
def test_whether_a_file_is_a_report_is_read_from_its_head_alone(tmp_path, monkeypatch, suffix):
    from sparsify.html_report import _FIRST_LINE, is_report

    first = _FIRST_LINE[suffix]
    ours, theirs = tmp_path / f"ours{suffix}", tmp_path / f"theirs{suffix}"
    # sparse files (no disk used): ours larger than any whole-file read accepts, theirs merely large
    for p, head, size in ((ours, first, (1 << 30) + 1), (theirs, b"# my notes, " + b"x" * len(first), 64 << 20)):
        with open(p, "wb") as f:
            f.write(head)
            f.truncate(size)
    got = _bytes_read(monkeypatch)
    assert not is_report(theirs) and sum(got) <= len(first)  # the marker's length of bytes, nothing more
    assert is_report(ours) and sum(got) <= 2 * len(first)
    (tmp_path / "link.md").symlink_to(ours)
    assert not is_report(tmp_path / "link.md")  # a link to a report is still not replaced
    import os
    os.mkfifo(tmp_path / "fifo.md")
    assert not is_report(tmp_path / "fifo.md")  # and a FIFO neither hangs nor counts


def test_force_keeps_a_pictures_folder_no_report_of_ours_links(tmp_path, capsys):
    nb = tmp_path / "analysis_files"  # nbconvert's pictures, and no analysis.md
    nb.mkdir()
    (nb / "output_3_0.png").write_bytes(b"\x89PNG mine")
    rc, _ = _convert(tmp_path, tmp_path / "analysis.md", "--force")
    assert rc == 2 and "refusing to replace it" in capsys.readouterr().err
    assert (nb / "output_3_0.png").read_bytes() == b"\x89PNG mine"

    ours = tmp_path / "r.md"  # a report of ours, and a picture of the user's beside the ones it links
    assert _convert(tmp_path, ours)[0] == 0
    (tmp_path / "r_files" / "holiday.png").write_bytes(b"\x89PNG mine")
    capsys.readouterr()
    rc, _ = _convert(tmp_path, ours, "--force")
    assert rc == 2 and "refusing to replace it" in capsys.readouterr().err
    assert (tmp_path / "r_files" / "holiday.png").read_bytes() == b"\x89PNG mine"
    (tmp_path / "r_files" / "holiday.png").unlink()
    assert _convert(tmp_path, ours, "--force")[0] == 0  # what it links, it replaces


# ---------------------------------------------------------- 6. OUT is the pictures
def test_out_equal_to_the_pictures_folder_is_refused_before_any_work(tmp_path, capsys):
    rc = main(["convert", f"{ZOO}:mlp", "-o", str(tmp_path / "r_files"), "--report", str(tmp_path / "r.md")])
    cap = capsys.readouterr()
    assert rc == 2 and "writes its pictures into" in cap.err and "is OUT" in cap.err
    assert cap.out == "" and list(tmp_path.iterdir()) == []  # nothing converted, nothing written


def test_streaming_refuses_out_equal_to_the_pictures_folder(tmp_path, capsys):
    from safetensors.torch import save_file

    spec = importlib.util.spec_from_file_location("zoo", ZOO)
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)
    save_file({k: v.contiguous() for k, v in zoo.mlp().state_dict().items()}, str(tmp_path / "w.safetensors"))
    rc = main(["convert", f"{ZOO}:mlp", "--stream", "--weights", str(tmp_path / "w.safetensors"),
               "-o", str(tmp_path / "r_files"), "--report", str(tmp_path / "r.md")])
    cap = capsys.readouterr()
    assert rc == 2 and "writes its pictures into" in cap.err and cap.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


# ------------------------------------------------------------ 7. link destinations
@settings(max_examples=5)
@given(st.sampled_from(["my report (v2)", "a b", "r#1", "x%20y", "ü [x]", "a)b("]))
def test_pictures_are_found_whatever_the_report_is_called(tmp_path_factory, stem):
    pytest.importorskip("matplotlib")
    d = tmp_path_factory.mktemp("named")
    m = _evil_model(["fc"])
    write_report(d / f"{stem}.md", sparsify.report(m), m)
    images = _assert_literal((d / f"{stem}.md").read_text(), d / f"{stem}.md")
    assert len(images) == 2
