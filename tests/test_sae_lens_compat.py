"""Our SAEs load in SAE Lens (test-only dependency) and give the same outputs, and SAE
Lens-format directories written by SAE Lens load in the workbench."""
import pytest
import torch

from sae import ARCHITECTURES, SAEConfig, load_sae

sae_lens = pytest.importorskip("sae_lens")


@pytest.mark.parametrize("arch", sorted(a for a, cls in ARCHITECTURES.items() if not cls.is_transcoder))  # transcoders: test_transcoder.py
def test_round_trip_through_sae_lens(arch, tmp_path):
    sae = ARCHITECTURES[arch](SAEConfig(architecture=arch, d_in=16, d_sae=48, k=5))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.2)
    sae.fold_input_scale(0.37)  # saved SAEs take raw activations
    sae.save(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    x = torch.randn(32, 16) * 3
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), sae.encode(x), atol=1e-5)
        assert torch.allclose(theirs(x), sae(x), atol=1e-5)

    # and back: SAE Lens writes the directory, we read it
    theirs.save_model(str(tmp_path / "resaved"))
    ours_again = load_sae(tmp_path / "resaved")
    with torch.no_grad():
        assert torch.allclose(ours_again(x), sae(x), atol=1e-5)
