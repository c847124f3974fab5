"""The models people use, built small: Hugging Face architectures from tiny configs
(random weights, nothing downloaded) and torch's own transformer modules.

Each entry builds ``(model, example_inputs, expected)`` where ``example_inputs``
is what ``sparsify(example_inputs=...)`` takes and ``expected`` describes the
projections that must be rewritten: ``{"count": n}`` linear-like sites that a
linear method takes (every Linear / Conv1D / attention projection above
``min_size=0``, minus the ones that are tied) and ``{"convs": n}`` convolutions
(for the factorizations).  Sizes are chosen so every projection has at least one
32x32 block per dimension and the whole zoo converts in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

H = 64           # hidden size of the transformer models
HEADS = 4
FF = 128         # intermediate size
VOCAB = 96
SEQ = 8


@dataclass
class Entry:
    name: str
    build: Callable[[], tuple[nn.Module, object]]
    linear_sites: int                 # weights block_sparse rewrites (min_size=0): linear-like + groups=1 convs
    causal_lm: bool = False
    convs: int = 0                    # Conv1d / Conv2d layers (for the factorizations)
    loss: Callable | None = None      # (model, inputs) -> scalar loss for the training step
    tags: set[str] = field(default_factory=set)


def _ids(batch: int = 2, seq: int = SEQ, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def _hf(model_type: str, auto: str = "AutoModel", **kw):
    import transformers

    cfg = transformers.AutoConfig.for_model(model_type, **kw)
    cls = getattr(transformers, auto)
    torch.manual_seed(0)
    return cls.from_config(cfg).eval()


def bert():
    m = _hf("bert", vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS,
            intermediate_size=FF, max_position_embeddings=32)
    return m, {"input_ids": _ids(), "attention_mask": torch.ones(2, SEQ, dtype=torch.long)}


def gpt2():
    m = _hf("gpt2", "AutoModelForCausalLM", vocab_size=VOCAB, n_embd=H, n_layer=2, n_head=HEADS,
            n_positions=32, bos_token_id=1, eos_token_id=2)
    return m, (_ids(),)


def llama():
    m = _hf("llama", "AutoModelForCausalLM", vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2,
            num_attention_heads=HEADS, num_key_value_heads=2, intermediate_size=FF, max_position_embeddings=32,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return m, (_ids(),)


def t5():
    m = _hf("t5", "AutoModelForSeq2SeqLM", vocab_size=VOCAB, d_model=H, d_kv=16, d_ff=FF, num_layers=2,
            num_decoder_layers=2, num_heads=HEADS, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return m, {"input_ids": _ids(), "decoder_input_ids": _ids(seq=4)}


def vit():
    m = _hf("vit", hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=FF,
            image_size=32, patch_size=8, num_channels=3)
    return m, (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)


def whisper():
    m = _hf("whisper", "AutoModel", vocab_size=VOCAB, d_model=H, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FF, decoder_ffn_dim=FF,
            num_mel_bins=16, max_source_positions=16, max_target_positions=16, decoder_start_token_id=1,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    feats = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(0))
    return m, {"input_features": feats, "decoder_input_ids": _ids(batch=1, seq=4)}


def wav2vec2():
    m = _hf("wav2vec2", hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=FF,
            conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4, vocab_size=VOCAB)
    return m, (torch.randn(2, 800, generator=torch.Generator().manual_seed(0)),)


def convnext():
    m = _hf("convnext", num_channels=3, hidden_sizes=[32, 64], depths=[1, 1], num_stages=2, image_size=32)
    return m, (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)


def resnet():
    m = _hf("resnet", num_channels=3, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
            layer_type="basic", image_size=32)
    return m, (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)


class EncoderModel(nn.Module):
    """A torch nn.TransformerEncoder with an embedding and a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, H)
        layer = nn.TransformerEncoderLayer(H, HEADS, FF, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(H, VOCAB)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids)))


class DecoderModel(nn.Module):
    """One nn.TransformerDecoderLayer (self- and cross-attention), sequence-first."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(H, HEADS, FF, dropout=0.0, norm_first=True)

    def forward(self, tgt, memory):
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[0])
        return self.layer(tgt, memory, tgt_mask=mask, tgt_is_causal=True)


class MHAModel(nn.Module):
    """nn.MultiheadAttention with separate key / value sizes (q_proj_weight ...), and a key padding mask."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(H, HEADS, kdim=48, vdim=48, batch_first=True)
        self.out = nn.Linear(H, H)

    def forward(self, q, kv, pad):
        y, _ = self.attn(q, kv, kv, key_padding_mask=pad)
        return self.out(y)


def torch_encoder():
    torch.manual_seed(0)
    return EncoderModel().eval(), (_ids(),)


def torch_decoder():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    return DecoderModel().eval(), (torch.randn(5, 2, H, generator=g), torch.randn(7, 2, H, generator=g))


def torch_mha():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    return MHAModel().eval(), (torch.randn(2, 5, H, generator=g), torch.randn(2, 6, 48, generator=g), pad)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    for k in ("logits", "last_hidden_state", "pooler_output"):
        v = getattr(out, k, None)
        if isinstance(v, torch.Tensor):
            return v
    return next(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def output_of(model: nn.Module, inputs) -> torch.Tensor:
    """The main output tensor of a call (logits, last hidden state, or the output itself)."""
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return _first_tensor(out)


ZOO: dict[str, Entry] = {e.name: e for e in [
    # BERT: per layer q, k, v, attention.output, intermediate, output (6 x 2) + pooler
    Entry("bert", bert, 13),
    # GPT-2: c_attn, c_proj, c_fc, mlp.c_proj (HF Conv1D) x 2; lm_head is tied to wte
    Entry("gpt2", gpt2, 8, causal_lm=True),
    # Llama: q, k, v, o, gate, up, down x 2 + lm_head (untied)
    # q, k, v, o, gate, up, down x 2; the untied lm_head (the output embedding) stays dense
    Entry("llama", llama, 14, causal_lm=True),
    # T5: encoder q,k,v,o,wi,wo x 2 + decoder (self q,k,v,o + cross q,k,v,o + wi, wo) x 2; lm_head tied
    Entry("t5", t5, 12 + 20),
    # ViT: q, k, v, attention.output, intermediate, output x 2 (+ pooler); + the patch embedding conv
    Entry("vit", vit, 13 + 1, convs=1),
    # Whisper: encoder (q,k,v,o,fc1,fc2) + decoder (self 4 + cross 4 + fc1, fc2) + conv1, conv2
    Entry("whisper", whisper, 6 + 10 + 2, convs=2),
    # Wav2Vec2: feature projection + (q,k,v,o, ff in, ff out) x 2 + 2 feature-extractor convs (the
    # grouped positional conv stays dense)
    Entry("wav2vec2", wav2vec2, 1 + 12 + 2, convs=3),
    # ConvNeXt: pwconv1, pwconv2 per block x 2 stages + stem and downsampling convs (depthwise: dense)
    Entry("convnext", convnext, 4 + 2, convs=5),
    # ResNet: only convs (stem + 2 per basic block x 2 + 2 shortcuts)
    Entry("resnet", resnet, 7, convs=7),
    # nn.TransformerEncoder: (q, k, v, out_proj, linear1, linear2) x 2 + head
    Entry("torch_encoder", torch_encoder, 13),
    # nn.TransformerDecoderLayer: self (q,k,v,out) + cross (q,k,v,out) + linear1, linear2
    Entry("torch_decoder", torch_decoder, 10),
    # nn.MultiheadAttention with kdim/vdim: q, k, v, out_proj + out
    Entry("torch_mha", torch_mha, 5),
]}
