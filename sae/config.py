"""The fields every SAE config shares, and the registry of architectures. Each architecture file subclasses `SAEConfig` with
its own fields (e.g. `sae.topk.TopKConfig` adds `k`); `sae.make_config` builds the right
subclass from an architecture name and flat fields."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

from activations.model import DEFAULT_HOOK, DEFAULT_MODEL

if TYPE_CHECKING:
    from .base import SAE


class _BuiltByArchitecture(type):
    """`SAEConfig(architecture=..., **fields)` is `sae.make_config(...)`: it returns the
    architecture's config subclass, so code and cfg.json files written when every field sat in
    one flat config keep working. Subclasses are constructed as ordinary dataclasses."""

    def __call__(cls, *args, **kwargs):
        if cls is SAEConfig:
            if args:
                raise TypeError("SAEConfig takes keyword arguments only (architecture=..., d_in=..., ...)")
            return make_config(**kwargs)
        return super().__call__(*args, **kwargs)


@dataclass
class SAEConfig(metaclass=_BuiltByArchitecture):
    architecture: str = ""
    """Registered architecture (a key of `sae.ARCHITECTURES`); each subclass fixes its own."""
    d_in: int = 576
    """Width of the hooked activation."""
    d_sae: int = 4608
    """Number of latents (features)."""
    hook_name: str = DEFAULT_HOOK
    model_name: str = DEFAULT_MODEL
    context_size: int = 128

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @property
    def batch_width(self) -> int:
        """Width of one training row: d_in for an SAE; a transcoder's rows hold its input and its target."""
        return self.d_in

    @property
    def sparsity_tag(self) -> str:
        """What the run name says about the sparsity setting (e.g. "k32"); "" when nothing."""
        return ""

    @property
    def run_name(self) -> str:
        """Folder name of the trained SAE, e.g. "topk_k32_4608"."""
        return f"{self.architecture}_{self.sparsity_tag}_{self.d_sae}"

    def __post_init__(self):
        own = type(self).__dataclass_fields__["architecture"].default
        if self.architecture != own:
            raise ValueError(f"{type(self).__name__} configures architecture {own!r}, not {self.architecture!r}; "
                             "build configs by name with sae.make_config")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError("d_in and d_sae must be positive")


# ---------------------------------------------------------------------------- the registry
ARCHITECTURES: dict[str, type[SAE]] = {}
"""Architecture name -> SAE class; the name is its config class's `architecture` default."""

def default_architecture() -> str:
    """The architecture `make_config` builds when none is named: the one registered with
    `@register(default=True)` (read from the registry, not kept as separate state)."""
    defaults = [name for name, cls in ARCHITECTURES.items() if cls.is_default]
    if len(defaults) != 1:
        raise RuntimeError(f"exactly one architecture must be registered with default=True, found {defaults}")
    return defaults[0]


def register(cls: type[SAE] | None = None, *, default: bool = False):
    """Class decorator: `@register` (or `@register(default=True)`) registers an SAE class under
    its `config_class`'s architecture name, refusing a name or SAE Lens string already taken."""

    def wrap(cls: type[SAE]) -> type[SAE]:
        name = cls.config_class.__dataclass_fields__["architecture"].default
        if not name or name in ARCHITECTURES:
            raise ValueError(f"{cls.__name__}: its config_class {cls.config_class.__name__} must set its own architecture "
                             f"default (got {name!r}; registered: {sorted(ARCHITECTURES)})")
        for other in ARCHITECTURES.values():
            taken = set(other.sae_lens_loads) & set(cls.sae_lens_loads)
            if taken:
                raise ValueError(f"{cls.__name__}: SAE Lens architecture(s) {sorted(taken)} already load as {other.architecture!r}")
        cls.architecture, cls.is_default = name, default
        ARCHITECTURES[name] = cls
        return cls

    return wrap if cls is None else wrap(cls)


def _fields_of_any_architecture() -> set[str]:
    return {name for cls in ARCHITECTURES.values() for name in cls.config_class.field_names()}


def make_config(architecture: str | None = None, **fields) -> SAEConfig:
    """The config of `architecture` (None: the default one) from flat fields. Fields that only
    other architectures have are ignored (a CLI sweep passes every flag to every architecture,
    and cfg.json files from before the configs were split hold them all); a field that no
    registered architecture has is a TypeError. `SAEConfig(**fields)` calls this."""
    name = architecture if architecture is not None else default_architecture()
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; registered: {sorted(ARCHITECTURES)}")
    config_class = ARCHITECTURES[name].config_class
    own = config_class.field_names()
    unknown = sorted(set(fields) - _fields_of_any_architecture())
    if unknown:
        raise TypeError(f"unknown key(s) {unknown}; the known keys are {own} (keys of other architectures' configs are ignored)")
    return config_class(architecture=name, **{key: value for key, value in fields.items() if key in own})
