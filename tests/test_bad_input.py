"""Broken SAE directories and broken activations give errors that say what is wrong and
what is allowed, instead of a raw KeyError / TypeError or a silently wrong SAE."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from sae import ARCHITECTURES, SAEConfig, load_sae


def saved_sae(tmp_path, architecture="jumprelu"):
    sae = ARCHITECTURES[architecture](SAEConfig(architecture=architecture, d_in=8, d_sae=16, k=2))
    path = sae.save(tmp_path / "sae")
    return path, json.loads((path / "cfg.json").read_text())


def rewrite(path, cfg):
    (path / "cfg.json").write_text(json.dumps(cfg))


def test_cfg_json_without_architecture_is_an_error_naming_the_file_and_the_architectures(tmp_path):
    path, cfg = saved_sae(tmp_path, "standard")
    del cfg["metadata"]["workbench_config"]  # another tool's SAE Lens-format file...
    del cfg["architecture"]  # ...that does not say which SAE it is
    rewrite(path, cfg)
    with pytest.raises(ValueError, match="cfg.json has no \"architecture\"") as error:
        load_sae(path)
    message = str(error.value)
    assert str(path / "cfg.json") in message and str(sorted(ARCHITECTURES)) in message
    assert "\"architecture\": \"standard\"" in message  # what an old SAE Lens file without it meant
    cfg["architecture"] = "standard"  # once added, it loads
    rewrite(path, cfg)
    assert load_sae(path).architecture == "standard"


def test_workbench_config_without_or_with_an_unregistered_architecture_is_an_error(tmp_path):
    path, cfg = saved_sae(tmp_path, "jumprelu")
    del cfg["metadata"]["workbench_config"]["architecture"]  # would silently load as the default, topk
    rewrite(path, cfg)
    with pytest.raises(ValueError, match="workbench_config.*has no \"architecture\"; registered architectures"):
        load_sae(path)
    cfg["metadata"]["workbench_config"]["architecture"] = "gated"
    rewrite(path, cfg)
    with pytest.raises(ValueError, match="architecture 'gated' is not registered; registered: \\['batchtopk'"):
        load_sae(path)


def test_unknown_workbench_config_keys_are_named_with_the_file(tmp_path):
    path, cfg = saved_sae(tmp_path)
    ours = cfg["metadata"]["workbench_config"]
    rewrite(path, cfg | {"metadata": {**cfg["metadata"], "workbench_config": ours | {"d_hidden": 16, "activation": "relu"}}})
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\['activation', 'd_hidden'\\]; the known keys are \\['architecture'") as error:
        load_sae(path)
    assert str(path / "cfg.json") in str(error.value)
    rewrite(path, cfg | {"metadata": {**cfg["metadata"], "workbench_config": ours | {"d_sae": -3}}})  # a bad value: named too
    with pytest.raises(ValueError, match="workbench_config.*d_sae must be positive"):
        load_sae(path)


def test_nan_in_the_init_sample_is_reported_as_broken_activations_with_the_shard(tiny_model, text_corpus, tmp_path):
    from activations import ActivationStore, CorpusConfig, HarvestConfig, harvest
    from activations.store import sha256_file
    from sae.trainer import TrainConfig, train

    cfg = HarvestConfig(out_dir=str(tmp_path / "acts"), model="tiny", hooks=["blocks.0.hook_resid_post"],
                        corpus=CorpusConfig(source=str(text_corpus), context_len=16), n_tokens=600, batch_contexts=4, shard_contexts=8,
                        dtype="float32", autocast="none", device="cpu")
    store = harvest(cfg, tiny_model)["blocks.0.hook_resid_post"]
    assert len(store.shards) > 2
    # one shard holds a few NaN / inf rows (as a float16 overflow or a bad disk would leave),
    # with a matching checksum so that only the values are wrong
    shard = store.shards[1]
    tensors = load_file(str(store.path / shard.file))
    tensors["acts"][3] = float("nan")
    tensors["acts"][5, 0] = float("inf")
    save_file(tensors, str(store.path / shard.file))
    manifest = json.loads((store.path / "manifest.json").read_text())
    manifest["shards"][1]["sha256"] = sha256_file(store.path / shard.file)
    (store.path / "manifest.json").write_text(json.dumps(manifest))

    sae_cfg = SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4, hook_name=store.hook_name, model_name="tiny")
    train_cfg = TrainConfig(out_dir=str(tmp_path / "sae"), saes=[sae_cfg], n_tokens=64 * 20,
                            batch_size=64, device="cpu", init_tokens=4096)
    with pytest.raises(ValueError, match="contain NaN/inf") as error:
        train(train_cfg, ActivationStore(store.path))
    message = str(error.value)
    assert str(store.path) in message and f"{shard.file} (2 rows)" in message
    assert "lower the learning rate" not in message
