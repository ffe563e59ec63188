"""Inception metrics in the ADM evaluator's conventions (openai/guided-diffusion `evaluations/evaluator.py`),
on ADM-layout `.npz` files read a batch at a time.

A samples file holds `arr_0`, uint8 [N, H, W, C]. A reference is either an ADM reference batch (`arr_0`
images, optionally the precomputed `mu`, `sigma`, `mu_s`, `sigma_s` that OpenAI's published batches carry)
or a statistics file with `mu` and `sigma` only (pytorch-fid's `--save-stats` layout, optionally `mu_s` and
`sigma_s`). As in ADM, precomputed statistics are used for FID and sFID where present and the reference
images, where present, for precision/recall; what the reference cannot give is None.

- FID (Heusel et al. 2017) on pool_3 and sFID (Nash et al. 2021) on the 2023 spatial features: the Fréchet
  distance of `isynth.eval.metrics` (torchmetrics' formula, the same maths as ADM's `scipy.linalg.sqrtm`).
- Inception score (Salimans et al. 2016): the softmax of the unbiased logits, in consecutive splits of 5000
  samples in file order, averaged (ADM's `compute_inception_score`; torch-fidelity instead shuffles into 10
  splits, so its numbers differ below ~50k samples).
- Precision and recall (Kynkäänniemi et al. 2019) on pool_3 with k = 3, `isynth.eval.metrics.precision_recall`
  (ADM's `ManifoldEstimator`, which measures distances in float16 first; here in float64).
"""
from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from isynth.data import ImageDataset, validate_images
from isynth.errors import IsynthError
from isynth.eval.inception import POOL_DIM, SPATIAL_DIM, FIDInceptionV3, inception_features
from isynth.eval.metrics import classifier_score, frechet_distance, gaussian_stats, precision_recall

IS_SPLIT_SIZE = 5000  # ADM's split_size
KNN_K = 3             # ADM's nhood_sizes
MIN_IMAGES = KNN_K + 1
STATS = {"pool": ("mu", "sigma", POOL_DIM), "spatial": ("mu_s", "sigma_s", SPATIAL_DIM)}
READ_ERRORS = (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError)
CONVENTIONS = {
    "network": "FID Inception-v3, TF inception-2015-12-05 graph (weights pt_inception-2015-12-05-6726825d.pth)",
    "resize": "TF1 bilinear to 299x299 without half-pixel offset; grey repeated to RGB",
    "fid": "pool_3, 2048-d (Heusel et al. 2017)",
    "sfid": "mixed_6/conv channels 0-6, 17x17x7 = 2023-d in NHWC order (Nash et al. 2021; ADM evaluator)",
    "inception_score": f"softmax of the 1008 logits without bias, splits of {IS_SPLIT_SIZE} in file order, mean "
                       "(Salimans et al. 2016; ADM evaluator)",
    "precision_recall": f"pool_3, k = {KNN_K} nearest neighbours (Kynkäänniemi et al. 2019; ADM evaluator)",
}


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


@dataclass(frozen=True)
class Images:
    """uint8 [N, H, W, C] images, in memory or `arr_0` of an .npz streamed a batch at a time (ADM's reference
    and sample batches do not fit in memory at ImageNet sizes)."""

    shape: tuple[int, ...]
    source: str
    array: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_array(cls, images: np.ndarray, source: str) -> Images:
        validate_images(images, np.zeros(len(images), np.int64), source)
        return cls(tuple(images.shape), source, images)._checked()

    @classmethod
    def from_npz(cls, path: Path) -> Images:
        """`arr_0`'s shape from the .npy header alone: a file is checked before any network runs."""
        try:
            with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
                shape, fortran, dtype = _read_header(f)
        except READ_ERRORS as e:
            raise IsynthError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
            raise IsynthError(f"{path}: arr_0 must be uint8 [N, H, W, C] with C in (1, 3), got {dtype} {list(shape)}")
        if fortran:  # rare (a transposed array saved as is): read it whole instead of streaming
            with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
                return cls(tuple(shape), str(path), np.ascontiguousarray(f["arr_0"]))._checked()
        return cls(tuple(shape), str(path))._checked()

    def _checked(self) -> Images:
        if self.shape[0] < MIN_IMAGES:
            raise IsynthError(f"{self.source}: need at least {MIN_IMAGES} images (a covariance and {KNN_K} nearest "
                              f"neighbours), got {self.shape[0]}")
        return self

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if self.array is not None:
            for i in range(0, len(self.array), batch_size):
                yield self.array[i:i + batch_size]
            return
        n, per = self.shape[0], int(np.prod(self.shape[1:]))
        try:
            with zipfile.ZipFile(self.source) as z, z.open("arr_0.npy") as f:
                _read_header(f)
                for start in range(0, n, batch_size):
                    k = min(batch_size, n - start)
                    data = f.read(k * per)
                    if len(data) != k * per:
                        raise EOFError(f"arr_0 ends after {start * per + len(data)} of {n * per} bytes")
                    yield np.frombuffer(data, np.uint8).reshape(k, *self.shape[1:])
        except READ_ERRORS as e:
            raise IsynthError(f"{self.source}: damaged .npz file ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class Reference:
    """What samples are compared with: images, precomputed Gaussian statistics (name -> (mu, sigma)), or both."""

    source: str
    images: Images | None = None
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _npz_keys(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise IsynthError(f"{what} file not found: {path}")
    try:
        with zipfile.ZipFile(path) as z:
            return [n.removesuffix(".npy") for n in z.namelist()]
    except READ_ERRORS as e:
        raise IsynthError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None


def read_samples(path: str | os.PathLike) -> Images:
    """An ADM-layout samples file (`arr_0`; labels, if any, are not needed)."""
    path = Path(path)
    if "arr_0" not in _npz_keys(path, "samples"):
        raise IsynthError(f"{path}: no arr_0 (want ADM-layout samples: arr_0 uint8 [N, H, W, C])")
    return Images.from_npz(path)


def _load_stat(f, path: Path, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    a = f[key]
    if a.dtype.kind not in "fiu" or a.shape != shape:
        raise IsynthError(f"{path}: {key} has shape {list(a.shape)} ({a.dtype}), want {list(shape)} numbers "
                          "(Inception pool_3 statistics are 2048-d, spatial ones 2023-d)")
    t = torch.from_numpy(np.asarray(a, dtype=np.float64))
    if not bool(torch.isfinite(t).all()):
        raise IsynthError(f"{path}: {key} holds non-finite values")
    return t


def read_reference(path: str | os.PathLike) -> Reference:
    """An ADM reference batch or a statistics file; every array is checked here, before any network runs."""
    path = Path(path)
    keys = _npz_keys(path, "reference")
    stats = {}
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
            for name, (mu, sigma, dim) in STATS.items():
                if (mu in keys) != (sigma in keys):
                    raise IsynthError(f"{path}: has {mu if mu in keys else sigma} without "
                                      f"{sigma if mu in keys else mu}")
                if mu in keys:
                    stats[name] = (_load_stat(f, path, mu, (dim,)), _load_stat(f, path, sigma, (dim, dim)))
    except READ_ERRORS as e:
        raise IsynthError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    images = Images.from_npz(path) if "arr_0" in keys else None
    if images is None and not stats:
        raise IsynthError(f"{path}: neither reference images (arr_0) nor statistics (mu and sigma), found {keys}")
    return Reference(str(path), images, stats)


def dataset_reference(dataset: ImageDataset) -> Reference:
    """A dataset's held-out split (never trained on) as the reference, as for the domain metrics."""
    name = f"{dataset.name} held-out split"
    return Reference(name, Images.from_array(dataset.eval_images, name))


def check_sizes(samples: Images, reference: Reference) -> None:
    """Samples and reference images must have one size: FID across sizes mostly measures the resize."""
    if reference.images is not None and samples.shape[1:3] != reference.images.shape[1:3]:
        (h, w), (rh, rw) = samples.shape[1:3], reference.images.shape[1:3]
        raise IsynthError(f"{reference.source}: reference images are {rh}x{rw} but samples {samples.source} are "
                          f"{h}x{w}; compare samples with a reference of their own size")


def inception_score(logits: torch.Tensor, split_size: int = IS_SPLIT_SIZE) -> float:
    """Mean over consecutive splits of exp(E KL(p(y|x) || p(y))), p the softmax of (N, 1008) logits."""
    parts = logits.double().split(split_size)
    return float(np.mean([classifier_score(torch.log_softmax(p, dim=-1)) for p in parts]))


def inception_metrics(net: FIDInceptionV3, samples: Images, reference: Reference, batch_size: int = 64) -> dict:
    """FID, sFID, Inception score and precision/recall of `samples` against `reference`, as plain numbers
    (None where the reference lacks what a metric needs), with the conventions they follow."""
    check_sizes(samples, reference)
    fake = inception_features(net, samples.batches(batch_size))
    real = None if reference.images is None else inception_features(net, reference.images.batches(batch_size))
    distances = {}
    for name in STATS:
        ref = reference.stats.get(name) or (gaussian_stats(getattr(real, name)) if real is not None else None)
        distances[name] = None if ref is None else frechet_distance(*gaussian_stats(getattr(fake, name)), *ref)
    precision, recall = precision_recall(real.pool, fake.pool, KNN_K) if real is not None else (None, None)
    return {
        "fid": distances["pool"],
        "sfid": distances["spatial"],
        "inception_score": inception_score(fake.logits),
        "precision": precision,
        "recall": recall,
        "num_samples": samples.shape[0],
        "num_reference_images": None if reference.images is None else reference.images.shape[0],
        "reference": reference.source,
        "reference_statistics": sorted(STATS[n][0] for n in reference.stats) or None,
        "knn_k": KNN_K,
        "conventions": CONVENTIONS,
    }
