"""Export of an atlas in Neuronpedia's feature-dashboard JSON shape."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from activations.io import atomic_write_bytes

from .labels import Labels, check_labels

if TYPE_CHECKING:
    from .atlas import Atlas


def export_neuronpedia(atlas: Atlas, path: str | Path, labels: Labels | dict | None = None, features: list[int] | None = None) -> Path:
    """Feature data in Neuronpedia's feature-dashboard JSON shape (one object per feature:
    activation examples as token strings + values, logit effects, density, histogram and
    explanations), as one JSON file {"model", "layer", "features": [...]}. `labels`: the
    SAE's `Labels` (or their labels.json object), for the explanations."""
    vocab = atlas.vocab
    labels = None if labels is None else check_labels(labels, atlas.d_sae)
    edges = atlas.hist_edges
    out = []
    for i in (features if features is not None else range(atlas.d_sae)):
        i = atlas.check_feature(i)
        examples = [
            {"tokens": [vocab.get(t, "") for t in e["tokens"]], "values": [round(v, 4) for v in e["acts"]],
             "maxValue": round(e["value"], 4), "maxValueTokenIndex": e["max_index"]}
            for e in atlas.examples(i, "top") + atlas.examples(i, "sample")
        ]
        hist = atlas.tensors["hist"][i]
        label = labels.best(i) if labels is not None else None
        out.append({
            "modelId": atlas.meta["model_name"], "layer": atlas.meta["hook_name"], "index": i,
            "maxActApprox": round(float(atlas.max_activation[i]), 4), "frac_nonzero": float(atlas.density[i]),
            "pos_str": [vocab.get(int(t), "") for t in atlas.tensors["logit_top_ids"][i]],
            "pos_values": [round(float(v), 4) for v in atlas.tensors["logit_top_values"][i]],
            "neg_str": [vocab.get(int(t), "") for t in atlas.tensors["logit_bottom_ids"][i]],
            "neg_values": [round(float(v), 4) for v in atlas.tensors["logit_bottom_values"][i]],
            "freq_hist_data_bar_heights": hist.tolist(),
            "freq_hist_data_bar_values": [round(float((edges[b] * edges[b + 1]).sqrt()), 5) for b in range(len(hist))],
            "activations": examples,
            "explanations": [] if label is None else [{
                "description": label.text, "explanationModelName": f"saewb/{label.kind}",
                "scores": [{"method": "held-out F1", "value": label.scores.f1 if label.scores else None}]}],
        })
    payload = {"model": atlas.meta["model_name"], "layer": atlas.meta["hook_name"], "features": out}
    path = Path(path)
    atomic_write_bytes(path, json.dumps(payload, ensure_ascii=False).encode())
    return path


__all__ = ["export_neuronpedia"]
