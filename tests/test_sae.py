"""Invariants for every registered architecture, plus feature recovery on synthetic data."""
import pytest
import torch

from sae import ARCHITECTURES, SAEConfig, load_sae
from sae.common import normalize_decoder_rows, project_out_parallel_grad, sparse_decode

ARCHS = sorted(a for a, cls in ARCHITECTURES.items() if not cls.is_transcoder)  # transcoders: tests/test_transcoder.py

ENCODING = {  # how each architecture encodes (the papers: Bricken et al. 2023, Gao et al. 2024, Bussmann et al. 2024, Rajamanoharan et al. 2024), written independently of sae/*.py: one line per architecture
    "topk": "topk",  # topk(relu(pre), k) per token
    "standard": "relu",
    "jumprelu": "threshold",  # pre * H(pre - theta), theta per latent
    "batchtopk": "batch_topk",  # training: the k * batch largest of the batch; inference: JumpReLU with one theta
    "matryoshka": "batch_topk",  # BatchTopK's code (its loss sums nested prefixes: tests/test_matryoshka.py)
}


def encoding(sae) -> str:
    if sae.cfg.architecture not in ENCODING:
        pytest.fail(f"no reference formula for architecture {sae.cfg.architecture!r}: add one to ENCODING")
    return ENCODING[sae.cfg.architecture]


def make(arch, d_in=16, d_sae=64, **kw):
    return ARCHITECTURES[arch](SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=4, **kw))


def make_nontrivial(arch, d_in=16, d_sae=64):
    """An SAE with every parameter away from its init: W_enc untied from W_dec (so mixing
    them up shows), b_enc mostly negative (TopK rows with fewer than k positive
    pre-activations), b_dec non-zero, and thresholds inside the pre-activations' range."""
    sae = make(arch, d_in, d_sae)
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.4)
        sae.b_enc.normal_(-1.5, 0.5)
        sae.b_dec.normal_(0, 1.0)
        if encoding(sae) == "threshold":
            sae.threshold.uniform_(0.1, 1.0)  # per latent
        if encoding(sae) == "batch_topk":
            sae.threshold.fill_(0.5)  # one scalar theta at inference
    return sae


def inputs(sae, *shape):
    """Tokens at distances 0 to 3 from b_dec: near it every pre-activation is about b_enc < 0,
    so TopK keeps fewer than k, and thresholds cut some positive pre-activations."""
    return sae.b_dec.detach() + torch.randn(*shape, sae.cfg.d_in) * torch.rand(*shape, 1) * 3


def reference_pre(sae, x):
    """(x - b_dec) @ W_enc + b_enc in float64, from the parameters alone."""
    return (x.double() - sae.b_dec.detach().double()) @ sae.W_enc.detach().double() + sae.b_enc.detach().double()


def reference_encode(sae, x):
    """The inference activations as the papers define them, in float64, written independently of sae/*.py."""
    pre = reference_pre(sae, x)
    rule = encoding(sae)
    if rule == "topk":  # topk(relu(pre)): the k largest pre-activations of each token, then ReLU
        keep = torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, pre.argsort(-1, descending=True)[..., :sae.cfg.k], True)
        return torch.where(keep & (pre > 0), pre, torch.zeros_like(pre))
    if rule == "relu":
        return torch.where(pre > 0, pre, torch.zeros_like(pre))
    if rule in ("threshold", "batch_topk"):  # pre * H(pre - theta); BatchTopK at inference: JumpReLU with its theta
        return torch.where(pre > sae.threshold.detach().double(), pre, torch.zeros_like(pre))
    pytest.fail(f"no reference formula for encoding {rule!r}")


def reference_decode(sae, f):
    return f.double() @ sae.W_dec.detach().double() + sae.b_dec.detach().double()


def _check_reference_is_exercised(sae, x, f_ref):
    """The data must hit the cases a wrong formula gets wrong."""
    pre = reference_pre(sae, x).flatten(0, -2)
    f_ref = f_ref.flatten(0, -2)
    rule = encoding(sae)
    if rule == "topk":
        n_active = (f_ref != 0).sum(-1)
        assert (n_active == sae.cfg.k).any() and (n_active < sae.cfg.k).any()  # ReLU after the top-k matters
        assert ((pre > 0) & (f_ref == 0)).any()  # positive but outside the top k
    if rule in ("threshold", "batch_topk"):
        assert ((pre > 0) & (f_ref == 0)).any() and (f_ref > 0).any()  # between 0 and theta: dropped


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_encode_matches_the_reference_formula(arch, grad):
    # with gradients on, inference is plain autograd (the hand-written backward passes of
    # sae.common are for training only, with fast=True), and gives the same code
    sae = make_nontrivial(arch)
    x = inputs(sae, 200)
    f_ref = reference_encode(sae, x)
    _check_reference_is_exercised(sae, x, f_ref)
    with torch.set_grad_enabled(grad):
        f = sae.encode(x)
    assert f.shape == (200, 64) and f.dtype == torch.float32
    assert torch.allclose(f.double(), f_ref, atol=1e-5)
    assert torch.equal(f != 0, f_ref != 0)


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_is_the_affine_map(arch):
    sae = make_nontrivial(arch)
    f = torch.randn(7, 3, 64).relu() * (torch.rand(7, 3, 64) < 0.2)
    assert torch.allclose(sae.decode(f).double(), reference_decode(sae, f), atol=1e-5)
    assert torch.allclose(sae.decode(torch.zeros(64)), sae.b_dec)  # nothing active: b_dec


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_sparse_decode_equals_a_dense_matmul(grad):
    """sae.common.sparse_decode (embedding bag; a custom autograd function with gradients and
    fast=True) against scattering the values into a dense (batch d_sae) code and multiplying."""
    gen = torch.Generator().manual_seed(3)
    w_dec = torch.randn(64, 16, generator=gen).requires_grad_(grad)
    b_dec = torch.randn(16, generator=gen)
    indices = torch.stack([torch.randperm(64, generator=gen)[:5] for _ in range(30)])
    values = torch.rand(30, 5, generator=gen) * 3
    values[:4, 3:] = 0  # BatchTopK pads rows with (index 0, value 0)
    indices[:4, 3:] = 0
    dense = torch.zeros(30, 64).scatter_add_(1, indices, values)
    expected = dense.double() @ w_dec.detach().double()
    with torch.set_grad_enabled(grad):
        out = sparse_decode(values, indices, w_dec, b_dec, fast=True)
        no_bias = sparse_decode(values, indices, w_dec, fast=True)
    assert out.shape == (30, 16)
    assert torch.allclose(out.double(), expected + b_dec.double(), atol=1e-5)
    assert torch.allclose(no_bias.double(), expected, atol=1e-5)


def reference_training_code(sae, x):
    """The code the training forward decodes: as at inference, except BatchTopK, which keeps
    the k * batch largest ReLU'd pre-activations of the whole batch."""
    if encoding(sae) != "batch_topk":
        return reference_encode(sae, x)
    acts = reference_pre(sae, x).clamp_min(0)
    keep = torch.zeros(acts.numel(), dtype=torch.bool).scatter_(0, acts.flatten().topk(sae.cfg.k * len(x)).indices, True)
    return torch.where(keep.view_as(acts), acts, torch.zeros_like(acts))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_training_reconstruction_matches_the_formula(arch, fast):
    """training_forward's x_hat (sparse decode of gathered pre-activations for TopK and
    BatchTopK, fast or plain autograd) equals decoding the reference code densely."""
    sae = make_nontrivial(arch)
    x = inputs(sae, 100)
    f_ref = reference_training_code(sae, x)
    out = sae.training_forward(x, fast=fast)
    x_hat_ref = reference_decode(sae, f_ref)
    assert torch.allclose(out.x_hat.double(), x_hat_ref, atol=1e-5)
    assert torch.allclose(out.mse.double(), (x.double() - x_hat_ref).pow(2).sum(-1).mean(), rtol=1e-5)
    assert float(out.l0) == pytest.approx(float((f_ref != 0).sum(-1).double().mean()), abs=1e-6)
    assert torch.equal(out.active, (f_ref != 0).any(0))


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_inputs_equal_per_row_results(arch):
    """(batch pos d_in) inputs give, token by token, what one token at a time gives (2-D
    inputs) and the reference formula."""
    sae = make_nontrivial(arch)
    x = inputs(sae, 3, 5)
    f, x_hat = sae.encode(x), sae(x)
    assert f.shape == (3, 5, 64) and x_hat.shape == (3, 5, 16)
    for b in range(3):
        for p in range(5):
            assert torch.allclose(f[b, p], sae.encode(x[b, p][None])[0], atol=1e-6)
            assert torch.allclose(x_hat[b, p], sae(x[b, p][None])[0], atol=1e-6)
    assert torch.allclose(f.double(), reference_encode(sae, x), atol=1e-5)
    assert torch.allclose(x_hat.double(), reference_decode(sae, reference_encode(sae, x)), atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
@pytest.mark.parametrize("shape", [(16,), (9, 16), (2, 4, 16)], ids=["token", "batch", "batch_pos"])
def test_dtype_and_shape_are_preserved(arch, dtype, shape):
    sae = make_nontrivial(arch).to(dtype)
    x = inputs(sae, *shape[:-1]).to(dtype)
    f, x_hat = sae.encode(x), sae(x)
    assert f.dtype == x_hat.dtype == dtype
    assert f.shape == (*shape[:-1], 64) and x_hat.shape == shape
    if dtype == torch.float64:  # full precision: the formula itself
        assert torch.allclose(f, reference_encode(sae, x), atol=1e-10)
        assert torch.allclose(x_hat, reference_decode(sae, reference_encode(sae, x)), atol=1e-10)


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
    from sae.trainer import TrainConfig, Trainer

    source, directions = synthetic_batches()
    extra = {"standard": dict(l1_coefficient=0.3), "jumprelu": dict(l0_coefficient=0.02)}.get(arch, {})
    cfg = TrainConfig(
        out_dir=str(tmp_path), saes=[SAEConfig(architecture=arch, d_in=24, d_sae=96, k=3, **extra)], n_tokens=256 * 300,
        batch_size=256, lr=3e-3, warmup_steps=20, dead_tokens=256 * 50, checkpoint_every=10_000, device="cpu",
    )
    trainer = Trainer(cfg, source)
    first_loss = None
    trainer.train()
    sae = trainer.saes[0]
    norms = sae.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    import json
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first_loss, last_loss = records[0]["mse"], records[-1]["mse"]
    assert last_loss < 0.2 * first_loss
    cos = (directions @ (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)).T).max(dim=1).values
    assert (cos > 0.9).float().mean() > 0.8, f"recovered {(cos > 0.9).float().mean():.2f} of the features"


def test_jumprelu_threshold_moves_and_l0_falls(tmp_path):
    from sae.trainer import TrainConfig, Trainer

    source, _ = synthetic_batches()
    cfg = TrainConfig(
        out_dir=str(tmp_path), saes=[SAEConfig(architecture="jumprelu", d_in=24, d_sae=96, l0_coefficient=0.05)],
        n_tokens=256 * 300, batch_size=256, lr=3e-3, warmup_steps=10, checkpoint_every=10_000, device="cpu", log_every=10,
    )
    trainer = Trainer(cfg, source)
    start_threshold = trainer.saes[0].threshold.detach().clone()
    trainer.train()
    import json
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    moved = (trainer.saes[0].threshold.detach() - start_threshold).abs().mean()
    assert moved > 0.05, f"threshold barely moved ({moved:.4f})"
    assert records[-1]["l0"] < 0.5 * records[0]["l0"], (records[0]["l0"], records[-1]["l0"])


def test_trainer_rejects_d_in_mismatch(tmp_path):
    from sae.trainer import TrainConfig, Trainer

    source, _ = synthetic_batches()
    with pytest.raises(ValueError, match="does not match"):
        Trainer(TrainConfig(out_dir=str(tmp_path), saes=[SAEConfig(d_in=25, d_sae=32, k=2)]), source)


@pytest.mark.parametrize("arch", ARCHS)
def test_folding_a_per_dimension_input_scale_keeps_the_map(arch):
    sae = make_nontrivial(arch)
    scale = (torch.rand(16) * 5 + 0.1).tolist()  # trained on x * scale, one factor per dimension
    x = inputs(sae, 11) / torch.tensor(scale)
    s = torch.tensor(scale)
    expected = sae.decode(sae.encode(x * s)) / s
    codes = sae.encode(x * s)
    assert torch.equal(sae.scale_rows(x, scale), x * s)
    sae.fold_input_scale(scale)
    assert torch.allclose(sae.encode(x), codes, atol=1e-4) and torch.allclose(sae.decode(sae.encode(x)), expected, atol=1e-4)
    with pytest.raises(ValueError, match="input scales for d_in"):
        sae.fold_input_scale([1.0, 2.0])


def test_per_dimension_scaling_keeps_a_huge_dimension_from_drowning_the_features(tmp_path):
    """One dimension with 100x the features' spread (as SmolLM2's middle residual stream has): scaled by one factor,
    the SAE spends its loss on it; scaled per dimension, it recovers the planted features."""
    from sae.common import per_dimension_scale
    from sae.trainer import TrainConfig, Trainer

    source, directions = synthetic_batches()
    plain = source.iter_batches

    def with_huge_dimension(*args, **kw):
        g = torch.Generator().manual_seed(7)
        for batch in plain(*args, **kw):
            batch[:, 0] += 100 * torch.randn(len(batch), generator=g)
            yield batch

    source.iter_batches = with_huge_dimension
    assert max(per_dimension_scale(next(source.iter_batches(512)))) / min(per_dimension_scale(next(source.iter_batches(512)))) > 20
    recovered = {}
    for scaling in ("scalar", "per_dimension"):
        cfg = TrainConfig(out_dir=str(tmp_path / scaling), saes=[SAEConfig(architecture="topk", d_in=24, d_sae=96, k=4)], n_tokens=256 * 300,
                          batch_size=256, lr=3e-3, warmup_steps=20, dead_tokens=256 * 50, checkpoint_every=10_000, device="cpu",
                          input_scaling=scaling)
        trainer = Trainer(cfg, source)
        trainer.train()
        saved = load_sae(trainer.save_final()[0])
        assert ("input_scale_per_dimension" in saved.training_data) == (scaling == "per_dimension")  # `saewb match` compares there
        w = saved.W_dec.detach()[:, 1:]  # raw space, the huge dimension left out
        cos = ((directions[:, 1:] / directions[:, 1:].norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True).clamp_min(1e-8)).T).max(dim=1).values
        recovered[scaling] = float((cos > 0.9).float().mean())
    assert recovered["per_dimension"] > 0.8 and recovered["scalar"] < recovered["per_dimension"] - 0.2, recovered


def test_auto_input_scaling_goes_per_dimension_only_where_one_dimension_dominates(tmp_path):
    """"auto" resolves on the init sample: per dimension when one dimension holds >= DOMINANT_SHARE of the variance (as at
    SmolLM2's middle layers), one factor otherwise; the SAE records the choice; a transcoder always gets its per-half factors."""
    from sae.common import DOMINANT_SHARE, dominant_share
    from sae.trainer import TrainConfig, Trainer

    x = torch.tensor([[0.0, 0.0, 0.0], [2.0, 1.0, 0.0], [4.0, 2.0, 0.0]])  # variances 4, 1, 0: the first holds 0.8
    assert dominant_share(x) == pytest.approx(0.8)
    source, _ = synthetic_batches()
    plain = source.iter_batches

    def with_huge_dimension(*args, **kw):
        for batch in plain(*args, **kw):
            batch[:, 0] += 100 * torch.randn(len(batch))
            yield batch

    chosen = {}
    for name, batches in (("plain", plain), ("huge", with_huge_dimension)):
        source.iter_batches = batches
        cfg = TrainConfig(out_dir=str(tmp_path / name), saes=[SAEConfig(architecture="topk", d_in=24, d_sae=32, k=2)], n_tokens=256 * 4,
                          batch_size=256, init_tokens=512, checkpoint_every=10_000, device="cpu", input_scaling="auto")
        trainer = Trainer(cfg, source)
        sample = torch.cat([b for _, b in zip(range(2), source.iter_batches(256))])
        assert (dominant_share(sample) >= DOMINANT_SHARE) == (name == "huge")
        trainer.train()
        chosen[name] = load_sae(trainer.save_final()[0]).training_data["input_scaling"]
        assert isinstance(trainer.scale, list) == (name == "huge")
    assert chosen == {"plain": "scalar", "huge": "per_dimension"}


def test_auto_input_scaling_keeps_a_transcoders_own_factors(tmp_path):
    from dataclasses import replace

    from sae.trainer import TrainConfig, Trainer
    from sae.transcoder import SkipTranscoderConfig

    class Huge:  # 4 input and 3 output columns, the first input column 100x the rest
        d_in, hook_name, n_tokens = 7, "planted", 256 * 2

        def iter_batches(self, batch_size, seed=0, epoch=0, rank=0, world_size=1):
            g = torch.Generator().manual_seed(seed * 1000 + epoch)
            for _ in range(self.n_tokens // batch_size):
                rows = torch.randn(batch_size, 7, generator=g)
                rows[:, 0] *= 100
                yield rows

    cfg = TrainConfig(out_dir=str(tmp_path), saes=[SkipTranscoderConfig(d_in=4, d_out=3, d_sae=8, k=2)], n_tokens=256 * 2, batch_size=256,
                      init_tokens=256, checkpoint_every=10_000, device="cpu", input_scaling="auto")
    trainer = Trainer(cfg, Huge())
    trainer.train()
    assert not isinstance(trainer.scale, list) or len(trainer.scale) != 7  # the per-half factors, never one per dimension
    with pytest.raises(ValueError, match="for SAEs"):
        Trainer(replace(cfg, out_dir=str(tmp_path / "pd"), input_scaling="per_dimension"), Huge()).train()
