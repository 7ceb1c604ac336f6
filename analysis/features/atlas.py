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

This module holds the `Atlas` type, its storage and `build_atlas`; the pass's running
statistics are in `accumulator.py`, the static properties in `static_properties.py`, and the
Neuronpedia export in `neuronpedia.py`.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from activations.corpus import CorpusConfig, contexts_for_tokens, load_contexts
from activations.io import atomic_save_safetensors, atomic_write_json
from activations.model import HookedModel, resolve_device, token_strings, validate_hook
from activations.store import ActivationStore
from sae.base import SAE

from ..encoding import HookActivations, encode_activations, first_position
from .accumulator import Accumulator
from .static_properties import coactivation_neighbours, decoder_neighbours, density_clusters, logit_effects

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


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
    autocast: str = "auto"
    """Model matmul precision: "auto" (the faster of fp32 and bf16 autocast on the first batch, if bf16 is accurate;
    `activations.precision`), "bf16" or "none" (the SAE always runs in fp32)."""
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
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


class FeatureTokens(NamedTuple):
    """The distinct tokens one feature fired on, most firings first (`Atlas.feature_tokens`), each [n]."""

    ids: Tensor
    counts: Tensor
    """Firings on the token."""
    act_sums: Tensor
    """Activation sum over those firings."""


class RankedFeatures(NamedTuple):
    """Per feature, a ranked list of tokens or features with their scores, each [d_sae n] (`Atlas.logit_tokens`, `Atlas.neighbours`)."""

    ids: Tensor
    values: Tensor


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

    def logit_tokens(self, side: Literal["top", "bottom"] = "top") -> RankedFeatures:
        """(token ids, logit values), each [d_sae, n_logit_tokens]: the tokens the decoder
        direction promotes most ("top") or suppresses most ("bottom"), strongest first."""
        return RankedFeatures(self.tensors[f"logit_{side}_ids"], self.tensors[f"logit_{side}_values"])

    def neighbours(self, kind: Literal["decoder", "coact"] = "decoder") -> RankedFeatures:
        """(feature ids, scores), each [d_sae, n_neighbours]: nearest features by decoder cosine
        ("decoder") or by co-activation Jaccard ("coact"); id -1 where none was counted."""
        if kind == "decoder":
            return RankedFeatures(self.tensors["decoder_neighbours"], self.tensors["decoder_cosine"])
        return RankedFeatures(self.tensors["coact_neighbours"], self.tensors["coact_jaccard"])

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

    def feature_tokens(self, feature: int) -> FeatureTokens:
        """(token ids, firing counts, activation sums), each [n]: the n distinct tokens `feature` fired on,
        most firings first."""
        ptr = self.tensors["token_count_ptr"]
        i = self.check_feature(feature)
        sl = slice(int(ptr[i]), int(ptr[i + 1]))
        return FeatureTokens(self.token_counts["ids"][sl], self.token_counts["counts"][sl], self.token_counts["act_sums"][sl])

    def examples(self, feature: int, kind: str = "top") -> list[dict]:
        """Example contexts of `feature` ("top" or "sample"), strongest first: token ids,
        activations and the index of the maximum, for a window around it."""
        i = self.check_feature(feature)
        values, contexts = self.tensors[f"{kind}_values"][i], self.tensors[f"{kind}_context"][i]
        positions, windows = self.tensors[f"{kind}_position"][i], self.tensors[f"{kind}_window"][i].float()
        left, right = self.meta["config"]["window_left"], self.meta["config"]["window_right"]
        out = []
        for value, ctx, pos, acts in zip(values.tolist(), contexts.tolist(), positions.tolist(), windows, strict=True):
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


@torch.no_grad()
def build_atlas(sae: SAE, model: HookedModel, cfg: AtlasConfig | None = None, sae_path: str | None = None,
                scratch: str | Path | None = None, tokens: np.ndarray | Tensor | None = None,
                heldout: ActivationStore | None = None) -> Atlas:
    """Stream `cfg.n_tokens` held-out tokens through `model` and `sae` and summarise every
    feature. `tokens`: the held-out rows to read, int [n_contexts context_len], for a caller
    that tokenised the text already (the first `contexts_for_tokens(cfg.n_tokens)` rows are
    read); default: those rows of `cfg.corpus` after its first `cfg.first_context`.
    `heldout`: a held-out store holding those rows' activations (`activations.store.heldout_store`):
    the contexts it holds are read from it, not run through the model.
    `scratch`: folder for the temporary code buffer (default: a temp dir)."""
    cfg = cfg or AtlasConfig()
    validate_hook(model, sae.cfg.hook_name)
    device = resolve_device(cfg.device) if cfg.device != "auto" else next(model.parameters()).device
    sae = sae.to(device).eval()
    tokens = _atlas_rows(cfg, model.tokenizer, tokens)
    ctx_len = tokens.shape[1]
    reader = HookActivations(model, sae.cfg.hook_name, heldout, cfg.first_context, first_position=first_position(sae))
    cfg = replace(cfg, autocast=reader.resolve_precision(cfg.autocast, tokens[:cfg.batch_contexts].to(device), len(tokens)))
    vocab_size = max(len(model.tokenizer), int(tokens.max()) + 1)
    scratch_dir = Path(tempfile.mkdtemp(prefix="atlas_codes_", dir=scratch))
    try:  # codes of sae.max_active_latents features per token go to the example buffer
        acc = Accumulator(sae.cfg.d_sae, cfg, vocab_size, len(tokens), ctx_len, sae.max_active_latents, scratch_dir)
        for start in tqdm(range(0, len(tokens), cfg.batch_contexts), desc="atlas", unit="batch"):
            batch = tokens[start:start + cfg.batch_contexts].to(device)
            acc.update(encode_activations(sae, reader(batch, start)).f, batch, start)
        acc.coalesce_tokens()
        acc.merge_candidates()
        atlas = _finish(acc, sae, model, cfg, tokens, len(tokens) * (ctx_len - 1), sae_path)
        atlas.meta["contexts_read_from_store"] = reader.read_from_store
        return atlas
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)


def _atlas_rows(cfg: AtlasConfig, tokenizer: PreTrainedTokenizerBase, tokens: np.ndarray | Tensor | None) -> Tensor:
    """The rows the atlas reads, long [n_contexts context_len]: the first ones of `tokens`
    when given, else of `cfg.corpus` after its first `cfg.first_context`."""
    ctx_len = cfg.corpus.context_len
    n_contexts = contexts_for_tokens(cfg.n_tokens, ctx_len)
    if tokens is None:
        tokens = load_contexts(cfg.corpus, tokenizer, max_contexts=cfg.first_context + n_contexts)[cfg.first_context:]
        if len(tokens) == 0:
            raise ValueError(f"no contexts left in the {cfg.corpus.split} split after the first {cfg.first_context}")
    if tokens.ndim != 2 or tokens.shape[1] != ctx_len or len(tokens) == 0:
        raise ValueError(f"the atlas reads token rows [n_contexts {ctx_len}] (cfg.corpus.context_len), not {tuple(tokens.shape)}")
    return torch.as_tensor(tokens[:n_contexts]).long()


def _finish(acc: Accumulator, sae: SAE, model: HookedModel, cfg: AtlasConfig, tokens: Tensor, n_tokens: int, sae_path: str | None) -> Atlas:
    """The atlas from the pass's statistics `acc`, with the static properties of every feature."""
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

    used = set(tokens.unique().tolist())
    used |= set(tensors["logit_top_ids"].unique().tolist()) | set(tensors["logit_bottom_ids"].unique().tolist())
    vocab = dict(zip(sorted(used), token_strings(model.tokenizer, sorted(used)), strict=True))
    meta = {
        "format": "saewb-atlas/1", "sae_path": sae_path, "hook_name": sae.cfg.hook_name, "model_name": sae.cfg.model_name,
        "d_sae": d_sae, "d_in": sae.cfg.d_in, "n_tokens": n_tokens, "n_contexts": len(tokens), "config": _jsonable(asdict(cfg)),
    }
    atlas = Atlas(meta, tensors, tokens.to(torch.int32), {k: v.cpu() for k, v in token_counts.items()}, vocab)
    atlas.meta["summary"] = density_clusters(atlas, sae.W_dec.detach().cpu())
    return atlas


def _jsonable(obj: object) -> object:
    """`obj` as JSON reads it back (tuples as lists, anything else JSON lacks as its str)."""
    return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


__all__ = ["Atlas", "AtlasConfig", "ExampleTable", "FeatureTokens", "RankedFeatures", "build_atlas", "load_atlas"]
