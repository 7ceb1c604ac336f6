"""Scoring every candidate label on held-out text, and the whole labelling job.

Labels are made from the atlas (its contexts) and scored on *other* held-out contexts (the
ones after the atlas's): precision = P(fires | predicate), recall = P(predicate | fires),
F1; recall per activation quartile (activation / max activation in [0, .25) ... [.75, 1]);
false-positive rates on random negatives (every non-firing position of the scoring text) and
on hard negatives (non-firing positions whose token is one the feature fires on in the
atlas). Each feature keeps its best label by held-out F1 and all the scores.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from activations.corpus import load_contexts
from activations.model import HookedModel
from sae.base import SAE

from ...encoding import encode_contexts
from ..atlas import Atlas
from .base import KINDS, Label, LabelContext, Scores, token_membership
from .config import LabelConfig, saved_config
from .store import FeatureLabels, Labels, LabelSummary, ScoredOn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

QUARTILE_EDGES = (0.25, 0.5, 0.75)
N_HARD_TOKENS = 20
"""Hard negatives: positions whose token is one of the feature's this-many most frequent in the atlas."""


class Scorer:
    """Counts, for every label at once, TP/FP/FN, recall per activation quartile and false
    positives on hard negatives, over batches of scoring text. Each kind compiles its labels'
    predicates once (`LabelKind.compile`), so a batch costs a few gathers per kind."""

    def __init__(self, labels: Sequence[Label], atlas: Atlas, tokenizer: PreTrainedTokenizerBase | None = None):
        self.labels, self.atlas, self.d_sae = list(labels), atlas, atlas.d_sae
        by_kind: dict[str, list[int]] = {}
        for n, label in enumerate(self.labels):
            by_kind.setdefault(label.kind, []).append(n)
        self.groups = []  # (predicate over this kind's labels, their indices, their features)
        for name, index in by_kind.items():
            if name not in KINDS:
                raise ValueError(f"no predicate for a label of kind {name!r}")
            predicate = KINDS[name].compile([self.labels[n] for n in index], tokenizer)
            self.groups.append((predicate, torch.tensor(index), torch.tensor([self.labels[n].feature for n in index])))
        self.hard = token_membership([atlas.feature_tokens(i)[0][:N_HARD_TOKENS].tolist() for i in range(self.d_sae)])
        n = len(self.labels)
        self.tp, self.fp, self.fn, self.fp_hard = (torch.zeros(n, dtype=torch.int64) for _ in range(4))
        self.tp_quartile = torch.zeros(4, n, dtype=torch.int64)
        self.fires_quartile = torch.zeros(4, self.d_sae, dtype=torch.int64)
        self.fires, self.negatives, self.hard_negatives = (torch.zeros(self.d_sae, dtype=torch.int64) for _ in range(3))
        self.n_positions = 0

    def update(self, f: Tensor, tokens: Tensor) -> None:
        """Count one batch: activations `f` [batch pos d_sae] of token ids `tokens` [batch pos].
        Position 0 (the sink) is not scored."""
        fires = f[:, 1:] > 0
        quartile = torch.bucketize(f[:, 1:] / self.atlas.max_activation.clamp_min(1e-8), torch.tensor(QUARTILE_EDGES))
        code = torch.where(fires, quartile, 4).to(torch.int8)  # activation quartile of each firing; 4: not firing
        hard = self.hard(tokens[:, 1:]) & ~fires
        n_fires = fires.sum((0, 1))
        self.n_positions += fires.shape[0] * fires.shape[1]
        self.fires += n_fires
        self.negatives += (~fires).sum((0, 1))
        self.hard_negatives += hard.sum((0, 1))
        for q in range(4):
            self.fires_quartile[q] += (code == q).sum((0, 1))
        for predicate, index, features in self.groups:
            pred = predicate(tokens)[:, 1:]  # [batch pos-1 label]
            code_k = code[..., features]
            tp_quartile = torch.stack([(pred & (code_k == q)).sum((0, 1)) for q in range(4)])
            tp = tp_quartile.sum(0)  # every firing is in one quartile
            self.tp_quartile[:, index] += tp_quartile
            self.tp[index] += tp
            self.fp[index] += pred.sum((0, 1)) - tp
            self.fn[index] += n_fires[features] - tp
            self.fp_hard[index] += (pred & hard[..., features]).sum((0, 1))

    def scores(self) -> list[Scores]:
        """The scores of each label, in the order the labels were given."""
        features = torch.tensor([label.feature for label in self.labels], dtype=torch.long)
        tp, fp, fn = self.tp.double(), self.fp.double(), self.fn.double()
        precision = (tp / (tp + fp).clamp_min(1)).tolist()
        recall = (tp / (tp + fn).clamp_min(1)).tolist()
        f1 = (2 * tp / (2 * tp + fp + fn).clamp_min(1)).tolist()
        quartile_fires = self.fires_quartile[:, features]
        recall_q = (self.tp_quartile.double() / quartile_fires.double().clamp_min(1)).T.tolist()
        has_quartile = (quartile_fires > 0).T.tolist()
        fpr_random = (fp / self.negatives[features].double().clamp_min(1)).tolist()
        hard_negatives = self.hard_negatives[features]
        fpr_hard = (self.fp_hard.double() / hard_negatives.double().clamp_min(1)).tolist()
        has_hard = (hard_negatives > 0).tolist()
        return [
            Scores(f1=round(f1[n], 4), precision=round(precision[n], 4), recall=round(recall[n], 4),
                   recall_by_quartile=[round(v, 4) if ok else None for v, ok in zip(recall_q[n], has_quartile[n])],
                   fpr_random=round(fpr_random[n], 6), fpr_hard=round(fpr_hard[n], 4) if has_hard[n] else None)
            for n in range(len(self.labels))
        ]

    def results(self) -> list[FeatureLabels | None]:
        """Per feature: its scored candidates, best held-out F1 first (None: no candidate)."""
        per_feature: list[list[Label]] = [[] for _ in range(self.d_sae)]
        for label, scores in zip(self.labels, self.scores()):
            per_feature[label.feature].append(replace(label, scores=scores))
        fires = self.fires.tolist()
        out: list[FeatureLabels | None] = []
        for i, scored in enumerate(per_feature):
            scored.sort(key=lambda label: -label.scores.f1)  # stable: equals keep their kinds' rank order
            out.append(FeatureLabels(scored[0], scored, fires[i]) if scored else None)
        return out


# ---------------------------------------------------------------------------- the whole job
@torch.no_grad()
def label_features(atlas: Atlas, sae: SAE, model: HookedModel, cfg: LabelConfig | None = None) -> Labels:
    """Make every registered kind of label for every live feature from `atlas`, score them on
    held-out contexts that follow the atlas's, and return the `Labels` (save them with
    `save_labels`)."""
    cfg = cfg or LabelConfig()
    if sae.cfg.d_sae != atlas.d_sae or sae.cfg.hook_name != atlas.hook_name:
        raise ValueError(f"atlas is of a {atlas.d_sae}-feature SAE at {atlas.hook_name}, not this one ({sae.cfg.d_sae} at {sae.cfg.hook_name})")
    device = next(model.parameters()).device
    sae = sae.to(device).eval()
    atlas_cfg = atlas.config
    corpus = atlas_cfg.corpus
    first = atlas_cfg.first_context + atlas.n_contexts
    tokens = torch.from_numpy(load_contexts(corpus, model.tokenizer, max_contexts=first + cfg.n_score_contexts)[first:]).long()
    if len(tokens) < min(16, cfg.n_score_contexts):
        raise ValueError(f"only {len(tokens)} held-out contexts follow the atlas's {first}: labels need unseen text to be scored on; "
                         "build the atlas on fewer tokens")

    context = LabelContext(sae, model, cfg)
    candidates = [label for kind in KINDS.values() for label in kind.candidates(atlas, context)]
    scorer = Scorer(candidates, atlas, model.tokenizer)
    for start in tqdm(range(0, len(tokens), cfg.batch_contexts), desc="labels: scoring", unit="batch"):
        batch = tokens[start:start + cfg.batch_contexts]
        scorer.update(encode_contexts(model, sae, batch.to(device), cfg.autocast).f.cpu(), batch)
    features = scorer.results()
    return Labels(features, summarize(features, scorer.n_positions, atlas), saved_config(cfg), ScoredOn(corpus, first, len(tokens)))


def summarize(features: list[FeatureLabels | None], n_positions: int, atlas: Atlas) -> LabelSummary:
    live = [f for f in features if f is not None]
    scored = [f for f in live if f.held_out_fires > 0]
    by_kind: dict[str, int] = {}
    for f in scored:
        if f.best.scores.f1 >= 0.5:
            by_kind[f.best.kind] = by_kind.get(f.best.kind, 0) + 1
    good = sum(f.best.scores.f1 >= 0.5 for f in live)
    return LabelSummary(
        held_out_positions=n_positions, live_features=len(live), scored_features=len(scored), best_f1_at_least_half=good,
        share_of_live_with_f1_at_least_half=round(good / max(len(live), 1), 4),
        median_best_f1=round(float(np.median([f.best.scores.f1 for f in live])) if live else 0.0, 4),
        best_kind_counts=by_kind, atlas_tokens=atlas.n_tokens,
    )


__all__ = ["QUARTILE_EDGES", "Scorer", "label_features", "summarize"]
