"""Feature labels without a large language model, each one scored on held-out text.

A label is a predicate over token positions that predicts where its feature fires. Kinds:
  * ``token-set``: the current token is one of a few tokens (chosen greedily on the atlas
    text by P(fire | token), keeping the prefix with the best F1 there);
  * ``pattern``: N2G-style. For the feature's top contexts, the context is cut to its last
    L tokens (L = 1, 2, 4, 8) before the maximum, behind the `<|endoftext|>` sink, and
    re-run; the shortest cut that keeps >= 50% of the activation is the pattern. The
    predicate: the tokens ending here equal one of the patterns;
  * ``logit``: the NEXT token is one the feature's decoder direction promotes (logit lens);
  * ``class``: heuristic classes: punctuation/whitespace/boundary tokens, early positions
    (position <= p, p fitted on the atlas), and dense (fires everywhere).
Labels are made from the atlas (its contexts) and scored on *other* held-out contexts (the
ones after the atlas's): precision = P(fires | predicate), recall = P(predicate | fires),
F1; recall per activation quartile (activation / max activation in [0, .25) ... [.75, 1]);
false-positive rates on random negatives (every non-firing position of the uniform
held-out stream) and on hard negatives (non-firing positions whose token is one the feature
fires on in the atlas). Each feature keeps its best label by held-out F1 and all the scores.

An optional LLM explainer (`llm_candidates`, off by default) asks any OpenAI-compatible
endpoint for an explanation plus trigger words; the words become a token-set predicate and
are scored exactly like the others.
"""
from __future__ import annotations

import ipaddress
import json
import os
import string
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from activations.corpus import CorpusConfig, boundary_token_id, load_contexts
from activations.model import run_to_hooks
from activations.store import atomic_write_json
from sae.base import SAE

from .atlas import Atlas

PATTERN_LENGTHS = (1, 2, 4, 8)
QUARTILE_EDGES = (0.25, 0.5, 0.75)
KINDS = ("token-set", "pattern", "logit", "punctuation", "position", "dense", "llm")
API_KEY_ENV = "OPENAI_API_KEY"
"""Where the optional LLM explainer's API key is read from, at call time (never saved)."""
LLM_KEYS = {"base_url", "model", "features", "api_key_env"}
SECRET_KEYS = {"api_key", "key", "token", "secret", "password", "authorization"}


# ---------------------------------------------------------------------------- explainer endpoint
def _is_loopback(host: str) -> bool:
    host = host.lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # 127.0.0.0/8, ::1
    except ValueError:
        return False


def _shown_url(url: str) -> str:
    """`url` without user info, query or fragment, for error messages."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def check_endpoint(url: str, allow_insecure: bool = False) -> str:
    """The explainer endpoint `url` if it is safe to send prompts (and the API key) to:
    https://, or http:// to a loopback host (127.0.0.0/8, ::1, localhost); plain http://
    elsewhere only with `allow_insecure`. Raises ValueError saying what is allowed otherwise."""
    parts = urllib.parse.urlsplit(str(url))
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme not in ("http", "https") or not host:
        raise ValueError(f"LLM explainer endpoint {_shown_url(str(url))!r} is not an http(s) URL with a host; "
                         "use e.g. https://api.example.com/v1 or http://localhost:8000/v1")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"LLM explainer endpoint {_shown_url(str(url))!r} has credentials in the URL; remove them and "
                         f"put the key in the environment variable {API_KEY_ENV}")
    if scheme == "http" and not _is_loopback(host) and not allow_insecure:
        raise ValueError(
            f"LLM explainer endpoint {_shown_url(str(url))!r} is plain http:// to {host!r}, which is not a loopback address: "
            "prompts and the API key would travel unencrypted. Use https://, a loopback host (127.0.0.0/8, ::1, localhost), "
            "or accept it explicitly with --allow-insecure-endpoint (allow_insecure_endpoint in the config)")
    return str(url)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(scheme)


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects that never carry the Authorization header to another origin (scheme, host or
    port), and never to an endpoint `check_endpoint` refuses."""

    def __init__(self, allow_insecure: bool = False):
        self.allow_insecure = allow_insecure

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is None:
            return None
        try:
            check_endpoint(new.full_url, self.allow_insecure)
        except ValueError as error:
            raise ValueError(f"LLM explainer at {_shown_url(req.full_url)!r} redirected to a refused endpoint: {error}") from None
        if _origin(new.full_url) != _origin(req.full_url):
            for name in [k for k in new.headers if k.lower() == "authorization"]:
                new.remove_header(name)
        return new


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


@dataclass
class LabelConfig:
    n_score_contexts: int = 2048
    """Held-out contexts (after the atlas's) on which every label is scored."""
    max_tokens: int = 12
    """Largest token set of a token-set label."""
    pattern_contexts: int = 3
    """Top contexts per feature from which N2G-style patterns are cut."""
    keep_fraction: float = 0.5
    """A pattern must keep this share of the activation at the maximum."""
    n_logit_tokens: int = 5
    max_position: int = 8
    """Largest p tried for the "position <= p" class."""
    batch_contexts: int = 16
    autocast: str = "bf16"
    llm: dict | None = field(default=None)
    """Optional OpenAI-compatible explainer: {"base_url", "model", "features"?, "api_key_env"?}. The API key is
    never part of the config (which is saved in labels.json): it is read from the environment variable
    `api_key_env` (default OPENAI_API_KEY) when the endpoint is called."""
    allow_insecure_endpoint: bool = False
    """Accept a plain http:// explainer endpoint on a non-loopback host (prompts and key unencrypted)."""

    def __post_init__(self):
        if self.llm is None:
            return
        secret = sorted(k for k in self.llm if k.lower() in SECRET_KEYS)
        if secret:
            raise ValueError(f"LabelConfig.llm must not hold a secret ({', '.join(secret)}): the config is saved in labels.json. "
                             f"Put the key in the environment variable {self.llm.get('api_key_env') or API_KEY_ENV} instead")
        unknown = sorted(set(self.llm) - LLM_KEYS)
        if unknown:
            raise ValueError(f"LabelConfig.llm: unknown key(s) {unknown}; allowed: {sorted(LLM_KEYS)}")
        if not self.llm.get("base_url"):
            raise ValueError("LabelConfig.llm needs a 'base_url' (an OpenAI-compatible endpoint, e.g. https://host/v1)")
        check_endpoint(self.llm["base_url"], self.allow_insecure_endpoint)


@dataclass
class Candidate:
    """One label of one feature, as token sets / patterns / classes for vectorised scoring."""

    feature: int
    kind: str
    text: str
    tokens: list[int] = field(default_factory=list)
    """token-set, llm: current token in; logit: next token in."""
    patterns: list[tuple[int, ...]] = field(default_factory=list)
    max_position: int = 0


# ---------------------------------------------------------------------------- candidate labels
def _quote(vocab: dict[int, str], ids) -> str:
    return " ".join(json.dumps(vocab.get(int(t), f"<{int(t)}>"), ensure_ascii=False) for t in ids)


def token_set_candidates(atlas: Atlas, max_tokens: int) -> list[Candidate]:
    """Greedy token sets: tokens by P(fire | token) on the atlas text, best-F1 prefix."""
    frequency = atlas.token_counts["token_frequency"].numpy()
    fire_count = atlas.tensors["fire_count"].numpy()
    ptr = atlas.tensors["token_count_ptr"].numpy()
    ids_all, counts_all = atlas.token_counts["ids"].numpy(), atlas.token_counts["counts"].numpy()
    out = []
    for i in np.nonzero(fire_count)[0]:
        ids, counts = ids_all[ptr[i]:ptr[i + 1]], counts_all[ptr[i]:ptr[i + 1]].astype(np.float64)
        precision = counts / np.maximum(frequency[ids], 1)
        order = np.lexsort((-counts, -precision))[:max_tokens * 4]
        tp, fp = np.cumsum(counts[order]), np.cumsum(frequency[ids[order]] - counts[order])
        f1 = 2 * tp / (2 * tp + fp + (fire_count[i] - tp))
        best = int(np.argmax(f1[:max_tokens])) + 1
        chosen = ids[order[:best]].tolist()
        out.append(Candidate(int(i), "token-set", f"tokens {_quote(atlas.vocab, chosen)}", tokens=chosen))
    return out


def logit_candidates(atlas: Atlas, n: int) -> list[Candidate]:
    live = torch.nonzero(atlas.tensors["fire_count"] > 0).flatten().tolist()
    top = atlas.tensors["logit_top_ids"][:, :n]
    return [Candidate(i, "logit", f"predicts {_quote(atlas.vocab, top[i].tolist())}", tokens=top[i].tolist()) for i in live]


def class_candidates(atlas: Atlas, max_position: int) -> list[Candidate]:
    live = torch.nonzero(atlas.tensors["fire_count"] > 0).flatten().tolist()
    counts = atlas.tensors["position_count"].double()  # [d_sae, ctx_len]
    n_contexts = atlas.meta["n_contexts"]
    # F1 of "position <= p" on the atlas text, for every p at once
    tp = counts[:, 1:max_position + 1].cumsum(1)
    predicted = n_contexts * torch.arange(1, max_position + 1, dtype=torch.float64)
    f1 = 2 * tp / (predicted + counts.sum(1, keepdim=True))
    best_p = f1.argmax(1) + 1
    out = []
    for i in live:
        out.append(Candidate(i, "punctuation", "punctuation / whitespace / boundary tokens"))
        out.append(Candidate(i, "position", f"position <= {int(best_p[i])}", max_position=int(best_p[i])))
        out.append(Candidate(i, "dense", f"dense: fires on {float(atlas.density[i]):.0%} of tokens"))
    return out


@torch.no_grad()
def pattern_candidates(atlas: Atlas, sae: SAE, model, cfg: LabelConfig) -> list[Candidate]:
    """N2G-style patterns: the shortest suffix (ending at the maximum) of each top context that
    keeps `keep_fraction` of the activation when re-run alone behind the sink token."""
    hook, device = sae.cfg.hook_name, next(sae.parameters()).device
    sink = boundary_token_id(model.tokenizer)
    values = atlas.tensors["top_values"][:, :cfg.pattern_contexts]
    contexts = atlas.tensors["top_context"][:, :cfg.pattern_contexts]
    positions = atlas.tensors["top_position"][:, :cfg.pattern_contexts]
    feature, slot = torch.nonzero(values > 0, as_tuple=True)
    kept = torch.zeros(len(feature), dtype=torch.int64)  # chosen length, 0 = none yet
    for length in tqdm(PATTERN_LENGTHS, desc="labels: patterns", unit="length"):
        todo = torch.nonzero((kept == 0) & (positions[feature, slot] >= length)).flatten()
        ctx, pos = contexts[feature[todo], slot[todo]].long(), positions[feature[todo], slot[todo]]
        window = pos[:, None] + torch.arange(-length + 1, 1)
        seqs = torch.cat([torch.full((len(todo), 1), sink), atlas.tokens.long()[ctx[:, None], window]], dim=1)
        acts = []
        for start in range(0, len(seqs), 256):
            x = run_to_hooks(model, seqs[start:start + 256].to(device), [hook], autocast=cfg.autocast)[hook][:, -1]
            acts.append(sae.encode(x).gather(1, feature[todo[start:start + 256]].to(device)[:, None]).squeeze(1).cpu())
        if acts:
            keeps = torch.cat(acts) >= cfg.keep_fraction * values[feature[todo], slot[todo]]
            kept[todo[keeps]] = length
    out: dict[int, Candidate] = {}
    for f, s, length in zip(feature.tolist(), slot.tolist(), kept.tolist()):
        if length == 0:
            continue
        ctx, pos = int(contexts[f, s]), int(positions[f, s])
        pattern = tuple(atlas.tokens[ctx, pos - length + 1:pos + 1].tolist())
        cand = out.setdefault(f, Candidate(f, "pattern", "", patterns=[]))
        if pattern not in cand.patterns:
            cand.patterns.append(pattern)
    for cand in out.values():
        shown = ["".join(atlas.vocab.get(t, "?") for t in p[:-1]) + "[" + atlas.vocab.get(p[-1], "?") + "]" for p in cand.patterns]
        cand.text = "pattern " + " | ".join(json.dumps(s, ensure_ascii=False) for s in shown)
    return list(out.values())


def llm_candidates(atlas: Atlas, tokenizer, features: list[int], base_url: str, model: str, api_key: str | None = None, timeout: float = 60,
                   allow_insecure: bool = False, api_key_env: str = API_KEY_ENV) -> list[Candidate]:
    """Ask an OpenAI-compatible chat endpoint to explain each feature from its top contexts.
    It must answer JSON {"explanation": str, "words": [str, ...]}; the words (with and
    without a leading space) become a token-set predicate, scored like every other label.

    The key is `api_key`, else the environment variable `api_key_env` read now; it is sent as
    a Bearer token only to `base_url`'s origin (redirects elsewhere drop it) and appears in no
    error message. `base_url` must pass `check_endpoint` (https, or http to loopback, unless
    `allow_insecure`)."""
    check_endpoint(base_url, allow_insecure)
    if api_key is None:
        api_key = os.environ.get(api_key_env) or None
    opener = urllib.request.build_opener(_SafeRedirects(allow_insecure))
    url = base_url.rstrip("/") + "/chat/completions"
    out = []
    for i in features:
        shown = []
        for example in atlas.examples(i)[:10]:
            pieces = [atlas.vocab.get(t, "?") for t in example["tokens"]]
            pieces[example["max_index"]] = f"<<{pieces[example['max_index']]}>>"
            shown.append("".join(pieces))
        prompt = (
            "These text excerpts show where one feature of a language model fires most strongly; the strongest token "
            "is marked <<like this>>.\n\n" + "\n".join(f"{n + 1}. {s}" for n, s in enumerate(shown)) +
            '\n\nAnswer with JSON only: {"explanation": "<a short description>", "words": [<up to 10 words the feature fires on>]}'
        )
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
        request = urllib.request.Request(url, data=body, headers=headers)
        try:
            with opener.open(request, timeout=timeout) as response:
                reply = response.read()
        except urllib.error.HTTPError as error:
            raise RuntimeError(_redact(f"LLM explainer at {_shown_url(url)!r} answered HTTP {error.code} ({error.reason}) for feature {i}"
                                       + (f"; is {api_key_env} set to a valid key?" if error.code in (401, 403) else ""), api_key)) from None
        except (urllib.error.URLError, OSError) as error:
            raise RuntimeError(_redact(f"LLM explainer at {_shown_url(url)!r} could not be reached for feature {i}: "
                                       f"{getattr(error, 'reason', error)}", api_key)) from None
        try:
            content = str(json.loads(reply)["choices"][0]["message"]["content"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError(_redact(f"LLM explainer at {_shown_url(url)!r} sent no chat completion for feature {i}: {reply[:200]!r}",
                                     api_key)) from None
        try:
            answer = json.loads(content[content.index("{"): content.rindex("}") + 1])
            words = [str(w) for w in answer.get("words", [])][:10]
            explanation = str(answer.get("explanation", ""))[:200]
        except (ValueError, AttributeError):
            raise ValueError(_redact(f"explainer answer for feature {i} is not the requested JSON: {content[:200]!r}", api_key)) from None
        explanation = _redact(explanation, api_key)
        tokens = sorted({t for w in words for variant in (w, " " + w.strip()) for t in tokenizer(variant, add_special_tokens=False)["input_ids"][:1]})
        out.append(Candidate(i, "llm", f"LLM: {explanation}", tokens=tokens))
    return out


# ---------------------------------------------------------------------------- scoring
def _is_punctuation(text: str) -> bool:
    stripped = text.strip()
    return stripped == "" or all(c in string.punctuation for c in stripped) or text == "<|endoftext|>"


class _Scorer:
    """Counts, for every candidate at once, TP/FP/FN, recall per quartile and FP on hard
    negatives over chunks of scoring tokens. Candidates become [rows, d_sae]-shaped boolean
    lookup tables indexed by (token | pattern id), so each chunk costs a few gathers."""

    def __init__(self, candidates: list[Candidate], atlas: Atlas, vocab_size: int, punctuation: Tensor):
        self.atlas, self.d_sae, self.candidates = atlas, atlas.d_sae, candidates
        self.kinds = sorted({c.kind for c in candidates}, key=KINDS.index)
        self.index = {(c.kind, c.feature): n for n, c in enumerate(candidates)}
        self.punctuation = punctuation
        # token tables are [used tokens + 1, d_sae]: rows of tokens no label mentions stay small
        ptr, fire_ids = atlas.tensors["token_count_ptr"], atlas.token_counts["ids"]
        live = torch.nonzero(atlas.tensors["fire_count"] > 0).flatten().tolist()
        hard_tokens = {i: fire_ids[int(ptr[i]):min(int(ptr[i]) + 20, int(ptr[i + 1]))] for i in live}
        used = sorted({t for c in candidates for t in c.tokens} | set(torch.cat(list(hard_tokens.values()) or [torch.zeros(0, dtype=torch.int64)]).tolist()))
        self.token_row = torch.full((vocab_size,), len(used))
        self.token_row[used] = torch.arange(len(used))
        self.token_tables = {}
        for kind in ("token-set", "logit", "llm"):
            table = torch.zeros(len(used) + 1, self.d_sae, dtype=torch.bool)
            for c in candidates:
                if c.kind == kind:
                    table[self.token_row[c.tokens], c.feature] = True
            self.token_tables[kind] = table
        self.max_position = torch.full((self.d_sae,), -1)
        for c in candidates:
            if c.kind == "position":
                self.max_position[c.feature] = c.max_position
        # patterns: per length, sorted hashes -> pattern row; rows -> features
        self.pattern_rows: dict[int, tuple[Tensor, Tensor]] = {}
        pattern_ids: dict[tuple[int, ...], int] = {}
        pairs = []
        for c in candidates:
            if c.kind == "pattern":
                for p in c.patterns:
                    pairs.append((pattern_ids.setdefault(p, len(pattern_ids)), c.feature))
        self.pattern_table = torch.zeros(len(pattern_ids) + 1, self.d_sae, dtype=torch.bool)  # last row: no match
        for row, feature in pairs:
            self.pattern_table[row, feature] = True
        for length in PATTERN_LENGTHS:
            same = [(self._hash(torch.tensor(p)[None]).item(), row) for p, row in pattern_ids.items() if len(p) == length]
            if same:
                hashes, rows = zip(*sorted(same))
                self.pattern_rows[length] = (torch.tensor(hashes), torch.tensor(rows))
        # hard negatives: positions whose token the feature fires on in the atlas (its top 20)
        self.hard_table = torch.zeros(len(used) + 1, self.d_sae, dtype=torch.bool)
        for i, ids in hard_tokens.items():
            self.hard_table[self.token_row[ids], i] = True
        shape = (len(self.kinds), self.d_sae)
        self.tp, self.fp, self.fn = (torch.zeros(shape, dtype=torch.int64) for _ in range(3))
        self.fp_hard = torch.zeros(shape, dtype=torch.int64)
        self.tp_quartile = torch.zeros(len(self.kinds), 4, self.d_sae, dtype=torch.int64)
        self.fires_quartile = torch.zeros(4, self.d_sae, dtype=torch.int64)
        self.negatives = torch.zeros(self.d_sae, dtype=torch.int64)
        self.hard_negatives = torch.zeros(self.d_sae, dtype=torch.int64)
        self.n_positions = 0

    @staticmethod
    def _hash(grams: Tensor) -> Tensor:
        """Polynomial hash of token n-grams [n, L] (int64 wrap-around is fine for lookup)."""
        h = torch.zeros(len(grams), dtype=torch.int64)
        for j in range(grams.shape[1]):
            h = h * 1_000_003 + grams[:, j] + 1
        return h

    def _pattern_rows(self, tokens: Tensor) -> list[Tensor]:
        """For each pattern length, the pattern row matching at each position [b, pos]."""
        out = []
        no_match = len(self.pattern_table) - 1
        for length, (hashes, rows) in self.pattern_rows.items():
            grams = tokens.unfold(1, length, 1)  # [b, pos - length + 1, length]
            h = self._hash(grams.reshape(-1, length)).view(grams.shape[:2])
            where = torch.searchsorted(hashes, h).clamp_max(len(hashes) - 1)
            row = torch.where(hashes[where] == h, rows[where], torch.tensor(no_match))
            out.append(torch.cat([torch.full((tokens.shape[0], length - 1), no_match), row], dim=1))
        return out

    def predicate(self, kind: str, tokens: Tensor, pattern_rows: list[Tensor]) -> Tensor:
        """[b, pos, d_sae] predicate of every feature's `kind` label on `tokens` [b, pos]."""
        b, n = tokens.shape
        if kind in ("token-set", "llm"):
            return self.token_tables[kind][self.token_row[tokens]]
        if kind == "logit":
            following = self.token_tables[kind][self.token_row[tokens[:, 1:]]]
            return torch.cat([following, torch.zeros(b, 1, self.d_sae, dtype=torch.bool)], dim=1)
        if kind == "pattern":
            out = torch.zeros(b, n, self.d_sae, dtype=torch.bool)
            for rows in pattern_rows:
                out |= self.pattern_table[rows]
            return out
        if kind == "punctuation":
            return self.punctuation[tokens][..., None].expand(b, n, self.d_sae)
        if kind == "position":
            return (torch.arange(n)[None, :, None] <= self.max_position).expand(b, n, self.d_sae)
        if kind == "dense":
            return torch.ones(b, n, self.d_sae, dtype=torch.bool)
        raise ValueError(kind)

    def update(self, f: Tensor, tokens: Tensor) -> None:
        """f: [b, pos, d_sae] activations; tokens [b, pos]. Position 0 is not scored."""
        fires = f[:, 1:] > 0
        quartile = torch.bucketize(f[:, 1:] / self.atlas.max_activation.clamp_min(1e-8), torch.tensor(QUARTILE_EDGES))
        hard = self.hard_table[self.token_row[tokens[:, 1:]]] & ~fires
        pattern_rows = self._pattern_rows(tokens) if self.pattern_rows else []
        self.n_positions += fires.shape[0] * fires.shape[1]
        self.negatives += (~fires).sum((0, 1))
        self.hard_negatives += hard.sum((0, 1))
        in_quartile = [fires & (quartile == q) for q in range(4)]
        for q in range(4):
            self.fires_quartile[q] += in_quartile[q].sum((0, 1))
        for k, kind in enumerate(self.kinds):
            pred = self.predicate(kind, tokens, pattern_rows)[:, 1:]
            self.tp[k] += (pred & fires).sum((0, 1))
            self.fp[k] += (pred & ~fires).sum((0, 1))
            self.fn[k] += (~pred & fires).sum((0, 1))
            self.fp_hard[k] += (pred & hard).sum((0, 1))
            for q in range(4):
                self.tp_quartile[k, q] += (pred & in_quartile[q]).sum((0, 1))

    def results(self) -> list[dict | None]:
        tp, fp, fn = self.tp.double(), self.fp.double(), self.fn.double()
        precision = tp / (tp + fp).clamp_min(1)
        recall = tp / (tp + fn).clamp_min(1)
        f1 = 2 * tp / (2 * tp + fp + fn).clamp_min(1)
        recall_q = self.tp_quartile.double() / self.fires_quartile.double().clamp_min(1)
        fpr_random = fp / self.negatives.double().clamp_min(1)
        fpr_hard = self.fp_hard.double() / self.hard_negatives.double().clamp_min(1)
        n_fires = (tp + fn)[0]
        per_feature: list[list[dict]] = [[] for _ in range(self.d_sae)]
        for c in self.candidates:
            k = self.kinds.index(c.kind)
            i = c.feature
            per_feature[i].append({
                "kind": c.kind, "label": c.text, "f1": round(float(f1[k, i]), 4), "precision": round(float(precision[k, i]), 4),
                "recall": round(float(recall[k, i]), 4),
                "recall_by_quartile": [round(float(v), 4) if self.fires_quartile[q, i] else None for q, v in enumerate(recall_q[k, :, i])],
                "fpr_random": round(float(fpr_random[k, i]), 6), "fpr_hard": round(float(fpr_hard[k, i]), 4) if self.hard_negatives[i] else None,
                **({"tokens": c.tokens} if c.tokens else {}), **({"patterns": [list(p) for p in c.patterns]} if c.patterns else {}),
            })
        out: list[dict | None] = []
        for i, scored in enumerate(per_feature):
            if not scored:
                out.append(None)
                continue
            scored.sort(key=lambda s: -s["f1"])
            out.append({"feature": i, **scored[0], "held_out_fires": int(n_fires[i]), "candidates": scored})
        return out


def label_predicate(label: dict, tokenizer=None):
    """The predicate of one scored label (an entry of `label_features(...)["features"]` or one
    of its "candidates") as a function tokens [b, pos] -> bool [b, pos]: where the label says
    its feature fires. Used to score steered text (`analysis.steering.concept_scores`)."""
    kind = label["kind"]
    if kind in ("token-set", "llm", "logit"):
        ids = torch.tensor(label["tokens"], dtype=torch.long)
        if kind != "logit":
            return lambda tokens: torch.isin(tokens, ids.to(tokens.device))
        # logit lens: the NEXT token is one the feature promotes
        return lambda tokens: torch.nn.functional.pad(torch.isin(tokens[:, 1:], ids.to(tokens.device)), (0, 1))
    if kind == "pattern":
        patterns = [torch.tensor(p, dtype=torch.long) for p in label["patterns"]]

        def matches(tokens: Tensor) -> Tensor:
            out = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
            for p in patterns:
                if len(p) <= tokens.shape[1]:  # the n-gram ending at each position equals p
                    out[:, len(p) - 1:] |= (tokens.unfold(1, len(p), 1) == p.to(tokens.device)).all(-1)
            return out
        return matches
    if kind == "position":
        max_position = int(label["label"].rsplit("<=", 1)[1])
        return lambda tokens: (torch.arange(tokens.shape[1], device=tokens.device) <= max_position).expand(tokens.shape)
    if kind == "dense":
        return lambda tokens: torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    if kind == "punctuation":
        if tokenizer is None:
            raise ValueError("a punctuation label needs the tokenizer to build its predicate")
        from activations.model import token_strings

        table = torch.tensor([_is_punctuation(s) for s in token_strings(tokenizer, list(range(len(tokenizer))))])
        return lambda tokens: table.to(tokens.device)[tokens]
    raise ValueError(f"no predicate for a label of kind {kind!r}")


# ---------------------------------------------------------------------------- the whole job
@torch.no_grad()
def label_features(atlas: Atlas, sae: SAE, model, cfg: LabelConfig | None = None) -> dict:
    """Make every kind of label for every live feature from `atlas`, score them on held-out
    contexts that follow the atlas's, and return {"summary", "features": [best + scores]}."""
    cfg = cfg or LabelConfig()
    if sae.cfg.d_sae != atlas.d_sae or sae.cfg.hook_name != atlas.meta["hook_name"]:
        raise ValueError(f"atlas is of a {atlas.d_sae}-feature SAE at {atlas.meta['hook_name']}, not this one ({sae.cfg.d_sae} at {sae.cfg.hook_name})")
    device = next(model.parameters()).device
    sae = sae.to(device).eval()
    atlas_cfg = atlas.meta["config"]
    corpus = CorpusConfig(**atlas_cfg["corpus"])
    first = atlas_cfg["first_context"] + atlas.meta["n_contexts"]
    tokens = torch.from_numpy(load_contexts(corpus, model.tokenizer, max_contexts=first + cfg.n_score_contexts)[first:]).long()
    if len(tokens) < min(16, cfg.n_score_contexts):
        raise ValueError(f"only {len(tokens)} held-out contexts follow the atlas's {first}: labels need unseen text to be scored on; "
                         "build the atlas on fewer tokens")

    candidates = token_set_candidates(atlas, cfg.max_tokens) + logit_candidates(atlas, cfg.n_logit_tokens)
    candidates += class_candidates(atlas, cfg.max_position) + pattern_candidates(atlas, sae, model, cfg)
    if cfg.llm:
        features = cfg.llm.get("features") or torch.nonzero(atlas.tensors["fire_count"] > 0).flatten().tolist()
        bad = [f for f in features if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < atlas.d_sae]
        if bad:
            raise ValueError(f"LLM explainer features {bad} are out of range: this SAE has {atlas.d_sae} features (ids 0..{atlas.d_sae - 1})")
        candidates += llm_candidates(atlas, model.tokenizer, features, cfg.llm["base_url"], cfg.llm.get("model") or "default",
                                     allow_insecure=cfg.allow_insecure_endpoint, api_key_env=cfg.llm.get("api_key_env") or API_KEY_ENV)

    vocab_size = max(len(model.tokenizer), int(tokens.max()) + 1, int(atlas.tokens.max()) + 1)
    from activations.model import token_strings

    punctuation = torch.tensor([_is_punctuation(s) for s in token_strings(model.tokenizer, list(range(vocab_size)))])
    scorer = _Scorer(candidates, atlas, vocab_size, punctuation)
    for start in tqdm(range(0, len(tokens), cfg.batch_contexts), desc="labels: scoring", unit="batch"):
        batch = tokens[start:start + cfg.batch_contexts]
        x = run_to_hooks(model, batch.to(device), [sae.cfg.hook_name], autocast=cfg.autocast)[sae.cfg.hook_name]
        scorer.update(sae.encode(x).cpu(), batch)
    features = scorer.results()
    scored_on = {"corpus": asdict(corpus), "first_context": first, "n_contexts": len(tokens)}
    return {"summary": summarize(features, scorer.n_positions, atlas), "config": saved_config(cfg), "scored_on": scored_on, "features": features}


def saved_config(cfg: LabelConfig) -> dict:
    """The config as labels.json keeps it: no secret (LabelConfig refuses one in `llm`, and
    this drops any that was set after construction), the explainer URL without credentials."""
    out = dict(cfg.__dict__)
    if out.get("llm"):
        llm = {k: v for k, v in out["llm"].items() if k.lower() not in SECRET_KEYS}
        if llm.get("base_url"):
            llm["base_url"] = _shown_url(llm["base_url"])
        out["llm"] = llm
    return out


def summarize(features: list[dict | None], n_positions: int, atlas: Atlas) -> dict:
    live = [f for f in features if f is not None]
    scored = [f for f in live if f["held_out_fires"] > 0]
    by_kind: dict[str, int] = {}
    for f in scored:
        if f["f1"] >= 0.5:
            by_kind[f["kind"]] = by_kind.get(f["kind"], 0) + 1
    return {
        "held_out_positions": n_positions, "live_features": len(live), "scored_features": len(scored),
        "best_f1_at_least_0.5": sum(f["f1"] >= 0.5 for f in live),
        "share_of_live_with_f1_at_least_0.5": round(sum(f["f1"] >= 0.5 for f in live) / max(len(live), 1), 4),
        "median_best_f1": round(float(np.median([f["f1"] for f in live])) if live else 0.0, 4),
        "best_kind_counts_at_f1_0.5": by_kind,
        "atlas_tokens": atlas.n_tokens,
    }


def save_labels(labels: dict, path: str | Path) -> Path:
    path = Path(path)
    atomic_write_json(path, labels)
    return path


def check_labels(labels: dict, d_sae: int, source: str | Path = "labels") -> dict:
    """`labels` if it has one entry (or null) per feature of a `d_sae`-feature SAE; else a
    ValueError naming `source` (labels of another SAE would be read at the wrong features)."""
    features = labels.get("features") if isinstance(labels, dict) else None
    if not isinstance(features, list):
        raise ValueError(f"{source}: not a labels file (no \"features\" list); rebuild it with `saewb analyze`")
    if len(features) != d_sae:
        raise ValueError(f"{source} has {len(features)} feature entries but the SAE has {d_sae} features: "
                         "these are labels of another SAE; rebuild them with `saewb analyze --sae <this SAE>`")
    return labels


def load_labels(path: str | Path, d_sae: int | None = None) -> dict:
    """Read labels.json; with `d_sae`, check it labels an SAE of that many features (`check_labels`)."""
    try:
        labels = json.loads(Path(path).read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); rebuild it with `saewb analyze`") from None
    return labels if d_sae is None else check_labels(labels, d_sae, path)


__all__ = ["API_KEY_ENV", "Candidate", "LabelConfig", "check_endpoint", "check_labels", "label_features", "label_predicate", "llm_candidates",
           "load_labels", "save_labels", "saved_config"]
