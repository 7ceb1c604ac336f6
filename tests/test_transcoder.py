"""Skip transcoders (`sae/transcoder.py`): the formula, training on a planted sparse map, the SAE Lens layout, and many
hooks trained from one stream (`sae/stream.py`) giving what training each alone gives."""
import json

import pytest
import torch

from sae import ARCHITECTURES, SAEConfig, load_sae
from sae.stream import column_views, train_together
from sae.trainer import TrainConfig, Trainer
from sae.transcoder import SkipTranscoder, SkipTranscoderConfig

D_IN, D_OUT, D_SAE, K = 12, 10, 40, 3


def make(seed=0) -> SkipTranscoder:
    torch.manual_seed(seed)
    tc = SkipTranscoder(SkipTranscoderConfig(d_in=D_IN, d_out=D_OUT, d_sae=D_SAE, k=K, hook_name="blocks.1.mlp.hook_in",
                                             hook_name_out="blocks.1.hook_mlp_out"))
    with torch.no_grad():
        for p in (tc.W_enc, tc.b_enc, tc.b_dec, tc.W_skip):
            p.normal_(0, 0.5)
    return tc


def reference(tc, x):
    """f = topk(relu(x W_enc + b_enc)), y = f W_dec + b_dec + x W_skip, in float64 from the parameters alone."""
    p = {n: t.detach().double() for n, t in tc.named_parameters()}
    pre = x.double() @ p["W_enc"] + p["b_enc"]
    top = pre.topk(K, dim=-1)
    f = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.clamp_min(0))
    return f, f @ p["W_dec"] + p["b_dec"] + x.double() @ p["W_skip"]


def test_encode_and_forward_match_the_formula():
    tc = make()
    x = torch.randn(30, D_IN) * 2
    f_ref, y_ref = reference(tc, x)
    assert torch.allclose(tc.encode(x).double(), f_ref, atol=1e-5)
    assert torch.allclose(tc(x).double(), y_ref, atol=1e-5)
    assert tc(x[None]).shape == (1, 30, D_OUT)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_training_forward_reconstructs_the_target_half_of_the_row(fast):
    tc = make()
    x, y = torch.randn(64, D_IN), torch.randn(64, D_OUT)
    out = tc.training_forward(torch.cat([x, y], -1), fast=fast)
    _, y_ref = reference(tc, x)
    assert torch.allclose(out.x_hat.double(), y_ref, atol=1e-5)
    assert float(out.mse.detach()) == pytest.approx(float((y.double() - y_ref).pow(2).sum(-1).mean()), rel=1e-5)


def test_fast_gradients_equal_autograd_with_auxk():
    grads = {}
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    rows = torch.randn(50, D_IN + D_OUT)
    from sae.trainer import Objective
    for fast in (True, False):
        tc = make()
        step = Objective(tc, 6, 1 / 32, fast)(rows, 1.0, dead)
        assert float(step.aux) > 0
        step.loss.backward()
        grads[fast] = {n: p.grad for n, p in tc.named_parameters()}
    for name, g in grads[False].items():
        assert torch.allclose(grads[True][name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max())), name


@pytest.mark.parametrize("scale", [0.3, [0.3, 0.05]], ids=["one factor", "input and output apart"])
def test_folding_the_input_scale_keeps_the_map(scale):
    tc = make()
    s_in, s_out = scale if isinstance(scale, list) else (scale, scale)
    x = torch.randn(20, D_IN)
    y_scaled = tc(x * s_in)  # trained on inputs scaled by s_in, targets by s_out
    assert torch.equal(tc.scale_rows(torch.cat([x, torch.zeros(20, D_OUT)], -1), scale)[:, :D_IN], x * s_in)
    tc.fold_input_scale(scale)
    assert torch.allclose(tc(x) * s_out, y_scaled, atol=1e-5)


def test_each_half_of_the_row_gets_its_own_scale():
    """An MLP output 100x its input's norm must not shrink the input to nothing (one shared factor would)."""
    rows = torch.cat([torch.randn(512, D_IN), 100 * torch.randn(512, D_OUT)], -1)
    s_in, s_out = make().scale_of(rows)
    scaled = make().scale_rows(rows, [s_in, s_out])
    for part, width in ((scaled[:, :D_IN], D_IN), (scaled[:, D_IN:], D_OUT)):
        assert float(part.norm(dim=1).mean()) == pytest.approx(width ** 0.5, rel=1e-4)


def test_save_load_and_the_sae_lens_layout(tmp_path):
    tc = make()
    tc.save(tmp_path / "tc")
    raw = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert raw["architecture"] == "skip_transcoder" and raw["d_out"] == D_OUT and raw["apply_b_dec_to_input"] is False
    assert raw["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out"
    from safetensors.torch import load_file
    assert load_file(str(tmp_path / "tc" / "sae_weights.safetensors"))["W_skip"].shape == (D_OUT, D_IN)  # SAE Lens: (d_out d_in)
    loaded = load_sae(tmp_path / "tc")
    assert type(loaded) is SkipTranscoder and loaded.cfg == tc.cfg
    x = torch.randn(9, D_IN)
    assert torch.equal(loaded(x), tc(x))


def test_a_square_transcoder_loads_as_saved(tmp_path):
    """d_out == d_in (an MLP's input and output, as in every real model): loading must not fold the output bias b_dec
    into b_enc, as it does for other tools' SAEs saved with apply_b_dec_to_input False (the shapes would allow it)."""
    torch.manual_seed(1)
    tc = SkipTranscoder(SkipTranscoderConfig(d_in=D_IN, d_out=D_IN, d_sae=D_SAE, k=K, hook_name="blocks.1.mlp.hook_in",
                                             hook_name_out="blocks.1.hook_mlp_out"))
    with torch.no_grad():
        for p in (tc.W_enc, tc.b_enc, tc.b_dec, tc.W_skip):
            p.normal_(0, 0.5)
        tc.b_dec.add_(3.0)  # a large output bias, as in SmolLM2's late MLPs
    tc.save(tmp_path / "tc")
    loaded = load_sae(tmp_path / "tc")
    x = torch.randn(9, D_IN)
    assert torch.equal(loaded.b_enc, tc.b_enc) and torch.equal(loaded.encode(x), tc.encode(x)) and torch.equal(loaded(x), tc(x))


def test_sae_lens_reads_the_weights(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    tc = make()
    tc.save(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    f = tc.encode(torch.randn(8, D_IN))
    x = torch.randn(8, D_IN)
    with torch.no_grad():  # SAE Lens encodes with a ReLU, not TopK: the code is compared given, the linear parts exactly
        assert torch.allclose(theirs.decode(f), tc.decode(f), atol=1e-5)
        assert torch.allclose(x @ theirs.W_skip.T, tc.skip(x), atol=1e-5)


def planted_pairs(n_features=30, seed=0):
    """Rows [x, y]: x a sparse sum of unit directions, y = the same code through other directions plus a linear map of x."""
    gen = torch.Generator().manual_seed(seed)
    into = torch.nn.functional.normalize(torch.randn(n_features, D_IN, generator=gen), dim=1)
    out = torch.nn.functional.normalize(torch.randn(n_features, D_OUT, generator=gen), dim=1)
    linear = torch.randn(D_IN, D_OUT, generator=gen) * 0.2

    class Source:
        d_in = D_IN + D_OUT
        hook_name = "planted"
        n_tokens = 256 * 16

        def iter_batches(self, batch_size, seed=0, epoch=0, rank=0, world_size=1):
            g = torch.Generator().manual_seed(seed * 1000 + epoch)
            for _ in range(self.n_tokens // batch_size):
                idx = torch.rand(batch_size, n_features, generator=g).argsort(1)[:, :2]
                code = torch.zeros(batch_size, n_features).scatter_(1, idx, 1 + torch.rand(batch_size, 2, generator=g))
                x = code @ into
                yield torch.cat([x, code @ out + x @ linear], -1)

    return Source(), out


def test_training_learns_a_planted_sparse_map(tmp_path):
    """The features carry what no linear map of the input can: the trained transcoder's target FVU is well under the best
    linear map's (least squares on the same rows), which the skip term alone could reach."""
    source, _ = planted_pairs()
    cfg = TrainConfig(out_dir=str(tmp_path), saes=[SkipTranscoderConfig(d_in=D_IN, d_out=D_OUT, d_sae=60, k=2)], n_tokens=256 * 500,
                      batch_size=256, lr=3e-3, warmup_steps=20, dead_tokens=256 * 40, checkpoint_every=10_000, device="cpu")
    [path] = Trainer(cfg, source).train()
    rows = torch.cat(list(source.iter_batches(256, seed=9)))
    x, y = rows[:, :D_IN], rows[:, D_IN:]
    variance = (y - y.mean(0)).pow(2).sum(-1).mean()
    ones = torch.ones(len(x), 1)
    linear = torch.linalg.lstsq(torch.cat([x, ones], 1), y).solution
    linear_fvu = float((y - torch.cat([x, ones], 1) @ linear).pow(2).sum(-1).mean() / variance)
    with torch.no_grad():
        fvu = float((y - load_sae(path)(x)).pow(2).sum(-1).mean() / variance)
    assert linear_fvu > 0.3 and fvu < 0.3 * linear_fvu, (fvu, linear_fvu)


def test_a_width_mismatch_is_a_clear_error(tmp_path):
    source, _ = planted_pairs()
    with pytest.raises(ValueError, match="does not match"):
        Trainer(TrainConfig(out_dir=str(tmp_path), saes=[SkipTranscoderConfig(d_in=D_IN, d_out=D_OUT + 1, d_sae=20, k=2)]), source)


def test_one_stream_trains_each_hook_as_training_it_alone_would(tmp_path):
    """Two transcoders and an SAE from column ranges of one source: the same weights as three separate trainings."""
    source, _ = planted_pairs()

    class Wide:  # rows [x, y | x, y | y]: two transcoders' pairs and an SAE on y
        d_in = 2 * (D_IN + D_OUT) + D_OUT
        hook_name = "wide"
        n_tokens = source.n_tokens

        def iter_batches(self, batch_size, seed=0, epoch=0, rank=0, world_size=1):
            for rows in source.iter_batches(batch_size, seed, epoch):
                yield torch.cat([rows, rows * 0.5, rows[:, D_IN:]], -1)

    class Columns:
        def __init__(self, start, stop):
            self.start, self.stop, self.d_in, self.hook_name, self.n_tokens = start, stop, stop - start, f"cols{start}", source.n_tokens

        def iter_batches(self, batch_size, seed=0, epoch=0, rank=0, world_size=1):
            for rows in Wide().iter_batches(batch_size, seed, epoch):
                yield rows[:, self.start:self.stop]

    pair = D_IN + D_OUT
    widths = [pair, pair, D_OUT]
    configs = [SkipTranscoderConfig(d_in=D_IN, d_out=D_OUT, d_sae=20, k=2), SkipTranscoderConfig(d_in=D_IN, d_out=D_OUT, d_sae=20, k=2),
               ARCHITECTURES["topk"].config_class(d_in=D_OUT, d_sae=20, k=2)]

    def train_config(i, where):
        return TrainConfig(out_dir=str(tmp_path / where / str(i)), saes=[configs[i]], n_tokens=256 * 24, batch_size=256,
                           checkpoint_every=10, device="cpu", autocast="none", seed=3)

    together = train_together([train_config(i, "stream") for i in range(3)], column_views(Wide(), widths, ["a", "b", "c"]))
    starts = [0, pair, 2 * pair]
    for i in range(3):
        [alone] = Trainer(train_config(i, "alone"), Columns(starts[i], starts[i] + widths[i])).train()
        a, b = load_sae(alone), load_sae(together[i][0])
        for name, p in a.named_parameters():
            assert torch.allclose(p, dict(b.named_parameters())[name], atol=1e-6), (i, name)


def test_stream_views_must_cover_the_row():
    source, _ = planted_pairs()
    with pytest.raises(ValueError, match="add up to"):
        column_views(source, [D_IN, D_OUT + 1], ["a", "b"])


def test_a_transcoder_maps_within_one_block():
    with pytest.raises(ValueError, match="within one block"):
        SAEConfig(architecture="skip_transcoder", hook_name="blocks.1.mlp.hook_in", hook_name_out="blocks.2.hook_mlp_out")
