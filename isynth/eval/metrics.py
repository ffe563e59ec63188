"""Offline sample metrics in the domain attribute network's space (see `features.py`).

All "real" statistics come from the dataset's eval split, which neither the generator nor the attribute net
was trained on. `fd_train_vs_eval` is the floor a perfect generator would score: FD is biased upward at
small sample sizes (Heusel et al. 2017 use 50k), so compare models at the same `num_samples`.

Prompt following is scored against the attributes that were asked for, one by one and all together, as
GenEval scores object, colour, count and position prompts with a detector (Ghosh et al. 2023); on datasets
with held-out classes (shapes' unseen (shape, colour) pairs) the same scores on the samples that asked for a
held-out class say whether a model composes attributes it only saw apart.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from isynth.conditions import Conditions
from isynth.data import ImageDataset, validate_images
from isynth.errors import IsynthError
from isynth.eval.features import AttributeNet, attributes_correct, embed

CDIST_CHUNK = 1024  # query rows per distance block: bounds memory at CDIST_CHUNK x N_ref doubles


def _tensor(a: np.ndarray) -> torch.Tensor:
    """torch.from_numpy, copying arrays that are read-only (shapes' cached splits), which torch warns about."""
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _nchw_batches(images: np.ndarray, batch: int = 512) -> Iterator[torch.Tensor]:
    """uint8 NHWC numpy -> uint8 NCHW tensors, the layout torchmetrics feeds its feature module."""
    for i in range(0, len(images), batch):
        yield _tensor(np.ascontiguousarray(images[i:i + batch])).permute(0, 3, 1, 2)  # (B, C, H, W)


@torch.no_grad()
def frechet_distances(net: AttributeNet, real: np.ndarray, fakes: list[np.ndarray]) -> list[float]:
    """Fréchet distance between `real` and each of `fakes` in the net's features (Heusel et al. 2017):
    ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)) between Gaussians fitted to the two feature sets.

    The real statistics are accumulated once and kept across `reset()` (reset_real_features=False).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=net, reset_real_features=False)
    for x in _nchw_batches(real):
        fid.update(x, real=True)
    out = []
    for fake in fakes:
        fid.reset()
        for x in _nchw_batches(fake):
            fid.update(x, real=False)
        out.append(float(fid.compute()))
    return out


def gaussian_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) in double of (N, D) features, the covariance normalised by N - 1 as torchmetrics'
    FID accumulates it and the ADM evaluator's `np.cov`."""
    x = feats.double()
    mu = x.mean(dim=0)
    centred = x - mu  # (N, D)
    return mu, centred.T @ centred / (len(x) - 1)


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """The Fréchet distance of `frechet_distances` between given Gaussians (e.g. a reference's precomputed
    statistics), by the same torchmetrics function `FrechetInceptionDistance.compute` ends in."""
    from torchmetrics.image.fid import _compute_fid

    return float(_compute_fid(mu1.double(), sigma1.double(), mu2.double(), sigma2.double()))


def _chunked(query: torch.Tensor, ref: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply `fn` to (chunk, N_ref) distance blocks and concatenate the per-query results."""
    return torch.cat([fn(torch.cdist(query[i:i + CDIST_CHUNK], ref)) for i in range(0, len(query), CDIST_CHUNK)])


def knn_radii(feats: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point: the radius of its manifold ball."""
    # k + 1 because the nearest point in the set is the point itself, at distance 0.
    return _chunked(feats, feats, lambda d: d.kthvalue(k + 1, dim=1).values)  # (N,)


def manifold_coverage(query: torch.Tensor, ref: torch.Tensor, ref_radii: torch.Tensor) -> float:
    """Fraction of `query` points inside at least one k-NN ball of `ref` (Kynkäänniemi et al. 2019, eq. 1-2)."""
    inside = _chunked(query, ref, lambda d: (d <= ref_radii[None, :]).any(dim=1))  # (N_query,)
    return float(inside.double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019): fake-in-real-manifold, real-in-fake-manifold."""
    real, fake = real.double(), fake.double()
    precision = manifold_coverage(fake, real, knn_radii(real, k))
    recall = manifold_coverage(real, fake, knn_radii(fake, k))
    return precision, recall


def class_log_probs(logits: torch.Tensor, sizes: tuple[int, ...], class_attrs: np.ndarray) -> torch.Tensor:
    """(N, sum(sizes)) attribute logits -> (N, num_classes) log p(class | x) in double: the heads are
    independent, so a class's log-probability is the sum of its attributes' (one attribute: log_softmax)."""
    parts = [torch.log_softmax(part.double(), dim=-1) for part in logits.split(sizes, dim=-1)]  # (N, size_k)
    attrs = torch.from_numpy(class_attrs)  # (num_classes, K)
    log_p = parts[0][:, attrs[:, 0]]  # (N, num_classes)
    for k in range(1, len(parts)):
        log_p = log_p + parts[k][:, attrs[:, k]]
    return log_p


def classifier_score(log_p: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))) of class log-probabilities (N, num_classes): the Inception score (Salimans
    et al. 2016) with the domain classifier."""
    log_py = torch.logsumexp(log_p, dim=0) - np.log(len(log_p))  # (K,) log of the marginal p(y)
    kl = (log_p.exp() * (log_p - log_py)).sum(dim=-1)  # (N,)
    return float(kl.mean().exp())


def _rows_as_bytes(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N,) opaque byte strings, so exact copies compare as equal scalars."""
    flat = np.ascontiguousarray(images).reshape(len(images), -1)  # (N, H*W*C)
    return flat.view(np.dtype((np.void, flat.shape[1]))).ravel()


def memorization(images: np.ndarray, train_images: np.ndarray) -> tuple[float, float]:
    """(fraction of exact pixel copies of a training image, mean L2 to the nearest one in [0, 1] pixels)."""
    copies = np.isin(_rows_as_bytes(images), _rows_as_bytes(train_images))
    q = _tensor(images.reshape(len(images), -1)).double() / 255.0  # (N, H*W*C)
    ref = _tensor(train_images.reshape(len(train_images), -1)).double() / 255.0
    nn_dist = _chunked(q, ref, lambda d: d.min(dim=1).values)  # (N,)
    nn_dist[torch.from_numpy(copies)] = 0.0  # exact, where the matmul form of cdist leaves ~1e-8
    return float(copies.mean()), float(nn_dist.mean())


def _validate(images: np.ndarray, labels: np.ndarray, dataset: ImageDataset, knn_k: int) -> None:
    validate_images(images, labels, "samples")
    if images.shape[1:] != dataset.image_shape:
        raise IsynthError(f"samples: image shape {list(images.shape[1:])} does not match dataset "
                          f"{dataset.name!r} shape {list(dataset.image_shape)}")
    if labels.max() >= dataset.num_classes:
        raise IsynthError(f"samples: label {int(labels.max())} out of range for {dataset.num_classes} classes")
    limit = min(len(images), len(dataset.eval_images)) - 1
    if not 1 <= knn_k <= limit:
        raise IsynthError(f"knn_k={knn_k} must be in [1, {limit}] for {len(images)} samples "
                          f"and {len(dataset.eval_images)} eval images")


def _mean(x: torch.Tensor) -> float:
    return float(x.double().mean())


def prompt_following(correct: torch.Tensor, labels: np.ndarray, conditions: Conditions) -> dict:
    """Accuracies of (N, K) per-attribute hits: `class_accuracy` (all attributes right), and with more than
    one attribute `attr_accuracy_<name>`; where the dataset holds classes out, the same on the samples that
    asked for one (`heldout_...`, None when none did)."""
    out = {"class_accuracy": _mean(correct.all(dim=1))}
    if len(conditions.names) > 1:
        out |= {f"attr_accuracy_{name}": _mean(correct[:, k]) for k, name in enumerate(conditions.names)}
    if conditions.heldout:
        held = torch.from_numpy(np.isin(labels, conditions.heldout))  # (N,) asked for a held-out class
        some = bool(held.any())
        out["heldout_class_accuracy"] = _mean(correct[held].all(dim=1)) if some else None
        out |= {f"heldout_attr_accuracy_{name}": _mean(correct[held, k]) if some else None
                for k, name in enumerate(conditions.names)}
    return out


def evaluate_samples(images: np.ndarray, labels: np.ndarray, dataset: ImageDataset, net: AttributeNet,
                     knn_k: int = 3) -> dict:
    """All offline metrics of class-conditional samples (uint8 [N, H, W, C], labels [N] class ids) as plain
    numbers (None where a metric has nothing to measure)."""
    _validate(images, labels, dataset, knn_k)
    cond = dataset.conditions
    fd, fd_floor = frechet_distances(net, dataset.eval_images, [images, dataset.train_images])
    real_feats, _ = embed(net, dataset.eval_images)
    fake_feats, fake_logits = embed(net, images)
    precision, recall = precision_recall(real_feats, fake_feats, knn_k)
    correct = attributes_correct(net, fake_logits, labels, cond)  # (N, K)
    memo_rate, nn_dist = memorization(images, dataset.train_images)
    # The ruler's own accuracy on real held-out images: how far the scores above can be trusted.
    ruler = {"feature_net_accuracy": float(net.eval_accuracy)} if len(cond.names) == 1 else {
        "attribute_net_accuracy": float(net.eval_accuracy), "attribute_net_heldout_accuracy": net.heldout_accuracy}
    return {
        "fd": fd,
        "fd_train_vs_eval": fd_floor,
        "precision": precision,
        "recall": recall,
        **prompt_following(correct, labels, cond),
        "inception_score": classifier_score(class_log_probs(fake_logits, net.sizes, cond.class_attrs())),
        "memorization_rate": memo_rate,
        "mean_nn_distance": nn_dist,
        "num_samples": int(len(images)),
        "knn_k": int(knn_k),
        **ruler,
    }
