"""Graph targets: what a feature graph explains. One kind per file, each a `GraphTarget`
registered in `TARGETS` (base.py): logit.py (a token's logit less the mean logit),
logit_diff.py (the difference of two tokens' logits), feature.py (a feature of a later SAE).
`logit_target` and `feature_target` make them from text and hook names."""
from .base import TARGETS, GraphTarget, LogitsTarget, register, target_from_json
from .feature import FeatureTarget, feature_target
from .logit import LogitTarget, logit_target, single_token
from .logit_diff import LogitDiffTarget

__all__ = ["TARGETS", "FeatureTarget", "GraphTarget", "LogitDiffTarget", "LogitTarget", "LogitsTarget", "feature_target", "logit_target",
           "register", "single_token", "target_from_json"]
