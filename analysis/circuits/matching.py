"""Which features are "the same": across two SAEs of one hook (widths, seeds), and from one
layer of a stack to the next.

- `match_saes(a, b)`: each live feature of `a` against its nearest decoder direction in `b`
  (cosine). The share at or above the threshold, and the share that are mutual nearest
  neighbours, are the reported numbers.
- `layer_matches(model, stack)`: for neighbouring hooks i -> i+1 of a stack, decoder cosine
  (the residual stream's basis drifts slowly, so a direction that persists keeps its cosine) and
  co-activation (Pearson correlation of the two features' activations over the same held-out
  tokens). A feature *persists* when it and its partner are mutual nearest neighbours at or above
  the threshold; it *splits* when two or more features of the next layer take it as their nearest
  (at or above the threshold), two or more *merge* into one, and a feature *appears* when nothing
  in the layer before comes that close. Persisting links are followed into chains across layers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from activations.corpus import CorpusConfig, contexts_for_tokens, heldout_corpus, load_contexts
from activations.model import HookedModel
from sae import SAE

from ..encoding import first_position
from .config import MatchConfig
from .runner import ResidualRunner
from .stack import SAEStack, decoder_directions


def live_features(sae_dir: str | Path) -> Tensor | None:
    """[d_sae] bool: features that fired on held-out text, from the SAE's eval.json (None without one)."""
    path = Path(sae_dir) / "eval.json"
    if not path.exists():
        return None
    density = json.loads(path.read_text()).get("log10_feature_density")
    return None if density is None else torch.tensor(density) > -10


def nearest(a: Tensor, b: Tensor, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """For unit rows a [n d] and b [m d]: (best cosine [n], index in b [n])."""
    values, indices = [], []
    for s in range(0, len(a), chunk):
        v, i = (a[s:s + chunk] @ b.T).max(dim=1)
        values.append(v)
        indices.append(i)
    return torch.cat(values), torch.cat(indices)


@dataclass
class PairMatch:
    threshold: float
    n_live_a: int
    n_live_b: int
    share_matched: float
    """Of a's live features: nearest decoder cosine in b at or above the threshold."""
    share_mutual: float
    """Of a's live features: mutual nearest neighbours at or above the threshold."""
    share_matched_b: float
    """Of b's live features: nearest in a at or above the threshold."""
    median_cosine: float
    best_cosine: Tensor = field(repr=False)
    best_index: Tensor = field(repr=False)
    chance_cosine: float = 0.0
    """Median |cosine| between different live features of a: near 0 when cosines mean something; high when every
    decoder row shares one direction (e.g. a huge residual dimension), which inflates every match."""
    space: str = "raw"
    """Where directions were compared: "raw" (the hook's basis) or "per-dimension standardised" (each dimension divided
    by its spread, the space an SAE trained with per-dimension input scaling learnt in)."""

    def summary(self) -> str:
        return (f"{self.share_matched:.1%} of {self.n_live_a} live features have a partner with decoder cosine >= {self.threshold} "
                f"({self.share_mutual:.1%} mutual nearest neighbours; {self.share_matched_b:.1%} the other way, of {self.n_live_b}); "
                f"median best cosine {self.median_cosine:.3f}; {self.space} directions, chance |cosine| {self.chance_cosine:.3f}"
                + (" (high: the rows share a direction, so these cosines overstate the match)" if self.chance_cosine > CHANCE_WARNING else ""))


CHANCE_WARNING = 0.2


def chance_cosine(directions: Tensor, n: int = 1024) -> float:
    """Median |cosine| between different unit rows of directions [m d] (the first n rows)."""
    rows = directions[:n]
    cos = (rows @ rows.T).abs()
    return float(cos[~torch.eye(len(rows), dtype=torch.bool)].median()) if len(rows) > 1 else 0.0


def in_space(scale: Tensor | None, *directions: Tensor) -> tuple[Tensor, ...]:
    """Unit directions [n d_in] as compared: unchanged in the raw basis (scale None), else each dimension times its
    per-dimension scale [d_in], normalised again."""
    return directions if scale is None else tuple(F.normalize(d * scale, dim=1) for d in directions)


def comparison_space(*saes: SAE) -> Tensor | None:
    """The per-dimension input scale [d_in] one of the SAEs was trained with (`TrainConfig.input_scaling`), else None."""
    for sae in saes:
        scale = (getattr(sae, "training_data", None) or {}).get("input_scale_per_dimension")
        if scale is not None and len(scale) == sae.cfg.d_in:
            return torch.tensor(scale, dtype=torch.float32)
    return None


def match_saes(a: SAE, b: SAE, threshold: float = MatchConfig.threshold, live_a: Tensor | None = None,
               live_b: Tensor | None = None) -> PairMatch:
    """Match the live features of `a` to those of `b` by decoder cosine: in the hook's basis, or, when either SAE was
    trained with per-dimension input scaling, with each dimension at that scale (its folded decoder rows otherwise share
    the huge dimensions' direction, and every pair looks alike)."""
    if a.cfg.d_in != b.cfg.d_in:
        raise ValueError(f"the SAEs read different widths (d_in {a.cfg.d_in} and {b.cfg.d_in}): nothing to match")
    live_a = torch.ones(a.cfg.d_sae, dtype=torch.bool) if live_a is None else live_a.bool()
    live_b = torch.ones(b.cfg.d_sae, dtype=torch.bool) if live_b is None else live_b.bool()
    scale = comparison_space(a, b)
    da, db = in_space(scale, decoder_directions(a)[live_a], decoder_directions(b)[live_b])  # where the SAEs learnt
    best_ab, index_ab = nearest(da, db)
    best_ba, index_ba = nearest(db, da)
    mutual = (index_ba[index_ab] == torch.arange(len(da))) & (best_ab >= threshold)
    return PairMatch(threshold, len(da), len(db), float((best_ab >= threshold).float().mean()), float(mutual.float().mean()),
                     float((best_ba >= threshold).float().mean()), float(best_ab.median()), best_ab,
                     live_b.nonzero().squeeze(1)[index_ab], chance_cosine(da), "raw" if scale is None else "per-dimension standardised")


PairRow = TypedDict("PairRow", {
    "from": str, "to": str, "live_from": int, "live_to": int, "persist": int, "split": int, "merge": int, "appear": int, "vanish": int,
    "median_cosine": float, "median_coact": float, "persist_coactive": float})
"""Features of one hook of a stack (from) against the next hook's (to): live counts; persist
(mutual nearest neighbours at or above the threshold), split, merge, appear, vanish (see the
module docstring); the median best decoder cosine, the median best co-activation, and the
share of persisting pairs with co-activation >= 0.5. ("from" is a keyword: the functional form.)"""


class FeatureRef(NamedTuple):
    stack_index: int
    feature: int


class Coactivation(NamedTuple):
    corr: list[Tensor]
    """Pearson correlation [d_i d_{i+1}] of every feature pair of neighbouring hooks."""
    fired: list[Tensor]
    """Each hook's firing counts [d_sae]."""
    n_tokens: int


@dataclass
class LayerMatches:
    hooks: list[str]
    threshold: float
    rows: list[PairRow]
    """Per neighbouring pair: live counts, persist / split / merge / appear / vanish, median cosines and co-activations."""
    chains: list[list[FeatureRef]]
    """Persisting chains, longest first."""
    n_tokens: int

    def table(self, labels: dict[tuple[int, int], str] | None = None, n_chains: int = 8) -> str:
        lines = [f"features across layers (decoder cosine >= {self.threshold}; co-activation on {self.n_tokens:,} held-out tokens)",
                 "| from -> to | live | persist | split | merge | appear | vanish | median cos | median coact | persisting with coact >= 0.5 |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['from'].split('.hook')[0]} -> {r['to'].split('.hook')[0]} | {r['live_from']} -> {r['live_to']} | "
                         f"{r['persist']} | {r['split']} | {r['merge']} | {r['appear']} | {r['vanish']} | {r['median_cosine']:.3f} | "
                         f"{r['median_coact']:.3f} | {r['persist_coactive']:.1%} |")
        for chain in self.chains[:n_chains]:
            lines.append("chain: " + " -> ".join(f"{self.hooks[i].split('.hook')[0]}#{f}" + (f" {labels[(i, f)]!r}" if labels and (i, f) in labels else "")
                                                  for i, f in chain))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"hooks": self.hooks, "threshold": self.threshold, "rows": self.rows, "chains": self.chains, "n_tokens": self.n_tokens}


@torch.no_grad()
def coactivation(model: HookedModel, stack: SAEStack, corpus: CorpusConfig | None = None, n_tokens: int = MatchConfig.coact_tokens,
                 batch_contexts: int = 8) -> Coactivation:
    """Pearson correlation [d_i d_{i+1}] of every feature pair of neighbouring hooks over the same
    held-out tokens (one pass), each hook's firing counts [d_sae], and the number of tokens."""
    runner = ResidualRunner(model)
    device = next(model.parameters()).device
    corpus = corpus or heldout_corpus(stack.saes[0].training_data, None, stack.saes[0].cfg.context_size)
    first = first_position(stack.saes[0])
    n_contexts = contexts_for_tokens(n_tokens, corpus.context_len, first)
    tokens = torch.from_numpy(load_contexts(corpus, model.tokenizer, max_contexts=n_contexts)).long()
    n_hooks = len(stack)
    s = [torch.zeros(sae.cfg.d_sae, dtype=torch.float64) for sae in stack.saes]
    ss = [torch.zeros(sae.cfg.d_sae, dtype=torch.float64) for sae in stack.saes]
    fired = [torch.zeros(sae.cfg.d_sae, dtype=torch.long) for sae in stack.saes]
    cross = [torch.zeros(stack.saes[i].cfg.d_sae, stack.saes[i + 1].cfg.d_sae, dtype=torch.float64) for i in range(n_hooks - 1)]
    count = 0
    for b in tqdm(range(0, len(tokens), batch_contexts), desc="co-activation"):
        walk = runner.walk(tokens[b:b + batch_contexts].to(device), stack.depths)
        next(walk)  # the embedding
        acts = [sae.encode(resid[:, first:].float()).flatten(0, 1).double().cpu() for sae, resid in zip(stack.saes, walk)]
        for i, f in enumerate(acts):
            s[i] += f.sum(0)
            ss[i] += (f * f).sum(0)
            fired[i] += (f > 0).sum(0)
            if i + 1 < n_hooks:
                cross[i] += f.T @ acts[i + 1]
        count += len(acts[0])
    corr = []
    for i in range(n_hooks - 1):
        mean_a, mean_b = s[i] / count, s[i + 1] / count
        std_a = (ss[i] / count - mean_a ** 2).clamp_min(1e-12).sqrt()
        std_b = (ss[i + 1] / count - mean_b ** 2).clamp_min(1e-12).sqrt()
        corr.append(((cross[i] / count - mean_a[:, None] * mean_b[None]) / (std_a[:, None] * std_b[None])).float())
    return Coactivation(corr, fired, count)


def layer_matches(model: HookedModel, stack: SAEStack, threshold: float = MatchConfig.threshold, n_tokens: int = MatchConfig.coact_tokens,
                  corpus: str | None = None) -> LayerMatches:
    """Features of each hook of `stack` against the next hook's (see the module docstring)."""
    stack.check_model(model)
    if len(stack) < 2:
        raise ValueError("matching across layers needs a stack of at least two SAEs")
    stack.to(next(model.parameters()).device)
    corpus_cfg = heldout_corpus(stack.saes[0].training_data, corpus, stack.saes[0].cfg.context_size) if corpus else None
    coact = coactivation(model, stack, corpus_cfg, n_tokens)
    dirs = [decoder_directions(s).cpu() for s in stack.saes]
    rows, links = [], []
    for i in range(len(stack) - 1):
        live_a, live_b = (coact.fired[i] > 0).nonzero().squeeze(1), (coact.fired[i + 1] > 0).nonzero().squeeze(1)
        if len(live_a) == 0 or len(live_b) == 0:
            raise ValueError(f"no feature of {stack.hooks[i] if len(live_a) == 0 else stack.hooks[i + 1]} fired on {coact.n_tokens:,} "
                             "held-out tokens: nothing to match (a dead SAE, or too little text)")
        # per-dimension scaled SAEs: compared at the earlier hook's scale (see `match_saes`)
        da, db = in_space(comparison_space(stack.saes[i], stack.saes[i + 1]), dirs[i][live_a], dirs[i + 1][live_b])
        cos = da @ db.T  # [live_a live_b]
        pair = _pair(stack.hooks[i], stack.hooks[i + 1], cos, coact.corr[i][live_a][:, live_b], threshold)
        rows.append(pair.row)
        links.append({int(live_a[a]): int(live_b[b]) for a, b in pair.links.items()})
    return LayerMatches(stack.hooks, threshold, rows, _chains(links), coact.n_tokens)


class _Pair(NamedTuple):
    row: PairRow
    links: dict[int, int]
    """Persisting links {index among a's live features: index among b's}."""


def _pair(hook_a: str, hook_b: str, cos: Tensor, corr: Tensor, threshold: float) -> _Pair:
    """The row and persisting links of one neighbouring pair, from the decoder cosines and
    co-activations [live_a live_b] of its live features."""
    fwd_v, fwd_i = cos.max(1)
    back_v, back_i = cos.max(0)
    mutual = (back_i[fwd_i] == torch.arange(len(cos))) & (fwd_v >= threshold)
    close_back = back_v >= threshold  # next-layer features with a close feature before
    takers = torch.bincount(back_i[close_back], minlength=cos.shape[0])  # next-layer features taking each a as nearest
    givers = torch.bincount(fwd_i[fwd_v >= threshold], minlength=cos.shape[1])
    pair_corr = corr[mutual.nonzero().squeeze(1), fwd_i[mutual]]
    row = PairRow({"from": hook_a, "to": hook_b, "live_from": cos.shape[0], "live_to": cos.shape[1],
                   "persist": int(mutual.sum()), "split": int((takers >= 2).sum()), "merge": int((givers >= 2).sum()),
                   "appear": int((~close_back).sum()), "vanish": int((fwd_v < threshold).sum()),
                   "median_cosine": float(fwd_v.median()), "median_coact": float(corr.max(1).values.median()),
                   "persist_coactive": float((pair_corr >= 0.5).float().mean()) if len(pair_corr) else 0.0})
    return _Pair(row, {k: int(fwd_i[k]) for k in mutual.nonzero().squeeze(1).tolist()})


def _chains(links: list[dict[int, int]]) -> list[list[FeatureRef]]:
    """Persisting links {feature: feature of the next hook} followed into chains across hooks, longest first."""
    chains, seen = [], set()
    for i in range(len(links)):
        for start in links[i]:
            if (i, start) in seen:
                continue
            chain, index, feature = [FeatureRef(i, start)], i, start
            while index < len(links) and feature in links[index]:
                feature = links[index][feature]
                index += 1
                chain.append(FeatureRef(index, feature))
                seen.add((index, feature))
            chains.append(chain)
    chains.sort(key=lambda c: -len(c))
    return chains
