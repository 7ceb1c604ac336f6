"""Corpus sources and model loading paths that need no network: user files in every
format, and (mocked at the boundary, since this machine has no hub access) Hugging Face
datasets streaming and hub model names."""
import json
import sys
import types

import pytest

from activations import CorpusConfig, iter_documents, load_model, pack_contexts
from tests.conftest import CharTokenizer

DOCS = [f"document number {i} about rivers" for i in range(40)]


def test_txt_jsonl_parquet_give_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.txt").write_text("\n\n".join(DOCS))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "d.parquet")
    for name in ("d.txt", "d.jsonl", "d.parquet"):
        train = list(iter_documents(CorpusConfig(source=str(tmp_path / name))))
        heldout = list(iter_documents(CorpusConfig(source=str(tmp_path / name), split="heldout")))
        assert heldout == DOCS[19::20] and len(train) == 38, name


def test_bad_jsonl_line_is_a_clear_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        list(iter_documents(CorpusConfig(source=str(tmp_path / "bad.jsonl"))))


def test_default_corpus_split_is_fixed_and_disjoint():
    heldout = list(iter_documents(CorpusConfig(split="heldout")))
    train = list(iter_documents(CorpusConfig(split="train")))
    assert (len(heldout), len(train)) == (772, 1346)
    assert not set(heldout) & set(train)


def test_joined_sources_read_each_part_in_order_with_its_own_split(tmp_path):
    from activations.corpus import describe, source_digest

    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"a{i}"}) for i in range(40)))
    (tmp_path / "b.txt").write_text("\n\n".join(f"b{i}" for i in range(40)))
    joined = f"{tmp_path / 'a.jsonl'}+{tmp_path / 'b.txt'}"
    for split in ("train", "heldout"):
        parts = [list(iter_documents(CorpusConfig(source=str(tmp_path / name), split=split))) for name in ("a.jsonl", "b.txt")]
        assert list(iter_documents(CorpusConfig(source=joined, split=split))) == parts[0] + parts[1]
    # the cache key follows the parts' content and order
    digest = source_digest(CorpusConfig(source=joined))
    assert digest != source_digest(CorpusConfig(source=f"{tmp_path / 'b.txt'}+{tmp_path / 'a.jsonl'}"))
    (tmp_path / "b.txt").write_text("changed")
    assert digest != source_digest(CorpusConfig(source=joined))
    assert "a.jsonl" in describe(CorpusConfig(source=joined)) and "b.txt" in describe(CorpusConfig(source=joined))
    with pytest.raises(ValueError, match="empty part"):
        list(iter_documents(CorpusConfig(source="default+")))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list(iter_documents(CorpusConfig(source="default+nowhere.txt")))


def test_embedded_chat_corpus_is_whole_conversations_apart_from_the_steering_prompts():
    from analysis.steering import MORE_NEUTRAL_PROMPTS, NEUTRAL_PROMPTS
    from analysis.steering.concept import MORE_TUNING_PROMPTS, TUNING_PROMPTS

    heldout = list(iter_documents(CorpusConfig(source="chat", split="heldout")))
    train = list(iter_documents(CorpusConfig(source="chat")))
    assert len(heldout) + len(train) == 2048 and 0.25 < len(heldout) / 2048 < 0.45 and not set(heldout) & set(train)
    assert all(doc.startswith("<|im_start|>system") and "<|im_start|>user" in doc and "<|im_start|>assistant" in doc for doc in train)
    requests = {doc.split("<|im_start|>user\n")[1].split("<|im_end|>")[0] for doc in train + heldout}
    assert len(requests) == 2048 and not requests & (set(NEUTRAL_PROMPTS) | set(MORE_NEUTRAL_PROMPTS) | set(TUNING_PROMPTS) | set(MORE_TUNING_PROMPTS))
    assert list(iter_documents(CorpusConfig(source="chat+default", split="heldout")))[: len(heldout)] == heldout


def test_packing_starts_every_context_with_the_boundary_token():
    tokens = pack_contexts(iter(["ab", "cdefg"]), CharTokenizer(), context_len=4)
    # stream: a b <eot> c d e f g <eot>, cut into chunks of 3 after the leading boundary token
    assert tokens.tolist() == [[256, 97, 98, 256], [256, 99, 100, 101], [256, 102, 103, 256]]


def test_hf_datasets_streaming_is_used_through_the_same_interface(monkeypatch):
    calls = {}

    def load_dataset(name, config, split, streaming):
        calls.update(name=name, config=config, split=split, streaming=streaming)
        return iter({"text": d} for d in DOCS)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    docs = list(iter_documents(CorpusConfig(source="hf:wikitext:wikitext-103-raw-v1")))
    assert calls == dict(name="wikitext", config="wikitext-103-raw-v1", split="train", streaming=True)
    assert len(docs) == 38


def test_hub_names_go_to_transformer_lens(monkeypatch):
    import transformer_lens

    seen = {}

    def from_pretrained(name, device, dtype):
        seen.update(name=name, device=device)
        return "hooked-model"

    monkeypatch.setattr(transformer_lens.HookedTransformer, "from_pretrained", staticmethod(from_pretrained))
    assert load_model("gpt2", device="cpu") == "hooked-model"
    assert seen == dict(name="gpt2", device="cpu")
