"""Features: the atlas (one streaming pass over held-out text for every feature: density,
top and sampled contexts, logit effects, neighbours, Neuronpedia export), labels scored on
other held-out text, and monitoring (which features fire on a text; concept search)."""
from .atlas import Atlas, AtlasConfig, build_atlas, export_neuronpedia, load_atlas

__all__ = ["Atlas", "AtlasConfig", "build_atlas", "export_neuronpedia", "load_atlas"]
