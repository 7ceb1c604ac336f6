"""Invariants for every registered architecture, plus feature recovery on synthetic data."""
import pytest
import torch

from sae import ARCHITECTURES, SAEConfig, load_sae
from sae.common import normalize_decoder_rows, project_out_parallel_grad

ARCHS = sorted(ARCHITECTURES)


def make(arch, d_in=16, d_sae=64, **kw):
    return ARCHITECTURES[arch](SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=4, **kw))


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_is_decode_of_encode(arch):
    sae = make(arch)
    with torch.no_grad():
        sae.b_enc.normal_()
    x = torch.randn(10, 16)
    assert torch.allclose(sae(x), sae.decode(sae.encode(x)))


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_identity(arch, tmp_path):
    sae = make(arch)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.3)
    sae.save(tmp_path / "s")
    loaded = load_sae(tmp_path / "s")
    assert type(loaded) is type(sae)
    x = torch.randn(20, 16)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x), sae(x))


def test_topk_l0_is_k():
    sae = make("topk")
    f = sae.encode(torch.randn(50, 16) * 5)
    assert ((f != 0).sum(-1) == 4).all()


def test_d_in_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="d_in=16"):
        make("topk").encode(torch.randn(3, 17))


def test_decoder_gradient_projection_removes_the_parallel_part():
    w = torch.randn(5, 8)
    normalize_decoder_rows(w)
    w.requires_grad_(True)
    w.grad = torch.randn(5, 8)
    project_out_parallel_grad(w)
    assert torch.allclose((w.grad * w).sum(1), torch.zeros(5), atol=1e-6)


def synthetic_batches(n_features=48, d_in=24, active=3, seed=0):
    """Sparse combinations of known unit directions: x = sum_i c_i d_i, 3 active per sample."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_features, d_in, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)

    class Source:
        d_in = 24
        hook_name = "synthetic"
        n_tokens = 2048 * 8

        def iter_batches(self, batch_size, seed=0, epoch=0, rank=0, world_size=1):
            g = torch.Generator().manual_seed(seed * 1000 + epoch)
            for _ in range(self.n_tokens // batch_size):
                idx = torch.rand(batch_size, n_features, generator=g).argsort(1)[:, :active]
                coef = torch.zeros(batch_size, n_features).scatter_(1, idx, 1 + torch.rand(batch_size, active, generator=g))
                yield coef @ directions

    return Source(), directions


@pytest.mark.parametrize("arch", ARCHS)
def test_training_recovers_known_features_and_keeps_decoder_unit_norm(arch, tmp_path):
    from sae.trainer import Trainer, TrainConfig

    source, directions = synthetic_batches()
    extra = {"standard": dict(l1_coefficient=0.3), "jumprelu": dict(l0_coefficient=0.02)}.get(arch, {})
    cfg = TrainConfig(
        out_dir=str(tmp_path), saes=[SAEConfig(architecture=arch, d_in=24, d_sae=96, k=3, **extra)], n_tokens=256 * 600,
        batch_size=256, lr=3e-3, warmup_steps=20, dead_tokens=256 * 50, checkpoint_every=10_000, device="cpu",
    )
    trainer = Trainer(cfg, source)
    first_loss = None
    trainer.train()
    sae = trainer.saes[0]
    norms = sae.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    import json
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first_loss, last_loss = records[0]["mse"], records[-1]["mse"]
    assert last_loss < 0.2 * first_loss
    cos = (directions @ (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)).T).max(dim=1).values
    assert (cos > 0.9).float().mean() > 0.8, f"recovered {(cos > 0.9).float().mean():.2f} of the features"


def test_jumprelu_threshold_moves_and_l0_falls(tmp_path):
    from sae.trainer import Trainer, TrainConfig

    source, _ = synthetic_batches()
    cfg = TrainConfig(
        out_dir=str(tmp_path), saes=[SAEConfig(architecture="jumprelu", d_in=24, d_sae=96, l0_coefficient=0.05)],
        n_tokens=256 * 300, batch_size=256, lr=3e-3, warmup_steps=10, checkpoint_every=10_000, device="cpu", log_every=10,
    )
    trainer = Trainer(cfg, source)
    start_threshold = trainer.saes[0].threshold.detach().clone()
    trainer.train()
    import json
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    moved = (trainer.saes[0].threshold.detach() - start_threshold).abs().mean()
    assert moved > 0.05, f"threshold barely moved ({moved:.4f})"
    assert records[-1]["l0"] < 0.5 * records[0]["l0"], (records[0]["l0"], records[-1]["l0"])


def test_trainer_rejects_d_in_mismatch(tmp_path):
    from sae.trainer import Trainer, TrainConfig

    source, _ = synthetic_batches()
    with pytest.raises(ValueError, match="does not match"):
        Trainer(TrainConfig(out_dir=str(tmp_path), saes=[SAEConfig(d_in=25, d_sae=32, k=2)]), source)
