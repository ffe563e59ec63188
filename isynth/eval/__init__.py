"""Offline evaluation: a domain feature network and the metrics measured in its space (FD, precision/recall,
classifier score, prompt following, memorisation)."""
from isynth.eval.features import FeatureNet, get_feature_net, to_input
from isynth.eval.images import load_samples, save_grid, save_samples
from isynth.eval.metrics import evaluate_samples, frechet_distances, precision_recall

__all__ = [
    "FeatureNet", "get_feature_net", "to_input",
    "evaluate_samples", "frechet_distances", "precision_recall",
    "save_samples", "load_samples", "save_grid",
]
