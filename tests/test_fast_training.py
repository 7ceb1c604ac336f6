"""The optimised training paths against the plain ones they replace: the hand-written
backward passes and fused Adam (`TrainConfig.fast_kernels`) give the loss curve and weights
of plain autograd, and the prefetching, pinned, rank-sliced store reader yields the batches
of the plain synchronous reader."""
import dataclasses
import json

import pytest
import torch

from activations import CorpusConfig, HarvestConfig, harvest
from sae import ARCHITECTURES, SAE, SAEConfig
from sae.trainer import Objective, TrainConfig, Trainer
from tests.test_sae import ARCHS as SAE_ARCHS
from tests.test_sae import synthetic_batches


def train_curve(tmp_path, arch: str, fast: bool, autocast: str = "none"):
    source, _ = synthetic_batches()
    extra = {"standard": dict(l1_coefficient=0.3), "jumprelu": dict(l0_coefficient=0.02)}.get(arch, {})
    out = tmp_path / f"{arch}_{fast}_{autocast}"
    cfg = TrainConfig(
        out_dir=str(out), saes=[SAEConfig(architecture=arch, d_in=24, d_sae=96, k=3, **extra)], n_tokens=256 * 40,
        batch_size=256, lr=3e-3, warmup_steps=5, dead_tokens=256 * 4, aux_k=12, checkpoint_every=10_000, log_every=1,
        device="cpu", autocast=autocast, fast_kernels=fast,
    )
    trainer = Trainer(cfg, source)
    trainer.train()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records, trainer.saes[0].state_dict()


@pytest.mark.parametrize("arch", SAE_ARCHS)
def test_fast_training_gives_the_plain_autograd_loss_curve(arch, tmp_path):
    fast, fast_weights = train_curve(tmp_path, arch, True)
    plain, plain_weights = train_curve(tmp_path, arch, False)
    if ARCHITECTURES[arch].aux_loss is not SAE.aux_loss:  # the architecture has an auxiliary loss (AuxK)
        assert any(r["aux_loss"] > 0 for r in plain)  # AuxK's sparse backward is exercised too
    assert len(fast) == len(plain) == 40
    for a, b in zip(fast, plain):
        for metric in ("loss", "mse", "l0", "aux_loss"):  # measured: equal to ~1e-6
            assert a[metric] == pytest.approx(b[metric], rel=1e-4, abs=1e-5), (a["step"], metric)
    for name, p in plain_weights.items():
        assert torch.allclose(fast_weights[name], p, rtol=1e-4, atol=1e-5), (name, (fast_weights[name] - p).abs().max())


def test_fast_training_under_bf16_autocast_tracks_plain_autograd(tmp_path):
    """bf16: plain autograd runs the backward matmuls in bf16, the sparse backward in fp32,
    so the curves agree to bf16 precision rather than bit for bit."""
    fast, _ = train_curve(tmp_path, "topk", True, "bf16")
    plain, _ = train_curve(tmp_path, "topk", False, "bf16")
    for a, b in zip(fast, plain):
        assert a["mse"] == pytest.approx(b["mse"], rel=0.03), a["step"]
    assert fast[-1]["mse"] < 0.5 * fast[0]["mse"]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_fast_kernels_setting_reaches_adam_and_the_backward_passes(fast, tmp_path, monkeypatch):
    """Without this, the comparisons above would pass with the setting ignored."""
    from sae import common

    calls = {"gather": 0, "decode": 0}
    for name, fn in (("gather", common._GatherPreActs), ("decode", common._SparseDecode)):
        monkeypatch.setattr(fn, "apply", lambda *a, _fn=fn.apply, _name=name: calls.__setitem__(_name, calls[_name] + 1) or _fn(*a))
    source, _ = synthetic_batches()
    cfg = TrainConfig(out_dir=str(tmp_path), saes=[SAEConfig(architecture="topk", d_in=24, d_sae=96, k=3)], n_tokens=256 * 4,
                      batch_size=256, checkpoint_every=10_000, device="cpu", fast_kernels=fast)
    trainer = Trainer(cfg, source)
    assert bool(trainer.optimizers[0].defaults["fused"]) == fast
    trainer.train()
    assert (calls["gather"] > 0 and calls["decode"] > 0) == fast and (calls["gather"] + calls["decode"] == 0) != fast


@pytest.mark.parametrize("arch", SAE_ARCHS)
def test_fast_gradients_equal_autograd_for_one_step(arch):
    """Every parameter's gradient, with AuxK on, from both paths."""
    grads = {}
    for fast in (True, False):
        torch.manual_seed(0)
        sae = ARCHITECTURES[arch](SAEConfig(architecture=arch, d_in=48, d_sae=256, k=8, l1_coefficient=0.3))
        with torch.no_grad():
            sae.b_dec.normal_()
            sae.b_enc.normal_(std=0.1)
        dead = torch.zeros(256, dtype=torch.bool)
        dead[::3] = True
        Objective(sae, 24, 1 / 32, fast)(torch.randn(128, 48) * 2, 1.0, dead).loss.backward()
        grads[fast] = {n: p.grad for n, p in sae.named_parameters()}
    for name, g in grads[False].items():
        # fp32 sums in another order: entries near zero by cancellation differ by ~1e-7 of the largest
        assert torch.allclose(grads[True][name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max())), name


def test_prefetched_pinned_rank_sliced_batches_equal_plain_reading(tiny_model, text_corpus, tmp_path):
    cfg = HarvestConfig(out_dir=str(tmp_path), model="tiny", hooks=["blocks.1.hook_resid_post"],
                        corpus=CorpusConfig(source=str(text_corpus), context_len=16), n_tokens=900, batch_contexts=4,
                        shard_contexts=8, dtype="bfloat16", autocast="none", device="cpu")
    store = harvest(cfg, tiny_model)["blocks.1.hook_resid_post"]
    plain = list(store.iter_batches(64, seed=2, epoch=1, window_shards=2, prefetch=False, pin_memory=False))
    fast = list(store.iter_batches(64, seed=2, epoch=1, window_shards=2, prefetch=True))
    assert len(plain) == store.n_tokens // 64 and len(fast) == len(plain)
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(plain, fast))
    # two ranks: each gets half of every global batch, in order
    halves = [list(store.iter_batches(32, seed=2, epoch=1, window_shards=2, rank=r, world_size=2)) for r in (0, 1)]
    assert all(torch.equal(torch.cat([a, b]), g) for a, b, g in zip(*halves, plain))


@pytest.mark.parametrize("spread", [1.0, 5.0, 100.0])
def test_batchtopk_selection_equals_a_top_k_over_the_whole_batch(spread):
    """BatchTopK picks its candidates per row (top 4k, widened when a row may keep more);
    the kept set must equal a top-(k * batch) over every value of the batch."""
    from sae.batchtopk import BatchTopKSAE

    sae = BatchTopKSAE(SAEConfig(architecture="batchtopk", d_in=8, d_sae=512, k=4))
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(64, 512, generator=gen).relu() * torch.rand(64, 1, generator=gen)
    acts[0] *= spread  # one row far above the rest keeps far more than 4k
    indices, kept = sae._batch_top_k(acts)
    chosen = torch.zeros_like(acts, dtype=torch.bool)
    chosen[torch.arange(64)[:, None].expand_as(indices)[kept], indices[kept]] = True
    expected = torch.zeros(acts.numel(), dtype=torch.bool).scatter_(0, acts.flatten().topk(4 * 64).indices, True).view_as(acts)
    assert torch.equal(chosen, expected)
    assert float(sae.threshold) == pytest.approx(float(acts.flatten().topk(4 * 64).values[-1]))


def test_gradient_clipping_bounds_each_step_and_none_turns_it_off(tmp_path, monkeypatch):
    """`TrainConfig.max_grad_norm` clips each SAE's whole gradient before Adam; 0: off; None (the default): the
    architecture's own (TopK 1.0, as SAE Lens; JumpReLU none)."""
    source, _ = synthetic_batches()
    norms = []
    real = torch.nn.utils.clip_grad_norm_

    def recording(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        total = real(parameters, max_norm, *args, **kwargs)
        norms.append((float(total), float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters])))))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)

    def run(clip):
        cfg = TrainConfig(out_dir=str(tmp_path / f"clip_{clip}"), saes=[SAEConfig(architecture="topk", d_in=24, d_sae=96, k=3)],
                          n_tokens=256 * 6, batch_size=256, lr=3e-3, warmup_steps=1, checkpoint_every=10_000, device="cpu",
                          max_grad_norm=clip)
        trainer = Trainer(cfg, source)
        trainer.train()
        return trainer.saes[0].W_enc.detach().clone()

    assert TrainConfig.max_grad_norm is None and ARCHITECTURES["topk"].max_grad_norm == 1.0 and ARCHITECTURES["jumprelu"].max_grad_norm is None
    unclipped = run(0)
    assert norms == []  # off
    run(None)
    assert len(norms) == 6  # TopK's own: 1.0
    norms.clear()
    clipped = run(1e-3)
    assert len(norms) == 6 and all(before > 1e-3 and after <= 1e-3 * 1.01 for before, after in norms)
    assert not torch.allclose(clipped, unclipped)


def test_the_stores_of_one_harvest_read_in_step_and_each_sae_records_its_own_store(tiny_model, text_corpus, tmp_path):
    """`StoreRows`: a stack's hooks from one stream of batches, each row one token at every hook; a store of other
    tokens is refused; a view reports its own store's provenance and fingerprint."""
    from sae.stream import StoreRows, column_views

    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    cfg = HarvestConfig(out_dir=str(tmp_path / "one"), model="tiny", hooks=hooks, corpus=CorpusConfig(source=str(text_corpus), context_len=16),
                        n_tokens=900, batch_contexts=4, shard_contexts=8, dtype="bfloat16", autocast="none", device="cpu")
    stores = harvest(cfg, tiny_model)
    rows = StoreRows([stores[h] for h in hooks])
    assert rows.d_in == 2 * stores[hooks[0]].d_in
    joint = list(rows.iter_batches(64, seed=5, epoch=2))
    apart = [list(stores[h].iter_batches(64, seed=5, epoch=2)) for h in hooks]
    assert len(joint) == len(apart[0]) > 0
    assert all(torch.equal(j, torch.cat([a, b], 1)) for j, a, b in zip(joint, *apart))
    views = column_views(rows, rows.widths, hooks, parts=[stores[h] for h in hooks])
    assert views[1].training_data["store"] == str(stores[hooks[1]].path) and views[1].fingerprint == stores[hooks[1]].fingerprint
    other = harvest(dataclasses.replace(cfg, out_dir=str(tmp_path / "other"), hooks=hooks[:1], n_tokens=600), tiny_model)
    with pytest.raises(ValueError, match="not one harvest|same tokens"):
        StoreRows([stores[hooks[1]], other[hooks[0]]])
