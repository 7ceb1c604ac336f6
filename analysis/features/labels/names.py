"""Readable names for features, shown beside the rule (the rule is what gets scored).

Two namers, neither needing a large LLM:

* ``"rules"`` (the default): the gist of the chosen label in a few words (its first tokens,
  its structural rule, its genre words) and, when the decoder direction clearly promotes a
  token, the arrow to it: `“God” “Lord” “Father” → “’s”`.
* ``"model"``: the model under study, asked few-shot what the label's words have in common
  (SmolLM2-135M: "ocean" for sea/ship/waters/shore, "happiness" for happy/glad/joy). Small
  models are often wrong, so these names are marked with a trailing "?" and the rule stays
  beside them. Features whose label lists no words keep their rule name.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from .base import Label
from .store import FeatureLabels

if TYPE_CHECKING:
    from activations.model import HookedModel

    from ..atlas import Atlas

NAME_TOKENS = 3
"""Words a rule name lists."""
FEW_SHOT = ("Words: apple, banana, cherry, grape\nCommon theme: fruit\n\n"
            "Words: Paris, London, Rome, Berlin\nCommon theme: European capitals\n\n"
            "Words: run, jump, swim, walk\nCommon theme: movement verbs\n\n"
            "Words: ;, :, ., !\nCommon theme: punctuation\n\n")
"""The model namer's prompt before the feature's words (a completion prompt: tiny instruct
models echo the words back when asked in a chat turn)."""


def _words(label: Label, atlas: Atlas) -> list[str]:
    """The label's listed tokens as display words, in its own order, without repeats."""
    ids = getattr(label, "prototype_tokens", None) or getattr(label, "tokens", None) or getattr(label, "current", None) or []
    words: list[str] = []
    for t in ids:
        word = atlas.vocab.get(int(t), "").strip()
        if word and word not in words:
            words.append(word)
    return words


def rule_name(entry: FeatureLabels, atlas: Atlas) -> str:
    """A few words for the feature from its chosen label and its strongest logit effect."""
    label = entry.best
    words = _words(label, atlas)
    gist = " ".join(f"“{w}”" for w in words[:NAME_TOKENS]) if words and label.kind not in ("logit",) else label.text
    if len(gist) > 60:
        gist = gist[:57] + "…"
    ids, values = atlas.logit_tokens("top")
    promoted = atlas.vocab.get(int(ids[label.feature, 0]), "").strip() if values.shape[1] else ""
    if promoted and label.kind != "logit" and float(values[label.feature, 0]) > 2 * float(values[label.feature].abs().mean()):
        gist += f" → “{promoted}”"
    return gist


def name_features(entries: Sequence[FeatureLabels | None], atlas: Atlas, model: HookedModel | None = None, namer: str = "rules",
                  batch_size: int = 32) -> None:
    """Set `name` on each feature's chosen labels (`best` and `best_all`), in place."""
    if namer not in ("rules", "model"):
        raise ValueError(f"unknown namer {namer!r}: 'rules' or 'model'")
    live = [e for e in entries if e is not None]
    names = {e.feature: rule_name(e, atlas) for e in live}
    if namer == "model":
        if model is None:
            raise ValueError("the model namer needs the model")
        names.update(model_names([e for e in live if len(_words(e.best, atlas)) >= 2], atlas, model, batch_size))
    for e in live:
        for label in {id(e.best): e.best, id(e.best_all_firings): e.best_all_firings}.values():
            label.name = names[e.feature]


def model_names(entries: Sequence[FeatureLabels], atlas: Atlas, model: HookedModel, batch_size: int = 32) -> dict[int, str]:
    """{feature: the model's few-shot answer + "?"} for features whose label lists words."""
    from activations.generation import GenerationConfig, decode, encode_prompts, generate_tokens

    out: dict[int, str] = {}
    cfg = GenerationConfig(max_new_tokens=6, batch_size=batch_size)
    for start in tqdm(range(0, len(entries), batch_size), desc="labels: naming", unit="batch"):
        chunk = entries[start:start + batch_size]
        prompts = [FEW_SHOT + f"Words: {', '.join(_words(e.best, atlas)[:8])}\nCommon theme:" for e in chunk]
        for e, tokens in zip(chunk, generate_tokens(model, encode_prompts(model.tokenizer, prompts), cfg), strict=False):
            answer = decode(model.tokenizer, tokens).split("\n")[0].strip().rstrip(".,;")
            if answer and answer.lower() not in {w.lower() for w in _words(e.best, atlas)[:1]}:  # an echo of the words is no name
                out[e.feature] = f"{answer}?"
    return out


__all__ = ["FEW_SHOT", "model_names", "name_features", "rule_name"]
