"""A user's own corpus flows through every stage after the harvest: evaluation, the atlas,
label scoring and steering read the held-out split of the corpus the store was harvested
from (recorded in the SAE's cfg.json), say so in their outputs, and fit a small corpus."""
from __future__ import annotations

import json

import torch

from analysis import cli
from sae import load_sae

ALPHABET = "qwxz "  # the user's text uses only these characters; the embedded default uses many more


def write_user_corpus(path, n_docs=400, length=100, seed=3):
    gen = torch.Generator().manual_seed(seed)
    letters = torch.randint(len(ALPHABET), (n_docs, length), generator=gen).tolist()
    path.write_text("".join(json.dumps({"text": "".join(ALPHABET[i] for i in doc)}) + "\n" for doc in letters))
    return path


def test_run_on_a_user_corpus_measures_on_its_heldout_split(tiny_llama_dir, tmp_path, capsys):
    corpus = write_user_corpus(tmp_path / "my_docs.jsonl")
    out = tmp_path / "run"
    cli.main(["run", "--preset", "smoke", "--model", tiny_llama_dir, "--device", "cpu", "--corpus", str(corpus), "--out", str(out),
              "--hook", "blocks.1.hook_resid_post", "--context-len", "32", "--n-tokens", "4000", "--train-tokens", "4000",
              "--d-sae", "64", "--k", "4", "--batch-size", "256", "--eval-tokens", "100000", "--ce-contexts", "8"])
    printed = capsys.readouterr().out
    sae_dir = out / "sae" / "topk_k4_64"
    sae = load_sae(sae_dir)
    assert sae.training_data["corpus"]["source"] == str(corpus)  # recorded from the store's manifest
    assert json.loads((sae_dir / "cfg.json").read_text())["metadata"]["dataset_path"] == str(corpus)

    # evaluation: measured on the user's held-out split, scaled down to what it holds (20 of 400 documents)
    result = json.loads((sae_dir / "eval.json").read_text())
    assert result["corpus"]["source"] == str(corpus) and result["corpus"]["split"] == "heldout"
    assert f"'{corpus}', heldout split has only" in printed and f"tokens of '{corpus}', heldout split" in printed
    heldout_chars = 20 * 100 + 20  # documents + one separator token each
    assert 0 < result["n_tokens"] <= heldout_chars

    # the atlas and the labels: the user's held-out text, shared out so the labels keep some
    atlas_cfg = json.loads((sae_dir / "atlas" / "atlas.json").read_text())["config"]
    assert atlas_cfg["corpus"]["source"] == str(corpus) and atlas_cfg["corpus"]["split"] == "heldout"
    labels = json.loads((sae_dir / "atlas" / "labels.json").read_text())
    assert labels["scored_on"]["corpus"]["source"] == str(corpus) and labels["scored_on"]["n_contexts"] >= 16
    from analysis.features.atlas import load_atlas

    atlas = load_atlas(sae_dir / "atlas")
    assert labels["scored_on"]["first_context"] == atlas.meta["n_contexts"]  # scored after the atlas's contexts
    from activations import load_model

    model = load_model(tiny_llama_dir, device="cpu")
    seen = set(model.tokenizer.decode(atlas.tokens.flatten().tolist(), skip_special_tokens=True))
    assert seen <= set(ALPHABET), f"atlas read text outside the user's corpus: {sorted(seen - set(ALPHABET))}"

    # steering's KL side effect: the same held-out text, named in the sweep
    live = int(atlas.tensors["fire_count"].argmax())
    cli.main(["steer", "--model", tiny_llama_dir, "--device", "cpu", "--sae", str(sae_dir), "--features", str(live), "--strengths", "1",
              "--prompts", "qwx", "--max-new-tokens", "3", "--kl-contexts", "2", "--out", str(tmp_path / "steer")])
    sweep = json.loads((tmp_path / "steer" / "steer" / "sweep.json").read_text())
    assert sweep["neutral_text"] == f"'{corpus}', heldout split"

    # without --model, a later stage loads the model the SAE names (not the embedded default)
    (sae_dir / "eval.json").unlink()
    cli.main(["evaluate", "--device", "cpu", "--sae", str(sae_dir), "--eval-tokens", "500", "--ce-contexts", "4"])
    assert f"loaded {tiny_llama_dir}" in capsys.readouterr().out
    assert json.loads((sae_dir / "eval.json").read_text())["corpus"]["source"] == str(corpus)


def test_a_corpus_too_small_for_analysis_is_a_clear_error(tiny_llama_dir, tmp_path):
    import pytest

    corpus = write_user_corpus(tmp_path / "tiny.jsonl", n_docs=60, length=40)  # 3 held-out documents: 4 contexts
    sae_dir = tmp_path / "sae"
    from sae import ARCHITECTURES, SAEConfig

    sae = ARCHITECTURES["topk"](SAEConfig(d_in=32, d_sae=64, k=4, hook_name="blocks.1.hook_resid_post", context_size=32))
    sae.training_data = {"corpus": {"source": str(corpus), "split": "train", "context_len": 32}}
    sae.save(sae_dir)
    with pytest.raises(SystemExit, match=r"tiny.jsonl', heldout split has \d+ contexts of 32 tokens; the atlas and label scoring needs at least 32"):
        cli.main(["analyze", "--model", tiny_llama_dir, "--device", "cpu", "--sae", str(sae_dir), "--preset", "smoke"])
