"""Harvest, store and trainer behaviour on a tiny random model: shapes, resume after a kill,
and clear errors for bad input."""
import json

import pytest
import torch

from activations import ActivationStore, CorpusConfig, EmptyCorpusError, HarvestConfig, StoreError, harvest
from activations import store as store_module
from sae import SAEConfig
from sae.trainer import Trainer, TrainConfig


def harvest_cfg(tmp_path, corpus, **kw):
    base = dict(out_dir=str(tmp_path / "acts"), model="tiny", hooks=["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"],
                corpus=CorpusConfig(source=str(corpus), context_len=16), n_tokens=600, batch_contexts=4, shard_contexts=8,
                dtype="float32", autocast="none", device="cpu")
    return HarvestConfig(**{**base, **kw})


def test_harvest_writes_sharded_store_with_tokens(tiny_model, text_corpus, tmp_path):
    stores = harvest(harvest_cfg(tmp_path, text_corpus), tiny_model)
    store = stores["blocks.1.hook_resid_post"]
    assert store.d_in == 32 and store.n_tokens >= 600 and len(store.shards) > 1
    assert store.manifest["exclude_bos"] and store.manifest["corpus_fingerprint"]
    shard = store.load_shard(0)
    assert shard["tokens"].shape[1] == 16 and (shard["tokens"][:, 0] == 256).all()  # every context starts with BOS
    assert len(shard["positions"]) == len(shard["acts"]) and (shard["positions"] % 16 != 0).all()  # BOS excluded
    # the stored activation equals a fresh forward pass at that position
    _, cache = tiny_model.run_with_cache(shard["tokens"][:1].long())
    assert torch.allclose(shard["acts"][:15], cache["blocks.1.hook_resid_post"][0, 1:], atol=1e-6)
    batches = list(store.iter_batches(64, seed=1))
    assert all(b.shape == (64, 32) for b in batches) and len(batches) == store.n_tokens // 64


def test_killed_harvest_resumes_to_the_same_store(tiny_model, text_corpus, tmp_path, monkeypatch):
    reference = harvest(harvest_cfg(tmp_path / "ref", text_corpus), tiny_model)["blocks.1.hook_resid_post"]
    calls = {"n": 0}
    original = store_module.atomic_save_safetensors

    def dying_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # killed in the middle of the harvest
        return original(*args, **kwargs)

    import importlib

    harvest_module = importlib.import_module("activations.harvest")  # the package re-exports a function of the same name
    monkeypatch.setattr(harvest_module, "atomic_save_safetensors", dying_save)
    with pytest.raises(KeyboardInterrupt):
        harvest(harvest_cfg(tmp_path / "run", text_corpus), tiny_model)
    with pytest.raises(StoreError, match="did not finish"):
        ActivationStore(tmp_path / "run" / "acts" / "blocks.1.hook_resid_post")
    monkeypatch.setattr(harvest_module, "atomic_save_safetensors", original)
    resumed = harvest(harvest_cfg(tmp_path / "run", text_corpus), tiny_model)["blocks.1.hook_resid_post"]
    assert [s.sha256 for s in resumed.shards] == [s.sha256 for s in reference.shards]


def test_wrong_hook_name_is_a_clear_error(tiny_model, text_corpus, tmp_path):
    with pytest.raises(KeyError, match="no hook point 'blocks.1.hook_resid_postt'"):
        harvest(harvest_cfg(tmp_path, text_corpus, hooks=["blocks.1.hook_resid_postt"]), tiny_model)


def test_empty_corpus_is_a_clear_error(tiny_model, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(EmptyCorpusError):
        harvest(harvest_cfg(tmp_path, empty), tiny_model)


def test_truncated_and_corrupt_shards_are_caught(tiny_model, text_corpus, tmp_path):
    store = harvest(harvest_cfg(tmp_path, text_corpus), tiny_model)["blocks.1.hook_resid_post"]
    path = store.path / store.shards[1].file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="checksum mismatch"):
        store.verify()
    with pytest.raises(StoreError, match="corrupt or truncated"):
        store.load_shard(1)
    (store.path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        ActivationStore(store.path)


def test_nan_activations_stop_training_with_a_clear_error(tiny_model, text_corpus, tmp_path):
    store = harvest(harvest_cfg(tmp_path, text_corpus), tiny_model)["blocks.1.hook_resid_post"]
    from safetensors.torch import load_file, save_file
    for shard in store.shards:
        tensors = load_file(str(store.path / shard.file))
        tensors["acts"][3, 5] = float("nan")
        save_file(tensors, str(store.path / shard.file))
    cfg = TrainConfig(out_dir=str(tmp_path / "sae"), saes=[SAEConfig(d_in=32, d_sae=64, k=4)], n_tokens=512, batch_size=64, device="cpu", init_tokens=64)
    with pytest.raises(FloatingPointError, match="non-finite"):
        Trainer(cfg, ActivationStore(store.path)).train()


def test_killed_training_resumes_to_the_same_weights(tiny_model, text_corpus, tmp_path):
    store = harvest(harvest_cfg(tmp_path, text_corpus), tiny_model)["blocks.1.hook_resid_post"]
    saes = [SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4), SAEConfig(architecture="jumprelu", d_in=32, d_sae=64)]
    common = dict(saes=saes, n_tokens=64 * 20, batch_size=64, device="cpu", checkpoint_every=3, init_tokens=128, dead_tokens=128)
    Trainer(TrainConfig(out_dir=str(tmp_path / "straight"), **common), store).train()
    Trainer(TrainConfig(out_dir=str(tmp_path / "killed"), max_steps=7, **common), store).train()  # "killed" after step 7
    resumed = Trainer(TrainConfig(out_dir=str(tmp_path / "killed"), **common), store)
    resumed.train()
    straight = Trainer(TrainConfig(out_dir=str(tmp_path / "straight"), **common), store)
    straight.load_checkpoint()
    for a, b in zip(straight.saes, resumed.saes):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.allclose(p, q, atol=1e-6), name
    summary = json.loads((tmp_path / "killed" / "train_summary.json").read_text())
    assert summary["steps"] == 20


def test_on_the_fly_training_needs_no_store(tiny_model, text_corpus, tmp_path):
    from sae.on_the_fly import OnTheFlySource

    source = OnTheFlySource(tiny_model, "blocks.1.hook_resid_post", CorpusConfig(source=str(text_corpus), context_len=16),
                            buffer_tokens=256, batch_contexts=4, autocast="none")
    assert source.d_in == 32
    # the init sample reads only the contexts it needs (not a shuffle buffer), reproducibly
    sample = source.init_sample(100, seed=3)
    assert sample.shape == (100, 32) and torch.equal(sample, source.init_sample(100, seed=3))
    assert source.tokens is source.tokens  # tokenised once per source, not once per epoch
    trainer = Trainer(TrainConfig(out_dir=str(tmp_path), saes=[SAEConfig(d_in=32, d_sae=64, k=4)], n_tokens=64 * 12,
                                  batch_size=64, device="cpu", init_tokens=64, log_every=1), source)
    [path] = trainer.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 12 and records[-1]["fvu"] < records[0]["fvu"]
    assert (path / "cfg.json").exists()
