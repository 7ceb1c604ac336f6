"""The feature atlas against a brute-force, per-feature computation on a tiny model."""
from __future__ import annotations

import torch

from activations.corpus import CorpusConfig, load_contexts
from activations.model import run_to_hooks
from analysis.features.atlas import AtlasConfig, build_atlas, load_atlas
from sae import ARCHITECTURES, SAEConfig

HOOK = "blocks.0.hook_resid_post"


def tiny_sae(architecture="topk", d_sae=64, k=4):
    torch.manual_seed(3)
    sae = ARCHITECTURES[architecture](SAEConfig(architecture=architecture, d_in=32, d_sae=d_sae, k=k, hook_name=HOOK, context_size=32))
    with torch.no_grad():
        sae.b_enc.add_(0.5)  # more firing in a random SAE
    return sae


def brute_force(sae, model, corpus, n_contexts):
    tokens = torch.from_numpy(load_contexts(corpus, model.tokenizer, max_contexts=n_contexts)).long()
    with torch.no_grad():
        f = sae.encode(run_to_hooks(model, tokens, [HOOK])[HOOK])
    f[:, 0] = 0
    return tokens, f


def test_atlas_matches_brute_force(tiny_model, text_corpus, tmp_path):
    sae = tiny_sae()
    corpus = CorpusConfig(source=str(text_corpus), context_len=32)
    cfg = AtlasConfig(corpus=corpus, n_tokens=31 * 40, batch_contexts=6, top_n=5, n_samples=7, window_left=4, window_right=2,
                      merge_every=2, coact_every=1, autocast="none", device="cpu")
    atlas = build_atlas(sae, tiny_model, cfg)
    atlas.save(tmp_path / "atlas")
    atlas = load_atlas(tmp_path / "atlas")
    tokens, f = brute_force(sae, tiny_model, corpus, 40)
    assert atlas.n_tokens == 40 * 31 and torch.equal(atlas.tokens.long(), tokens)

    fires = f > 0
    assert torch.equal(atlas.tensors["fire_count"], fires.sum((0, 1)))
    torch.testing.assert_close(atlas.max_activation, f.amax((0, 1)))
    torch.testing.assert_close(atlas.mean_activation, f.sum((0, 1)) / fires.sum((0, 1)).clamp_min(1), rtol=1e-4, atol=1e-5)
    assert int(atlas.tensors["hist"].sum()) == int(fires.sum())
    assert torch.equal(atlas.tensors["position_count"], fires.sum(0).T)

    ctx_max = f.amax(1)  # [contexts, d_sae]
    live = torch.nonzero(atlas.tensors["fire_count"] > 0).flatten()
    assert len(live) > 20
    for i in live.tolist():
        # top contexts = the contexts with the largest per-context maxima, in order
        expected = ctx_max[:, i].sort(descending=True).values[:5]
        expected = expected[expected > 0]
        got = atlas.tensors["top_values"][i][: len(expected)]
        torch.testing.assert_close(got, expected)
        for example in atlas.examples(i, "top") + atlas.examples(i, "sample"):
            ctx, pos = example["context"], example["position"]
            assert example["value"] == float(f[ctx, pos, i]) and tokens[ctx, pos] == example["tokens"][example["max_index"]]
            start = pos - example["max_index"]
            truth = f[ctx, start:start + len(example["acts"]), i]
            torch.testing.assert_close(torch.tensor(example["acts"]), truth, atol=2e-3, rtol=2e-3)  # stored in fp16
        # the random sample only holds activating contexts, distinct ones
        samples = atlas.tensors["sample_context"][i]
        samples = samples[samples >= 0]
        assert len(samples) == min(7, int((ctx_max[:, i] > 0).sum())) and len(set(samples.tolist())) == len(samples)
        # (feature, token) counts
        ids, counts, _ = atlas.feature_tokens(i)
        on = tokens[fires[:, :, i]]
        assert dict(zip(ids.tolist(), counts.tolist())) == {t: int((on == t).sum()) for t in on.unique().tolist()}

    # co-activation neighbours by Jaccard, decoder neighbours by cosine
    binary = fires.flatten(0, 1).float()
    both = binary.T @ binary
    union = binary.sum(0)[:, None] + binary.sum(0)[None, :] - both
    jaccard = (both / union.clamp_min(1)).fill_diagonal_(-1)
    i = int(live[0])
    assert atlas.tensors["coact_jaccard"][i][0] == jaccard[i].max()
    unit = torch.nn.functional.normalize(sae.W_dec.detach(), dim=-1)
    cos = (unit @ unit.T).fill_diagonal_(-2)
    assert int(atlas.tensors["decoder_neighbours"][i][0]) == int(cos[i].argmax())
    # logit effects: the top token of W_dec[i] * ln_final.w @ W_U
    logits = (sae.W_dec.detach()[i] * tiny_model.ln_final.w) @ tiny_model.W_U
    assert int(atlas.tensors["logit_top_ids"][i][0]) == int(logits.argmax())
    assert atlas.summary()["dead"] == int((atlas.tensors["fire_count"] == 0).sum())


def test_atlas_rejects_bad_input(tiny_model, text_corpus):
    import pytest

    sae = tiny_sae()
    atlas_cfg = AtlasConfig(corpus=CorpusConfig(source=str(text_corpus), context_len=32), n_tokens=100, device="cpu", autocast="none")
    sae.cfg.hook_name = "blocks.0.hook_nonsense"
    with pytest.raises(KeyError, match="hook_nonsense"):
        build_atlas(sae, tiny_model, atlas_cfg)
    wide = tiny_sae()
    wide.cfg.hook_name = HOOK
    wide.cfg.d_in = 48
    with pytest.raises(ValueError, match="d_in"):
        build_atlas(wide, tiny_model, atlas_cfg)
    atlas = build_atlas(tiny_sae(), tiny_model, atlas_cfg)
    with pytest.raises(IndexError, match="out of range"):
        atlas.examples(64)


def test_atlas_reads_given_rows_as_it_reads_its_corpus(tiny_model, text_corpus):
    """A caller that tokenised the held-out text passes its rows (past `first_context`): the same atlas."""
    sae = tiny_sae()
    corpus = CorpusConfig(source=str(text_corpus), context_len=32)
    cfg = AtlasConfig(corpus=corpus, n_tokens=31 * 10, first_context=3, batch_contexts=4, top_n=3, n_samples=4, autocast="none", device="cpu")
    loaded = build_atlas(sae, tiny_model, cfg)
    rows = load_contexts(corpus, tiny_model.tokenizer, max_contexts=20)[3:]  # int32, more than the atlas reads
    given = build_atlas(sae, tiny_model, cfg, tokens=rows)
    assert torch.equal(given.tokens, loaded.tokens) and given.meta == loaded.meta and given.vocab == loaded.vocab
    assert given.tensors.keys() == loaded.tensors.keys() and all(torch.equal(given.tensors[k], loaded.tensors[k]) for k in loaded.tensors)
    assert all(torch.equal(given.token_counts[k], loaded.token_counts[k]) for k in loaded.token_counts)
    import pytest

    with pytest.raises(ValueError, match=r"token rows \[n_contexts 32\]"):
        build_atlas(sae, tiny_model, cfg, tokens=rows[:, :16])
