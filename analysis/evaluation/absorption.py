"""First-letter feature absorption (Chanin et al. 2024, "A is for Absorption"; SAEBench's
absorption metric, simplified to run on a CPU in a minute or two).

The model knows the first letter of a word token: a linear probe on the activations reads
it. An SAE ought to have a latent for "starts with s"; absorption is when that latent stays
silent on some s-words because a more specific latent (" snake") took the letter direction
into its own decoder row. Per letter L:

1. One logistic-regression probe per letter on the activations x reads "starts with L" on
   word tokens (a space then letters). Train and test tokens are split by *vocabulary*: the probe
   and the latents must generalise to words they never saw.
2. The letter's **main latents**: the latent whose firing best predicts L (F1 on the train
   words), plus up to two more while each raises the F1 of their OR by at least `min_gain`
   (so a letter split across latents is not mistaken for absorption).
3. On test tokens of letter L that the probe gets right, the **miss rate** is the share on
   which no main latent fires; such a token is **absorbed** when one other active latent,
   whose decoder row points along the probe (cosine >= `min_cosine`), writes at least
   `min_share` of the token's own probe-direction signal (x - mean) . p: the letter is still
   written, by a latent that is not the letter's.

The absorption rate is absorbed / probe-correct tokens, averaged over letters with enough
test tokens. Lower is better. Differences from SAEBench: one layer's probe, k <= 3 main
latents chosen by F1 instead of k-sparse probing, and no ablation step.
"""
from __future__ import annotations

import re
import string
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from activations.model import token_strings
from sae.base import SAE

from ..encoding import encode_contexts, first_position

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from activations.model import HookedModel

WORD = re.compile(r"^ [A-Za-z]{2,}$")
LETTERS = string.ascii_lowercase


@dataclass
class AbsorptionConfig:
    test_fraction: float = 0.3
    """Share of the word vocabulary held out for the test (by token id, not by occurrence)."""
    min_gain: float = 0.03
    """A further main latent must raise the F1 of the letter's OR by this much."""
    max_main: int = 3
    """Most main latents per letter."""
    min_cosine: float = 0.025
    """A latent writes the letter when its decoder row has at least this cosine with the probe (SAEBench's value)."""
    min_share: float = 0.4
    """Absorbed: one such latent writes this share of the token's own probe-direction signal."""
    min_test_tokens: int = 50
    """Letters with fewer probe-correct test tokens are not averaged."""
    probe_steps: int = 300
    batch_contexts: int = 16
    seed: int = 0


@dataclass
class LetterAbsorption:
    letter: str
    main_latents: list[int]
    main_f1: float
    """F1 of the main latents' OR for "starts with the letter", on the test words."""
    n_test: int
    """Probe-correct test tokens of the letter."""
    miss_rate: float
    absorption_rate: float


@dataclass
class AbsorptionResult:
    probe_accuracy: float
    """Held-out (test-vocabulary) accuracy of the first-letter probes (the most confident letter)."""
    n_word_tokens: int
    mean_absorption_rate: float
    mean_miss_rate: float
    mean_main_f1: float
    letters: list[LetterAbsorption] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def word_letters(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> Tensor:
    """First-letter class [vocab_size] of every token id: 0-25 for a space-led word of 2+
    letters, -1 for anything else."""
    strings = token_strings(tokenizer, list(range(vocab_size)))
    return torch.tensor([LETTERS.index(s[1].lower()) if WORD.match(s) else -1 for s in strings])


@torch.no_grad()
def collect_word_tokens(model: HookedModel, sae: SAE, tokens: Tensor, letters: Tensor,
                        batch_contexts: int = 16) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Activations x [words d_in], their feature activations f [words d_sae] (sparse COO), token
    ids [words] and letter classes [words] of the word tokens in contexts tokens [batch pos]."""
    xs, fs, ids = [], [], []
    first = first_position(sae)
    for b in tqdm(range(0, len(tokens), batch_contexts), desc="absorption: read word tokens"):
        batch = tokens[b:b + batch_contexts]
        x, f = encode_contexts(model, sae, batch.to(next(model.parameters()).device))
        batch = batch[:, first:].flatten()
        keep = letters[batch] >= 0
        xs.append(x[:, first:].flatten(0, 1)[keep].float().cpu())
        fs.append(f[:, first:].flatten(0, 1)[keep].cpu().to_sparse())
        ids.append(batch[keep])
    ids_all = torch.cat(ids)
    return torch.cat(xs), torch.cat(fs), ids_all, letters[ids_all]


def train_probe(x: Tensor, y: Tensor, steps: int = 300, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """One binary logistic regression per letter ("starts with c" against the rest, as in
    SAEBench; a multinomial probe's rows also encode "not the other letters", which no single
    latent writes), fitted together on standardised x (n d_in) with classes y (n,).
    Returns (weight (letters d_in) in x's own units, bias (letters,), mean (d_in,))."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    weight = (torch.randn(len(LETTERS), x.shape[1], generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(len(LETTERS), requires_grad=True)
    optimiser = torch.optim.Adam([weight, bias], lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            optimiser.zero_grad()
            targets = torch.nn.functional.one_hot(y, len(LETTERS)).float()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ weight.T + bias, targets) + 1e-4 * weight.pow(2).sum()
            loss.backward()
            optimiser.step()
    return (weight / std).detach(), bias.detach(), mean


def _f1(fires: Tensor, positive: Tensor) -> float:
    tp = float((fires & positive).sum())
    return 2 * tp / max(1.0, float(fires.sum() + positive.sum()))


def main_latents(fires: Tensor, positive: Tensor, cfg: AbsorptionConfig, candidates: int = 20) -> tuple[list[int], float]:
    """Greedy OR of latents predicting `positive` (n,) from fires bool (n d_sae): best by F1,
    then more while each adds `min_gain`. Returns (latents, F1 of their OR)."""
    fires_f = fires.float()
    tp = positive.float() @ fires_f
    f1 = 2 * tp / (fires_f.sum(0) + positive.sum()).clamp_min(1)
    order = f1.argsort(descending=True)[:candidates].tolist()
    chosen, union, best = [order[0]], fires[:, order[0]].clone(), float(f1[order[0]])
    while len(chosen) < cfg.max_main:
        gains = [(_f1(union | fires[:, j], positive), j) for j in order if j not in chosen]
        score, j = max(gains)
        if score < best + cfg.min_gain:
            break
        chosen.append(j)
        union |= fires[:, j]
        best = score
    return chosen, best


@torch.no_grad()
def first_letter_absorption(model: HookedModel, sae: SAE, tokens: Tensor, cfg: AbsorptionConfig | None = None) -> AbsorptionResult:
    """Absorption of first-letter features by `sae`, read on held-out contexts tokens [batch pos]."""
    cfg = cfg or AbsorptionConfig()
    letters = word_letters(model.tokenizer, int(tokens.max()) + 1)
    x, f_sparse, ids, y = collect_word_tokens(model, sae, tokens, letters, cfg.batch_contexts)
    if len(y) < 1000:
        raise ValueError(f"only {len(y)} word tokens in {len(tokens)} contexts: absorption needs more text")
    vocab = ids.unique()
    held = vocab[torch.randperm(len(vocab), generator=torch.Generator().manual_seed(cfg.seed))[:int(len(vocab) * cfg.test_fraction)]]
    return score_absorption(x, f_sparse.to_dense(), y, torch.isin(ids, held), sae.W_dec.detach().float().cpu(), cfg)


def score_absorption(x: Tensor, f: Tensor, y: Tensor, test: Tensor, w_dec: Tensor, cfg: AbsorptionConfig) -> AbsorptionResult:
    """The metric from word tokens' activations x (n d_in), feature activations f (n d_sae),
    letter classes y (n,), the test-vocabulary mask test (n,) and the decoder w_dec (d_sae d_in)."""
    weight, bias, mean = train_probe(x[~test], y[~test], cfg.probe_steps, cfg.seed)
    logits = (x[test] - mean) @ weight.T + bias  # (test letters)
    predicted = logits.argmax(-1)
    probe_accuracy = float((predicted == y[test]).float().mean())
    fires = f > 0
    probe_dirs = torch.nn.functional.normalize(weight, dim=-1)  # (letters d_in)
    cosine = torch.nn.functional.normalize(w_dec, dim=-1) @ probe_dirs.T  # (d_sae letters)
    projection = w_dec @ probe_dirs.T  # what a unit activation of each latent writes along each probe direction

    results = []
    test_rows = test.nonzero().squeeze(1)
    for c, letter in enumerate(LETTERS):
        positive_train = y[~test] == c
        if positive_train.sum() < 10:
            continue
        latents, _ = main_latents(fires[~test], positive_train, cfg)
        main_f1 = _f1(fires[test][:, latents].any(1), y[test] == c)
        rows = test_rows[(y[test] == c) & (logits[:, c] > 0)]  # the letter's probe says yes
        if len(rows) < cfg.min_test_tokens:
            continue
        missed = ~fires[rows][:, latents].any(1)
        signal = (x[rows] - mean) @ probe_dirs[c]  # how strongly the token's activation reads as the letter
        writers = cosine[:, c] >= cfg.min_cosine
        top_write = (f[rows] * projection[:, c] * writers).max(1).values  # the strongest single letter-writing latent
        absorbed = missed & (signal > 0) & (top_write >= cfg.min_share * signal)
        results.append(LetterAbsorption(letter, latents, round(main_f1, 4), len(rows), float(missed.float().mean()),
                                        float(absorbed.float().mean())))
    if not results:
        raise ValueError("no letter had enough probe-correct test tokens; read more contexts")
    mean_of = lambda name: sum(getattr(r, name) for r in results) / len(results)  # noqa: E731
    return AbsorptionResult(probe_accuracy, len(y), mean_of("absorption_rate"), mean_of("miss_rate"), mean_of("main_f1"), results)


__all__ = ["AbsorptionConfig", "AbsorptionResult", "LetterAbsorption", "first_letter_absorption", "main_latents", "score_absorption",
           "train_probe", "word_letters"]
