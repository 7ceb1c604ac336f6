"""Text sources, tokenised and packed into fixed-length contexts.

Sources (`CorpusConfig.source`):
  * ``"default"``: the embedded corpus (`activations/data/default_corpus.jsonl.xz`, 4.0M
    SmolLM2 tokens of human-written English: Jane Austen's novels, the King James Bible and the
    Python and Debian documentation, see README) with a fixed train/held-out split;
  * ``"chat"``: the embedded chat corpus (`activations/data/chat_corpus.jsonl.xz`): SmolLM2's
    own answers to 2,048 varied user requests, whole conversations in its chat template
    (`activations/data/build_chat_corpus.py` says how they were made), same kind of split;
  * a path to a ``.txt`` (documents separated by blank lines), ``.jsonl`` (a ``text`` field)
    or ``.parquet`` (a ``text`` column) file, or a folder of them;
  * ``"hf:<dataset>[:<config>]"``: a Hugging Face dataset, streamed (needs network);
  * several of these joined by ``+`` (``"chat+default"``): every document of the first, then
    of the next, each split kept; a harvest of fewer tokens than the whole reads the first part first.

Packing (BOS handling): documents are tokenised without special tokens and joined into one
stream with a separator token after each document. The stream is cut into chunks of
`context_len - 1` tokens and each context starts with that same token, so position 0 of every
context is a BOS-like attention sink (excluded from training and metrics by default). The
token is ``<|endoftext|>`` where the vocabulary has it (SmolLM2 and GPT-2 style models use it
as their document boundary; SmolLM2's nominal BOS is the chat marker ``<|im_start|>``), else
the tokenizer's BOS, else its EOS.
"""
from __future__ import annotations

import hashlib
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_CORPUS = Path(__file__).parent / "data" / "default_corpus.jsonl.xz"
CHAT_CORPUS = Path(__file__).parent / "data" / "chat_corpus.jsonl.xz"
EMBEDDED = {"default": DEFAULT_CORPUS, "chat": CHAT_CORPUS}
"""The corpora the package ships, by source name: .jsonl.xz files of {"text", "split"} documents."""
JOIN = "+"


@dataclass
class CorpusConfig:
    source: str = "default"
    """"default", a .txt/.jsonl/.parquet file or folder, or "hf:<name>[:<config>]"."""
    split: Literal["train", "heldout"] = "train"
    """For "default": the fixed split. For files, "heldout" takes every 20th document."""
    context_len: int = 128
    """Tokens per context, BOS included."""
    text_field: str = "text"
    """Field or column holding the text in .jsonl/.parquet/HF sources."""
    hf_split: str = "train"
    """Split name of a Hugging Face dataset."""


class EmptyCorpusError(ValueError):
    pass


def heldout_corpus(training_data: dict | None, source: str | None = None, context_len: int = 128) -> CorpusConfig:
    """The held-out split every stage after the harvest measures on: of `source` when the user
    names one, else of the corpus the SAE was trained on (`SAE.training_data["corpus"]`, which
    the store's manifest recorded), else of the embedded default (an SAE from another tool)."""
    if source is not None:
        return CorpusConfig(source=source, split="heldout", context_len=context_len)
    recorded = dict((training_data or {}).get("corpus") or {"source": "default"})
    recorded.update(split="heldout", context_len=context_len)
    return CorpusConfig(**recorded)


def describe(cfg: CorpusConfig) -> str:
    """One line naming a corpus and split, for every output measured on it."""
    names = {"default": "the embedded default corpus", "chat": "the embedded chat corpus"}
    name = " + ".join(names.get(part, repr(part)) for part in source_parts(cfg.source))
    return f"{name}, {cfg.split} split"


def source_parts(source: str) -> list[str]:
    """The sources a ``+``-joined source reads, in order (one part for a plain source; a path
    that exists is never split, even with a ``+`` in its name)."""
    if JOIN not in source or Path(source).exists():
        return [source]
    parts = [part.strip() for part in source.split(JOIN)]
    if any(not part for part in parts):
        raise ValueError(f"corpus source {source!r} has an empty part: join sources as 'chat+default'")
    return parts


def _split_of_index(i: int, split: str) -> bool:
    return (i % 20 == 19) == (split == "heldout")


CORPUS_SUFFIXES = (".txt", ".jsonl", ".parquet")


def corpus_files(path: Path) -> list[Path]:
    """The files a corpus source reads, in reading order: the file itself, or every corpus file under a folder."""
    return sorted(p for p in path.rglob("*") if p.suffix in CORPUS_SUFFIXES) if path.is_dir() else [path]


def iter_documents(cfg: CorpusConfig) -> Iterator[str]:
    """Yield the documents of `cfg.source` that belong to `cfg.split`, in a fixed order."""
    parts = source_parts(cfg.source)
    if len(parts) > 1:
        for part in parts:
            yield from iter_documents(replace(cfg, source=part))
        return
    if cfg.source in EMBEDDED:
        with lzma.open(EMBEDDED[cfg.source], "rt", encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)
                if doc["split"] == cfg.split:
                    yield doc["text"]
        return
    if cfg.source.startswith("hf:"):
        import datasets  # optional, needs network

        name, _, config = cfg.source[3:].partition(":")
        stream = datasets.load_dataset(name, config or None, split=cfg.hf_split, streaming=True)
        for i, row in enumerate(stream):
            if _split_of_index(i, cfg.split):
                yield row[cfg.text_field]
        return
    path = Path(cfg.source)
    if not path.exists():
        raise FileNotFoundError(f"corpus source {cfg.source!r} does not exist")
    files = corpus_files(path)
    i = 0
    for file in files:
        for text in _read_file(file, cfg.text_field):
            if text.strip() and _split_of_index(i, cfg.split):
                yield text
            i += 1


def _read_file(path: Path, field: str) -> Iterator[str]:
    if path.suffix == ".txt":
        yield from (d for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip())
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)[field]
                    except (json.JSONDecodeError, KeyError) as e:
                        raise ValueError(f"{path}:{n}: expected a JSON object with a {field!r} field ({e})") from e
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=[field])
        yield from (t for t in table.column(field).to_pylist() if t)
    else:
        raise ValueError(f"unsupported corpus file type {path.suffix!r}: use .txt, .jsonl or .parquet")


def pack_contexts(documents: Iterator[str], tokenizer: PreTrainedTokenizerBase, context_len: int = 128, max_contexts: int | None = None) -> np.ndarray:
    """Tokenise and pack documents into contexts: int32 [n_contexts, context_len].
    Every context starts with the boundary token, which also separates documents
    (`boundary_token_id`: `<|endoftext|>` where the tokenizer has it, else BOS, else EOS)."""
    if context_len < 2:
        raise ValueError("context_len must be at least 2")
    bos = eos = boundary_token_id(tokenizer)
    body = context_len - 1
    chunks: list[np.ndarray] = []
    buffer: list[int] = []
    n = 0
    for doc in documents:
        buffer.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        buffer.append(eos)
        while len(buffer) >= body and (max_contexts is None or n < max_contexts):
            chunks.append(np.asarray([bos] + buffer[:body], dtype=np.int32))
            del buffer[:body]
            n += 1
        if max_contexts is not None and n >= max_contexts:
            break
    if not chunks:
        raise EmptyCorpusError("the corpus produced no complete context: it is empty or shorter than one context")
    return np.stack(chunks)


def boundary_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that starts every context and separates documents (see module docstring)."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("tokenizer has no <|endoftext|>, BOS or EOS token to mark context starts")


def contexts_for_tokens(n_tokens: int, context_len: int, first: int = 1) -> int:
    """How many packed contexts hold `n_tokens` usable tokens when each context's positions
    before `first` are left out (position 0, the BOS sink, by default): the one rule for
    "contexts for n tokens"."""
    return -(-n_tokens // (context_len - first))


def tokens_in_contexts(n_contexts: int, context_len: int, first: int = 1) -> int:
    """Usable tokens in `n_contexts` packed contexts (the inverse of `contexts_for_tokens`)."""
    return n_contexts * (context_len - first)


def fingerprint(tokens: np.ndarray) -> str:
    """Content hash of packed tokens, stored in manifests to catch mismatched corpora."""
    return hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()[:16]


def source_digest(cfg: CorpusConfig) -> str:
    """A content hash of the corpus source's files (the embedded corpus, a file, or every corpus
    file under a folder, with their relative names), so caches of its tokens follow the text, not
    its path or modification time. A Hugging Face dataset is named only (its files are remote)."""
    parts = source_parts(cfg.source)
    if len(parts) > 1:
        return hashlib.sha256(JOIN.join(source_digest(replace(cfg, source=part)) for part in parts).encode()).hexdigest()
    if cfg.source.startswith("hf:"):
        return cfg.source
    path = EMBEDDED.get(cfg.source) or Path(cfg.source)
    if not path.exists():
        raise FileNotFoundError(f"corpus source {cfg.source!r} does not exist")
    files = corpus_files(path)
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        with file.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_contexts(cfg: CorpusConfig, tokenizer: PreTrainedTokenizerBase, max_contexts: int | None = None, cache_dir: Path | None = None) -> np.ndarray:
    """Packed contexts for `cfg`, int32 [n_contexts, context_len], cached as .npy in `cache_dir`
    when given (tokenising the default corpus takes ~10 s)."""
    cache = None
    if cache_dir is not None:
        from .model import vocabulary_key

        content = [cfg.__dict__, source_digest(cfg), vocabulary_key(tokenizer), max_contexts]  # what the tokens depend on, not where they came from
        key = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]
        cache = Path(cache_dir) / f"contexts_{cfg.split}_{key}.npy"
        if cache.exists():
            return np.load(cache, allow_pickle=False)
    try:
        tokens = pack_contexts(iter_documents(cfg), tokenizer, cfg.context_len, max_contexts)
    except EmptyCorpusError as error:
        raise EmptyCorpusError(f"{describe(cfg)}: {error}") from None
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, tokens, allow_pickle=False)
        tmp.replace(cache)
    return tokens
