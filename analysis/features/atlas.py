"""The feature atlas: what every feature of an SAE fires on, from one streaming pass.

One vectorised pass over held-out contexts keeps, for all features at once (no Python loop
per feature):
  * firing counts, activation sums and maxima -> density, mean and max activation;
  * a histogram of activations on fixed log-spaced bins (shared by all features), and
    firing counts per position in the context;
  * the top-N contexts by the feature's maximum in the context (a running top-N merged
    with each batch's candidates), with the activations in a window around the maximum;
  * a uniform random sample of activating contexts (reservoir sampling with random keys):
    the dashboards show it as "random activating contexts" and split it into
    activation-quantile bins;
  * (feature, token) firing counts, for token-set labels;
  * co-activation counts (features firing on the same token, on every `coact_every`-th
    batch), for neighbours.
Then static properties: logit effects (W_dec[i] through the final norm's scale and the
unembedding) and nearest features by decoder cosine and by co-activation (Jaccard).

Position 0 of every context (the `<|endoftext|>` sink) is skipped, as in training.
Everything is stored with safetensors + JSON (no pickle) by `Atlas.save` / `load_atlas`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from activations.corpus import CorpusConfig, load_contexts
from activations.model import HookedModel, resolve_device, token_strings, unembedding, validate_hook
from activations.io import atomic_save_safetensors, atomic_write_json
from sae.base import SAE

from ..encoding import encode_contexts

if TYPE_CHECKING:
    from .labels import Labels

DENSE_THRESHOLD = 0.1  # same as analysis.evaluation.metrics.dense_fraction


@dataclass
class AtlasConfig:
    n_tokens: int = 1_000_000
    """Held-out tokens to read (position 0 of each context excluded)."""
    corpus: CorpusConfig = field(default_factory=lambda: CorpusConfig(split="heldout"))
    first_context: int = 0
    """Skip this many contexts of the corpus first (labels are scored on contexts after the atlas's)."""
    batch_contexts: int = 16
    top_n: int = 20
    """Top activating contexts kept per feature."""
    n_samples: int = 40
    """Uniformly sampled activating contexts kept per feature (quantile bins + random examples)."""
    window_left: int = 24
    window_right: int = 8
    """Tokens kept before / after the maximum of each example context."""
    hist_bins: int = 48
    hist_range: tuple[float, float] = (1e-3, 1e3)
    """Log-spaced activation histogram edges (values outside go to the end bins)."""
    n_neighbours: int = 10
    n_logit_tokens: int = 10
    max_coact_latents: int = 16_384
    """Co-activation needs a [d_sae, d_sae] count matrix: skipped above this width."""
    coact_every: int = 4
    """Count co-activations on every n-th batch only (a sample is enough for neighbours)."""
    merge_every: int = 8
    """Batches of candidate examples gathered before each top-N / reservoir merge."""
    autocast: str = "bf16"
    """Model matmul precision (the SAE always runs in fp32)."""
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        if isinstance(self.corpus, dict):
            self.corpus = CorpusConfig(**self.corpus)
        self.hist_range = tuple(self.hist_range)

    @property
    def window(self) -> int:
        return self.window_left + 1 + self.window_right


class ExampleTable(NamedTuple):
    """Example contexts of every feature (`Atlas.example_table`), strongest first per feature."""

    values: Tensor
    """[d_sae, n] the feature's maximum in the context (0: an empty slot)."""
    context: Tensor
    """[d_sae, n] row of the context in `Atlas.tokens` (-1: an empty slot)."""
    position: Tensor
    """[d_sae, n] position of that maximum in the context."""
    window: Tensor
    """[d_sae, n, window] activations around it (fp16)."""


@dataclass
class Atlas:
    """Everything the dashboards, labels and monitor need; tensors are indexed by feature."""

    meta: dict
    tensors: dict[str, Tensor]
    tokens: Tensor
    """[n_contexts, context_len] token ids of the analysed contexts."""
    token_counts: dict[str, Tensor]
    """Sparse (feature, token) firing counts: `ids`/`counts`/`act_sums`, rows of feature i at
    ptr[i]:ptr[i+1] (CSR), plus `token_frequency` [vocab] over the analysed positions."""
    vocab: dict[int, str]
    """Display strings of every token id the atlas refers to."""

    def __getattr__(self, name: str) -> Tensor:
        tensors = self.__dict__.get("tensors", {})
        if name in tensors:
            return tensors[name]
        raise AttributeError(name)

    # -------------------------------------------------------------- derived per-feature values
    @property
    def d_sae(self) -> int:
        return int(self.meta["d_sae"])

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def density(self) -> Tensor:
        """[d_sae] share of analysed tokens the feature fires on."""
        return self.tensors["fire_count"].double() / self.n_tokens

    @property
    def max_activation(self) -> Tensor:
        """[d_sae] max observed activation (the unit of steering strengths)."""
        return self.tensors["max_act"]

    @property
    def mean_activation(self) -> Tensor:
        """[d_sae] mean activation when firing (0 for dead features)."""
        return self.tensors["sum_act"] / self.tensors["fire_count"].clamp_min(1)

    # -------------------------------------------------------------- typed accessors (over `meta` and `tensors`)
    @property
    def hook_name(self) -> str:
        """Hook point of the SAE the atlas describes."""
        return str(self.meta["hook_name"])

    @property
    def model_name(self) -> str | None:
        return self.meta.get("model_name")

    @property
    def sae_path(self) -> str | None:
        """Folder of the SAE, when it was built from one."""
        return self.meta.get("sae_path")

    @property
    def n_contexts(self) -> int:
        """Contexts analysed (rows of `tokens`)."""
        return int(self.meta["n_contexts"])

    @property
    def config(self) -> AtlasConfig:
        """The config the atlas was built with (fields an older atlas lacks take their defaults)."""
        known = {f.name for f in fields(AtlasConfig)}
        return AtlasConfig(**{k: v for k, v in self.meta["config"].items() if k in known})

    @property
    def fire_count(self) -> Tensor:
        """[d_sae] analysed tokens the feature fires on."""
        return self.tensors["fire_count"]

    @property
    def live_features(self) -> list[int]:
        """Ids of the features that fire at least once, ascending."""
        return torch.nonzero(self.tensors["fire_count"] > 0).flatten().tolist()

    @property
    def position_count(self) -> Tensor:
        """[d_sae, context_len] firings at each position of the context."""
        return self.tensors["position_count"]

    @property
    def hist(self) -> Tensor:
        """[d_sae, hist_bins] activation histogram on `hist_edges`."""
        return self.tensors["hist"]

    @property
    def token_frequency(self) -> Tensor:
        """[vocab] occurrences of each token id among the analysed positions."""
        return self.token_counts["token_frequency"]

    def logit_tokens(self, side: Literal["top", "bottom"] = "top") -> tuple[Tensor, Tensor]:
        """(token ids, logit values), each [d_sae, n_logit_tokens]: the tokens the decoder
        direction promotes most ("top") or suppresses most ("bottom"), strongest first."""
        return self.tensors[f"logit_{side}_ids"], self.tensors[f"logit_{side}_values"]

    def neighbours(self, kind: Literal["decoder", "coact"] = "decoder") -> tuple[Tensor, Tensor]:
        """(feature ids, scores), each [d_sae, n_neighbours]: nearest features by decoder cosine
        ("decoder") or by co-activation Jaccard ("coact"); id -1 where none was counted."""
        if kind == "decoder":
            return self.tensors["decoder_neighbours"], self.tensors["decoder_cosine"]
        return self.tensors["coact_neighbours"], self.tensors["coact_jaccard"]

    def example_table(self, kind: Literal["top", "sample"] = "top") -> ExampleTable:
        """Every feature's example contexts at once (`examples` gives one feature's, readable)."""
        return ExampleTable(*(self.tensors[f"{kind}_{name}"] for name in ExampleTable._fields))

    @property
    def hist_edges(self) -> Tensor:
        """The hist_bins + 1 log-spaced bin edges of `hist` [d_sae, hist_bins]."""
        lo, hi = self.meta["config"]["hist_range"]
        return torch.logspace(math.log10(lo), math.log10(hi), self.meta["config"]["hist_bins"] + 1)

    def check_feature(self, feature: int) -> int:
        if not 0 <= int(feature) < self.d_sae:
            raise IndexError(f"feature {feature} out of range: this SAE has {self.d_sae} features (0..{self.d_sae - 1})")
        return int(feature)

    def feature_tokens(self, feature: int) -> tuple[Tensor, Tensor, Tensor]:
        """(token ids, firing counts, activation sums), each [n]: the n distinct tokens `feature` fired on,
        most firings first."""
        ptr = self.tensors["token_count_ptr"]
        i = self.check_feature(feature)
        sl = slice(int(ptr[i]), int(ptr[i + 1]))
        return self.token_counts["ids"][sl], self.token_counts["counts"][sl], self.token_counts["act_sums"][sl]

    def examples(self, feature: int, kind: str = "top") -> list[dict]:
        """Example contexts of `feature` ("top" or "sample"), strongest first: token ids,
        activations and the index of the maximum, for a window around it."""
        i = self.check_feature(feature)
        values, contexts = self.tensors[f"{kind}_values"][i], self.tensors[f"{kind}_context"][i]
        positions, windows = self.tensors[f"{kind}_position"][i], self.tensors[f"{kind}_window"][i].float()
        left, right = self.meta["config"]["window_left"], self.meta["config"]["window_right"]
        out = []
        for value, ctx, pos, acts in zip(values.tolist(), contexts.tolist(), positions.tolist(), windows):
            if value <= 0:
                continue
            start, stop = max(1, pos - left), min(self.tokens.shape[1], pos + right + 1)
            out.append({
                "value": value, "context": ctx, "position": pos,
                "tokens": self.tokens[ctx, start:stop].tolist(),
                "acts": acts[start - (pos - left): stop - (pos - left)].tolist(), "max_index": pos - start,
            })
        return sorted(out, key=lambda e: -e["value"])

    def summary(self) -> dict:
        return self.meta["summary"]

    # -------------------------------------------------------------- storage
    def save(self, path: str | Path) -> Path:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors({k: v.contiguous() for k, v in self.tensors.items()}, out / "features.safetensors")
        atomic_save_safetensors({"tokens": self.tokens.contiguous(), **self.token_counts}, out / "tokens.safetensors")
        atomic_write_json(out / "vocab.json", {str(k): v for k, v in sorted(self.vocab.items())})
        atomic_write_json(out / "atlas.json", self.meta)  # written last: its presence marks a complete atlas
        return out


def load_atlas(path: str | Path) -> Atlas:
    path = Path(path)
    if not (path / "atlas.json").exists():
        raise FileNotFoundError(f"{path} is not a feature atlas (no atlas.json); build one with `saewb analyze`")
    meta = json.loads((path / "atlas.json").read_text())
    tensors = load_file(path / "features.safetensors")
    stored = load_file(path / "tokens.safetensors")
    tokens = stored.pop("tokens")
    vocab = {int(k): v for k, v in json.loads((path / "vocab.json").read_text()).items()}
    return Atlas(meta, tensors, tokens, stored, vocab)


# ---------------------------------------------------------------------------- the streaming pass
class _Accumulator:
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
        self.token_table: tuple[Tensor, Tensor, Tensor] | None = None
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
            self._coalesce_tokens()

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
        if not self.candidates:
            return
        candidates = {k: torch.cat([c[k] for c in self.candidates], dim=1) for k in self.candidates[0]}
        keys = candidates.pop("keys")
        self._merge(self.top, candidates, self.top["values"], candidates["values"])
        self.sample_keys = self._merge(self.sample, candidates, self.sample_keys, keys)
        self.candidates = []

    def _coalesce_tokens(self) -> None:
        if not self.token_keys:
            return
        keys, acts = torch.cat(self.token_keys), torch.cat(self.token_acts).double()
        counts = torch.ones_like(keys)
        if self.token_table is not None:
            old_keys, old_counts, old_acts = self.token_table
            keys, counts, acts = torch.cat([old_keys, keys]), torch.cat([old_counts, counts]), torch.cat([old_acts, acts])
        unique, inverse = torch.unique(keys, return_inverse=True)
        self.token_table = (
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


@torch.no_grad()
def build_atlas(sae: SAE, model: HookedModel, cfg: AtlasConfig | None = None, sae_path: str | None = None, scratch: str | Path | None = None) -> Atlas:
    """Stream `cfg.n_tokens` held-out tokens through `model` and `sae` and summarise every
    feature. `scratch`: folder for the temporary code buffer (default: a temp dir)."""
    import shutil
    import tempfile

    cfg = cfg or AtlasConfig()
    hook = sae.cfg.hook_name
    validate_hook(model, hook)
    device = resolve_device(cfg.device) if cfg.device != "auto" else next(model.parameters()).device
    sae = sae.to(device).eval()
    ctx_len = cfg.corpus.context_len
    n_contexts = -(-cfg.n_tokens // (ctx_len - 1))
    all_tokens = load_contexts(cfg.corpus, model.tokenizer, max_contexts=cfg.first_context + n_contexts)
    tokens = torch.from_numpy(all_tokens[cfg.first_context:]).long()
    if len(tokens) == 0:
        raise ValueError(f"no contexts left in the {cfg.corpus.split} split after the first {cfg.first_context}")
    vocab_size = max(len(model.tokenizer), int(tokens.max()) + 1)
    max_active = sae.max_active_latents  # codes kept per token in the example buffer
    scratch_dir = Path(tempfile.mkdtemp(prefix="atlas_codes_", dir=scratch))
    try:
        acc = _Accumulator(sae.cfg.d_sae, cfg, vocab_size, len(tokens), ctx_len, max_active, scratch_dir)
        for start in tqdm(range(0, len(tokens), cfg.batch_contexts), desc="atlas", unit="batch"):
            batch = tokens[start:start + cfg.batch_contexts].to(device)
            acc.update(encode_contexts(model, sae, batch, cfg.autocast).f, batch, start)
        acc._coalesce_tokens()
        acc.merge_candidates()
        return _finish(acc, sae, model, cfg, tokens, len(tokens) * (ctx_len - 1), sae_path)
    finally:
        del acc
        shutil.rmtree(scratch_dir, ignore_errors=True)


def _finish(acc: _Accumulator, sae: SAE, model, cfg: AtlasConfig, tokens: Tensor, n_tokens: int, sae_path: str | None) -> Atlas:
    d_sae = sae.cfg.d_sae
    tensors = {
        "fire_count": acc.fire_count, "sum_act": acc.sum_act.float(), "max_act": acc.max_act,
        "hist": acc.hist.view(d_sae, cfg.hist_bins), "position_count": acc.position_count.view(d_sae, acc.context_len),
    }
    for kind, examples in (("top", acc.top), ("sample", acc.sample)):
        # samples are kept in random order; store them by value so quantile bins are slices
        order = examples["values"].argsort(dim=1, descending=True)
        examples = {name: value.gather(1, order) for name, value in examples.items()}
        examples["window"] = acc.windows(examples)
        tensors |= {f"{kind}_{name}": value for name, value in examples.items()}

    keys, counts, act_sums = acc.token_table
    features, token_ids = keys // acc.vocab_size, keys % acc.vocab_size
    order = torch.argsort(features * (counts.max() + 1) + (counts.max() - counts), stable=True)  # by feature, then count desc
    features, token_ids, counts, act_sums = features[order], token_ids[order], counts[order], act_sums[order]
    tensors["token_count_ptr"] = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(features, minlength=d_sae).cumsum(0)])
    token_counts = {"ids": token_ids, "counts": counts, "act_sums": act_sums.float(), "token_frequency": acc.token_frequency}

    tensors |= logit_effects(sae, model, cfg.n_logit_tokens)
    tensors |= decoder_neighbours(sae.W_dec.detach(), cfg.n_neighbours)
    tensors |= coactivation_neighbours(acc.coact, acc.fire_count, cfg.n_neighbours)
    tensors = {k: v.cpu() for k, v in tensors.items()}

    used = set(tokens.unique().tolist()) | set(tensors["logit_top_ids"].unique().tolist()) | set(tensors["logit_bottom_ids"].unique().tolist())
    vocab = dict(zip(sorted(used), token_strings(model.tokenizer, sorted(used))))
    meta = {
        "format": "saewb-atlas/1", "sae_path": sae_path, "hook_name": sae.cfg.hook_name, "model_name": sae.cfg.model_name,
        "d_sae": d_sae, "d_in": sae.cfg.d_in, "n_tokens": n_tokens, "n_contexts": len(tokens), "config": _jsonable(asdict(cfg)),
    }
    atlas = Atlas(meta, tensors, tokens.to(torch.int32), {k: v.cpu() for k, v in token_counts.items()}, vocab)
    atlas.meta["summary"] = density_clusters(atlas, sae.W_dec.detach().cpu())
    return atlas


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


# ---------------------------------------------------------------------------- static properties
@torch.no_grad()
def logit_effects(sae: SAE, model: HookedModel, n: int, chunk: int = 512) -> dict[str, Tensor]:
    """Top/bottom tokens of W_dec[i] read through the final norm's scale and the unembedding:
    logit_{top,bottom}_{ids,values}, each [d_sae, n]."""
    W_U, norm_scale = unembedding(model)  # [d_model, d_vocab], [d_model] or None
    W_dec = sae.W_dec.detach().to(W_U.device, W_U.dtype)
    if norm_scale is not None:
        W_dec = W_dec * norm_scale
    out = {k: [] for k in ("logit_top_ids", "logit_top_values", "logit_bottom_ids", "logit_bottom_values")}
    for start in range(0, len(W_dec), chunk):
        logits = W_dec[start:start + chunk] @ W_U
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


def export_neuronpedia(atlas: Atlas, path: str | Path, labels: Labels | dict | None = None, features: list[int] | None = None) -> Path:
    """Feature data in Neuronpedia's feature-dashboard JSON shape (one object per feature:
    activation examples as token strings + values, logit effects, density, histogram and
    explanations), as one JSON file {"model", "layer", "features": [...]}. `labels`: the
    SAE's `Labels` (or their labels.json object), for the explanations."""
    from activations.io import atomic_write_bytes

    from .labels import check_labels

    vocab = atlas.vocab
    labels = None if labels is None else check_labels(labels, atlas.d_sae)
    edges = atlas.hist_edges
    out = []
    for i in (features if features is not None else range(atlas.d_sae)):
        i = atlas.check_feature(i)
        examples = [
            {"tokens": [vocab.get(t, "") for t in e["tokens"]], "values": [round(v, 4) for v in e["acts"]],
             "maxValue": round(e["value"], 4), "maxValueTokenIndex": e["max_index"]}
            for e in atlas.examples(i, "top") + atlas.examples(i, "sample")
        ]
        hist = atlas.tensors["hist"][i]
        label = labels.best(i) if labels is not None else None
        out.append({
            "modelId": atlas.meta["model_name"], "layer": atlas.meta["hook_name"], "index": i,
            "maxActApprox": round(float(atlas.max_activation[i]), 4), "frac_nonzero": float(atlas.density[i]),
            "pos_str": [vocab.get(int(t), "") for t in atlas.tensors["logit_top_ids"][i]],
            "pos_values": [round(float(v), 4) for v in atlas.tensors["logit_top_values"][i]],
            "neg_str": [vocab.get(int(t), "") for t in atlas.tensors["logit_bottom_ids"][i]],
            "neg_values": [round(float(v), 4) for v in atlas.tensors["logit_bottom_values"][i]],
            "freq_hist_data_bar_heights": hist.tolist(),
            "freq_hist_data_bar_values": [round(float((edges[b] * edges[b + 1]).sqrt()), 5) for b in range(len(hist))],
            "activations": examples,
            "explanations": [] if label is None else [{"description": label.text, "explanationModelName": f"saewb/{label.kind}",
                                                      "scores": [{"method": "held-out F1", "value": label.scores.f1 if label.scores else None}]}],
        })
    payload = {"model": atlas.meta["model_name"], "layer": atlas.meta["hook_name"], "features": out}
    path = Path(path)
    atomic_write_bytes(path, json.dumps(payload, ensure_ascii=False).encode())
    return path


__all__ = ["Atlas", "AtlasConfig", "ExampleTable", "build_atlas", "coactivation_neighbours", "decoder_neighbours", "export_neuronpedia", "load_atlas", "logit_effects"]
