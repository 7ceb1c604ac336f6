"""Concept monitoring (analysis.features.monitor): per-text concept scores against a direct
reading of the SAE, AUROC against a brute force over all pairs, the escaped heatmap page, and
`saewb monitor --concepts` on a tiny SAE folder."""
from __future__ import annotations

import json

import pytest
import torch

from activations.corpus import CorpusConfig
from analysis.features.atlas import AtlasConfig, build_atlas
from analysis.features.monitor import auroc, concept_features, concept_monitor_html, feature_activations, monitor_concepts

from .test_atlas import tiny_sae


@pytest.fixture(scope="module")
def setup(tiny_model, text_corpus):
    sae = tiny_sae()
    cfg = AtlasConfig(corpus=CorpusConfig(source=str(text_corpus), context_len=32), n_tokens=31 * 30, batch_contexts=8, autocast="none", device="cpu")
    return sae, build_atlas(sae, tiny_model, cfg)


def test_auroc_matches_all_pairs_by_hand():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40,), generator=gen).float()  # many ties
    positive = torch.rand(40, generator=gen) > 0.6
    pairs = [(1.0 if p > q else 0.5 if p == q else 0.0) for p in scores[positive].tolist() for q in scores[~positive].tolist()]
    assert auroc(scores, positive) == pytest.approx(sum(pairs) / len(pairs))
    assert auroc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([True, False, False])) == 1.0
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([True, False])) == 0.0
    with pytest.raises(ValueError, match="both positive and negative"):
        auroc(torch.ones(3), torch.ones(3, dtype=torch.bool))


def test_concept_scores_are_the_strongest_relative_firing(setup, tiny_model):
    sae, atlas = setup
    concepts = {"cat": concept_features("cat", tiny_model, sae, atlas, n=3, max_density=1.0), "river": concept_features("river", tiny_model, sae, atlas, n=2, max_density=1.0)}
    assert 1 <= len(concepts["cat"]) <= 3 and all(atlas.max_activation[f] > 0 for f in concepts["cat"])
    texts = ["the cat sat on a mat", "quiet rivers and old stone bridges", "dogs <b>ran</b> past"]
    readings = monitor_concepts(texts, tiny_model, sae, atlas, concepts)
    assert readings.score.shape == (3, 2) and readings.concepts == ["cat", "river"]
    for n, text in enumerate(texts):  # one text at a time, read directly
        tokens, f = feature_activations(text, tiny_model, sae)
        for j, c in enumerate(readings.concepts):
            rel = f[0, 1:, concepts[c]] / atlas.max_activation[concepts[c]]
            assert float(readings.score[n, j]) == pytest.approx(float(rel.max()), abs=1e-5)
            assert torch.allclose(readings.per_feature[c][n], rel.max(0).values, atol=1e-5)
    table = readings.table()
    assert "share of texts where it fires" in table and len(table.splitlines()) == 1 + 3 + 2
    page = concept_monitor_html(readings)
    assert "plotly" in page and "&lt;b&gt;ran&lt;/b&gt;" in page and "<b>ran</b>" not in page
    json.dumps(readings.to_dict())
    with pytest.raises(ValueError, match="empty text"):
        monitor_concepts(["  "], tiny_model, sae, atlas, concepts)
    with pytest.raises(ValueError, match="at least one feature"):
        monitor_concepts(texts, tiny_model, sae, atlas, {"cat": []})


def test_cli_monitor_concepts_writes_scores_and_heatmap(setup, tiny_model, tmp_path, monkeypatch, capsys):
    from activations.model import ModelLoader
    from analysis import cli

    sae, atlas = setup
    sae.save(tmp_path / "sae")
    atlas.save(tmp_path / "sae" / "atlas")
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat sat\nold stone bridges\n\n<script>x</script> cat\n")
    monkeypatch.setattr(ModelLoader, "get", lambda self, recorded=None: tiny_model)
    cli.main(["monitor", "--sae", str(tmp_path / "sae"), "--concepts", "cat", "--file", str(texts), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "cat:" in printed and "share of texts where it fires" in printed
    saved = json.loads((tmp_path / "out" / "monitor" / "concepts.json").read_text())
    assert len(saved["texts"]) == 3 and len(saved["score"]) == 3
    page = (tmp_path / "out" / "monitor" / "concepts.html").read_text()
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "<script>x</script>" not in page
    with pytest.raises(SystemExit, match="needs texts"):
        cli.main(["monitor", "--sae", str(tmp_path / "sae"), "--concepts", "cat", "--out", str(tmp_path / "out")])
