"""Label scoring: strong-firing F1 against a brute force, the split between the part a label is
chosen on and the part it is reported on, and compact labels before lookup tables."""
import pytest
import torch

from analysis.features.labels import Scorer
from analysis.features.labels.base import MAX_LISTED_TOKENS, STRONG_SHARE
from analysis.features.labels.score import summarize
from analysis.features.labels.token_set import TokenLabel

from .test_labels import setup  # noqa: F401  (the tiny atlas fixture)


def synthetic(atlas, n=6, pos=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 40, (n, pos), generator=g)
    f = torch.rand(n, pos, atlas.d_sae, generator=g) * atlas.max_activation * 1.2
    f[torch.rand(n, pos, atlas.d_sae, generator=g) < 0.6] = 0  # sparse
    return f, tokens


def token_label(feature, tokens):
    return TokenLabel(kind="token-set", feature=feature, tokens=tokens)


def test_strong_and_all_firing_scores_match_a_brute_force(setup):  # noqa: F811
    _, atlas, _ = setup
    f, tokens = synthetic(atlas)
    labels = [token_label(i, list(range(i % 7, 40, 3))) for i in atlas.live_features[:8]]
    scorer = Scorer(labels, atlas)
    scorer.update(f[:3], tokens[:3])
    scorer.update(f[3:], tokens[3:])
    for label, scores in zip(labels, scorer.scores()):
        a, t = f[:, 1:, label.feature], tokens[:, 1:]
        pred = torch.isin(t, torch.tensor(label.tokens))
        fires, strong = a > 0, a > STRONG_SHARE * atlas.max_activation[label.feature]
        tp, fp, fn = int((pred & fires).sum()), int((pred & ~fires).sum()), int((~pred & fires).sum())
        s_tp, s_fn = int((pred & strong).sum()), int((~pred & strong).sum())  # weak firings: in neither count
        assert scores.f1 == pytest.approx(2 * tp / max(2 * tp + fp + fn, 1), abs=1e-4)
        assert scores.strong_f1 == pytest.approx(2 * s_tp / max(2 * s_tp + fp + s_fn, 1), abs=1e-4)
        assert scores.strong_precision == pytest.approx(s_tp / max(s_tp + fp, 1), abs=1e-4)
        assert scores.strong_recall == pytest.approx(s_tp / max(s_tp + s_fn, 1), abs=1e-4)
        assert scores.strong_f1 != scores.f1  # the two ways differ on this text


def test_the_label_is_chosen_on_one_part_and_reported_on_the_other(setup):  # noqa: F811
    _, atlas, _ = setup
    feature = atlas.live_features[0]
    f, tokens = synthetic(atlas, n=8)
    f[..., feature] = 0
    f[:4, :, feature] = torch.where(tokens[:4] < 5, atlas.max_activation[feature], 0.0)  # selection part: tokens 0-4
    f[4:, :, feature] = torch.where(tokens[4:] >= 35, atlas.max_activation[feature], 0.0)  # report part: tokens 35-39
    fits_selection, fits_report = token_label(feature, [0, 1, 2, 3, 4]), token_label(feature, [35, 36, 37, 38, 39])
    scorer = Scorer([fits_report, fits_selection], atlas)
    scorer.update(f[:4], tokens[:4], part=0)
    scorer.update(f[4:], tokens[4:], part=1)
    entry = scorer.results()[feature]
    assert entry.best.tokens == fits_selection.tokens  # chosen where it fits ...
    assert entry.best.selection.strong_f1 == 1.0 and entry.best.scores.strong_f1 == 0.0  # ... and reported where it does not
    summary = summarize(scorer.results(), scorer.n_positions, atlas)
    assert summary.selection_share_strong > summary.share_strong_f1_at_least_half  # the selection gain shows


def test_lookup_tables_are_kept_but_never_chosen_or_counted(setup):  # noqa: F811
    _, atlas, _ = setup
    feature = atlas.live_features[0]
    f, tokens = synthetic(atlas)
    f[..., feature] = torch.where(tokens < 30, atlas.max_activation[feature], 0.0)
    table = token_label(feature, list(range(30)))  # perfect, but 30 listed tokens
    compact = token_label(feature, list(range(4)))  # compact, but explains 4 of the 30 tokens
    assert not table.compact and compact.compact and token_label(feature, list(range(MAX_LISTED_TOKENS))).compact
    scorer = Scorer([table, compact], atlas)
    scorer.update(f[:3], tokens[:3], part=0)
    scorer.update(f[3:], tokens[3:], part=1)
    entry = scorer.results()[feature]
    assert entry.best.tokens == compact.tokens and entry.candidates[-1].tokens == table.tokens
    assert table.scores is None and entry.candidates[-1].scores.strong_f1 == 1.0
    summary = summarize(scorer.results(), scorer.n_positions, atlas)
    assert summary.lookup_share_strong > 0 and summary.unexplained >= 1  # counted apart, the feature is still unexplained


def test_labelling_names_every_labelled_feature_and_writes_the_coverage_page(setup, tiny_model, tmp_path):  # noqa: F811
    from analysis.features.labels import LabelConfig, label_features, write_coverage_report

    sae, atlas, _ = setup
    labels = label_features(atlas, sae, tiny_model, LabelConfig(n_score_contexts=20, autocast="none"))
    live = [e for e in labels.features if e is not None]
    assert live and all(e.best.name and e.best_all_firings.name for e in live)
    assert all(e.best.compact and e.best.selection is not None and e.best.scores is not None for e in live)
    s = labels.summary
    assert s.unexplained == sum(not (e.best.scores.strong_f1 >= 0.5) for e in live)
    live[0].best.text = "<script>alert(1)</script>"  # model text reaches the page escaped
    s.unexplained_examples = [live[0].feature]
    page = write_coverage_report(labels, tmp_path / "coverage.html").read_text()
    assert "plotly" in page and "Unexplained features" in page
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)" in page


def test_the_split_keeps_every_document_in_one_part():
    from analysis.features.labels.score import document_parts

    boundary = 0
    lengths = [5, 30, 3, 12, 40, 7, 9, 2, 25]  # tokens per document, each closed by the boundary token
    stream = torch.cat([torch.cat([torch.arange(1, n + 1), torch.tensor([boundary])]) for n in lengths])
    body = 15
    stream = stream[:len(stream) // body * body]
    tokens = torch.cat([torch.zeros(len(stream) // body, 1, dtype=torch.long), stream.view(-1, body)], dim=1)  # packed contexts
    parts = document_parts(tokens, boundary)
    document = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths) + 1)[:len(stream)].view(-1, body)
    for d in document.unique():
        assert len(parts[:, 1:][document == d].unique()) == 1  # a document spanning contexts stays in one part
    assert torch.equal(parts[:, 1:], document % 2)  # documents alternate
    assert torch.equal(parts[:, 0], parts[:, 1])


def test_scoring_by_document_parts_equals_scoring_each_part_alone(setup):  # noqa: F811
    _, atlas, _ = setup
    f, tokens = synthetic(atlas, n=6)
    labels = [token_label(i, list(range(i % 5, 40, 4))) for i in atlas.live_features[:6]]
    parts = (torch.arange(tokens.shape[1]) >= 9).long().expand_as(tokens).clone()  # a split inside every context
    split = Scorer(labels, atlas)
    split.update(f, tokens, part=parts)
    for index in (0, 1):  # the same counts as zeroing out the other part by hand
        keep = parts == index
        by_hand = Scorer(labels, atlas)
        g = f.clone()
        g[~keep] = 0
        by_hand.update(g, torch.where(keep, tokens, 10_000), part=index)
        assert [s.f1 for s in split.scores(index)] == [s.f1 for s in by_hand.scores(index)]
        assert [s.strong_f1 for s in split.scores(index)] == [s.strong_f1 for s in by_hand.scores(index)]
    assert split.n_positions == parts[:, 1:].numel()


def test_a_semantic_label_is_compact_only_when_its_ball_is_small_enough_to_read():
    from analysis.features.labels.base import KINDS
    from analysis.features.labels.semantic import SemanticKind, SemanticLabel

    kind = KINDS["semantic"]
    small = SemanticLabel(kind="semantic", feature=0, prototype_tokens=[1, 2], radius=0.5, tokens=list(range(SemanticKind.MAX_COMPACT_BALL)))
    large = SemanticLabel(kind="semantic", feature=0, prototype_tokens=[1, 2], radius=0.4,
                          tokens=list(range(SemanticKind.MAX_COMPACT_BALL + 1)))
    assert SemanticKind.MAX_COMPACT_BALL == 64 and kind.is_compact(small) and not kind.is_compact(large)


def test_the_headline_is_shown_both_ways_when_semantic_balls_are_large(setup):  # noqa: F811
    from analysis.features.labels.semantic import SemanticLabel

    _, atlas, _ = setup
    feature = atlas.live_features[0]
    f, tokens = synthetic(atlas)
    f[..., feature] = torch.where(tokens < 30, atlas.max_activation[feature], 0.0)
    ball = SemanticLabel(kind="semantic", feature=feature, prototype_tokens=[0, 1], radius=0.3, tokens=list(range(30)) + list(range(40, 80)))
    assert not ball.compact  # 70 tokens: past the readable size
    scorer = Scorer([ball, token_label(feature, [0, 1])], atlas)
    scorer.update(f[:3], tokens[:3], part=0)
    scorer.update(f[3:], tokens[3:], part=1)
    summary = summarize(scorer.results(), scorer.n_positions, atlas)
    assert summary.any_ball_share_strong > summary.share_strong_f1_at_least_half
    assert summary.semantic_ball_sizes["count"] == 1 and summary.semantic_ball_sizes["over_64"] == 1
