"""Stage 1: language models, text corpora and the on-disk activation store."""
from .corpus import CorpusConfig, EmptyCorpusError, iter_documents, load_contexts, pack_contexts
from .harvest import HarvestConfig, harvest
from .model import DEFAULT_MODEL, load_model, resolve_device, run_to_hooks, validate_hook
from .store import ActivationStore, StoreError

__all__ = [
    "ActivationStore", "CorpusConfig", "DEFAULT_MODEL", "EmptyCorpusError", "HarvestConfig", "StoreError",
    "harvest", "iter_documents", "load_contexts", "load_model", "pack_contexts", "resolve_device",
    "run_to_hooks", "validate_hook",
]
