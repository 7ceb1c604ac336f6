"""llm: an optional explainer (off by default). Any OpenAI-compatible chat endpoint is asked to
explain each feature from its top contexts and to name trigger words; the words (with and
without a leading space) become a token set, scored exactly like every other label.

The endpoint must be https://, or http:// to a loopback host, unless insecure endpoints are
allowed explicitly (`check_endpoint`). The API key is read from the environment when the
endpoint is called (never saved, never shown in an error), and redirects to another origin
drop it (`_SafeRedirects`).
"""
from __future__ import annotations

import ipaddress
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..atlas import Atlas
from .base import Label, LabelContext, register
from .token_set import TokenLabel, TokenSetKind

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

API_KEY_ENV = "OPENAI_API_KEY"
"""Where the optional LLM explainer's API key is read from, at call time (never saved)."""
LLM_KEYS = {"base_url", "model", "features", "api_key_env"}
"""Keys `LabelConfig.llm` may have."""
SECRET_KEYS = {"api_key", "key", "token", "secret", "password", "authorization"}
"""Keys refused in `LabelConfig.llm` (it is saved in labels.json) and dropped from the saved config."""

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


# ---------------------------------------------------------------------------- the kind
@dataclass(kw_only=True)
class LLMLabel(TokenLabel):
    """A token set whose tokens an LLM named (`tokens`: the current token is one of them)."""

    explanation: str = ""
    """The explainer's description of the feature (shown as "LLM: <explanation>")."""


@register
class LLMKind(TokenSetKind):
    """The explainer's trigger words as a token-set predicate (the same rule as token-set)."""

    name = "llm"
    rank = 70
    label_class = LLMLabel

    def candidates(self, atlas: Atlas, context: LabelContext) -> list[Label]:
        cfg = context.cfg
        if not cfg.llm:
            return []
        features = cfg.llm.get("features") or atlas.live_features
        bad = [f for f in features if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < atlas.d_sae]
        if bad:
            raise ValueError(f"LLM explainer features {bad} are out of range: this SAE has {atlas.d_sae} features "
                             f"(ids 0..{atlas.d_sae - 1})")
        return llm_candidates(atlas, context.model.tokenizer, features, cfg.llm["base_url"], cfg.llm.get("model") or "default",
                              allow_insecure=cfg.allow_insecure_endpoint, api_key_env=cfg.llm.get("api_key_env") or API_KEY_ENV)

    def render(self, label: LLMLabel, atlas: Atlas) -> str:
        return f"LLM: {label.explanation}"


def llm_candidates(atlas: Atlas, tokenizer: PreTrainedTokenizerBase, features: list[int], base_url: str, model: str,
                   api_key: str | None = None, timeout: float = 60, allow_insecure: bool = False,
                   api_key_env: str = API_KEY_ENV) -> list[LLMLabel]:
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
            hint = f"; is {api_key_env} set to a valid key?" if error.code in (401, 403) else ""
            raise RuntimeError(_redact(f"LLM explainer at {_shown_url(url)!r} answered HTTP {error.code} ({error.reason}) for feature {i}"
                                       + hint, api_key)) from None
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
        variants = [variant for w in words for variant in (w, " " + w.strip())]
        tokens = sorted({t for variant in variants for t in tokenizer(variant, add_special_tokens=False)["input_ids"][:1]})
        out.append(LLMKind().make(atlas, i, tokens=tokens, explanation=explanation))
    return out


__all__ = ["API_KEY_ENV", "LLMKind", "LLMLabel", "check_endpoint", "llm_candidates"]
