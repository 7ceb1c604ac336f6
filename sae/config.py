"""The fields every SAE config shares. Each architecture file subclasses `SAEConfig` with
its own fields (e.g. `sae.topk.TopKConfig` adds `k`); `sae.make_config` builds the right
subclass from an architecture name and flat fields."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


class _BuiltByArchitecture(type):
    """`SAEConfig(architecture=..., **fields)` is `sae.make_config(...)`: it returns the
    architecture's config subclass, so code and cfg.json files written when every field sat in
    one flat config keep working. Subclasses are constructed as ordinary dataclasses."""

    def __call__(cls, *args, **kwargs):
        if cls is SAEConfig:
            if args:
                raise TypeError("SAEConfig takes keyword arguments only (architecture=..., d_in=..., ...)")
            from .base import make_config

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
    hook_name: str = "blocks.8.hook_resid_post"
    model_name: str = "smollm2"
    context_size: int = 128

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

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
