"""Held-out means a feature graph's decomposition is relative to (the residual, each feature's
activation and the token embedding; on the transcoder basis, each transcoder feature's activation
and each block's error), and their cache.

The cache is keyed on content: the model's name, the hooks, the SAEs' weights (a sha256 of
their tensors), the corpus, the number of tokens and the first position. A stack retrained into
the same folders has other weights, so its means are measured again.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from activations.corpus import CorpusConfig, contexts_for_tokens, describe, heldout_corpus, load_contexts
from activations.io import atomic_save_safetensors
from activations.model import HookedModel
from sae import SAE

from ..encoding import first_position
from .config import GraphConfig
from .replacement import ReplacementModel, TranscoderSet
from .runner import ResidualRunner
from .stack import SAEStack


@dataclass
class StackMeans:
    """Held-out means the decomposition is relative to."""

    resid: list[Tensor]
    """[d_model] per hook of the stack."""
    features: list[Tensor]
    """[d_sae] per hook: mean activation, zeros included."""
    embed: Tensor
    """[d_model] mean token embedding."""
    n_tokens: int
    corpus: str

    def subset(self, indices: list[int]) -> StackMeans:
        """The means of the hooks at `indices` (`SAEStack.subset`)."""
        return replace(self, resid=[self.resid[i] for i in indices], features=[self.features[i] for i in indices])


def weights_sha256(sae: SAE) -> str:
    """Hex sha256 of an SAE's weights: every parameter and saved extra tensor (the tensors of
    sae_weights.safetensors), by name, with dtype and shape."""
    tensors = {name: p for name, p in sae.named_parameters()} | sae.extra_tensors()
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().float().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def means_key(stack: SAEStack, corpus: CorpusConfig, n_tokens: int) -> dict[str, str]:
    """What the means depend on, as the cache file's metadata (str -> str)."""
    return {"model": str(stack.model_name), "hooks": json.dumps(stack.hooks), "n_tokens": str(n_tokens), "corpus": describe(corpus),
            "first": str(first_position(stack.saes[0])), "weights": json.dumps([weights_sha256(s) for s in stack.saes])}


def stack_means(model: HookedModel, stack: SAEStack, corpus: CorpusConfig | None = None, n_tokens: int = GraphConfig.mean_tokens,
                batch_contexts: int = 8, cache: str | Path | None = None) -> StackMeans:
    """Mean residual, feature activations and embedding over `n_tokens` held-out tokens (positions
    >= 1), one pass through the model; cached in `cache` (a safetensors file) when given."""
    corpus = corpus or heldout_corpus(stack.saes[0].training_data, None, stack.saes[0].cfg.context_size)
    key = means_key(stack, corpus, n_tokens)
    if cache is not None and (cached := _read_cache(Path(cache), key, len(stack), n_tokens)) is not None:
        return cached
    means = _measure(model, stack, corpus, n_tokens, batch_contexts)
    if cache is not None:
        tensors = {f"resid.{i}": t for i, t in enumerate(means.resid)} | {f"features.{i}": t for i, t in enumerate(means.features)}
        atomic_save_safetensors(tensors | {"embed": means.embed}, Path(cache), metadata=key)
    return means


def _cached_tensors(path: Path, key: dict[str, str]) -> dict[str, Tensor] | None:
    """The tensors in `path` when it was written for `key`, else None."""
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        if f.metadata() != key:
            return None
    return load_file(str(path))


def _read_cache(path: Path, key: dict[str, str], n_hooks: int, n_tokens: int) -> StackMeans | None:
    """The means in `path` when it was written for `key`, else None."""
    if (t := _cached_tensors(path, key)) is None:
        return None
    return StackMeans([t[f"resid.{i}"] for i in range(n_hooks)], [t[f"features.{i}"] for i in range(n_hooks)], t["embed"], n_tokens,
                      key["corpus"])


def _heldout_rows(model: HookedModel, corpus: CorpusConfig, n_tokens: int, first: int) -> Tensor:
    """The held-out contexts [n_contexts context_len] (int64) that hold `n_tokens` tokens from position `first` on."""
    n_contexts = contexts_for_tokens(n_tokens, corpus.context_len, first)
    tokens = torch.from_numpy(load_contexts(corpus, model.tokenizer, max_contexts=n_contexts)).long()
    if len(tokens) == 0:
        raise ValueError(f"{describe(corpus)} is empty: no text for the held-out means")
    return tokens


@torch.no_grad()
def _measure(model: HookedModel, stack: SAEStack, corpus: CorpusConfig, n_tokens: int, batch_contexts: int) -> StackMeans:
    """One pass over the held-out tokens: the sums of the residual, features and embedding (float64)."""
    runner = ResidualRunner(model)
    device = next(model.parameters()).device
    first = first_position(stack.saes[0])
    tokens = _heldout_rows(model, corpus, n_tokens, first)
    sums = [torch.zeros(stack.saes[0].cfg.d_in, dtype=torch.float64) for _ in stack.saes]
    fsums = [torch.zeros(s.cfg.d_sae, dtype=torch.float64) for s in stack.saes]
    esum, count = torch.zeros(stack.saes[0].cfg.d_in, dtype=torch.float64), 0
    for b in tqdm(range(0, len(tokens), batch_contexts), desc="held-out means"):
        batch = tokens[b:b + batch_contexts].to(device)
        walk = runner.walk(batch, stack.depths)
        esum += next(walk)[:, first:].double().sum((0, 1)).cpu()
        for i, (sae, resid) in enumerate(zip(stack.saes, walk)):
            x = resid[:, first:].float()
            sums[i] += x.double().sum((0, 1)).cpu()
            fsums[i] += sae.encode(x).double().sum((0, 1)).cpu()
        count += batch[:, first:].numel()
    return StackMeans([(s / count).float() for s in sums], [(s / count).float() for s in fsums], (esum / count).float(), count,
                      describe(corpus))


@dataclass
class TranscoderMeans:
    """Held-out means of a transcoder replacement: what a removed node is set to on the transcoder basis."""

    codes: Tensor
    """[n_layers d_sae] each feature's mean activation (zeros included), positions >= 1."""
    errors: Tensor
    """[n_layers d_model] each block's mean error: the real MLP's output minus its transcoder's."""
    n_tokens: int
    """Tokens averaged over (whole contexts: at least the number asked for)."""
    corpus: str


def transcoder_means(model: HookedModel, transcoders: TranscoderSet, corpus: CorpusConfig | None = None,
                     n_tokens: int = GraphConfig.mean_tokens, batch_contexts: int = 8, cache: str | Path | None = None) -> TranscoderMeans:
    """Mean feature activations and errors of every block's transcoder over `n_tokens` held-out tokens (positions >= 1),
    one pass through the model; cached in `cache` (a safetensors file, keyed on the model, the corpus, the number of
    tokens and the transcoders' weights) when given."""
    first = transcoders.transcoders[0]
    corpus = corpus or heldout_corpus(first.training_data, None, first.cfg.context_size)
    key = {"model": str(transcoders.model_name), "n_tokens": str(n_tokens), "corpus": describe(corpus), "basis": "transcoder",
           "weights": json.dumps([weights_sha256(tc) for tc in transcoders.transcoders])}
    if cache is not None and (t := _cached_tensors(Path(cache), key)) is not None and "count" in t:
        return TranscoderMeans(t["codes"], t["errors"], int(t["count"]), key["corpus"])
    means = _measure_transcoders(model, transcoders, corpus, n_tokens, batch_contexts)
    if cache is not None:
        atomic_save_safetensors({"codes": means.codes, "errors": means.errors, "count": torch.tensor(means.n_tokens)}, Path(cache),
                                metadata=key)
    return means


@torch.no_grad()
def _measure_transcoders(model: HookedModel, transcoders: TranscoderSet, corpus: CorpusConfig, n_tokens: int,
                         batch_contexts: int) -> TranscoderMeans:
    """One pass over the held-out tokens, every block's MLP read: the sums of codes and errors (float64)."""
    rm = ReplacementModel(model, transcoders)
    device = next(model.parameters()).device
    transcoders.to(device)
    tokens = _heldout_rows(model, corpus, n_tokens, 1)
    code_sums = torch.zeros(len(transcoders), transcoders.transcoders[0].cfg.d_sae, dtype=torch.float64)
    error_sums = torch.zeros(len(transcoders), transcoders.transcoders[0].cfg.d_out, dtype=torch.float64)
    count = 0

    def read(layer: int, m_in: Tensor, real: Tensor) -> Tensor:
        tc = transcoders.transcoders[layer]
        f = tc.encode(m_in[:, 1:].float())
        code_sums[layer] += f.double().sum((0, 1)).cpu()
        error_sums[layer] += (real[:, 1:].float() - tc.decode(f) - tc.skip(m_in[:, 1:].float())).double().sum((0, 1)).cpu()
        return real

    for b in tqdm(range(0, len(tokens), batch_contexts), desc="held-out transcoder means"):
        batch = tokens[b:b + batch_contexts].to(device)
        rm.spliced_logits(batch, read)
        count += batch[:, 1:].numel()
    return TranscoderMeans((code_sums / count).float(), (error_sums / count).float(), count, describe(corpus))


__all__ = ["StackMeans", "TranscoderMeans", "means_key", "stack_means", "transcoder_means", "weights_sha256"]
