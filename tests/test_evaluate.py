"""analysis.evaluation.evaluate.evaluate() on the tiny model against a hand computation: the splice
written here with a TransformerLens hook (position 0 of every context left untouched, as in
training), CE and KL in plain torch, and FVU / L0 / dead and dense fractions on the same
tokens. The corpus is passed explicitly (the held-out split of the `text_corpus` file)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from activations.corpus import CorpusConfig, load_contexts
from analysis.evaluation.evaluate import EvalConfig, evaluate, evaluate_many
from sae import ARCHITECTURES, SAEConfig

HOOK = "blocks.0.hook_resid_post"
CTX = 32
N_RECON, N_CE = 20, 12  # contexts behind the reconstruction metrics and the CE metrics


def train_split(model, corpus_file):
    return torch.from_numpy(load_contexts(CorpusConfig(source=str(corpus_file), split="train", context_len=CTX), model.tokenizer)).long()


def trained_copy(model, corpus_file, steps=60):
    """The tiny model after a few Adam steps on the train split: a random model's CE barely
    moves when the hook is zeroed, which leaves CE recovered ill-conditioned."""
    model = copy.deepcopy(model).train()
    tokens = train_split(model, corpus_file)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(tokens[torch.randint(len(tokens), (16,), generator=gen)], return_type="loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


def pca_topk_sae(model, corpus_file, k=4):
    """A TopK SAE whose 64 decoder rows are the +/- principal directions of the hook's
    activations (train split) and b_dec their mean: it reconstructs each token from its
    largest principal components (at most k, and only those past a small bias), so the
    reconstruction is good but lossy, L0 varies, and low-variance directions never fire."""
    with torch.no_grad():
        x = model.run_with_cache(train_split(model, corpus_file)[:40], names_filter=HOOK)[1][HOOK][:, 1:].reshape(-1, 32)
    mean = x.mean(0)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)  # rows of v: principal directions
    kth = ((x - mean) @ v.T).abs().topk(k, dim=1).values[:, -1]
    sae = ARCHITECTURES["topk"](SAEConfig(architecture="topk", d_in=32, d_sae=64, k=k, hook_name=HOOK, model_name="tiny", context_size=CTX))
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([v, -v]))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.fill_(-0.5 * float(kth.median()))
        sae.b_dec.copy_(mean)
    return sae


def hand_logits(model, tokens, edit=None):
    """Logits with `edit` applied to the activation at HOOK by a plain TransformerLens hook."""
    with torch.no_grad():
        if edit is None:
            return model(tokens)
        return model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda act, hook: edit(act))])


def next_token_nll(logits, tokens):
    """-log p(token[t+1] | tokens[:t+1]) for every position t: [b, pos - 1], float64."""
    logp = logits.double().log_softmax(-1)[:, :-1]
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def setup(tiny_model, text_corpus):
    model = trained_copy(tiny_model, text_corpus)
    sae = pca_topk_sae(model, text_corpus)
    corpus = CorpusConfig(source=str(text_corpus), split="heldout", context_len=CTX)
    tokens = torch.from_numpy(load_contexts(corpus, tiny_model.tokenizer)).long()
    assert len(tokens) >= N_RECON
    # batches of 5: the CE pass ends on a partial batch (5, 5, 2)
    cfg = EvalConfig(corpus=corpus, n_tokens=N_RECON * (CTX - 1), n_ce_contexts=N_CE, batch_contexts=5)
    return model, sae, tokens, evaluate(sae, model, cfg)


def test_evaluate_ce_and_kl_match_a_hand_written_splice(setup):
    model, sae, tokens, result = setup
    tokens = tokens[:N_CE]

    def splice(act, first=1):  # the SAE's reconstruction at positions first.., the rest untouched
        out = act.clone()
        out[:, first:] = sae(act[:, first:])
        return out

    def zero(act):
        out = act.clone()
        out[:, 1:] = 0
        return out

    clean, spliced, zeroed = hand_logits(model, tokens), hand_logits(model, tokens, splice), hand_logits(model, tokens, zero)
    # predictions made at positions 1..pos-2: position 0's prediction is the same in all three runs
    ce_clean = float(next_token_nll(clean, tokens)[:, 1:].mean())
    ce_spliced = float(next_token_nll(spliced, tokens)[:, 1:].mean())
    ce_zero = float(next_token_nll(zeroed, tokens)[:, 1:].mean())
    logp, logq = clean.double().log_softmax(-1)[:, 1:-1], spliced.double().log_softmax(-1)[:, 1:-1]
    kl = float((logp.exp() * (logp - logq)).sum(-1).mean())

    # the data tell a wrong splice apart: splicing position 0 too moves CE by over ten times the
    # tolerance below (measured: 2.4e-4 nats)
    assert abs(float(next_token_nll(hand_logits(model, tokens, lambda a: splice(a, 0)), tokens)[:, 1:].mean()) - ce_spliced) > 1e-4
    assert ce_clean + 0.01 < ce_spliced < ce_zero - 1 and kl > 0.01  # lossy, yet far better than zeroing

    assert result.n_ce_tokens == N_CE * (CTX - 2)
    assert result.ce_clean == pytest.approx(ce_clean, abs=1e-5)
    assert result.ce_spliced == pytest.approx(ce_spliced, abs=1e-5)
    assert result.ce_zero_ablated == pytest.approx(ce_zero, abs=1e-5)
    assert result.delta_ce == pytest.approx(ce_spliced - ce_clean, abs=1e-5)
    assert result.ce_loss_recovered == pytest.approx((ce_zero - ce_spliced) / (ce_zero - ce_clean), abs=1e-5)
    assert result.kl_per_token == pytest.approx(kl, abs=1e-5)


def test_evaluate_reconstruction_metrics_match_a_hand_computation(setup):
    model, sae, tokens, result = setup
    with torch.no_grad():
        acts = model.run_with_cache(tokens[:N_RECON], names_filter=HOOK)[1][HOOK]
        x = acts[:, 1:].reshape(-1, 32)  # position 0 excluded
        f = sae.encode(x)
        x_hat = f @ sae.W_dec + sae.b_dec
    x, x_hat = x.double(), x_hat.double()
    n = N_RECON * (CTX - 1)
    fires = (f != 0).sum(0)  # tokens each feature fires on

    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    dead = float((fires == 0).double().mean())
    assert 0.05 < fvu < 0.9 and 0 < dead < 1  # non-trivial: lossy, some features dead, some alive
    assert len(set((f != 0).sum(-1).tolist())) > 1  # L0 varies from token to token

    assert result.n_tokens == n
    assert result.fvu == pytest.approx(fvu, abs=1e-5)
    assert result.explained_variance == pytest.approx(1 - fvu, abs=1e-5)
    assert result.mse == pytest.approx(float((x - x_hat).pow(2).sum(-1).mean()), rel=1e-5)
    assert result.l0 == pytest.approx(float((f != 0).sum(-1).double().mean()), abs=1e-9)
    assert result.dead_fraction == pytest.approx(dead, abs=1e-12)
    assert result.dense_fraction == pytest.approx(float((fires > 0.1 * n).double().mean()), abs=1e-12)
    expected_density = [math.log10(max(int(c) / n, 1e-10)) for c in fires]
    assert result.log10_feature_density == pytest.approx(expected_density, abs=1e-4)
    assert result.metrics["ultralow_fraction"] == pytest.approx(float(((fires > 0) & (fires < n / 1e5)).double().mean()), abs=1e-12)


def test_evaluate_many_gives_each_sae_what_evaluate_gives_it_alone(setup, text_corpus):
    """A stack shares its passes (one run to the deepest hook, one clean CE); the numbers of each
    SAE must not change: here an SAE at the other hook of the tiny model beside the first one."""
    model, sae, _, alone = setup
    other = pca_topk_sae(model, text_corpus, k=2)
    cfg = EvalConfig(corpus=CorpusConfig(**alone.corpus), n_tokens=N_RECON * (CTX - 1), n_ce_contexts=N_CE, batch_contexts=5)
    with torch.no_grad():
        other.cfg.hook_name = "blocks.1.hook_resid_post"
        other.W_dec.mul_(-1)  # a different SAE: the same directions, read with the other sign
        other.W_enc.mul_(-1)
    other_alone = evaluate(other, model, cfg)
    together = evaluate_many([sae, other], model, cfg)
    for expected, got in ((alone, together[0]), (other_alone, together[1])):
        for name in ("fvu", "l0", "dead_fraction", "ce_clean", "ce_spliced", "ce_zero_ablated", "kl_per_token", "n_ce_tokens"):
            assert getattr(got, name) == pytest.approx(getattr(expected, name), abs=1e-6), name
    assert together[0].fvu != pytest.approx(together[1].fvu, abs=1e-3)  # two different SAEs, two different results


def test_evaluate_reads_given_rows_as_it_reads_its_corpus(setup):
    """A caller that tokenised the held-out text passes its rows: the same numbers, bit for bit."""
    model, sae, tokens, alone = setup
    cfg = EvalConfig(corpus=CorpusConfig(**alone.corpus), n_tokens=N_RECON * (CTX - 1), n_ce_contexts=N_CE, batch_contexts=5)
    given = evaluate(sae, model, cfg, tokens=tokens.int().numpy())  # more rows than needed: the first ones are read
    assert given == alone
    with pytest.raises(ValueError, match="contexts of 32 tokens, 20 needed"):
        evaluate(sae, model, cfg, tokens=tokens[:N_RECON - 1])
    with pytest.raises(ValueError, match=r"token rows \[n_contexts 32\]"):
        evaluate(sae, model, cfg, tokens=tokens[:, :16])


def test_evaluate_command_tokenises_the_heldout_text_once(setup, text_corpus, tmp_path, monkeypatch):
    import activations.corpus
    from activations.model import ModelLoader
    from analysis import cli

    model, sae, _, alone = setup
    other = pca_topk_sae(model, text_corpus, k=2)
    sae.save(tmp_path / "a")
    other.save(tmp_path / "b")
    packed = []
    pack = activations.corpus.pack_contexts
    monkeypatch.setattr(activations.corpus, "pack_contexts", lambda *a, **k: packed.append(1) or pack(*a, **k))
    monkeypatch.setattr(ModelLoader, "get", lambda self, recorded=None: model)
    results = cli.main(["evaluate", "--sae", str(tmp_path / "a"), str(tmp_path / "b"), "--corpus", str(text_corpus), "--device", "cpu",
                        "--eval-tokens", str(N_RECON * (CTX - 1)), "--ce-contexts", str(N_CE), "--out", str(tmp_path / "out")])
    assert len(packed) == 1  # two SAEs of one model on one text: one tokenisation, one group
    got = results[str(tmp_path / "a")]
    for name in ("fvu", "l0", "dead_fraction", "ce_clean", "ce_spliced", "ce_zero_ablated", "kl_per_token", "n_tokens", "n_ce_tokens"):
        assert getattr(got, name) == pytest.approx(getattr(alone, name), abs=1e-6), name
    # --sae with --out: the results go under <out>/eval/, the SAEs' own folders are left as they were
    assert (tmp_path / "out" / "eval" / "a" / "eval.json").is_file() and (tmp_path / "out" / "eval" / "b" / "report.html").is_file()
    assert not (tmp_path / "a" / "eval.json").exists() and not (tmp_path / "b" / "eval.json").exists()


def test_results_of_saes_with_one_name_do_not_overwrite_each_other(tmp_path):
    from analysis.evaluation.cli import results_folders

    paths = [tmp_path / "run1" / "topk", tmp_path / "run2" / "topk", tmp_path / "run2" / "jumprelu"]
    assert results_folders(paths, tmp_path / "o") == {paths[0]: tmp_path / "o" / "eval" / "topk-1", paths[1]: tmp_path / "o" / "eval" / "topk-2",
                                                      paths[2]: tmp_path / "o" / "eval" / "jumprelu"}
