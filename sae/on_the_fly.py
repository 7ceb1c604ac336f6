"""Train straight from the model, for runs too big to store: contexts are harvested as
training goes and mixed in an in-memory shuffle buffer (`buffer_tokens` rows).

Several hooks make one row: their activations side by side (batch sum of widths), from one forward pass. A
transcoder's rows are its input and output hooks; `sae.stream` trains many SAEs from column ranges of one such source."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import torch

from activations.corpus import CorpusConfig, load_contexts
from activations.model import HookedModel, run_to_hooks, validate_hook


class OnTheFlySource:
    n_tokens = None  # streaming: no epochs to count

    def __init__(self, model: HookedModel, hook_name: str | list[str], corpus: CorpusConfig | None = None, context_len: int = 128,
                 buffer_tokens: int = 131_072, batch_contexts: int = 16, exclude_bos: bool = True, autocast: str = "bf16"):
        self.hook_names = [hook_name] if isinstance(hook_name, str) else list(hook_name)
        if not self.hook_names:
            raise ValueError("OnTheFlySource needs at least one hook")
        for name in self.hook_names:
            validate_hook(model, name)
        self.model, self.hook_name = model, "+".join(self.hook_names)
        self.corpus = corpus or CorpusConfig(context_len=context_len)
        self.buffer_tokens, self.batch_contexts = buffer_tokens, batch_contexts
        self.first_pos = 1 if exclude_bos else 0
        self.autocast = autocast
        self.device = next(model.parameters()).device
        self._tokens: np.ndarray | None = None
        probe = run_to_hooks(model, torch.zeros(1, 2, dtype=torch.long, device=self.device), self.hook_names)
        self.widths = [int(probe[name].shape[-1]) for name in self.hook_names]
        """Each hook's width, in the order its columns sit in a row."""
        self.d_in = sum(self.widths)

    @property
    def training_data(self) -> dict:
        """Provenance an SAE trained from this source records (`SAE.training_data`)."""
        return {"corpus": dataclasses.asdict(self.corpus), "exclude_bos": self.first_pos == 1}

    @property
    def tokens(self) -> np.ndarray:
        """The corpus' packed contexts (n_contexts context_len), tokenised once per source."""
        if self._tokens is None:
            self._tokens = load_contexts(self.corpus, self.model.tokenizer)
        return self._tokens

    def _activations(self, contexts: np.ndarray) -> torch.Tensor:
        batch = torch.from_numpy(contexts).long().to(self.device)
        acts = run_to_hooks(self.model, batch, self.hook_names, self.autocast)
        row = torch.cat([acts[name][:, self.first_pos:] for name in self.hook_names], dim=-1)
        return row.flatten(0, 1).float().cpu()

    def init_sample(self, n_tokens: int, seed: int = 0) -> torch.Tensor:
        """(n_tokens d_in) from random contexts, for the trainer's input scale and b_dec: only
        the contexts it needs, not a full shuffle buffer."""
        order = np.random.default_rng([seed, 2**31 - 1]).permutation(len(self.tokens))
        rows, taken = [], 0
        for start in range(0, len(order), self.batch_contexts):
            rows.append(self._activations(self.tokens[np.sort(order[start:start + self.batch_contexts])]))
            taken += len(rows[-1])
            if taken >= n_tokens:
                break
        return torch.cat(rows)[:n_tokens]

    def iter_batches(self, batch_size: int, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
        """Shuffled training batches (batch d_in), batch = batch_size; rank's share of the contexts."""
        rng = np.random.default_rng([seed, epoch])
        tokens = self.tokens
        order = rng.permutation(len(tokens))[rank::world_size]
        buffer: list[torch.Tensor] = []
        held = 0
        for start in range(0, len(order), self.batch_contexts):
            buffer.append(self._activations(tokens[order[start:start + self.batch_contexts]]))
            held += buffer[-1].shape[0]
            if held >= self.buffer_tokens:
                mixed = torch.cat(buffer)
                mixed = mixed[torch.from_numpy(rng.permutation(len(mixed)))]
                n_out = (len(mixed) // 2) // batch_size * batch_size  # keep half to mix with what comes next
                for b in range(0, n_out, batch_size):
                    yield mixed[b:b + batch_size]
                buffer, held = [mixed[n_out:]], len(mixed) - n_out
