"""The architecture registry and the per-architecture configs: `make_config` (and the old flat
`SAEConfig(...)` call) build the right subclass, saved configs round-trip and old flat cfg.json
files still load, run names are unchanged, what outside code asks of an architecture comes from
the class (sweep fields, the bound on active latents), and no shared module of sae/ names an
architecture."""
import ast
import io
import json
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import sae as sae_package
from sae import ARCHITECTURES, SAE, SAEConfig, load_sae, make_config
from sae.base import register
from sae.trainer import DEFAULT_LR_RULE, TrainConfig, default_lr, sae_name

ARCHS = sorted(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHS)
def test_make_config_and_the_flat_call_build_the_architectures_config(arch):
    cls = ARCHITECTURES[arch].config_class
    cfg = make_config(arch, d_in=8, d_sae=32, k=4, l1_coefficient=0.3, l0_coefficient=0.02)  # every CLI flag, as a sweep passes them
    assert type(cfg) is cls and cfg.architecture == arch and (cfg.d_in, cfg.d_sae) == (8, 32)
    assert SAEConfig(architecture=arch, d_in=8, d_sae=32, k=4, l1_coefficient=0.3, l0_coefficient=0.02) == cfg
    for name, value in (("k", 4), ("l1_coefficient", 0.3), ("l0_coefficient", 0.02)):
        assert getattr(cfg, name, value) == value  # kept where the architecture has the field, ignored elsewhere
    assert set(cfg.to_dict()) == set(cls.field_names())
    with pytest.raises(TypeError, match=r"unknown key\(s\) \['kk'\]"):
        make_config(arch, d_in=8, d_sae=32, kk=4)
    with pytest.raises(ValueError, match="configures architecture"):
        cls(architecture="gated")


def test_defaults_and_validation_are_the_old_ones():
    assert type(SAEConfig()) is ARCHITECTURES["topk"].config_class and SAEConfig().k == 32
    assert TrainConfig().saes == [SAEConfig()]
    assert make_config("standard").l1_coefficient == 5.0 and make_config("jumprelu").l0_coefficient == 0.05
    assert not hasattr(make_config("standard", k=8), "k")
    for arch in ("topk", "batchtopk", "matryoshka"):
        with pytest.raises(ValueError, match="k must be in 1..d_sae"):
            make_config(arch, d_sae=16, k=17)
    with pytest.raises(ValueError, match="d_in and d_sae must be positive"):
        SAEConfig(architecture="standard", d_sae=0)
    with pytest.raises(ValueError, match="unknown architecture 'gated'"):
        make_config("gated")
    assert TrainConfig(saes=[{"architecture": "jumprelu", "d_sae": 64, "k": 4}]).saes == [make_config("jumprelu", d_sae=64)]


def test_run_names_are_unchanged():
    names = {"topk": "topk_k32_4608", "batchtopk": "batchtopk_k32_4608", "standard": "standard_l1_5_4608",
             "jumprelu": "jumprelu_l0_0.05_4608", "matryoshka": "matryoshka_k32_4608", "skip_transcoder": "skip_transcoder_k32_4608"}
    for arch in ARCHS:
        assert make_config(arch).run_name == sae_name(make_config(arch)) == names[arch]
    assert make_config("standard", l1_coefficient=0.3, d_sae=96).run_name == "standard_l1_0.3_96"


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_config_loads_into_its_subclass(arch, tmp_path):
    cfg = make_config(arch, d_in=8, d_sae=32, k=3, l1_coefficient=0.3, hook_name="blocks.1.hook_resid_post", context_size=64)
    path = ARCHITECTURES[arch](cfg).save(tmp_path / "s")
    loaded = load_sae(path)
    assert type(loaded.cfg) is type(cfg) and loaded.cfg == cfg


OLD_FLAT = {"architecture": "topk", "d_in": 8, "d_sae": 32, "k": 3, "l1_coefficient": 5.0, "l0_coefficient": 0.05,
            "jumprelu_init_threshold": 0.05, "jumprelu_bandwidth": 0.07, "hook_name": "blocks.1.hook_resid_post",
            "model_name": "tiny", "context_size": 64}
"""metadata.workbench_config as saved when every architecture's field sat in one SAEConfig."""


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "standard", "jumprelu"])
def test_old_flat_workbench_configs_still_load(arch, tmp_path):
    sae = ARCHITECTURES[arch](make_config(**OLD_FLAT | {"architecture": arch}))
    with torch.no_grad():
        sae.b_enc.normal_()
    path = sae.save(tmp_path / "s")
    raw = json.loads((path / "cfg.json").read_text())
    raw["metadata"]["workbench_config"] = OLD_FLAT | {"architecture": arch}
    (path / "cfg.json").write_text(json.dumps(raw))
    loaded = load_sae(path)
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    assert getattr(loaded.cfg, "k", 3) == 3 and getattr(loaded.cfg, "jumprelu_bandwidth", 0.07) == 0.07
    x = torch.randn(5, 8)
    assert torch.equal(loaded.encode(x), sae.encode(x))


def test_other_tools_sae_lens_directories_pick_the_class_by_their_architecture_string(tmp_path):
    for theirs, ours in (("topk", "topk"), ("batchtopk", "batchtopk"), ("jumprelu", "jumprelu"), ("standard", "standard")):
        path = ARCHITECTURES[ours](make_config(ours, d_in=8, d_sae=32, k=5)).save(tmp_path / theirs)
        raw = json.loads((path / "cfg.json").read_text())
        del raw["metadata"]["workbench_config"]
        (path / "cfg.json").write_text(json.dumps(raw | {"architecture": theirs, "k": 5}))
        loaded = load_sae(path)
        assert loaded.architecture == ours and getattr(loaded.cfg, "k", 5) == 5
    (path / "cfg.json").write_text(json.dumps(raw | {"architecture": "gated"}))
    with pytest.raises(ValueError, match=r"'gated' is not supported; supported: \['batchtopk', 'jumprelu', 'standard', 'topk'\]"):
        load_sae(path)


def test_sweep_fields_and_max_active_latents_follow_the_old_rules():
    assert {a: ARCHITECTURES[a].sweep_fields for a in ARCHS} == {
        "batchtopk": ("k",), "jumprelu": (), "matryoshka": ("k",), "standard": (), "topk": ("k",), "skip_transcoder": ("k",)}
    for d_sae, k in ((64, 4), (1000, 50), (48, 40), (4608, 32)):
        for arch in ARCHS:
            sae = ARCHITECTURES[arch](make_config(arch, d_in=4, d_sae=d_sae, k=k))
            # analysis/atlas.py before: k for TopK, else min(d_sae, max(64, 2 * (k or 32))) (k was 32 unless set)
            old_k = k if "k" in ARCHITECTURES[arch].sweep_fields else 32
            exactly_k = arch in ("topk", "skip_transcoder")  # the skip transcoder is new: TopK's rule, k per row
            assert sae.max_active_latents == (k if exactly_k else min(d_sae, max(64, 2 * old_k))), (arch, d_sae, k)


def test_register_refuses_a_taken_name_or_sae_lens_string():
    before = dict(ARCHITECTURES)

    class Copy(ARCHITECTURES["topk"]):  # inherits TopK's config_class, so its name
        pass

    with pytest.raises(ValueError, match="must set its own architecture"):
        register(Copy)

    @dataclass
    class OtherConfig(SAEConfig):
        architecture: str = "other_for_test"

    class Other(SAE):
        config_class = OtherConfig
        sae_lens_loads = ("topk",)

    with pytest.raises(ValueError, match=r"\['topk'\] already load as 'topk'"):
        register(Other)
    assert ARCHITECTURES == before


def test_the_lr_rule_is_written_once():
    assert default_lr(2**14) == pytest.approx(1.6e-3) and default_lr(4608) == pytest.approx(3.017e-3, rel=1e-3)
    assert DEFAULT_LR_RULE == "0.0016 / sqrt(d_sae / 2^14)"


def _string_literals(path: Path) -> set[str]:
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    out = set()
    for tok in tokens:
        if tok.type == tokenize.STRING and tok.string.lstrip("rbuRBU").startswith(("'", '"')):  # not an f-string
            out.add(ast.literal_eval(tok.string))
    return out


def test_no_shared_module_of_sae_names_an_architecture():
    """Architecture names as string literals appear only in the architecture's own file."""
    own_files = {Path(sys.modules[cls.__module__].__file__) for cls in ARCHITECTURES.values()}
    shared = [p for p in Path(sae_package.__file__).parent.glob("*.py") if p not in own_files]
    assert {p.name for p in shared} >= {"__init__.py", "base.py", "common.py", "config.py", "trainer.py"}
    for path in shared:
        named = _string_literals(path) & set(ARCHITECTURES)
        assert not named, f"{path.name} names architecture(s) {sorted(named)}"
