"""Matryoshka BatchTopK: the loss really sums the reconstruction error of every nested prefix
(a hand computation, SAE Lens' implementation, and BatchTopK when the only prefix is the
whole dictionary), and training makes an early prefix reconstruct on its own. The invariants
every architecture shares run in tests/test_sae.py, test_fast_training.py and
test_sae_lens_compat.py."""
import json

import pytest
import torch

from sae import ARCHITECTURES, load_sae, make_config
from tests.test_sae import synthetic_batches


def nontrivial(architecture="matryoshka", d_in=6, d_sae=8, k=2, **fields):
    torch.manual_seed(0)
    sae = ARCHITECTURES[architecture](make_config(architecture, d_in=d_in, d_sae=d_sae, k=k, **fields))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.5)
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_()
    return sae


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_loss_is_the_sum_of_the_prefix_errors_by_hand(fast):
    sae = nontrivial(prefix_sizes=[2, 5, 8])
    x = torch.randn(5, 6) * 2
    # by hand, in float64: BatchTopK's code over the whole dictionary (the k * batch = 10
    # largest ReLU'd pre-activations of the batch), then every prefix decodes on its own
    pre = (x.double() - sae.b_dec.detach().double()) @ sae.W_enc.detach().double() + sae.b_enc.detach().double()
    acts = pre.clamp_min(0)
    keep = torch.zeros(acts.numel(), dtype=torch.bool).scatter_(0, acts.flatten().topk(10).indices, True).view_as(acts)
    f = torch.where(keep, acts, torch.zeros_like(acts))
    w_dec, b_dec = sae.W_dec.detach().double(), sae.b_dec.detach().double()
    errors = [(x.double() - (f[:, :m] @ w_dec[:m] + b_dec)).pow(2).sum(-1).mean() for m in (2, 5, 8)]
    assert len({round(float(e), 6) for e in errors}) == 3  # the prefixes reconstruct differently
    assert (f[:, :2] != 0).any() and (f[:, 5:] != 0).any()  # every band holds active latents

    out = sae.training_forward(x, fast=fast)
    assert float(out.loss.detach()) == pytest.approx(float(sum(errors)), rel=1e-5)
    assert float(out.mse.detach()) == pytest.approx(float(errors[-1]), rel=1e-5)  # logged mse: the whole dictionary's


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_with_the_whole_dictionary_as_only_prefix_it_is_batchtopk(fast):
    matryoshka = nontrivial(d_in=16, d_sae=64, k=4, prefix_sizes=[64])
    batchtopk = ARCHITECTURES["batchtopk"](make_config("batchtopk", d_in=16, d_sae=64, k=4))
    batchtopk.load_state_dict(matryoshka.state_dict())
    x = torch.randn(32, 16) * 2
    a, b = matryoshka.training_forward(x, fast=fast), batchtopk.training_forward(x, fast=fast)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.x_hat, b.x_hat)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(matryoshka.named_parameters(), batchtopk.parameters()):  # summed in another order
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-6 * float(q.grad.abs().max())), name
    assert float(nontrivial(d_in=16, d_sae=64, k=4).training_forward(x, fast=fast).loss.detach()) > float(a.loss.detach())  # default: 5 prefixes


def test_loss_equals_sae_lens_matryoshka_batchtopk():
    """A cross-check against another library: SAE Lens' MatryoshkaBatchTopKTrainingSAE on the
    same weights (its outer loss plus one inner loss per smaller width)."""
    sae_lens = pytest.importorskip("sae_lens.saes.matryoshka_batchtopk_sae")
    from sae_lens.saes.sae import TrainStepInput

    ours = nontrivial(d_in=16, d_sae=48, k=3, prefix_sizes=[4, 12, 48])
    theirs = sae_lens.MatryoshkaBatchTopKTrainingSAE(sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=16, d_sae=48, k=3, matryoshka_widths=[4, 12, 48], rescale_acts_by_decoder_norm=False, apply_b_dec_to_input=True))
    theirs.load_state_dict(theirs.state_dict() | {n: p.detach().clone() for n, p in ours.named_parameters()})
    x = torch.randn(32, 16) * 2
    step = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=torch.zeros(48, dtype=torch.bool), n_training_steps=0,
                          is_logging_step=False)
    expected = theirs.training_forward_pass(step)
    assert set(expected.losses) >= {"inner_mse_loss_4", "inner_mse_loss_12"}
    assert float(ours.training_forward(x, fast=True).loss.detach()) == pytest.approx(float(expected.loss.detach()), rel=1e-5)


def test_prefix_sizes_default_validate_and_round_trip(tmp_path):
    assert make_config("matryoshka", d_sae=4608).prefixes == (288, 576, 1152, 2304, 4608)
    assert make_config("matryoshka", d_sae=8, k=2).prefixes == (1, 2, 4, 8)  # rounded, at least 1, no repeats
    for bad in ([4, 32], [8, 4, 64], [0, 64], []):
        with pytest.raises(ValueError, match="prefix_sizes must rise strictly"):
            make_config("matryoshka", d_sae=64, k=4, prefix_sizes=bad)
    sae = nontrivial(d_in=16, d_sae=64, k=4, prefix_sizes=(8, 24, 64))
    loaded = load_sae(sae.save(tmp_path / "m"))
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg and loaded.cfg.prefixes == (8, 24, 64)
    assert json.loads((tmp_path / "m" / "cfg.json").read_text())["architecture"] == "jumprelu"  # SAE Lens: a JumpReLU


def test_training_makes_the_early_prefixes_reconstruct_on_their_own(tmp_path):
    """After the same training from the same init, the prefixes of 6, 12, 24 and 48 of the 96
    latents alone explain more variance in a Matryoshka SAE than the same latents of a
    BatchTopK SAE, which never had to reconstruct on their own (with the prefix losses dropped
    the two runs would be equal). Measured over seeds 0-3: the summed margin is 0.11 to 1.1,
    the first prefix's 0.04 to 0.21; seed 1 (0.97 and 0.17) leaves room for float noise."""
    from sae.trainer import TrainConfig, Trainer

    source, _ = synthetic_batches()
    explained = {}
    for arch in ("matryoshka", "batchtopk"):
        cfg = TrainConfig(out_dir=str(tmp_path / arch), saes=[make_config(arch, d_in=24, d_sae=96, k=3)], n_tokens=256 * 300,
                          batch_size=256, lr=3e-3, warmup_steps=20, dead_tokens=256 * 50, checkpoint_every=10_000, device="cpu", seed=1)
        trainer = Trainer(cfg, source)
        trainer.train()
        sae = trainer.saes[0]
        x = next(iter(source.iter_batches(2048, seed=7))) * trainer.scale
        with torch.no_grad():
            f = sae.encode(x)
            x_hats = [f[:, :m] @ sae.W_dec[:m] + sae.b_dec for m in (6, 12, 24, 48)]
        explained[arch] = [1 - float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()) for x_hat in x_hats]
    assert trainer.saes[0].cfg.architecture == "batchtopk" and make_config("matryoshka", d_sae=96, k=3).prefixes[:-1] == (6, 12, 24, 48)
    assert sum(explained["matryoshka"]) > sum(explained["batchtopk"]) + 0.3, explained
    assert explained["matryoshka"][0] > explained["batchtopk"][0] + 0.1, explained
