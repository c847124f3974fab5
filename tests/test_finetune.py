"""``sparsify.finetune``: distillation recovers what conversion lost; only stored blocks and
factors train; patterns and ranks stay fixed; the user's models are never modified; bad
input is refused before any work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsify
from sparsify.finetune import FINETUNE_ATTR, extra_parameters, trainable_parameters

from .helpers import assert_same_state, rel_err, state_snapshot


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 128), nn.LayerNorm(128), nn.GELU(), nn.Linear(128, 64))


def _data(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 128, generator=g) for _ in range(n)]


@pytest.mark.parametrize("kw", [dict(method="block_sparse", density=0.25, block_size=16),
                                dict(method="low_rank", rank=8), dict(method="tucker", rank=0.2)])
def test_distillation_lowers_the_error_and_trains_only_blocks_and_factors(kw):
    teacher = _teacher()
    student = sparsify.sparsify(teacher, min_size=0, **kw)
    data, held = _data(), _data(2, seed=7)
    t_snap, s_snap = state_snapshot(teacher), state_snapshot(student)
    tuned = sparsify.finetune(student, teacher=teacher, data=data, steps=60, lr=3e-3, progress=False,
                              eval_data=held)
    assert_same_state(teacher, t_snap)   # the teacher is never modified
    assert_same_state(student, s_snap)   # nor the given student (inplace=False)
    log = getattr(tuned, FINETUNE_ATTR)
    assert log["error_after"]["error"] < log["error_before"]["error"]
    x = held[0]
    assert rel_err(tuned(x), teacher(x)) < rel_err(student(x), teacher(x))
    trained = {n for n, _ in trainable_parameters(tuned)}
    after = tuned.state_dict()
    for name, v in s_snap.items():
        changed = not torch.equal(after[name], v)
        if name in trained:
            continue
        # the LayerNorm, every bias, and the block pattern buffers are untouched
        assert not changed, name
    assert any(not torch.equal(after[n], s_snap[n]) for n in trained)
    assert all(p.requires_grad for p in tuned.parameters())  # flags restored
    assert "finetuned by distillation" in tuned._sparsify_plan.notes[-1]


def test_kl_on_logits_and_hidden_states():
    class Clf(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(128, 128), nn.ReLU())
            self.head = nn.Linear(128, 10)

        def forward(self, x):
            return {"logits": self.head(self.body(x)), "features": self.body(x)}

    torch.manual_seed(0)
    teacher = Clf()
    student = sparsify.sparsify(teacher, method="low_rank", rank=4, min_size=0,
                                rules=[sparsify.Rule("head", skip=True)])
    tuned = sparsify.finetune(student, teacher, _data(), steps=40, lr=3e-3, loss="kl", temperature=2.0,
                              hidden=["body"], progress=False)
    losses = getattr(tuned, FINETUNE_ATTR)["losses"]
    assert len(losses) == 40 and losses[-1] < losses[0]


def test_hidden_weight_scales_the_hidden_terms():
    # the first step's loss is output term + hidden_weight * hidden term, before any update
    teacher = _teacher()
    student = sparsify.sparsify(teacher, method="low_rank", rank=8, min_size=0)
    first = {w: getattr(sparsify.finetune(student, teacher, _data(1), steps=1, hidden=["1"], hidden_weight=w,
                                          progress=False), FINETUNE_ATTR)["losses"][0] for w in (0.0, 1.0, 3.0)}
    no_hidden = getattr(sparsify.finetune(student, teacher, _data(1), steps=1, progress=False), FINETUNE_ATTR)
    assert first[0.0] == pytest.approx(no_hidden["losses"][0], rel=1e-6)
    hidden_term = first[1.0] - first[0.0]
    assert hidden_term > 0
    assert first[3.0] == pytest.approx(first[0.0] + 3 * hidden_term, rel=1e-5)


def test_inplace_trains_the_given_model():
    teacher = _teacher()
    student = sparsify.sparsify(teacher, method="low_rank", rank=8, min_size=0)
    out = sparsify.finetune(student, teacher, _data(), steps=5, progress=False, inplace=True)
    assert out is student


@pytest.mark.parametrize("kw, match", [
    (dict(steps=0), "steps"), (dict(lr=-1.0), "lr"), (dict(loss="mse"), "loss"),
    (dict(hidden=["nope"]), "no module 'nope'"), (dict(data=[]), "no batches"),
    (dict(outputs=["logits"]), "no output 'logits'"), (dict(weight_decay=float("nan")), "weight_decay"),
    (dict(hidden_weight=-1.0), "hidden_weight"), (dict(hidden_weight=True), "hidden_weight"),
    (dict(also_train="bias"), "also_train"), (dict(also_train=("bias", "embedding")), "also_train"),
    (dict(also_train=3), "also_train"),
])
def test_bad_input_is_refused(kw, match):
    teacher = _teacher()
    student = sparsify.sparsify(teacher, method="low_rank", rank=8, min_size=0)
    args = dict(data=_data(1), steps=3, progress=False)
    args.update(kw)
    snap = state_snapshot(student)
    with pytest.raises(ValueError, match=match):
        sparsify.finetune(student, teacher, **args)
    assert_same_state(student, snap)


def test_a_model_with_nothing_rewritten_is_refused():
    teacher = _teacher()
    with pytest.raises(ValueError, match="no rewritten layers"):
        sparsify.finetune(teacher, teacher, _data(1), steps=1, progress=False)


def test_an_endless_generator_gives_only_the_batches_the_steps_take():
    # as_batches reads a one-shot iterator into a list: an endless one hung, growing without bound
    teacher = _teacher()
    student = sparsify.sparsify(teacher, method="low_rank", rank=8, min_size=0)
    drawn = []

    def endless():
        g = torch.Generator().manual_seed(0)
        while True:
            drawn.append(1)
            yield torch.randn(8, 128, generator=g)

    out = sparsify.finetune(student, teacher, endless(), steps=3, lr=1e-3, progress=False)
    assert out._sparsify_finetune["steps"] == 3 and len(drawn) == 3


class _NoLen:
    """An iterable without ``__len__`` that yields nothing (an IterableDataset's DataLoader, say)."""

    def __iter__(self):
        return iter(())


def test_data_that_yields_nothing_and_outputs_of_another_shape_are_named():
    teacher = _teacher()
    student = sparsify.sparsify(teacher, method="low_rank", rank=8, min_size=0)
    with pytest.raises(ValueError, match="the data yielded no batches"):  # was a bare StopIteration
        sparsify.finetune(student, teacher, _NoLen(), steps=2, progress=False)
    # a teacher whose output (or hidden state) has another shape was broadcast against the student's
    other = nn.Sequential(nn.Linear(128, 128), nn.LayerNorm(128), nn.GELU(), nn.Linear(128, 1))
    with pytest.raises(ValueError, match=r"output 'output' has shape \[32, 64\], the teacher's \[32, 1\]"):
        sparsify.finetune(student, other, _data(1), steps=2, progress=False)
    torch.manual_seed(0)
    narrow = nn.Sequential(nn.Linear(128, 96), nn.LayerNorm(96), nn.GELU(), nn.Linear(96, 64))
    with pytest.raises(ValueError, match=r"hidden state of '0' 'output' has shape \[32, 128\], the teacher's \[32, 96\]"):
        sparsify.finetune(student, narrow, _data(1), steps=2, hidden=["0"], progress=False)


class _Embedder(nn.Module):
    """Embedding -> Linear -> LayerNorm -> Linear, the shape of a transformer's sublayer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 128)
        self.body = nn.Sequential(nn.Linear(128, 128), nn.LayerNorm(128), nn.GELU(), nn.Linear(128, 64))

    def forward(self, ids):
        return self.body(self.emb(ids))


@pytest.mark.parametrize("also", [("bias",), ("norm",), ("bias", "norm")])
def test_also_train_adds_biases_and_norms_but_never_embeddings_or_patterns(tmp_path, also):
    torch.manual_seed(0)
    teacher = _Embedder()
    student = sparsify.sparsify(teacher, method="block_sparse", density=0.25, block_size=16, min_size=0)
    g = torch.Generator().manual_seed(3)
    data = [torch.randint(0, 50, (16, 8), generator=g) for _ in range(4)]
    snap = state_snapshot(student)
    tuned = sparsify.finetune(student, teacher, data, steps=20, lr=3e-3, also_train=also, progress=False)
    assert_same_state(student, snap)
    expected = set()
    if "bias" in also:
        expected |= {"body.0.bias", "body.3.bias", "body.1.bias"}
    if "norm" in also:
        expected |= {"body.1.weight", "body.1.bias"}
    assert {n for n, _ in extra_parameters(tuned, also)} == expected
    blocks = {n for n, _ in trainable_parameters(tuned)}
    log = getattr(tuned, FINETUNE_ATTR)
    assert set(log["trained"]) == blocks | expected and log["also_train"] == list(also)
    after = tuned.state_dict()
    for name, v in snap.items():
        changed = not torch.equal(after[name], v)
        assert changed == (name in blocks | expected), name   # the embedding and the patterns stay
    # the same number of parameters: nothing is added, only more of them train
    assert sum(p.numel() for p in tuned.parameters()) == sum(p.numel() for p in student.parameters())
    # what trained is saved and loaded with the rest
    back = sparsify.load(sparsify.save(tuned, tmp_path / "m", export=False), factory=_Embedder)
    ids = data[0]
    with torch.no_grad():
        assert torch.equal(back(ids), tuned(ids))
