"""The planner: config rules -> one Decision per candidate layer.

Every candidate gets a Decision, including the ones left dense, each with the
reason.  Planning never changes the model and needs no shapes, so a config
that does not fit the model fails before the example inputs run;
``annotate_shapes`` adds shapes and FLOPs to the decisions afterwards.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from .decision import Decision, Plan
from .methods import METHODS
from .passes.infra import PassContext
from .passes.sites import find_sites, param_owners

__all__ = ["plan_model", "output_embedding"]


def output_embedding(model: nn.Module) -> str | None:
    """The qualified name of a Hugging Face model's output embedding (``get_output_embeddings()``:
    ``lm_head``, ``cls.predictions.decoder``...), or None.

    Example:
        >>> class LM(nn.Sequential):
        ...     def get_output_embeddings(self):
        ...         return self[1]
        >>> output_embedding(LM(nn.Linear(4, 4), nn.Linear(4, 9))), output_embedding(nn.Linear(4, 4))
        ('1', None)
    """
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        head = get()
    except Exception:  # a model class without a head may raise (NotImplementedError, AttributeError)
        return None
    if not isinstance(head, nn.Module):
        return None
    return next((n for n, m in model.named_modules() if m is head and n), None)


def _stored_parameters(site) -> list[torch.Tensor]:
    """What a site's row counts: a module layer's parameters (for a parametrized weight, as
    ``torch.nn.utils.parametrizations.weight_norm`` makes, the originals it is computed from, not the
    computed weight, which is no parameter); for a projection or a functional use, its weight and bias."""
    if site.module is not None and site.mha is None:
        return list(site.module.parameters())
    return [t for t in (site.weight, site.bias) if t is not None]


def _names_it(rule, name: str) -> bool:
    """A rule asks for this very layer: its pattern is the layer's qualified name (no glob, no type)."""
    return rule is not None and rule.pattern == name


def _site_decision(site, config, owners, tie_counts, used_rules, head: str | None = None) -> Decision:
    w = site.weight
    stored = _stored_parameters(site)
    d = Decision(
        name=site.name,
        layer_type=site.display_type,
        weight_shape=tuple(w.shape),
        method="dense",
        node=site.nodes[0].name if site.functional else None,
        params_before=sum(p.numel() for p in stored),
        bytes_before=sum(p.numel() * p.element_size() for p in stored),
    )
    d.params_after, d.bytes_after = d.params_before, d.bytes_before
    where = f" ({site.detail})" if site.detail else ""
    method, params, rule = config.choose(site.name, site.rule_types)
    if rule is not None:
        used_rules.add(id(rule))
        d.rule = repr(rule)
    tied = [n for n in owners.get(id(site.param), []) if n != site.param_name]
    if method == "dense":
        d.reason = f"skipped by {rule!r}"
    elif site.method_type not in METHODS[method].layer_types:
        d.reason = (f"method {method!r} does not apply to {site.display_type} layers "
                    f"(it rewrites {', '.join(METHODS[method].layer_types)})")
    elif w.numel() < config.min_size:
        d.reason = (f"weight has {w.numel()} elements, fewer than min_size={config.min_size} "
                    "(a 128x128 Linear); too small to gain")
    elif tied or tie_counts[site.tie_key] > 1:
        d.reason = (f"weight is shared with {', '.join(tied) or 'another call site'} (tied); "
                    "left dense so the tie survives")
    elif site.functional and site.other_uses > 0:
        d.reason = "the weight is also used outside this linear call; left dense"
    elif site.functional and site.bias_name is not None and len(owners.get(id(site.bias), [])) > 1:
        d.reason = "the bias is shared with another layer; left dense"
    elif site.name == head and site.module is not None and not _names_it(rule, site.name):
        d.reason = (f"the model's output embedding (get_output_embeddings()): left dense by default, as SparseGPT, "
                    "Wanda and GPTQ leave it: every logit is computed by it, so compressing it costs accuracy out "
                    "of proportion to its size, and Hugging Face's resize_token_embeddings() needs an nn.Linear "
                    f"there; a rule naming it, Rule({site.name!r}, ...), converts it")
    else:
        d.method = method
        d.params = params
        src = f"rule {rule!r}" if rule is not None else "the default method"
        d.reason = f"{method} by {src}{where}"
    if not d.rewrites and where and "skipped" not in d.reason:
        d.reason += where
    return d


#: Why a 2-D / conv weight that no method takes stays dense, by the owning module's type.
_NOT_TAKEN = {
    "Embedding": "an embedding table (a lookup, not a product): no method rewrites embeddings",
    "EmbeddingBag": "an embedding table (a lookup, not a product): no method rewrites embeddings",
    "LSTM": "a recurrent layer's weights: no method rewrites nn.LSTM yet",
    "GRU": ("a recurrent layer's weights: no method rewrites nn.GRU yet (block_sparse rewrites nn.LSTM; a GRU's "
            "reset gate multiplies the recurrent product, so it needs a recurrence op of its own)"),
    "RNN": "a recurrent layer's weights: no method rewrites nn.RNN yet",
    "Conv3d": "a Conv3d kernel: no method rewrites Conv3d yet",
    "ConvTranspose1d": "a transposed-conv kernel: no method rewrites transposed convolutions yet",
    "ConvTranspose2d": "a transposed-conv kernel: no method rewrites transposed convolutions yet",
    "ConvTranspose3d": "a transposed-conv kernel: no method rewrites transposed convolutions yet",
}


def _other_weights(module: nn.Module, sites, traced: bool, how: str) -> list[Decision]:
    """A dense row for every 2-D or conv weight that is not a site, with the reason."""
    covered = {id(s.param) for s in sites}
    # a module site's row counts all of its parameters (an nn.LSTM's, a parametrized weight's originals)
    covered |= {id(p) for s in sites for p in _stored_parameters(s)}
    rows = []
    seen: set[int] = set()
    for mname, m in module.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if p.dim() < 2 or id(p) in covered or id(p) in seen or hasattr(m, "to_dense_module"):
                continue
            seen.add(id(p))
            name = f"{mname}.{pname}" if mname else pname
            kind = type(m).__name__
            why = _NOT_TAKEN.get(kind)
            if why is None:
                if traced:
                    why = (f"a {p.dim()}-D parameter of {kind} that the {how} graph never uses as a linear "
                           "weight (F.linear, x @ W.T, addmm); no method takes it")
                else:
                    why = (f"a {p.dim()}-D parameter of {kind}, used in forward code that sparsify could not "
                           "see (no graph: the model could not be traced or exported; pass example_inputs=)")
            n = p.numel()
            d = Decision(name=name, layer_type=kind, weight_shape=tuple(p.shape), method="dense", reason=why,
                         params_before=n, params_after=n, bytes_before=n * p.element_size(),
                         bytes_after=n * p.element_size(), site=False)
            rows.append(d)
    return rows


def plan_model(module: nn.Module, ctx: PassContext) -> Plan:
    config = ctx.config
    sites = find_sites(module, ctx)
    owners = param_owners(module)
    tie_counts = Counter(s.tie_key for s in sites)
    used_rules: set[int] = set()
    head = output_embedding(module)
    decisions = [_site_decision(site, config, owners, tie_counts, used_rules, head) for site in sites]
    if config.strict:
        for i, r in enumerate(config.rules):
            if id(r) in used_rules:
                continue
            matched = [s for s in sites if r.matches(s.name, s.rule_types)]
            if matched:
                # It matches layers, but an earlier rule takes each of them first.
                earlier = []
                for s in matched:
                    first = next(e for e in config.rules[:i] if e.matches(s.name, s.rule_types))
                    if first not in earlier:
                        earlier.append(first)
                raise ValueError(
                    f"SparsifyConfig(strict=True): rule #{i + 1} {r!r} is shadowed: every layer it matches "
                    f"({', '.join(s.name for s in matched[:4])}{' ...' if len(matched) > 4 else ''}) is taken "
                    f"first by {', '.join(repr(e) for e in earlier[:3])}. Rules apply first match first: move it "
                    "up, narrow the earlier rule, or drop it.")
            names = ", ".join(s.name for s in sites[:8]) + (" ..." if len(sites) > 8 else "")
            raise ValueError(
                f"SparsifyConfig(strict=True): {r!r} matches no layer. "
                f"Candidate layers: {names or 'none'}. Fix the pattern or type, or drop the rule."
            )
    cap = getattr(ctx, "capture", None)
    how = cap.how if cap is not None else ("torch.fx" if ctx.traced else "module tree")
    decisions += _other_weights(module, sites, ctx.traced, how)
    return Plan(decisions, traced=ctx.traced, capture_note=ctx.capture_note, notes=ctx.notes)
