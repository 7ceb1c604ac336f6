"""Data parallelism on 2 CPU processes (gloo), launched like torchrun (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT): a 2-rank harvest writes the same store as one process (also
when resuming a store a single process started), and 2-rank DDP training, killed and
resumed, ends where single-process training with the same global batch and seed ends."""
import json
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

from activations import ActivationStore, CorpusConfig, HarvestConfig, harvest
from sae import SAEConfig, load_sae
from sae.trainer import TrainConfig, Trainer

HOOK = "blocks.1.hook_resid_post"
ARCHS = ["topk", "standard", "jumprelu"]  # BatchTopK selects per rank: not the same as one process by design


def harvest_cfg(out, corpus) -> HarvestConfig:
    return HarvestConfig(out_dir=str(out), model="tiny", hooks=[HOOK, "blocks.0.hook_mlp_out"],
                         corpus=CorpusConfig(source=str(corpus), context_len=16), n_tokens=600, batch_contexts=4,
                         shard_contexts=8, dtype="float32", autocast="none", device="cpu")


def train_cfg(out, **kw) -> TrainConfig:
    saes = [SAEConfig(architecture=a, d_in=32, d_sae=64, k=4, l1_coefficient=0.5, model_name="tiny") for a in ARCHS]
    # dead_tokens small so AuxK switches on; 20 steps of a global batch of 64
    return TrainConfig(out_dir=str(out), saes=saes, n_tokens=64 * 20, batch_size=64, lr=3e-3, warmup_steps=3, device="cpu",
                       checkpoint_every=3, init_tokens=128, dead_tokens=128, log_every=1, **kw)


def _worker(rank: int, world: int, port: int, tmp: str, corpus: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from activations import distributed
    from tests.conftest import make_tiny_model

    model = make_tiny_model()
    harvest(harvest_cfg(f"{tmp}/two", corpus), model)
    harvest(harvest_cfg(f"{tmp}/resumed", corpus), model)  # a single process started this one
    store = ActivationStore(f"{tmp}/one/{HOOK}")
    Trainer(train_cfg(f"{tmp}/sae_two", max_steps=7), store).train()  # "killed" after step 7
    Trainer(train_cfg(f"{tmp}/sae_two"), store).train()
    distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tiny_model, text_corpus, tmp_path_factory):
    """Single-process references, then the same work on 2 ranks."""
    tmp = tmp_path_factory.mktemp("dist")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: same float summation order
    try:
        harvest(harvest_cfg(tmp / "one", text_corpus), tiny_model)
        # a partial store: the first 2 of 5 shards, as a killed single-process harvest leaves it
        shutil.copytree(tmp / "one", tmp / "resumed")
        for hook in (HOOK, "blocks.0.hook_mlp_out"):
            folder = tmp / "resumed" / hook
            manifest = json.loads((folder / "manifest.json").read_text())
            for shard in manifest["shards"][2:]:
                (folder / shard["file"]).unlink()
            manifest.update(shards=manifest["shards"][:2], complete=False)
            (folder / "manifest.json").write_text(json.dumps(manifest))
        Trainer(train_cfg(tmp / "sae_one"), ActivationStore(tmp / "one" / HOOK)).train()
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp), str(text_corpus)), nprocs=2, join=True)
    return tmp


@pytest.mark.parametrize("run", ["two", "resumed"])
def test_two_rank_harvest_writes_the_single_process_store(runs, run):
    for hook in (HOOK, "blocks.0.hook_mlp_out"):
        one = json.loads((runs / "one" / hook / "manifest.json").read_text())
        two = json.loads((runs / run / hook / "manifest.json").read_text())
        assert len(one["shards"]) == 5 and two["complete"]
        assert two == one  # same header and the same sha256 for every shard: byte-identical activations


def test_two_rank_training_matches_single_process(runs):
    curves = {}
    for run in ("sae_one", "sae_two"):
        records = [json.loads(line) for line in (runs / run / "metrics.jsonl").read_text().splitlines()]
        curves[run] = {(r["sae"], r["step"]): r for r in records}
    assert curves["sae_one"].keys() == curves["sae_two"].keys() and len(curves["sae_one"]) == 20 * len(ARCHS)
    assert any(r["aux_loss"] > 0 for r in curves["sae_one"].values())  # AuxK ran, so its all-reduce was exercised
    for key, one in curves["sae_one"].items():
        two = curves["sae_two"][key]
        for metric in ("loss", "mse", "fvu", "l0", "aux_loss"):  # measured: equal to ~2e-7
            assert two[metric] == pytest.approx(one[metric], rel=1e-5, abs=1e-6), (key, metric)

    summary_one = json.loads((runs / "sae_one" / "train_summary.json").read_text())
    summary_two = json.loads((runs / "sae_two" / "train_summary.json").read_text())
    assert summary_two["steps"] == 20 and summary_two["input_scale"] == pytest.approx(summary_one["input_scale"], rel=1e-6)
    x = torch.randn(32, 32)
    for name, path in summary_one["saes"].items():
        one, two = load_sae(path), load_sae(summary_two["saes"][name])
        for (key, a), b in zip(one.state_dict().items(), two.state_dict().values()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (name, key, (a - b).abs().max())  # measured: ~2e-7
        assert torch.allclose(one(x), two(x), rtol=1e-5, atol=1e-5), name
