"""Feature atlases built by hand from planted activations, for the label tests: every statistic
of `analysis/features/atlas.py::build_atlas` that does not need the SAE's weights or the model
(so no logit effects, no decoder neighbours), computed from its definition."""
from __future__ import annotations

import json
import math
from dataclasses import asdict

import torch

from activations.corpus import CorpusConfig
from analysis.features.atlas import Atlas, AtlasConfig
from analysis.features.static_properties import coactivation_neighbours, density_clusters


def atlas_from_activations(tokens: torch.Tensor, acts: torch.Tensor, vocab: dict[int, str], top_n: int = 20, n_samples: int = 40,
                           left: int = 24, right: int = 8, seed: int = 0) -> Atlas:
    """The atlas of token ids `tokens` [n_contexts ctx_len] on which the features fire as `acts`
    [n_contexts ctx_len d_sae] says, as `build_atlas` would store it with `AtlasConfig(top_n=top_n,
    n_samples=n_samples, window_left=left, window_right=right, seed=seed)`: position 0 (the sink)
    is skipped, a feature fires where its activation is > 0, the sample's random keys are drawn
    batch by batch from `seed` and the examples are merged every `merge_every` batches, just as
    the streaming pass does. `vocab`: display strings of the token ids."""
    n_contexts, ctx_len, d_sae = acts.shape
    tokens = tokens.long()
    cfg = AtlasConfig(n_tokens=n_contexts * (ctx_len - 1), corpus=CorpusConfig(split="heldout", context_len=ctx_len),
                      top_n=top_n, n_samples=n_samples, window_left=left, window_right=right, seed=seed)
    acts = acts.float().clone()
    acts[:, 0] = 0
    acts = acts.where(acts > 0, 0.0)
    fires = acts > 0
    vocab_size = max(max(vocab, default=-1) + 1, int(tokens.max()) + 1)

    # every firing, as the streaming pass sees it: (context, position, feature, activation)
    c, p, feature = fires.nonzero(as_tuple=True)
    value = acts[c, p, feature]
    lo, hi = cfg.hist_range
    inner_edges = torch.logspace(math.log10(lo), math.log10(hi), cfg.hist_bins + 1)[1:-1]
    tensors = {
        "fire_count": torch.bincount(feature, minlength=d_sae),
        "sum_act": torch.zeros(d_sae, dtype=torch.float64).index_add_(0, feature, value.double()).float(),
        "max_act": torch.zeros(d_sae).scatter_reduce_(0, feature, value, "amax"),
        "hist": torch.bincount(feature * cfg.hist_bins + torch.bucketize(value, inner_edges), minlength=d_sae * cfg.hist_bins).view(d_sae, -1),
        "position_count": torch.bincount(feature * ctx_len + p, minlength=d_sae * ctx_len).view(d_sae, ctx_len),
    }

    # examples: per (feature, context) the maximum and its last position; the top by value, the sample by random key
    ctx_max = acts.amax(1).T  # [d_sae n_contexts]
    positions = torch.arange(ctx_len)[None, :, None].expand_as(acts)
    ctx_pos = torch.where(fires & (acts >= ctx_max.T[:, None, :]), positions, 0).amax(1).T
    context = torch.arange(n_contexts).expand(d_sae, -1).masked_fill(ctx_max <= 0, -1)
    gen = torch.Generator().manual_seed(seed)
    keys = torch.cat([torch.rand(d_sae, len(range(start, min(start + cfg.batch_contexts, n_contexts))), generator=gen)
                      for start in range(0, n_contexts, cfg.batch_contexts)], dim=1).masked_fill_(ctx_max <= 0, -1.0)
    candidates = {"values": ctx_max, "context": context, "position": ctx_pos}
    offsets = torch.arange(-left, right + 1)
    merged = cfg.batch_contexts * cfg.merge_every
    for kind, n, sort_keys in (("top", top_n, None), ("sample", n_samples, keys)):
        kept = {"values": torch.zeros(d_sae, n), "context": torch.full((d_sae, n), -1), "position": torch.zeros(d_sae, n, dtype=torch.long)}
        kept_keys = torch.full((d_sae, n), -1.0)
        for start in range(0, n_contexts, merged):
            part = slice(start, start + merged)
            new_keys = candidates["values"][:, part] if sort_keys is None else sort_keys[:, part]
            old_keys = kept["values"] if sort_keys is None else kept_keys
            kept_keys, order = torch.cat([old_keys, new_keys], dim=1).topk(n, dim=1)
            kept = {name: torch.cat([kept[name], candidates[name][:, part]], dim=1).gather(1, order) for name in kept}
        order = kept["values"].argsort(dim=1, descending=True)
        kept = {name: table.gather(1, order) for name, table in kept.items()}
        where = kept["position"][..., None] + offsets  # [d_sae n window]
        inside = (where >= 1) & (where < ctx_len) & (kept["context"][..., None] >= 0)
        window = acts[kept["context"].clamp_min(0)[..., None], where.clamp(0, ctx_len - 1), torch.arange(d_sae)[:, None, None]]
        kept["window"] = (window.half().float() * inside).half()
        tensors |= {f"{kind}_{name}": table for name, table in kept.items()}

    # (feature, token) firing counts and activation sums, by feature, then most firings first
    unique, inverse = torch.unique(feature * vocab_size + tokens[c, p], return_inverse=True)
    counts = torch.zeros_like(unique).index_add_(0, inverse, torch.ones_like(inverse))
    act_sums = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, value.double())
    features, token_ids = unique // vocab_size, unique % vocab_size
    most = counts.max() if len(counts) else 0
    order = torch.argsort(features * (most + 1) + (most - counts), stable=True)
    tensors["token_count_ptr"] = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(features, minlength=d_sae).cumsum(0)])
    token_counts = {"ids": token_ids[order], "counts": counts[order], "act_sums": act_sums[order].float(),
                    "token_frequency": torch.bincount(tokens[:, 1:].flatten(), minlength=vocab_size)}

    # co-activations, counted on every coact_every-th batch
    coact = torch.zeros(d_sae, d_sae)
    for start in range(0, n_contexts, cfg.batch_contexts * cfg.coact_every):
        both = fires[start:start + cfg.batch_contexts].flatten(0, 1).float()
        coact += both.T @ both
    tensors |= coactivation_neighbours(coact.flatten(), tensors["fire_count"], cfg.n_neighbours)

    config = json.loads(json.dumps(asdict(cfg), default=lambda o: list(o) if isinstance(o, tuple) else str(o)))
    meta = {"format": "saewb-atlas/1", "d_sae": d_sae, "n_tokens": cfg.n_tokens, "n_contexts": n_contexts, "config": config}
    atlas = Atlas(meta, tensors, tokens.to(torch.int32), token_counts, vocab)
    atlas.meta["summary"] = density_clusters(atlas)
    return atlas
