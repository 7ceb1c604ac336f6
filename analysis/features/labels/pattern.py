"""pattern: N2G-style context patterns. The tokens ending here equal one of the feature's
patterns.

For the feature's top `LabelConfig.pattern_contexts` contexts, the context is cut to its
last L tokens (L = 1, 2, 4, 8) up to the maximum, put behind the `<|endoftext|>` sink and
re-run; the shortest cut that keeps `LabelConfig.keep_fraction` of the activation at the
maximum is a pattern.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from activations.corpus import boundary_token_id
from activations.model import run_to_hooks
from activations.precision import resolve_autocast

from ..atlas import Atlas
from .base import Label, LabelContext, LabelKind, Predicate, register

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PATTERN_LENGTHS = (1, 2, 4, 8)


@dataclass(kw_only=True)
class PatternLabel(Label):
    patterns: list[tuple[int, ...]] = field(default_factory=list)
    """Token-id n-grams; the label holds where the tokens ending at a position equal one of them."""

    def __post_init__(self) -> None:
        self.patterns = [tuple(int(t) for t in p) for p in self.patterns]


@register
class PatternKind(LabelKind):
    name = "pattern"
    rank = 60
    label_class = PatternLabel

    @torch.no_grad()
    def candidates(self, atlas: Atlas, context: LabelContext) -> list[Label]:
        sae, model, cfg = context
        hook, device = sae.cfg.hook_name, next(sae.parameters()).device
        sink = boundary_token_id(model.tokenizer)
        examples = atlas.example_table("top")
        values, contexts, positions = (t[:, :cfg.pattern_contexts] for t in examples[:3])
        feature, slot = torch.nonzero(values > 0, as_tuple=True)
        kept = torch.zeros(len(feature), dtype=torch.int64)  # chosen length, 0 = none yet
        # label_features resolves "auto" once for the stage; a context built elsewhere probes here
        autocast = resolve_autocast(cfg.autocast, model, atlas.tokens[:16].long().to(device), [hook])
        for length in tqdm(PATTERN_LENGTHS, desc="labels: patterns", unit="length"):
            todo = torch.nonzero((kept == 0) & (positions[feature, slot] >= length)).flatten()
            ctx, pos = contexts[feature[todo], slot[todo]].long(), positions[feature[todo], slot[todo]]
            window = pos[:, None] + torch.arange(-length + 1, 1)
            seqs = torch.cat([torch.full((len(todo), 1), sink), atlas.tokens.long()[ctx[:, None], window]], dim=1)
            acts = []
            for start in range(0, len(seqs), 256):
                x = run_to_hooks(model, seqs[start:start + 256].to(device), [hook], autocast=autocast)[hook][:, -1]
                acts.append(sae.encode(x).gather(1, feature[todo[start:start + 256]].to(device)[:, None]).squeeze(1).cpu())
            if acts:
                keeps = torch.cat(acts) >= cfg.keep_fraction * values[feature[todo], slot[todo]]
                kept[todo[keeps]] = length
        patterns: dict[int, list[tuple[int, ...]]] = {}
        for f, s, length in zip(feature.tolist(), slot.tolist(), kept.tolist(), strict=True):
            if length == 0:
                continue
            ctx, pos = int(contexts[f, s]), int(positions[f, s])
            pattern = tuple(atlas.tokens[ctx, pos - length + 1:pos + 1].tolist())
            if pattern not in patterns.setdefault(f, []):
                patterns[f].append(pattern)
        return [self.make(atlas, f, patterns=p) for f, p in patterns.items()]

    def compile(self, labels: Sequence[PatternLabel], tokenizer: PreTrainedTokenizerBase | None = None) -> Predicate:
        # Exact n-gram lookup, one trie level per token: the prefix of length k + 1 is known when
        # (id of its first k tokens, its last token) is a key of level k (sorted, searched).
        rows: dict[tuple[int, ...], int] = {}
        owners = []
        for j, label in enumerate(labels):
            for p in label.patterns:
                if p:
                    owners.append((rows.setdefault(p, len(rows)), j))
        table = torch.zeros(len(rows) + 1, len(labels), dtype=torch.bool)  # last row: no pattern
        for row, j in owners:
            table[row, j] = True
        no_match = len(rows)
        base = max((t for p in rows for t in p), default=0) + 2  # > every pattern token and the "other token" id below
        tries = {}
        for length in sorted({len(p) for p in rows}):
            grams = torch.tensor([p for p in rows if len(p) == length], dtype=torch.long)
            prefix, levels = torch.zeros(len(grams), dtype=torch.long), []
            for k in range(length):
                keys = prefix * base + grams[:, k]
                levels.append(keys.unique())  # sorted
                prefix = torch.searchsorted(levels[-1], keys)
            pattern_row = torch.full((len(levels[-1]),), no_match)
            pattern_row[prefix] = torch.tensor([rows[tuple(p)] for p in grams.tolist()])
            tries[length] = (levels, pattern_row)

        def predicate(tokens: Tensor) -> Tensor:
            """tokens [batch pos] -> bool [batch pos label]: one of the label's n-grams ends here."""
            b, n = tokens.shape
            device = tokens.device
            tokens = tokens.long().clamp(0, base - 1)  # tokens no pattern names all read as base - 1, which none has
            out = torch.zeros(b, n, len(labels), dtype=torch.bool, device=device)
            for length, (levels, pattern_row) in tries.items():
                if length > n:
                    continue
                windows = tokens.unfold(1, length, 1)  # [b, n - length + 1, length]: the n-gram ending at each position
                prefix = torch.zeros(windows.shape[:2], dtype=torch.long, device=device)
                found = torch.ones(windows.shape[:2], dtype=torch.bool, device=device)
                for k, level in enumerate(levels):
                    level = level.to(device)
                    keys = prefix * base + windows[..., k]
                    prefix = torch.searchsorted(level, keys).clamp_max(len(level) - 1)
                    found &= level[prefix] == keys
                row = torch.where(found, pattern_row.to(device)[prefix], no_match)
                out[:, length - 1:] |= table.to(device)[row]
            return out
        return predicate

    def render(self, label: PatternLabel, atlas: Atlas) -> str:
        vocab = atlas.vocab
        shown = ["".join(vocab.get(t, "?") for t in p[:-1]) + "[" + vocab.get(p[-1], "?") + "]" for p in label.patterns]
        return "pattern " + " | ".join(json.dumps(s, ensure_ascii=False) for s in shown)
