"""Scoring every candidate label on held-out text, and the whole labelling job.

Labels are made from the atlas (its contexts) and scored on *other* held-out contexts (the
ones after the atlas's): precision = P(fires | predicate), recall = P(predicate | fires),
F1; recall per activation quartile (activation / max activation in [0, .25) ... [.75, 1]);
false-positive rates on random negatives (every non-firing position of the scoring text) and
on hard negatives (non-firing positions whose token is one the feature fires on in the
atlas). Each feature keeps its best label by held-out F1 and all the scores.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from activations.corpus import boundary_token_id, load_contexts
from activations.model import HookedModel
from activations.precision import resolve_autocast
from activations.store import ActivationStore
from sae.base import SAE

from ...encoding import HookActivations, encode_activations, first_position
from ..atlas import Atlas
from .base import KINDS, STRONG_SHARE, Label, LabelContext, Scores, token_membership
from .config import LabelConfig, saved_config
from .names import name_features
from .store import FeatureLabels, Labels, LabelSummary, ScoredOn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

QUARTILE_EDGES = (STRONG_SHARE, 0.5, 0.75)  # quartiles 1-3 are the strong firings
N_HARD_TOKENS = 20
"""Hard negatives: positions whose token is one of the feature's this-many most frequent in the atlas."""


MIN_SCORE_CONTEXTS = 16
"""The fewest held-out contexts labels are scored on (unless `LabelConfig.n_score_contexts` asks for fewer)."""

PARTS = ("selection", "report")
"""The scoring text is dealt out to two parts by document, alternately (`document_parts`):
each feature's label is chosen on the first and reported on the second, so the reported score
is not inflated by the choice among candidates, nor by text of the same document."""


def document_parts(tokens: Tensor, boundary: int) -> Tensor:
    """The part (0: selection, 1: report) of every position of packed contexts `tokens` [n pos]
    (`activations.corpus.pack_contexts`: each context is the boundary token, then the next
    `pos - 1` tokens of one stream whose documents end with the boundary token): documents
    alternate between the parts, in stream order, each document wholly in one part (a context's
    position 0 goes with its position 1)."""
    stream = tokens[:, 1:].reshape(-1)
    ends = (stream == boundary).long()
    document = ends.cumsum(0) - ends  # a document's closing boundary token is still its own
    parts = (document % len(PARTS)).view(len(tokens), -1)
    return torch.cat([parts[:, :1], parts], dim=1)


class _Counts:
    """TP / FP / FN per label, true positives and firings per activation quartile, and false
    positives on hard negatives, over the batches of one part of the scoring text."""

    def __init__(self, n_labels: int, d_sae: int):
        self.tp, self.fp, self.fn, self.fp_hard = (torch.zeros(n_labels, dtype=torch.int64) for _ in range(4))
        self.tp_quartile = torch.zeros(4, n_labels, dtype=torch.int64)
        self.fires_quartile = torch.zeros(4, d_sae, dtype=torch.int64)
        self.fires, self.negatives, self.hard_negatives = (torch.zeros(d_sae, dtype=torch.int64) for _ in range(3))
        self.n_positions = 0

    def scores(self, features: Tensor) -> list[Scores]:
        """The scores of labels whose features are `features` [label]."""
        tp, fp, fn = self.tp.double(), self.fp.double(), self.fn.double()
        precision = (tp / (tp + fp).clamp_min(1)).tolist()
        recall = (tp / (tp + fn).clamp_min(1)).tolist()
        f1 = (2 * tp / (2 * tp + fp + fn).clamp_min(1)).tolist()
        # strong firings: quartiles 1-3 (activation > max / 4) are the positives; quartile-0
        # firings are left out, so the false positives are the predictions on non-firing positions
        strong_tp = self.tp_quartile[1:].sum(0).double()
        strong_fn = self.fires_quartile[1:, features].sum(0).double() - strong_tp
        strong_precision = (strong_tp / (strong_tp + fp).clamp_min(1)).tolist()
        strong_recall = (strong_tp / (strong_tp + strong_fn).clamp_min(1)).tolist()
        strong_f1 = (2 * strong_tp / (2 * strong_tp + fp + strong_fn).clamp_min(1)).tolist()
        quartile_fires = self.fires_quartile[:, features]
        recall_q = (self.tp_quartile.double() / quartile_fires.double().clamp_min(1)).T.tolist()
        has_quartile = (quartile_fires > 0).T.tolist()
        fpr_random = (fp / self.negatives[features].double().clamp_min(1)).tolist()
        hard_negatives = self.hard_negatives[features]
        fpr_hard = (self.fp_hard.double() / hard_negatives.double().clamp_min(1)).tolist()
        has_hard = (hard_negatives > 0).tolist()
        return [
            Scores(f1=round(f1[n], 4), precision=round(precision[n], 4), recall=round(recall[n], 4),
                   strong_f1=round(strong_f1[n], 4), strong_precision=round(strong_precision[n], 4),
                   strong_recall=round(strong_recall[n], 4),
                   recall_by_quartile=[round(v, 4) if ok else None for v, ok in zip(recall_q[n], has_quartile[n], strict=True)],
                   fpr_random=round(fpr_random[n], 6), fpr_hard=round(fpr_hard[n], 4) if has_hard[n] else None)
            for n in range(len(features))
        ]


class Scorer:
    """Counts, for every label at once and for each part of the scoring text (`PARTS`),
    TP/FP/FN, recall per activation quartile and false positives on hard negatives. Each kind
    compiles its labels' predicates once (`LabelKind.compile`), so a batch costs a few gathers
    per kind. Positions before `first` (the sink, `analysis.encoding.first_position`) are not scored."""

    def __init__(self, labels: Sequence[Label], atlas: Atlas, tokenizer: PreTrainedTokenizerBase | None = None, first: int = 1):
        self.labels, self.atlas, self.d_sae, self.first = list(labels), atlas, atlas.d_sae, first
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
        self.features = torch.tensor([label.feature for label in self.labels], dtype=torch.long)
        self.parts = [_Counts(len(self.labels), self.d_sae) for _ in PARTS]

    @property
    def n_positions(self) -> int:
        return sum(part.n_positions for part in self.parts)

    def update(self, f: Tensor, tokens: Tensor, part: int | Tensor = 1) -> None:
        """Count one batch: activations `f` [batch pos d_sae] of token ids `tokens` [batch pos],
        into part `part` (0: selection, 1: report), or position by position when `part` is a
        tensor [batch pos] of part indices (`document_parts`). The predicates, quartiles and
        hard negatives are worked out once per batch, whatever the parts."""
        first = self.first
        f = f[:, first:]
        quartile = torch.bucketize(f / self.atlas.max_activation.clamp_min(1e-8), torch.tensor(QUARTILE_EDGES))
        hard_token = self.hard(tokens[:, first:])
        held = [predicate(tokens)[:, first:] for predicate, _, _ in self.groups]
        if isinstance(part, int):
            self._count(self.parts[part], f, quartile, hard_token, held, None)
        else:
            for index, counts in enumerate(self.parts):
                self._count(counts, f, quartile, hard_token, held, part[:, first:] == index)

    def _count(self, counts: _Counts, f: Tensor, quartile: Tensor, hard_token: Tensor, held: list[Tensor], where: Tensor | None) -> None:
        """Count the positions of `where` [batch pos] (every position when None) into `counts`:
        activations `f` [batch pos d_sae] and their `quartile`s, `hard_token` [batch pos d_sae]
        (the position's token is one of the feature's), and each group's predicate `held` [batch pos n]."""
        fires = f > 0
        if where is not None:
            fires = fires & where[..., None]
        code = torch.where(fires, quartile, 4).to(torch.int8)  # activation quartile of each firing; 4: not firing
        hard = hard_token & ~fires
        not_firing = ~fires
        if where is not None:
            hard, not_firing = hard & where[..., None], not_firing & where[..., None]
        n_fires = fires.sum((0, 1))
        counts.n_positions += fires.shape[0] * fires.shape[1] if where is None else int(where.sum())
        counts.fires += n_fires
        counts.negatives += not_firing.sum((0, 1))
        counts.hard_negatives += hard.sum((0, 1))
        for q in range(4):
            counts.fires_quartile[q] += (code == q).sum((0, 1))
        for (_, index, features), holds in zip(self.groups, held, strict=True):
            # Most predicates hold at few positions: count over the (position, label) pairs where
            # they hold, not over the dense [batch pos label] block (several times faster)
            b, p, label = (holds if where is None else holds & where[..., None]).nonzero(as_tuple=True)
            feature = features[label]
            by_code = torch.bincount(label * 5 + code[b, p, feature].long(), minlength=5 * len(index)).view(len(index), 5)
            tp_quartile = by_code[:, :4].T  # [4 label]
            tp = tp_quartile.sum(0)  # every firing is in one quartile
            counts.tp_quartile[:, index] += tp_quartile
            counts.tp[index] += tp
            counts.fp[index] += by_code[:, 4]  # predicted where the feature does not fire
            counts.fn[index] += n_fires[features] - tp
            counts.fp_hard[index] += torch.bincount(label[hard[b, p, feature]], minlength=len(index))

    def scores(self, part: int = 1) -> list[Scores]:
        """The scores of each label on part `part`, in the order the labels were given."""
        return self.parts[part].scores(self.features)

    def results(self) -> list[FeatureLabels | None]:
        """Per feature: its candidates with report-part `scores` and selection-part `selection`;
        the best is the compact candidate of highest selection strong-firing F1 (`best_all`: of
        highest all-firing F1), so the reported numbers are not the ones the choice was made on.
        None: no candidate."""
        per_feature: list[list[Label]] = [[] for _ in range(self.d_sae)]
        for label, report, selection in zip(self.labels, self.scores(1), self.scores(0), strict=True):
            per_feature[label.feature].append(replace(label, scores=report, selection=selection))
        fires = self.parts[1].fires.tolist()
        return [choose(scored, fires[i]) if scored else None for i, scored in enumerate(per_feature)]


def choose(candidates: list[Label], held_out_fires: int | None = None,
           compact: Callable[[Label], bool] = lambda label: label.compact) -> FeatureLabels:
    """A feature's labels from its scored candidates: best first by selection-part strong F1
    (`compact` ones before the rest; equals keep their kinds' rank order)."""
    def key(metric: str) -> Callable[[Label], tuple[bool, float]]:
        return lambda label: (not compact(label), -(getattr(label.selection or label.scores, metric) or 0.0))
    ordered = sorted(candidates, key=key("strong_f1"))
    best_all = min(candidates, key=key("f1"))
    return FeatureLabels(ordered[0], ordered, held_out_fires, best_all=best_all)


# ---------------------------------------------------------------------------- the whole job
@torch.no_grad()
def label_features(atlas: Atlas, sae: SAE, model: HookedModel, cfg: LabelConfig | None = None,
                   tokens: np.ndarray | Tensor | None = None, heldout: ActivationStore | None = None) -> Labels:
    """Make every registered kind of label for every live feature from `atlas`, score them on
    held-out contexts that follow the atlas's, and return the `Labels` (save them with
    `save_labels`). `tokens`: those contexts, int [n_contexts context_len], for a caller that
    tokenised the held-out text already (the rows right after the atlas's; the first
    `cfg.n_score_contexts` are read); default: loaded from the atlas's corpus. `heldout`: a
    held-out store holding their activations (`activations.store.heldout_store`), read instead
    of running the model on the contexts it holds."""
    cfg = cfg or LabelConfig()
    if sae.cfg.d_sae != atlas.d_sae or sae.cfg.hook_name != atlas.hook_name:
        raise ValueError(f"atlas is of a {atlas.d_sae}-feature SAE at {atlas.hook_name}, "
                         f"not this one ({sae.cfg.d_sae} at {sae.cfg.hook_name})")
    device = next(model.parameters()).device
    sae = sae.to(device).eval()
    corpus = atlas.config.corpus
    first = atlas.config.first_context + atlas.n_contexts
    if tokens is None:
        tokens = load_contexts(corpus, model.tokenizer, max_contexts=first + cfg.n_score_contexts)[first:]
    tokens = torch.as_tensor(tokens[:cfg.n_score_contexts]).long()
    if len(tokens) < min(MIN_SCORE_CONTEXTS, cfg.n_score_contexts):
        raise ValueError(f"only {len(tokens)} held-out contexts follow the atlas's {first}: labels need unseen text to be scored on; "
                         "build the atlas on fewer tokens")

    # the pattern labels re-run the model whatever the store holds: the precision is resolved for them too
    cfg = replace(cfg, autocast=resolve_autocast(cfg.autocast, model, tokens[:cfg.batch_contexts].to(device), [sae.cfg.hook_name],
                                                 first_position(sae)))
    reader = HookActivations(model, sae.cfg.hook_name, heldout, first, cfg.autocast, first_position(sae))
    context = LabelContext(sae, model, cfg)
    candidates = [label for kind in KINDS.values() for label in kind.candidates(atlas, context)]
    scorer = Scorer(candidates, atlas, model.tokenizer, first=first_position(sae))
    parts = document_parts(tokens, boundary_token_id(model.tokenizer))
    for start in tqdm(range(0, len(tokens), cfg.batch_contexts), desc="labels: scoring", unit="batch"):
        batch = tokens[start:start + cfg.batch_contexts]
        scorer.update(encode_activations(sae, reader(batch.to(device), start)).f.cpu(), batch, part=parts[start:start + cfg.batch_contexts])
    features = scorer.results()
    name_features(features, atlas, model, cfg.namer)
    summary = replace(summarize(features, scorer.n_positions, atlas),
                      positions_by_part={name: counts.n_positions for name, counts in zip(PARTS, scorer.parts, strict=True)})
    return Labels(features, summary, saved_config(cfg), ScoredOn(corpus, first, len(tokens)))


def summarize(features: list[FeatureLabels | None], n_positions: int, atlas: Atlas) -> LabelSummary:
    """Coverage of the labels, measured on the report part (`LabelSummary`)."""
    live = [f for f in features if f is not None]
    scored = [f for f in live if f.held_out_fires]
    n_live = max(len(live), 1)

    def at_least_half(label: Label | None, metric: str, part: str = "scores") -> bool:
        scores = None if label is None else getattr(label, part)
        return scores is not None and (getattr(scores, metric) or 0.0) >= 0.5

    def kind_counts(pick: Callable[[FeatureLabels], Label], metric: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for f in scored:
            if at_least_half(pick(f), metric):
                counts[pick(f).kind] = counts.get(pick(f).kind, 0) + 1
        return counts

    def lookup(f: FeatureLabels) -> Label | None:
        return next((c for c in f.candidates if not c.compact), None)

    strong_ok = [at_least_half(f.best, "strong_f1") and f.best.compact for f in live]
    all_ok = [at_least_half(f.best_all_firings, "f1") and f.best_all_firings.compact for f in live]
    any_ball = lambda label: label.compact or label.kind == "semantic"  # noqa: E731  the rule before ball sizes counted
    rechosen = [choose(f.candidates, f.held_out_fires, any_ball) for f in live]
    semantic_best = [min((c for c in f.candidates if c.kind == "semantic"),
                         key=lambda c: -((c.selection or c.scores).strong_f1 or 0.0), default=None) for f in live]
    balls = np.array([len(c.tokens) for c in semantic_best if at_least_half(c, "strong_f1")])
    unexplained = [f.feature for f, ok in zip(live, strong_ok, strict=True) if not ok]
    median = lambda values: round(float(np.median(values)), 4) if values else 0.0  # noqa: E731
    return LabelSummary(
        held_out_positions=n_positions, live_features=len(live), scored_features=len(scored), best_f1_at_least_half=sum(all_ok),
        share_of_live_with_f1_at_least_half=round(sum(all_ok) / n_live, 4),
        median_best_f1=median([f.best_all_firings.scores.f1 for f in live]),
        best_kind_counts=kind_counts(lambda f: f.best_all_firings, "f1"), atlas_tokens=atlas.n_tokens,
        share_strong_f1_at_least_half=round(sum(strong_ok) / n_live, 4),
        median_best_strong_f1=median([f.best.scores.strong_f1 or 0.0 for f in live]),
        strong_kind_counts=kind_counts(lambda f: f.best, "strong_f1"),
        selection_share_strong=round(sum(at_least_half(f.best, "strong_f1", "selection") for f in live) / n_live, 4),
        selection_share_all=round(sum(at_least_half(f.best_all_firings, "f1", "selection") for f in live) / n_live, 4),
        lookup_share_strong=round(sum(at_least_half(lookup(f), "strong_f1") for f in live) / n_live, 4),
        any_ball_share_strong=round(sum(at_least_half(f.best, "strong_f1") and any_ball(f.best) for f in rechosen) / n_live, 4),
        any_ball_share_all=round(sum(at_least_half(f.best_all_firings, "f1") and any_ball(f.best_all_firings) for f in rechosen) / n_live, 4),
        semantic_ball_sizes=ball_sizes(balls),
        unexplained=len(unexplained), unexplained_examples=unexplained[:: max(1, len(unexplained) // 12)][:12],
    )


def ball_sizes(sizes: np.ndarray) -> dict[str, float]:
    """Count, median, quartiles and the number above 64 and 200 tokens of ball sizes [n]."""
    if not len(sizes):
        return {"count": 0}
    q1, median, q3 = (float(v) for v in np.percentile(sizes, [25, 50, 75]))
    return {"count": int(len(sizes)), "median": median, "q1": q1, "q3": q3, "max": int(sizes.max()),
            "over_64": int((sizes > 64).sum()), "over_200": int((sizes > 200).sum())}


__all__ = ["MIN_SCORE_CONTEXTS", "ball_sizes", "document_parts", "PARTS", "QUARTILE_EDGES", "Scorer", "choose", "label_features", "summarize"]
