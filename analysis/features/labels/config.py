"""The labelling config: one flat dataclass whose fields the kinds read (`LabelContext.cfg`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .llm import API_KEY_ENV, LLM_KEYS, SECRET_KEYS, _shown_url, check_endpoint


@dataclass
class LabelConfig:
    n_score_contexts: int = 2048
    """Held-out contexts (after the atlas's) on which every label is scored."""
    max_tokens: int = 16
    """Largest token set of a compact token-set label (`base.MAX_LISTED_TOKENS`)."""
    pattern_contexts: int = 3
    """Top contexts per feature from which N2G-style patterns are cut."""
    keep_fraction: float = 0.5
    """A pattern must keep this share of the activation at the maximum."""
    n_logit_tokens: int = 5
    """Promoted tokens in a logit-lens label."""
    max_position: int = 8
    """Largest p tried for the "position <= p" class."""
    batch_contexts: int = 16
    """Scoring contexts per batch."""
    namer: Literal["rules", "model"] = "rules"
    """Readable names beside the rules: from the rule and logit effects ("rules"), or the model
    under study asked few-shot what the label's words have in common ("model"; a minute or two more)."""
    autocast: str = "auto"
    """Model matmul precision for pattern re-runs and scoring: "auto" (the faster of fp32 and bf16 autocast on the first
    batch, if bf16 is accurate; `activations.precision`), "bf16" or "none" (the SAE always runs in fp32)."""
    llm: dict | None = field(default=None)
    """Optional OpenAI-compatible explainer: {"base_url", "model", "features"?, "api_key_env"?}. The API key is
    never part of the config (which is saved in labels.json): it is read from the environment variable
    `api_key_env` (default OPENAI_API_KEY) when the endpoint is called."""
    allow_insecure_endpoint: bool = False
    """Accept a plain http:// explainer endpoint on a non-loopback host (prompts and key unencrypted)."""

    def __post_init__(self) -> None:
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


__all__ = ["LabelConfig", "saved_config"]
