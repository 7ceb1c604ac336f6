"""End to end on the real embedded SmolLM2 (loaded once per session, ~25 s)."""
import pytest
import torch

from activations import CorpusConfig, HarvestConfig, harvest, run_to_hooks
from analysis import EvalConfig, evaluate
from sae import SAEConfig, load_sae
from sae.trainer import TrainConfig, train

pytestmark = pytest.mark.slow


def test_fast_hook_path_matches_the_bridge_cache(smollm2):
    tokens = torch.randint(100, 40000, (2, 16))
    hooks = ["blocks.3.hook_resid_post", "blocks.2.hook_mlp_out", "blocks.4.hook_resid_pre", "blocks.1.hook_attn_out"]
    fast = run_to_hooks(smollm2, tokens, hooks)
    _, cache = smollm2.run_with_cache(tokens, names_filter=hooks, stop_at_layer=5)
    for hook in hooks:
        assert torch.allclose(fast[hook], cache[hook], atol=1e-5), hook


def test_harvest_train_evaluate_on_smollm2(smollm2, tmp_path):
    hook = "blocks.8.hook_resid_post"
    store = harvest(HarvestConfig(out_dir=str(tmp_path / "acts"), hooks=[hook], n_tokens=24_000, shard_contexts=64, device="cpu"), smollm2)[hook]
    assert store.d_in == 576 and store.n_tokens >= 24_000
    [path] = train(TrainConfig(out_dir=str(tmp_path / "sae"), saes=[SAEConfig(d_in=576, d_sae=1152, k=32, hook_name=hook)],
                               n_tokens=48_000, batch_size=512, device="cpu"), store)
    sae = load_sae(path)
    result = evaluate(sae, smollm2, EvalConfig(corpus=CorpusConfig(split="heldout"), n_tokens=4096, n_ce_contexts=8))
    # TopK keeps the k largest pre-activations and ReLUs them: at most k = 32 per token, fewer where the k-th is not
    # positive (an SAE this young has such tokens: 31.98 on a CPU without AVX-512, where the harvest runs in fp32)
    assert 31.5 < result.l0 <= 32 + 1e-9
    assert result.fvu < 0.8
    assert result.ce_zero_ablated > result.ce_spliced > result.ce_clean
    assert result.ce_loss_recovered > 0.6, result


def test_wrong_hook_and_d_in_mismatch_on_the_real_model(smollm2):
    with pytest.raises(KeyError, match="no hook point"):
        run_to_hooks(smollm2, torch.zeros(1, 4, dtype=torch.long), ["blocks.99.hook_resid_post"])
    from sae import ARCHITECTURES

    sae = ARCHITECTURES["topk"](SAEConfig(d_in=100, d_sae=200, k=4, hook_name="blocks.8.hook_resid_post"))
    with pytest.raises(ValueError, match="d_in=100"):
        evaluate(sae, smollm2, EvalConfig(n_tokens=254, n_ce_contexts=2, batch_contexts=2))
