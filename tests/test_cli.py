"""The command line: flags come from the stage dataclasses (one source for every default),
each stage owns its command, and a sweep builds one config per architecture x swept value."""
import dataclasses
import json

import pytest

from activations.flags import field_docs
from activations.harvest import HarvestConfig
from analysis import cli
from analysis.circuits.graph import GraphConfig
from analysis.evaluation.evaluate import EvalConfig
from analysis.features.atlas import AtlasConfig
from analysis.features.labels import LabelConfig
from analysis.steering import GenerationConfig, SweepConfig
from sae import ARCHITECTURES
from sae.cli import sae_configs
from sae.trainer import TrainConfig


def _help(command: str) -> str:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return " ".join(sub.format_help().split())


def _default(cls, name):
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


@pytest.mark.parametrize("command, cls, field, flag", [
    ("train", TrainConfig, "warmup_steps", "--warmup-steps"),
    ("train", TrainConfig, "n_tokens", "--train-tokens"),
    ("train", ARCHITECTURES["jumprelu"].config_class, "jumprelu_bandwidth", "--jumprelu-bandwidth"),
    ("train", ARCHITECTURES["matryoshka"].config_class, "prefix_sizes", "--prefix-sizes"),
    ("harvest", HarvestConfig, "shard_contexts", "--shard-contexts"),
    ("evaluate", EvalConfig, "n_ce_contexts", "--ce-contexts"),
    ("analyze", AtlasConfig, "n_tokens", "--atlas-tokens"),
    ("analyze", LabelConfig, "n_score_contexts", "--label-contexts"),
    ("steer", SweepConfig, "strengths", "--strengths"),
    ("steer", GenerationConfig, "top_p", "--top-p"),
    ("trace", GraphConfig, "max_feature_nodes", "--max-feature-nodes"),
    ("trace", GraphConfig, "edge_share", "--edge-share"),
])
def test_flag_help_is_the_fields_docstring_and_default(command, cls, field, flag):
    text = _help(command)
    assert flag in text
    doc = field_docs(cls).get(field)
    assert doc, f"{cls.__name__}.{field} has no docstring"
    assert doc[:40] in text
    assert f"(default: {_default(cls, field)})" in text


def test_unset_flags_fall_back_to_the_dataclass_defaults(tmp_path):
    args = cli.parse(["steer", "--sae", "x", "--features", "1"])
    from activations.flags import from_flags

    cfg = from_flags(SweepConfig, args, features=[1])
    assert cfg.strengths == SweepConfig(features=[1]).strengths and cfg.mode == "clamp"
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"strengths": [3.0], "temperature": 0.5}))
    args = cli.parse(["steer", "--config", str(config), "--temperature", "0.7"])
    assert args.strengths == [3.0] and args.temperature == 0.7  # the command line wins over the file


def test_a_sweep_makes_one_config_per_architecture_and_swept_value():
    args = cli.parse(["train", "--architecture", "topk", "matryoshka", "jumprelu", "--k", "8", "16", "--d-sae", "64", "128",
                      "--l0-coefficient", "0.2"])
    names = [c.run_name for c in sae_configs(args, d_in=16, context_len=32)]
    assert names == ["topk_k8_64", "topk_k16_64", "topk_k8_128", "topk_k16_128",
                     "matryoshka_k8_64", "matryoshka_k16_64", "matryoshka_k8_128", "matryoshka_k16_128",
                     "jumprelu_l0_0.2_64", "jumprelu_l0_0.2_128"]  # k is not jumprelu's: one config per width


def test_preset_values_fill_flags_the_command_line_left_unset():
    args = cli.parse(["run", "--preset", "chain"])
    assert args.hooks == [f"blocks.{layer}.hook_resid_post" for layer in range(2, 30, 3)]  # a stack spanning the model
    assert cli.parse(["run", "--preset", "chain", "--input-scaling", "auto"]).input_scaling == "auto"
    args = cli.parse(["run", "--preset", "smoke", "--k", "8"])
    [cfg] = sae_configs(args, d_in=16, context_len=32)
    assert (cfg.d_sae, cfg.k) == (cli.PRESETS["smoke"]["d_sae"], 8)
    assert args.train_tokens == cli.PRESETS["smoke"]["train_tokens"] and args.atlas_tokens == cli.PRESETS["smoke"]["atlas_tokens"]


def test_every_command_has_help(capsys):
    for command in ("run", "harvest", "train", "transcoders", "evaluate", "analyze", "dashboard", "monitor", "steer", "trace", "match"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0
    assert "--architecture" in capsys.readouterr().out


def test_the_console_script_exits_0_when_a_command_returns_its_outputs(monkeypatch):
    """`saewb train` returns the SAE folders; the console script hands its entry's result to sys.exit."""
    monkeypatch.setattr(cli, "main", lambda argv=None: ["runs/x/sae/topk_k32_4608"])
    with pytest.raises(SystemExit) as exit_:
        raise SystemExit(cli.entry())
    assert exit_.value.code is None


def test_one_hook_given_as_hooks_is_the_hook_trained(monkeypatch, tmp_path):
    """`saewb run --preset chain --hooks X` trains on X's store, not on the default --hook's."""
    import sae.cli as train_cli

    trained = []
    monkeypatch.setattr(train_cli, "train_one", lambda args, models, hook, out: trained.append(hook) or [])
    args = cli.parse(["run", "--preset", "chain", "--hooks", "blocks.14.hook_resid_post", "--out", str(tmp_path)])
    train_cli.run(args, None)
    assert trained == ["blocks.14.hook_resid_post"]
