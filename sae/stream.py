"""Many SAEs (or transcoders) at many hooks from one stream of batches: one forward pass of the model feeds them all.

The source's rows hold every hook's activations side by side (`sae.on_the_fly.OnTheFlySource` with several hooks, or
`StoreRows`: the stores of one harvest read in step); each trainer reads its own columns through a `ColumnView`, with its own input scale, output
folder, checkpoints and metrics. Every trainer takes the same step on the same rows, so the stream costs one model pass
per batch instead of one per hook.

Resuming: each trainer resumes from its own checkpoint; the stream starts at the earliest step among them, and a
trainer that had got further skips the batches it has already seen (the data order is a pure function of seed, epoch
and step, `sae.trainer.epoch_batches`).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from activations.store import ActivationStore

from .trainer import BatchSource, TrainConfig, Trainer, epoch_batches, init_sample_of


class ColumnView:
    """The columns [start, stop) of a wider source's rows, as a source of its own (what one trainer of a stream sees).
    It serves the trainer's init sample and provenance; the training batches come from the stream."""

    def __init__(self, source: BatchSource, start: int, stop: int, hook_name: str,
                 shared_samples: dict[tuple[int, int], torch.Tensor] | None = None, part: BatchSource | None = None):
        self.source, self.start, self.stop, self.hook_name = source, start, stop, hook_name
        self.part = part
        """The source of these columns alone, where there is one (a hook's own store): the provenance and fingerprint an
        SAE trained on the view records."""
        self.d_in = stop - start
        self.seed = 0
        """The stream's seed (set by `train_together`): its batches and init sample follow it, whatever seed a trainer's
        config sets for its weights."""
        self.batch_size = 4096
        """The batch size of the trainings it serves (set by `train_together`): a source without `init_sample` gives its
        init sample in batches of this size, as `Trainer` would."""
        self.model = getattr(source, "model", None)
        self._sample = {} if shared_samples is None else shared_samples
        """(n_tokens, seed) -> the source's init sample (n_tokens source width), shared by the views of one source."""

    @property
    def training_data(self) -> dict:
        if self.part is not None:
            return getattr(self.part, "training_data", {})
        return {**getattr(self.source, "training_data", {}), "hook_name": self.hook_name}

    @property
    def fingerprint(self) -> str | None:
        """The part's fingerprint (a store's content), which a checkpoint records; None for a stream from the model."""
        return getattr(self.part, "fingerprint", None)

    def init_sample(self, n_tokens: int, seed: int = 0) -> torch.Tensor:
        """(n_tokens width) of this view's columns; the source's sample is drawn once for all views, with the stream's
        seed (`seed` is the trainer's, which sets only its weights)."""
        key = (n_tokens, self.seed)
        if key not in self._sample:
            self._sample[key] = init_sample_of(self.source, n_tokens, self.seed, self.batch_size)
        return self._sample[key][:, self.start:self.stop]

    def iter_batches(self, batch_size: int, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
        for batch in self.source.iter_batches(batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size):
            yield batch[:, self.start:self.stop]


def column_views(source: BatchSource, widths: list[int], names: list[str], parts: list[BatchSource] | None = None) -> list[ColumnView]:
    """Consecutive views of `source`'s rows, one per entry of `widths` (the columns' widths, in row order); `parts`: the
    source of each view's columns alone, where there is one (`StoreRows.stores`)."""
    if sum(widths) != source.d_in:
        raise ValueError(f"the views' widths add up to {sum(widths)}, the source's rows are {source.d_in} wide")
    parts = parts or [None] * len(widths)
    views, start, shared = [], 0, {}
    for width, name, part in zip(widths, names, parts, strict=True):
        views.append(ColumnView(source, start, start + width, name, shared, part))
        start += width
    return views


class StoreRows:
    """The stores of one harvest (several hooks of the same tokens) read in step: each row of a batch holds every hook's
    activations of one token, in the order of `stores`. A store's batch order is a pure function of (seed, epoch) and its
    shard sizes, so stores with the same shards give the same tokens row by row."""

    def __init__(self, stores: list[ActivationStore]):
        if not stores:
            raise ValueError("StoreRows needs at least one store")
        first = stores[0]
        layout = [(s.n_contexts, s.n_tokens) for s in first.shards]
        for store in stores[1:]:
            if ([(s.n_contexts, s.n_tokens) for s in store.shards] != layout
                    or store.manifest.get("corpus_fingerprint") != first.manifest.get("corpus_fingerprint")):
                raise ValueError(f"{store.path} and {first.path} do not hold the same tokens in the same shards (not one "
                                 "harvest): train their SAEs apart, or harvest the hooks together")
        self.stores = stores
        self.widths = [s.d_in for s in stores]
        self.d_in = sum(self.widths)
        self.hook_name = "+".join(s.hook_name for s in stores)
        self.model_name = first.model_name

    @property
    def training_data(self) -> dict:
        return self.stores[0].training_data

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([s.fingerprint for s in self.stores]).encode()).hexdigest()[:16]

    def iter_batches(self, batch_size: int, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
        """Batches [batch_size sum(widths)]: every store's batch of the same (seed, epoch, step), side by side."""
        readers = [s.iter_batches(batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size) for s in self.stores]
        for rows in zip(*readers, strict=True):
            yield torch.cat(rows, dim=1)


def train_together(configs: list[TrainConfig], views: list[ColumnView]) -> list[list[Path]]:
    """Train the SAEs of `configs[i]` on `views[i]`, all from one pass over the views' shared source; the saved SAE
    folders of each config (empty where `max_steps` stopped it early). The batches and the init sample follow the first
    config's seed; each config's own seed initialises its weights."""
    if len(configs) != len(views) or not configs:
        raise ValueError(f"{len(configs)} configs for {len(views)} views")
    source = views[0].source
    if any(v.source is not source for v in views):
        raise ValueError("train_together needs views of one source")
    lead = configs[0]
    for cfg in configs[1:]:
        if (cfg.batch_size, cfg.n_tokens, cfg.max_steps) != (lead.batch_size, lead.n_tokens, lead.max_steps):
            raise ValueError("the trainers of one stream take the same batches: batch_size, n_tokens and max_steps must agree")
    for view in views:
        view.batch_size, view.seed = lead.batch_size, lead.seed
    trainers = [Trainer(replace(cfg), view) for cfg, view in zip(configs, views)]
    for trainer in trainers:
        trainer.begin(progress=False)
    step, end = min(t.step for t in trainers), max(t.end for t in trainers)
    world = trainers[0].rank
    bar = tqdm(total=end * lead.batch_size, initial=step * lead.batch_size, unit="tok", unit_scale=True,
               desc=f"train {len(trainers)} hooks", disable=not world.is_main)
    batches = epoch_batches(source, lead.batch_size, lead.seed, step, world.rank, world.world_size) if step < end else iter(())
    while step < end:
        rows = next(batches)
        for trainer, view in zip(trainers, views):
            if trainer.step == step and trainer.step < trainer.end:
                trainer.step_on(rows[:, view.start:view.stop])
        step += 1
        bar.update(lead.batch_size)
        record = trainers[-1].last_record
        if record:
            bar.set_postfix(last_fvu=f"{record['fvu']:.3f}")
    bar.close()
    return [trainer.finish() for trainer in trainers]


__all__ = ["ColumnView", "StoreRows", "column_views", "train_together"]
