"""Features: the atlas (one streaming pass over held-out text for every feature: density,
top and sampled contexts, logit effects, neighbours; `atlas.py`, with `accumulator.py` and
`static_properties.py`), its Neuronpedia export (`neuronpedia.py`), labels scored on other
held-out text (`labels/`), monitoring (which features fire on a text; concept search;
`monitor.py`), and the `analyze` and `monitor` commands (`cli.py`)."""
from .atlas import Atlas, AtlasConfig, build_atlas, load_atlas
from .neuronpedia import export_neuronpedia

__all__ = ["Atlas", "AtlasConfig", "build_atlas", "export_neuronpedia", "load_atlas"]
