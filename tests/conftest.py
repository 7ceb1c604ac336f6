"""Shared fixtures: a seed, a tiny random TransformerLens model with a character tokenizer,
and (for slow tests) the real SmolLM2 loaded once per session."""
from __future__ import annotations

import pytest
import torch


class CharTokenizer:
    """Byte-level stand-in for a HF tokenizer: ids 0..255 = bytes, 256 = <|endoftext|>."""

    name_or_path = "char-test"
    bos_token_id = eos_token_id = pad_token_id = 256
    padding_side = "right"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, skip_special_tokens=False):
        special = "" if skip_special_tokens else "<|endoftext|>"
        return "".join(special if i == 256 else bytes([i]).decode("latin-1") for i in ids)

    def get_vocab(self):
        return {"<|endoftext|>": 256}

    def __len__(self):
        return 257


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def make_tiny_model():
    """2 layers, d_model 32, random weights fixed by seed 0 (also built in spawned workers)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, n_ctx=64, d_vocab=257, act_fn="gelu", normalization_type="LN")
    model = HookedTransformer(cfg)
    model.tokenizer = CharTokenizer()
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_model()


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    words = "the cat sat on a mat while dogs ran past quiet rivers and old stone bridges".split()
    gen = torch.Generator().manual_seed(1)
    docs = [" ".join(words[i] for i in torch.randint(len(words), (60,), generator=gen).tolist()) for _ in range(120)]
    path.write_text("\n\n".join(docs))
    return path


@pytest.fixture(scope="session")
def smollm2():
    from activations import load_model

    torch.set_num_threads(2)
    return load_model("smollm2", device="cpu")


def save_tiny_llama(path) -> str:
    """A random 2-layer Llama (d_model 32) with a byte-level tokenizer, saved as a local
    Hugging Face folder: loads offline through `load_model(path)` like any HF model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, bos_token_id=256, eos_token_id=256)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bridge(tiny_llama_dir):
    """The tiny Llama through `load_model`: a TransformerBridge over a Hugging Face model,
    the same path as SmolLM2 (HF fast hooks, KV cache, HF generate)."""
    from activations import load_model

    return load_model(tiny_llama_dir, device="cpu")
