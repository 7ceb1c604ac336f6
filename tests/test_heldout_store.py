"""One forward pass per held-out token: the harvest writes the held-out activations beside the
training store, and evaluation, the atlas and label scoring read them instead of running the
model, with the same results as the model's pass."""
from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from activations import CorpusConfig, HarvestConfig, harvest, load_contexts
from activations.cli import heldout_config
from activations.model import run_to_hooks
from activations.store import heldout_store
from analysis import encoding
from analysis.evaluation.evaluate import EvalConfig, evaluate
from analysis.features.atlas import AtlasConfig, build_atlas
from analysis.features.labels import LabelConfig, label_features
from sae import ARCHITECTURES, SAEConfig

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture
def stores(tiny_model, text_corpus, tmp_path):
    """A training store and its held-out store of 20 contexts (in shards of 8)."""
    corpus = CorpusConfig(source=str(text_corpus), context_len=32)
    cfg = HarvestConfig(out_dir=str(tmp_path / "acts"), model="tiny", hooks=[HOOK], corpus=corpus, n_tokens=31 * 8, batch_contexts=4,
                        shard_contexts=8, dtype="float32", autocast="none", device="cpu")
    train = harvest(cfg, tiny_model)[HOOK]
    heldout = harvest(heldout_config(cfg, 31 * 20, "none"), tiny_model)[HOOK]
    return train, heldout, replace_split(corpus)


def replace_split(corpus: CorpusConfig) -> CorpusConfig:
    return CorpusConfig(**{**asdict(corpus), "split": "heldout"})


def tiny_sae(train_store):
    torch.manual_seed(3)
    sae = ARCHITECTURES["topk"](SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4, hook_name=HOOK, model_name="tiny", context_size=32))
    with torch.no_grad():
        sae.b_enc.add_(0.5)
    sae.training_data = train_store.training_data
    return sae


def no_model_pass(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model ran although the store holds these contexts")
    monkeypatch.setattr(encoding, "run_to_hooks", refuse)


def test_the_heldout_store_holds_what_the_model_computes_in_context_layout(stores, tiny_model):
    train, heldout, corpus = stores
    assert heldout.path.parent.name == "heldout" and heldout.manifest["corpus"]["split"] == "heldout"
    assert heldout.manifest["dtype"] == "float32" and heldout.n_contexts == 20
    tokens, acts = heldout.contexts(6, 5)  # crosses the shard boundary at context 8
    expected_tokens = torch.from_numpy(load_contexts(corpus, tiny_model.tokenizer, max_contexts=11)[6:]).long()
    assert torch.equal(tokens.long(), expected_tokens)
    with torch.no_grad():
        exact = run_to_hooks(tiny_model, expected_tokens, [HOOK])[HOOK]
    assert acts.shape == (5, 32, 32) and (acts[:, 0] == 0).all()  # position 0 is not stored
    assert torch.allclose(acts[:, 1:], exact[:, 1:], atol=1e-5)
    with pytest.raises(ValueError, match="holds contexts 0..20"):
        heldout.contexts(18, 5)
    # found from the SAE's provenance, and only for its corpus, model and hook
    found = heldout_store(train.path, asdict(corpus), "tiny", HOOK)
    assert found is not None and found.path == heldout.path
    assert heldout_store(train.path, {**asdict(corpus), "source": "other.txt"}, "tiny", HOOK) is None
    assert heldout_store(train.path, asdict(corpus), "another-model", HOOK) is None
    assert heldout_store(train.path, asdict(corpus), "tiny", "blocks.1.hook_resid_post") is None


def test_atlas_labels_and_evaluation_read_the_store_and_match_the_models_pass(stores, tiny_model, monkeypatch):
    train, heldout, corpus = stores
    sae = tiny_sae(train)
    rows = load_contexts(corpus, tiny_model.tokenizer, max_contexts=20)
    cfg = AtlasConfig(corpus=corpus, n_tokens=31 * 12, batch_contexts=4, top_n=3, n_samples=4, autocast="none", device="cpu")
    by_model = build_atlas(sae, tiny_model, cfg, tokens=rows[:12])
    label_cfg = LabelConfig(n_score_contexts=8, autocast="none")
    labels_by_model = label_features(by_model, sae, tiny_model, label_cfg, tokens=rows[12:20])
    eval_cfg = EvalConfig(corpus=corpus, n_tokens=31 * 12, n_ce_contexts=4, batch_contexts=4)
    eval_by_model = evaluate(sae, tiny_model, eval_cfg, tokens=rows)

    no_model_pass(monkeypatch)  # (the pattern labels still run the model on made-up text, through their own import)
    atlas = build_atlas(sae, tiny_model, cfg, tokens=rows[:12], heldout=heldout)
    assert atlas.meta["contexts_read_from_store"] == 12
    for key, value in by_model.tensors.items():
        assert torch.allclose(value.float(), atlas.tensors[key].float(), atol=1e-4), key
    labels = label_features(atlas, sae, tiny_model, label_cfg, tokens=rows[12:20], heldout=heldout)
    assert labels.summary == labels_by_model.summary
    result = evaluate(sae, tiny_model, eval_cfg, tokens=rows, heldout=heldout)  # the CE passes run the model, via logits_with_edit
    assert result.reconstruction_inputs == "held-out store (fp32)" and eval_by_model.reconstruction_inputs == "model, fp32"
    assert result.fvu == pytest.approx(eval_by_model.fvu, rel=1e-4) and result.l0 == eval_by_model.l0


def test_contexts_past_the_store_or_other_text_run_through_the_model(stores, tiny_model, caplog):
    train, heldout, corpus = stores
    rows = torch.from_numpy(load_contexts(corpus, tiny_model.tokenizer, max_contexts=24)).long()
    reader = encoding.HookActivations(tiny_model, HOOK, heldout, first_context=16)
    assert reader.held(8) == 4
    with torch.no_grad():
        exact = run_to_hooks(tiny_model, rows[16:24], [HOOK])[HOOK]
    assert torch.allclose(reader(rows[16:20], 0)[:, 1:], exact[:4, 1:], atol=1e-5) and reader.read_from_store == 4
    assert torch.allclose(reader(rows[20:24], 4), exact[4:], atol=1e-5) and reader.read_from_store == 4  # past the store
    # rows that are not the store's text (the corpus file changed since the harvest): the model, with a warning
    other = encoding.HookActivations(tiny_model, HOOK, heldout, first_context=0)
    shifted = rows[1:5]
    with caplog.at_level("WARNING"):
        got = other(shifted, 0)
    assert "holds other text" in caplog.text and other.store is None and other.read_from_store == 0
    with torch.no_grad():
        assert torch.allclose(got, run_to_hooks(tiny_model, shifted, [HOOK])[HOOK], atol=1e-5)
    # an SAE that reads position 0 cannot use a store that left it out
    assert encoding.HookActivations(tiny_model, HOOK, heldout, first_position=0).store is None


def test_run_harvests_the_heldout_text_once_and_the_stages_read_it(tiny_llama_dir, tmp_path, capsys):
    """`saewb run` writes the held-out store; evaluation, the atlas and labels read it (no second pass)."""
    from analysis import cli

    assert cli.heldout_tokens_needed(cli.parse(["run"])) == 127 * (7875 + 2048)  # the default: atlas + label contexts
    from tests.test_user_corpus import write_user_corpus

    corpus = write_user_corpus(tmp_path / "docs.jsonl")
    out = tmp_path / "run"
    cli.main(["run", "--preset", "smoke", "--model", tiny_llama_dir, "--device", "cpu", "--corpus", str(corpus), "--out", str(out),
              "--hook", "blocks.1.hook_resid_post", "--context-len", "32", "--n-tokens", "3000", "--train-tokens", "3000", "--d-sae", "64",
              "--k", "4", "--batch-size", "256", "--eval-tokens", str(31 * 8), "--ce-contexts", "4", "--atlas-tokens", str(31 * 16),
              "--label-contexts", "16"])
    printed = capsys.readouterr().out
    stored = out / "activations" / "heldout" / "blocks.1.hook_resid_post"
    assert (stored / "manifest.json").exists() and "held-out activations:" in printed
    assert f"read from {stored}" in printed  # the atlas
    import json

    sae_dir = next((out / "sae").glob("topk_*"))
    assert json.loads((sae_dir / "eval.json").read_text())["reconstruction_inputs"].startswith("held-out store")
    # asking for more than the store holds says so and computes the rest
    cli.main(["analyze", "--model", tiny_llama_dir, "--device", "cpu", "--out", str(out), "--atlas-tokens", str(31 * 24),
              "--label-contexts", "16"])
    printed = capsys.readouterr().out
    assert "holds 32 of the 40 contexts read" in printed and "--heldout-tokens" in printed


def test_a_compiled_harvest_stores_what_the_eager_one_does(tiny_bridge, tiny_llama_dir, text_corpus, tmp_path):
    """`HarvestConfig.compile`: decoder layers through torch.compile (residual hooks only), recorded in the manifest."""
    hook = "blocks.1.hook_resid_post"
    base = dict(model=tiny_llama_dir, hooks=[hook],
                corpus=CorpusConfig(source=str(text_corpus), context_len=32), n_tokens=31 * 8, batch_contexts=4, shard_contexts=8,
                dtype="float32", autocast="none", device="cpu")
    eager = harvest(HarvestConfig(out_dir=str(tmp_path / "eager"), compile="no", **base), tiny_bridge)[hook]
    compiled = harvest(HarvestConfig(out_dir=str(tmp_path / "compiled"), compile="yes", **base), tiny_bridge)[hook]
    assert compiled.manifest["compiled"] is True and eager.manifest["compiled"] is False
    assert torch.allclose(compiled.load_shard(0)["acts"], eager.load_shard(0)["acts"], atol=1e-5)
    assert "forward" not in vars(tiny_bridge.blocks[0].original_component)  # eager again after the harvest
    small = HarvestConfig(out_dir=str(tmp_path / "auto"), **base)  # "auto": too few tokens to pay for compiling
    assert harvest(small, tiny_bridge)[hook].manifest["compiled"] is False
    with pytest.raises(ValueError, match="residual hooks of a Hugging Face model only"):
        harvest(HarvestConfig(out_dir=str(tmp_path / "mlp"), compile="yes", **{**base, "hooks": ["blocks.1.hook_mlp_out"]}), tiny_bridge)


def test_a_store_from_before_the_compiled_key_still_resumes(tiny_bridge, tiny_llama_dir, text_corpus, tmp_path, monkeypatch):
    """A manifest without "compiled" was harvested eagerly: rerunning the harvest (as `saewb run` does) keeps it, no mismatch."""
    import importlib
    import json

    harvest_module = importlib.import_module("activations.harvest")  # (the package's `harvest` is the function)

    monkeypatch.setattr(harvest_module, "COMPILE_MIN_TOKENS", 0)  # "auto" would compile this small harvest
    hook = "blocks.1.hook_resid_post"
    cfg = HarvestConfig(out_dir=str(tmp_path), model=tiny_llama_dir, hooks=[hook], corpus=CorpusConfig(source=str(text_corpus), context_len=32),
                        n_tokens=31 * 8, batch_contexts=4, shard_contexts=8, dtype="float32", autocast="none", device="cpu")
    manifest = tmp_path / hook / "manifest.json"
    first = harvest(HarvestConfig(**{**cfg.__dict__, "compile": "no"}), tiny_bridge)[hook]
    old = json.loads(manifest.read_text())
    del old["compiled"]
    manifest.write_text(json.dumps(old))
    again = harvest(cfg, tiny_bridge)[hook]
    assert again.fingerprint == first.fingerprint and json.loads(manifest.read_text())["compiled"] is False
    new = harvest(HarvestConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "new")}), tiny_bridge)[hook]
    assert new.manifest["compiled"] is True  # a new "auto" harvest over the threshold compiles


def test_a_hook_of_fewer_rows_shares_the_pass_and_gets_the_store_of_its_own_harvest(tiny_model, text_corpus, tmp_path, monkeypatch):
    import importlib

    harvest_module = importlib.import_module("activations.harvest")

    shallow, deep = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
    base = dict(model="tiny", corpus=CorpusConfig(source=str(text_corpus), context_len=32), batch_contexts=4, shard_contexts=8,
                dtype="float32", autocast="none", device="cpu")
    calls = []
    real = harvest_module.run_to_hooks
    monkeypatch.setattr(harvest_module, "run_to_hooks", lambda model, batch, hooks, autocast: calls.append(list(hooks)) or real(model, batch, hooks, autocast))
    both = harvest(HarvestConfig(out_dir=str(tmp_path / "both"), hooks=[shallow, deep], n_tokens=31 * 20, hook_tokens={deep: 31 * 10}, **base),
                   tiny_model)
    # 20 contexts in batches of 4: the deep hook wants contexts 0-9, so batches 0-2 run to layer 1 and batches 3-4 stop at layer 0
    assert calls == [[shallow, deep]] * 3 + [[shallow]] * 2
    monkeypatch.setattr(harvest_module, "run_to_hooks", real)
    alone = {shallow: harvest(HarvestConfig(out_dir=str(tmp_path / "shallow"), hooks=[shallow], n_tokens=31 * 20, **base), tiny_model)[shallow],
             deep: harvest(HarvestConfig(out_dir=str(tmp_path / "deep"), hooks=[deep], n_tokens=31 * 10, **base), tiny_model)[deep]}
    for hook, store in alone.items():  # the same store, shard for shard, byte for byte
        shared = both[hook].manifest
        assert shared["n_contexts"] == store.manifest["n_contexts"] and shared["n_tokens"] == store.n_tokens
        assert shared["corpus_fingerprint"] == store.manifest["corpus_fingerprint"]
        assert [(s["file"], s["n_contexts"], s["sha256"]) for s in shared["shards"]] == [(s["file"], s["n_contexts"], s["sha256"]) for s in store.manifest["shards"]]
    assert both[deep].n_tokens == 31 * 10 and both[shallow].n_tokens == 31 * 20
    again = harvest(HarvestConfig(out_dir=str(tmp_path / "both"), hooks=[shallow, deep], n_tokens=31 * 20, hook_tokens={deep: 31 * 10}, **base),
                    tiny_model)  # a rerun resumes: nothing left to do, the same manifests
    assert again[deep].manifest["shards"] == both[deep].manifest["shards"]
    with pytest.raises(ValueError, match="at most n_tokens"):
        HarvestConfig(hooks=[shallow, deep], n_tokens=100, hook_tokens={deep: 200})
    with pytest.raises(ValueError, match="not harvested"):
        HarvestConfig(hooks=[shallow], hook_tokens={deep: 10})
