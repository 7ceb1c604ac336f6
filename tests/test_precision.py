"""The precision probe: `autocast="auto"` keeps the faster of fp32 and bf16 autocast, never an
inaccurate bf16, and a resumed harvest keeps the precision its first run recorded."""
import json

import pytest
import torch

from activations import CorpusConfig, HarvestConfig, harvest, precision
from activations.precision import PrecisionProbe, probe_precision, relative_error, resolve_autocast

HOOK = "blocks.1.hook_resid_post"


def test_relative_error_is_squared_error_over_variance():
    exact = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # column means (2, 1): variance sum 1 + 1 + 1 + 1 = 4
    approx = exact + torch.tensor([[0.5, 0.0], [0.0, -0.5]])  # squared error 0.25 + 0.25
    assert relative_error(approx, exact) == pytest.approx(0.5 / 4)


def _fake_timings(monkeypatch, rates: dict[str, float], bf16_offset: float):
    acts = torch.randn(2, 5, 4)

    def timed(model, tokens, hooks, autocast, repeats):
        return rates[autocast], {h: acts + (bf16_offset if autocast == "bf16" else 0.0) for h in hooks}

    monkeypatch.setattr(precision, "_timed", timed)


@pytest.mark.parametrize("rates, offset, choice", [
    ({"none": 100.0, "bf16": 200.0}, 1e-3, "bf16"),   # faster and accurate
    ({"none": 200.0, "bf16": 100.0}, 1e-3, "none"),   # slower
    ({"none": 100.0, "bf16": 200.0}, 1.0, "none"),    # faster but inaccurate: fp32 whatever the speed
])
def test_the_probe_keeps_the_faster_accurate_precision(monkeypatch, rates, offset, choice):
    _fake_timings(monkeypatch, rates, offset)
    probe = probe_precision(None, torch.zeros(2, 5, dtype=torch.long), [HOOK])
    assert probe.choice == choice and probe.tokens_per_s == rates
    assert (probe.bf16_error <= precision.MAX_BF16_ERROR) == (offset < 0.1)


def test_explicit_settings_are_kept_and_bad_ones_refused(tiny_model):
    tokens = torch.zeros(2, 8, dtype=torch.long)
    assert resolve_autocast("none", tiny_model, tokens, [HOOK]) == "none"
    assert resolve_autocast("bf16", tiny_model, tokens, [HOOK]) == "bf16"
    assert resolve_autocast("auto", tiny_model, tokens, [HOOK]) in precision.AUTOCASTS  # a real probe on the tiny model
    with pytest.raises(ValueError, match="autocast"):
        resolve_autocast("fp8", tiny_model, tokens, [HOOK])
    with pytest.raises(ValueError, match="autocast"):
        HarvestConfig(autocast="fp16")


def test_a_resumed_auto_harvest_keeps_the_recorded_precision(tiny_model, text_corpus, tmp_path, monkeypatch):
    cfg = HarvestConfig(out_dir=str(tmp_path), model="tiny", hooks=[HOOK], corpus=CorpusConfig(source=str(text_corpus), context_len=16),
                        n_tokens=300, batch_contexts=4, shard_contexts=8, dtype="float32", autocast="auto", device="cpu")
    monkeypatch.setattr(precision, "probe_precision", lambda *a, **k: PrecisionProbe("bf16", {"none": 1.0, "bf16": 2.0}, 0.0))
    store = harvest(cfg, tiny_model)[HOOK]
    assert store.manifest["autocast"] == "bf16"  # the manifest records the concrete choice, not "auto"
    manifest = json.loads((store.path / "manifest.json").read_text())
    manifest["complete"], manifest["shards"] = False, manifest["shards"][:1]  # as if killed after one shard
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(precision, "probe_precision", lambda *a, **k: pytest.fail("a resume must not probe again"))
    resumed = harvest(cfg, tiny_model)[HOOK]
    assert resumed.manifest["autocast"] == "bf16" and resumed.n_tokens == store.n_tokens
    assert HarvestConfig().autocast == "auto"  # the default measures, it does not guess


def test_training_precision_is_measured_for_large_encoders_and_kept_by_a_resume(tmp_path, monkeypatch):
    """TrainConfig.autocast="auto": fp32 below MIN_TRAINING_PROBE_WEIGHTS without timing; else the
    faster encoder matmul; a resumed run keeps what its checkpoint recorded."""
    from activations import precision
    from sae import SAEConfig
    from sae.trainer import TrainConfig, Trainer
    from tests.test_sae import synthetic_batches

    assert precision.training_autocast(256, 24, 96, torch.device("cpu")) == "none"  # small: no probe
    choice = precision.training_autocast(512, 256, 4096, torch.device("cpu"), repeats=1)
    assert choice in ("none", "bf16") and precision.training_autocast(512, 256, 4096, torch.device("cpu")) == choice  # measured once
    source, _ = synthetic_batches()
    cfg = TrainConfig(out_dir=str(tmp_path), saes=[SAEConfig(architecture="topk", d_in=24, d_sae=96, k=3)], n_tokens=256 * 4,
                      batch_size=256, checkpoint_every=2, max_steps=2, device="cpu", autocast="bf16")
    Trainer(cfg, source).train()
    from dataclasses import replace

    resumed = Trainer(replace(cfg, autocast="auto", max_steps=None), source)  # the checkpoint says bf16: no probe, no switch
    assert resumed.cfg.autocast == "bf16"
    resumed.train()
    assert Trainer(replace(cfg, out_dir=str(tmp_path / "new"), autocast="auto"), source).cfg.autocast == "none"
