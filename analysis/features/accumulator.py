"""The atlas's streaming pass: running statistics of every feature at once, updated batch by
batch from sparse codes (`analysis.features.atlas.build_atlas` drives it, then reads it out)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from .atlas import AtlasConfig


class TokenTable(NamedTuple):
    """(feature, token) firings, one entry per distinct pair."""

    keys: Tensor
    """[n] feature * vocab_size + token id, ascending."""
    counts: Tensor
    """[n] firings of the feature on the token."""
    act_sums: Tensor
    """[n] their activation sum (fp64)."""


class Accumulator:
    """Running statistics of the pass. Each batch arrives as sparse codes (the strongest
    active features of every token), so every update costs O(active entries), not
    O(tokens x d_sae); the codes also go to a disk-backed buffer from which the example
    windows are cut at the end (memory stays bounded whatever `n_tokens` is)."""

    def __init__(self, d_sae: int, cfg: AtlasConfig, vocab_size: int, n_contexts: int, context_len: int, max_active: int, scratch: Path):
        self.cfg, self.d_sae, self.vocab_size, self.context_len = cfg, d_sae, vocab_size, context_len
        self.fire_count = torch.zeros(d_sae, dtype=torch.int64)
        self.sum_act = torch.zeros(d_sae, dtype=torch.float64)
        self.max_act = torch.zeros(d_sae)
        self.hist = torch.zeros(d_sae * cfg.hist_bins, dtype=torch.int64)
        self.position_count = torch.zeros(d_sae * context_len, dtype=torch.int64)
        lo, hi = cfg.hist_range
        self.inner_edges = torch.logspace(math.log10(lo), math.log10(hi), cfg.hist_bins + 1)[1:-1]
        self.top = self._examples(cfg.top_n)
        self.sample = self._examples(cfg.n_samples)
        self.sample_keys = torch.full((d_sae, cfg.n_samples), -1.0)
        self.token_keys: list[Tensor] = []
        self.token_acts: list[Tensor] = []
        self.token_table: TokenTable | None = None
        self.token_frequency = torch.zeros(vocab_size, dtype=torch.int64)
        self.coact = torch.zeros(d_sae * d_sae) if d_sae <= cfg.max_coact_latents else None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.candidates: list[dict[str, Tensor]] = []
        self.n_batches = 0
        # codes of every analysed token: feature ids (-1 = none) and activations, strongest first
        scratch.mkdir(parents=True, exist_ok=True)
        shape = (n_contexts, context_len, max_active)
        self.code_ids = np.lib.format.open_memmap(scratch / "code_ids.npy", mode="w+", dtype=np.int32, shape=shape)
        self.code_values = np.lib.format.open_memmap(scratch / "code_values.npy", mode="w+", dtype=np.float16, shape=shape)
        self.max_active = max_active

    def _examples(self, n: int) -> dict[str, Tensor]:
        return {
            "values": torch.zeros(self.d_sae, n),
            "context": torch.full((self.d_sae, n), -1, dtype=torch.int64),
            "position": torch.zeros(self.d_sae, n, dtype=torch.int64),
        }

    @staticmethod
    def _merge(kept: dict[str, Tensor], candidates: dict[str, Tensor], kept_keys: Tensor, candidate_keys: Tensor) -> Tensor:
        """Keep, per feature, the entries with the largest keys among kept + candidates."""
        best, order = torch.cat([kept_keys, candidate_keys], dim=1).topk(kept_keys.shape[1], dim=1)
        for name, value in kept.items():
            kept[name] = torch.cat([value, candidates[name]], dim=1).gather(1, order)
        return best

    def update(self, f: Tensor, tokens: Tensor, first_context: int) -> None:
        """f: [batch, pos, d_sae] activations (position 0 already zeroed); tokens: [batch, pos]."""
        cfg, d_sae = self.cfg, self.d_sae
        batch, n_pos, _ = f.shape
        n_active = self.max_active
        values, ids = f.topk(n_active, dim=-1)  # [batch, pos, n_active]
        live = values > 0
        ids, values = ids.cpu(), values.float().cpu()
        live = live.cpu()
        self.code_ids[first_context:first_context + batch, :, :n_active] = ids.masked_fill(~live, -1).numpy()
        self.code_values[first_context:first_context + batch, :, :n_active] = values.masked_fill(~live, 0).half().numpy()

        b, p, slot = live.nonzero(as_tuple=True)
        feature, value = ids[b, p, slot], values[b, p, slot]
        self.fire_count += torch.bincount(feature, minlength=d_sae)
        self.sum_act.index_add_(0, feature, value.double())
        self.max_act.scatter_reduce_(0, feature, value, "amax")
        self.hist += torch.bincount(feature * cfg.hist_bins + torch.bucketize(value, self.inner_edges), minlength=d_sae * cfg.hist_bins)
        self.position_count += torch.bincount(feature * n_pos + p, minlength=d_sae * self.context_len)
        tokens = tokens.cpu()
        self.token_frequency += torch.bincount(tokens[:, 1:].flatten(), minlength=self.vocab_size)
        self.token_keys.append(feature * self.vocab_size + tokens[b, p])
        self.token_acts.append(value)
        if len(self.token_keys) >= 64:
            self.coalesce_tokens()

        # per (feature, context): the maximum and where it is
        key = feature * batch + b
        ctx_max = torch.zeros(d_sae * batch).scatter_reduce_(0, key, value, "amax")
        at_max = value >= ctx_max[key]
        ctx_pos = torch.zeros(d_sae * batch, dtype=torch.int64).scatter_reduce_(0, key[at_max], p[at_max], "amax")
        ctx_max, ctx_pos = ctx_max.view(d_sae, batch), ctx_pos.view(d_sae, batch)
        contexts = torch.arange(first_context, first_context + batch).expand(d_sae, -1).masked_fill(ctx_max <= 0, -1)
        random_keys = torch.rand(ctx_max.shape, generator=self.generator).masked_fill_(ctx_max <= 0, -1.0)
        self.candidates.append({"values": ctx_max, "context": contexts, "position": ctx_pos, "keys": random_keys})
        if len(self.candidates) >= cfg.merge_every:
            self.merge_candidates()

        self.n_batches += 1
        if self.coact is not None and (self.n_batches - 1) % cfg.coact_every == 0:
            flat_ids, flat_live = ids.flatten(0, 1), live.flatten(0, 1)
            pair = flat_live[:, :, None] & flat_live[:, None, :]
            keys = (flat_ids[:, :, None] * d_sae + flat_ids[:, None, :])[pair]
            self.coact.index_add_(0, keys, torch.ones(len(keys)))

    def merge_candidates(self) -> None:
        """Merge the candidate examples gathered since the last call into the top-N and the reservoir sample."""
        if not self.candidates:
            return
        candidates = {k: torch.cat([c[k] for c in self.candidates], dim=1) for k in self.candidates[0]}
        keys = candidates.pop("keys")
        self._merge(self.top, candidates, self.top["values"], candidates["values"])
        self.sample_keys = self._merge(self.sample, candidates, self.sample_keys, keys)
        self.candidates = []

    def coalesce_tokens(self) -> None:
        """Fold the (feature, token) firings gathered since the last call into `token_table`."""
        if not self.token_keys:
            return
        keys, acts = torch.cat(self.token_keys), torch.cat(self.token_acts).double()
        counts = torch.ones_like(keys)
        if self.token_table is not None:
            old_keys, old_counts, old_acts = self.token_table
            keys, counts, acts = torch.cat([old_keys, keys]), torch.cat([old_counts, counts]), torch.cat([old_acts, acts])
        unique, inverse = torch.unique(keys, return_inverse=True)
        self.token_table = TokenTable(
            unique,
            torch.zeros_like(unique).index_add_(0, inverse, counts),
            torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, acts),
        )
        self.token_keys, self.token_acts = [], []

    def windows(self, examples: dict[str, Tensor], chunk: int = 256) -> Tensor:
        """Activations of each example's feature around its maximum: [d_sae, n, window] (fp16),
        read back from the code buffer (chunks of features keep the lookup small)."""
        cfg = self.cfg
        offsets = torch.arange(-cfg.window_left, cfg.window_right + 1)
        out = []
        for start in range(0, self.d_sae, chunk):
            context, position = examples["context"][start:start + chunk], examples["position"][start:start + chunk]
            position = position[..., None] + offsets  # [chunk, n, window]
            inside = (position >= 1) & (position < self.context_len) & (context[..., None] >= 0)
            flat = (context.clamp_min(0)[..., None] * self.context_len + position.clamp(0, self.context_len - 1)).flatten().numpy()
            ids = torch.from_numpy(self.code_ids.reshape(-1, self.max_active)[flat]).view(*position.shape, -1)
            values = torch.from_numpy(self.code_values.reshape(-1, self.max_active)[flat]).view(*position.shape, -1)
            feature = torch.arange(start, start + len(context)).view(-1, 1, 1, 1)
            out.append(((ids == feature) * values.float()).sum(-1).mul_(inside).half())
        return torch.cat(out)


__all__ = ["Accumulator", "TokenTable"]
