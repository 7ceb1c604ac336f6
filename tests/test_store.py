"""Harvest, store and trainer behaviour on a tiny random model: shapes, resume after a kill,
and clear errors for bad input."""
import json
import os
import re
import shlex

import numpy as np
import pytest
import torch

from activations import ActivationStore, CorpusConfig, EmptyCorpusError, HarvestConfig, StoreError, harvest
from activations import store as store_module
from sae import SAEConfig
from sae.trainer import TrainConfig, Trainer


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
    import importlib

    harvest_module = importlib.import_module("activations.harvest")  # the package re-exports a function of the same name
    original = harvest_module.atomic_save_safetensors

    def dying_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # killed in the middle of the harvest
        return original(*args, **kwargs)

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
    manifest = json.loads((store.path / "manifest.json").read_text())
    for shard in manifest["shards"]:  # NaN written by the harvest itself: the checksums match
        tensors = load_file(str(store.path / shard["file"]))
        tensors["acts"][3, 5] = float("nan")
        save_file(tensors, str(store.path / shard["file"]))
        shard["sha256"] = store_module.sha256_file(store.path / shard["file"])
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    cfg = TrainConfig(out_dir=str(tmp_path / "sae"), saes=[SAEConfig(d_in=32, d_sae=64, k=4, model_name="tiny")], n_tokens=512,
                      batch_size=64, device="cpu", init_tokens=64)
    with pytest.raises(FloatingPointError, match="non-finite"):
        Trainer(cfg, ActivationStore(store.path)).train()


def test_killed_training_resumes_to_the_same_weights(tiny_model, text_corpus, tmp_path):
    store = harvest(harvest_cfg(tmp_path, text_corpus), tiny_model)["blocks.1.hook_resid_post"]
    saes = [SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4, model_name="tiny"),
            SAEConfig(architecture="jumprelu", d_in=32, d_sae=64, model_name="tiny")]
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


# ----------------------------------------------------------------------------- durability
HOOK = "blocks.1.hook_resid_post"


def store_bytes(folder):
    """Every file of a store folder (temp files included), by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def flip_byte(path, offset_from_end=100):
    """Corrupt one byte of the acts region; the safetensors header stays readable."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_stops_training_and_resume_and_the_named_repair_restores_the_store(tiny_bridge, tiny_llama_dir, text_corpus, tmp_path):
    from safetensors.torch import load_file

    from analysis import cli

    cfg = harvest_cfg(tmp_path, text_corpus, model=tiny_llama_dir, hooks=[HOOK])
    store = harvest(cfg, tiny_bridge)[HOOK]
    original = store_bytes(store.path)
    assert len(store.shards) >= 4
    bad = store.path / store.shards[1].file
    flip_byte(bad)
    load_file(str(bad))  # the header is intact: only the checksum can tell
    # training: the reader thread hashes each shard on its first read
    train_cfg = TrainConfig(out_dir=str(tmp_path / "sae"), saes=[SAEConfig(d_in=32, d_sae=64, k=4, model_name=tiny_llama_dir)],
                            n_tokens=64 * 8, batch_size=64, device="cpu", init_tokens=64)
    with pytest.raises(StoreError, match=r"shard_00001\.safetensors: checksum mismatch") as error:
        Trainer(train_cfg, ActivationStore(store.path)).train()
    command = re.search(r"`(saewb harvest --repair [^`]+)`", str(error.value)).group(1)
    # harvest resume (a killed harvest: manifest incomplete) re-checks the shards it lists
    manifest = json.loads((store.path / "manifest.json").read_text())
    (store.path / "manifest.json").write_text(json.dumps({**manifest, "shards": manifest["shards"][:3], "complete": False}))
    (store.path / store.shards[3].file).unlink()
    with pytest.raises(StoreError, match=r"shard_00001\.safetensors do not match") as error:
        harvest(cfg, tiny_bridge)
    assert command in str(error.value)
    # the command named in both errors re-harvests the corrupt and the missing shard: byte-identical
    cli.main(shlex.split(command)[1:])
    assert store_bytes(store.path) == original
    Trainer(train_cfg, ActivationStore(store.path)).train()


def test_repair_of_a_complete_store_redoes_only_the_corrupt_shard(tiny_model, text_corpus, tmp_path, capsys):
    from activations.harvest import repair_config

    store = harvest(harvest_cfg(tmp_path, text_corpus, hooks=[HOOK]), tiny_model)[HOOK]
    original = store_bytes(store.path)
    flip_byte(store.path / store.shards[2].file)
    with pytest.raises(StoreError, match="shard_00002.safetensors: checksum mismatch"):
        store.verify()
    harvest(repair_config(store.path), tiny_model)
    assert "re-harvesting corrupt shard(s) shard_00002.safetensors" in capsys.readouterr().out
    assert store_bytes(store.path) == original


def resume_setup(tmp_path, store, **kw):
    saes = [SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4, model_name="tiny")]
    base = dict(out_dir=str(tmp_path / "sae"), saes=saes, n_tokens=64 * 20, batch_size=64, device="cpu", checkpoint_every=3,
                init_tokens=128, dead_tokens=128, log_every=1)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("change", [dict(lr=1e-3), dict(warmup_steps=7), dict(decay_fraction=0.5), dict(dead_tokens=256),
                                    dict(aux_k=4), dict(aux_coefficient=0.5), dict(autocast="bf16"), dict(init_tokens=64),
                                    dict(sparsity_warmup_fraction=0.2), dict(b_dec_init="mean")])
def test_resume_refuses_other_settings_and_says_what_differs(tiny_model, text_corpus, tmp_path, change):
    store = harvest(harvest_cfg(tmp_path, text_corpus, hooks=[HOOK]), tiny_model)[HOOK]
    Trainer(resume_setup(tmp_path, store, max_steps=3), store).train()
    [(key, value)] = change.items()
    with pytest.raises(ValueError, match=rf"{key}: .* -> {value!r}"):
        Trainer(resume_setup(tmp_path, store, **change), store).train()
    # what a resume may change: where it logs, how often it checkpoints, the device
    Trainer(resume_setup(tmp_path, store, checkpoint_every=5, log_every=2, max_steps=4), store).train()


def test_resume_refuses_another_store(tiny_model, text_corpus, tmp_path):
    store = harvest(harvest_cfg(tmp_path / "a", text_corpus, hooks=[HOOK]), tiny_model)[HOOK]
    other = harvest(harvest_cfg(tmp_path / "b", text_corpus, hooks=[HOOK], n_tokens=700), tiny_model)[HOOK]
    Trainer(resume_setup(tmp_path, store, max_steps=3), store).train()
    with pytest.raises(ValueError, match="source fingerprint: .*another activation store"):
        Trainer(resume_setup(tmp_path, other), other).train()
    with pytest.raises(ValueError, match=r"saes\[0\]\.k: 4 -> 8"):
        Trainer(resume_setup(tmp_path, store, saes=[SAEConfig(architecture="topk", d_in=32, d_sae=64, k=8, model_name="tiny")]), store).train()


def test_a_kill_after_resuming_from_the_old_checkpoint_still_leaves_a_complete_one(tiny_model, text_corpus, tmp_path, monkeypatch):
    from pathlib import Path

    store = harvest(harvest_cfg(tmp_path, text_corpus, hooks=[HOOK]), tiny_model)[HOOK]
    Trainer(resume_setup(tmp_path, store, max_steps=3), store).train()
    sae_dir = tmp_path / "sae"
    (sae_dir / "checkpoint").rename(sae_dir / ".checkpoint.old")  # a kill between the two renames leaves only this
    real_rename = Path.rename

    def killed_before_the_new_checkpoint_lands(self, target):
        if Path(target).name == "checkpoint":
            raise KeyboardInterrupt  # SIGKILL right before the new checkpoint is renamed into place
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_before_the_new_checkpoint_lands)
    with pytest.raises(KeyboardInterrupt):
        Trainer(resume_setup(tmp_path, store, max_steps=6), store).train()
    monkeypatch.setattr(Path, "rename", real_rename)
    survivor = Trainer(resume_setup(tmp_path, store), store)
    assert survivor.load_checkpoint() and survivor.step == 3  # the checkpoint resumed from is still there
    survivor.train()  # and the next run cleans up the dead run's temp folder
    assert not list(sae_dir.glob(".checkpoint*"))


def test_atomic_writes_fsync_file_and_folder_and_remove_temp_files_on_failure(tmp_path, monkeypatch):
    import os
    import stat

    from activations import io as io_module

    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    io_module.atomic_write_bytes(tmp_path / "a.bin", b"abc")
    assert synced == ["file", "dir"]
    synced.clear()
    io_module.atomic_save_safetensors({"x": torch.zeros(3)}, tmp_path / "a.safetensors")
    assert synced == ["file", "dir"]
    monkeypatch.setattr(os, "fsync", real_fsync)

    def torn_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io_module, "save_file", torn_save)
    with pytest.raises(OSError, match="disk full"):
        io_module.atomic_save_safetensors({"x": torch.zeros(3)}, tmp_path / "b.safetensors")

    def failing_replace(self, target):
        raise OSError("rename failed")

    monkeypatch.setattr(type(tmp_path), "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        io_module.atomic_write_bytes(tmp_path / "c.bin", b"abc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.safetensors"]


def test_resume_truncates_metrics_to_the_checkpoint_and_readers_skip_a_torn_line(tiny_model, text_corpus, tmp_path, monkeypatch):
    from analysis.evaluation.evaluate import EvalResult, write_results
    from sae.trainer import read_metrics

    store = harvest(harvest_cfg(tmp_path, text_corpus, hooks=[HOOK]), tiny_model)[HOOK]
    real_save = Trainer.save_checkpoint
    monkeypatch.setattr(Trainer, "save_checkpoint", lambda self: real_save(self) if self.step <= 3 else None)
    Trainer(resume_setup(tmp_path, store, max_steps=7), store).train()  # logged steps 0..6, last checkpoint at 3
    metrics = tmp_path / "sae" / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"sae": "topk_k4_64", "step": 7, "lo')  # killed in the middle of a record
    assert [r["step"] for r in read_metrics(metrics)] == list(range(7))  # the reader skips the torn last line
    fields = {name: 0.0 for name in EvalResult.__dataclass_fields__} | {"n_tokens": 1, "n_ce_tokens": 1, "log10_feature_density": [0.0], "corpus": {}, "metrics": {}}
    write_results(EvalResult(**fields), tmp_path / "eval", metrics)  # the report reads it too
    monkeypatch.setattr(Trainer, "save_checkpoint", real_save)
    Trainer(resume_setup(tmp_path, store), store).train()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(r["sae"], r["step"]) for r in records] == [("topk_k4_64", s) for s in range(20)]


def test_training_and_evaluation_refuse_another_models_activations(tiny_model, tiny_bridge, tiny_llama_dir, text_corpus, tmp_path):
    from activations.model import same_model
    from analysis.evaluation.evaluate import EvalConfig, evaluate
    from sae import ARCHITECTURES

    store = harvest(harvest_cfg(tmp_path, text_corpus, model=tiny_llama_dir, hooks=[HOOK]), tiny_bridge)[HOOK]
    with pytest.raises(ValueError, match=r"model_name='smollm2' but the activations .* come from model"):
        Trainer(resume_setup(tmp_path, store, saes=[SAEConfig(d_in=32, d_sae=64, k=4, model_name="smollm2")]), store)
    with pytest.raises(ValueError, match="names another model"):
        harvest(harvest_cfg(tmp_path / "b", text_corpus, model="smollm2", hooks=[HOOK]), tiny_bridge)
    eval_cfg = EvalConfig(corpus=CorpusConfig(source=str(text_corpus), split="heldout", context_len=16), n_tokens=30,
                          n_ce_contexts=2, batch_contexts=2)
    other = ARCHITECTURES["topk"](SAEConfig(d_in=32, d_sae=64, k=4, hook_name=HOOK, model_name="smollm2"))
    with pytest.raises(ValueError, match=r"expected model 'smollm2', but the model given is .*d_model 32, n_layers 2"):
        evaluate(other, tiny_bridge, eval_cfg)
    ours = ARCHITECTURES["topk"](SAEConfig(d_in=32, d_sae=64, k=4, hook_name=HOOK, model_name=tiny_llama_dir))
    assert evaluate(ours, tiny_bridge, eval_cfg).n_tokens == 30
    evaluate(other, tiny_model, eval_cfg)  # lenient: a model not loaded by load_model has no recorded name
    # spellings of one model
    assert same_model("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct") and not same_model("smollm2", tiny_llama_dir)
    assert same_model(tiny_llama_dir, tiny_llama_dir + "/") and same_model("", "anything")


def test_the_token_cache_follows_the_corpus_text_not_its_path(tiny_model, tmp_path):
    from activations import load_contexts

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"first version document {i} with a few words" for i in range(40)))
    cfg = CorpusConfig(source=str(corpus), context_len=16, split="train")
    first = load_contexts(cfg, tiny_model.tokenizer, cache_dir=tmp_path / "cache")
    stat = corpus.stat()
    corpus.write_text("\n\n".join(f"second text, other words entirely, number {i}" for i in range(40)))
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same path, same modification time, other text
    second = load_contexts(cfg, tiny_model.tokenizer, cache_dir=tmp_path / "cache")
    assert not np.array_equal(first, second)
    assert np.array_equal(second, load_contexts(cfg, tiny_model.tokenizer))  # what the text itself packs to
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
