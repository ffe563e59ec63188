"""Offline evaluation: a domain attribute network and the metrics measured with it (FD, precision/recall,
classifier score, prompt following attribute by attribute, memorisation)."""
from isynth.eval.features import AttributeNet, FeatureNet, get_attribute_net, get_feature_net, to_input
from isynth.eval.images import load_samples, save_grid, save_samples
from isynth.eval.metrics import evaluate_samples, frechet_distances, precision_recall

__all__ = [
    "AttributeNet", "FeatureNet", "get_attribute_net", "get_feature_net", "to_input",
    "evaluate_samples", "frechet_distances", "precision_recall",
    "save_samples", "load_samples", "save_grid",
]
