"""Static properties of an atlas's features, from the SAE's weights and the pass's counts:
logit effects (W_dec[i] through the final norm's scale and the unembedding), nearest features
by decoder cosine and by co-activation (Jaccard), and the dead / dense / ultralow-density
clusters of the density distribution."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from activations.model import HookedModel
from sae.base import SAE

from ..evaluation.metrics import DENSE_THRESHOLD
from ..logit_lens import logit_lens

if TYPE_CHECKING:
    from .atlas import Atlas


@torch.no_grad()
def logit_effects(sae: SAE, model: HookedModel, n: int, chunk: int = 512) -> dict[str, Tensor]:
    """Top/bottom tokens of W_dec[i] read through the final norm's scale and the unembedding:
    logit_{top,bottom}_{ids,values}, each [d_sae, n]."""
    out = {k: [] for k in ("logit_top_ids", "logit_top_values", "logit_bottom_ids", "logit_bottom_values")}
    for start in range(0, sae.cfg.d_sae, chunk):
        logits = logit_lens(sae, model, slice(start, start + chunk))
        top, bottom = logits.topk(n, dim=-1), logits.topk(n, dim=-1, largest=False)
        out["logit_top_ids"].append(top.indices)
        out["logit_top_values"].append(top.values)
        out["logit_bottom_ids"].append(bottom.indices)
        out["logit_bottom_values"].append(bottom.values)
    return {k: torch.cat(v).cpu() for k, v in out.items()}


@torch.no_grad()
def decoder_neighbours(W_dec: Tensor, n: int, chunk: int = 1024) -> dict[str, Tensor]:
    """Nearest features by cosine of decoder rows W_dec [d_sae, d_in]: ids and cosines, each [d_sae, n]."""
    unit = torch.nn.functional.normalize(W_dec.float(), dim=-1)
    n = min(n, len(unit) - 1)
    ids, cos = [], []
    for start in range(0, len(unit), chunk):
        sims = unit[start:start + chunk] @ unit.T
        sims[torch.arange(len(sims)), torch.arange(start, start + len(sims))] = -2  # not itself
        top = sims.topk(n, dim=-1)
        ids.append(top.indices)
        cos.append(top.values)
    return {"decoder_neighbours": torch.cat(ids), "decoder_cosine": torch.cat(cos)}


@torch.no_grad()
def coactivation_neighbours(coact: Tensor | None, fire_count: Tensor, n: int, chunk: int = 1024) -> dict[str, Tensor]:
    """Features that fire on the same tokens, by Jaccard index count(i&j)/count(i|j): ids and scores,
    each [d_sae, n], from the flat pair counts coact [d_sae * d_sae] (None: not counted) and fire_count [d_sae]."""
    d_sae = len(fire_count)
    n = min(n, d_sae - 1)
    if coact is None:  # too wide to count pairs: leave empty (-1)
        return {"coact_neighbours": torch.full((d_sae, n), -1), "coact_jaccard": torch.zeros(d_sae, n)}
    matrix, counts = coact.view(d_sae, d_sae), fire_count.float()
    ids, scores = [], []
    for start in range(0, d_sae, chunk):
        both = matrix[start:start + chunk]
        union = counts[start:start + chunk, None] + counts[None, :] - both
        jaccard = both / union.clamp_min(1)
        jaccard[torch.arange(len(both)), torch.arange(start, start + len(both))] = -1
        top = jaccard.topk(n, dim=-1)
        ids.append(top.indices)
        scores.append(top.values)
    return {"coact_neighbours": torch.cat(ids), "coact_jaccard": torch.cat(scores)}


def density_clusters(atlas: Atlas, W_dec: Tensor | None = None) -> dict:
    """Dead, dense and ultralow-density features; W_dec [d_sae, d_in], when given, for the cluster's cosines.

    The ultralow-density cluster (Anthropic, "Towards Monosemanticity") shows up as a second
    mode of the log-density histogram, well below the main one, whose decoder rows point in
    similar directions. We look for the deepest valley below the main mode in a histogram
    of log10 density (0.25-decade bins); features below it form the cluster if it is at
    least a decade below the mode. Its mean pairwise decoder cosine is reported beside that
    of random live features, which tells a real cluster from a tail."""
    density = atlas.density
    live = density > 0
    log_density = density[live].log10()
    summary = {
        "n_features": atlas.d_sae, "n_tokens": atlas.n_tokens,
        "dead": int((~live).sum()), "dense": int((density > DENSE_THRESHOLD).sum()),
        "dense_features": torch.nonzero(density > DENSE_THRESHOLD).flatten().tolist()[:200],
        "dense_threshold": DENSE_THRESHOLD, "ultralow": None,
    }
    if len(log_density) < 10:
        return summary
    resolution = 1.0 / atlas.n_tokens
    edges = torch.arange(math.floor(float(log_density.min()) * 4) / 4, float(log_density.max()) + 0.5, 0.25, dtype=torch.float64)
    counts = torch.histogram(log_density, bins=edges).hist
    mode = int(counts.argmax())
    best = None
    for valley in range(1, mode):
        below, above = counts[:valley].max(), counts[valley:mode + 1].max()
        depth = min(below, above) - counts[valley]
        if counts[:valley].sum() >= 5 and depth > 0 and (best is None or depth > best[1]):
            best = (valley, float(depth))
    summary["log10_density_mode"] = float(edges[mode] + 0.125)
    if best is not None and float(edges[mode]) - float(edges[best[0]]) >= 1.0:
        threshold = float(edges[best[0]] + 0.125)
        members = torch.nonzero(live & (density.log10() < threshold)).flatten()
        summary["ultralow"] = {
            "log10_density_below": threshold, "n_features": len(members), "features": members.tolist()[:500],
        }
        if W_dec is not None:
            others = torch.nonzero(live).flatten()
            others = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(0))[:len(members)]]
            summary["ultralow"]["mean_decoder_cosine"] = _mean_pairwise_cosine(W_dec[members])
            summary["ultralow"]["mean_decoder_cosine_random_live"] = _mean_pairwise_cosine(W_dec[others])
            # Anthropic's cluster shares one direction; a low-density tail does not
            cos, base = summary["ultralow"]["mean_decoder_cosine"], summary["ultralow"]["mean_decoder_cosine_random_live"]
            summary["ultralow"]["shares_direction"] = cos is not None and base is not None and cos > base + 0.1
    summary["below_1e-5"] = int((live & (density < max(1e-5, resolution))).sum())
    return summary


def _mean_pairwise_cosine(rows: Tensor) -> float | None:
    if len(rows) < 2:
        return None
    unit = torch.nn.functional.normalize(rows.float(), dim=-1)
    sims = unit @ unit.T
    n = len(unit)
    return float((sims.sum() - n) / (n * (n - 1)))


__all__ = ["coactivation_neighbours", "decoder_neighbours", "density_clusters", "logit_effects"]
