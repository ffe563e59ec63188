"""The FID Inception-v3 network in pure torch, loaded from the standard weights file on disk, never downloaded.

FID (Heusel et al. 2017), sFID (Nash et al. 2021), the Inception score (Salimans et al. 2016) and Inception
precision/recall (Kynkäänniemi et al. 2019) are defined on one network: TensorFlow's 2015-12-05 ImageNet graph
(`classify_image_graph_def.pb`). The PyTorch ports of its weights that the field uses are one file,
`pt_inception-2015-12-05-6726825d.pth` (mseitzer/pytorch-fid `src/pytorch_fid/inception.py`), which
torch-fidelity ships as `weights-inception-2015-12-05-6726825d.pth` (toshas/torch-fidelity
`torch_fidelity/feature_extractor_inceptionv3.py`; its converter `utils/util_convert_inception_weights.py`
writes the same keys: torchvision's `Inception3` names without the auxiliary head, a 1008-way `fc`, batch-norm
`weight`/`bias`/`running_mean`/`running_var` and no `num_batches_tracked`). This module rebuilds that graph so
those keys load unchanged, with the graph's own deviations from torchvision's Inception-v3 that both ports
reproduce: the pool branches average without counting the zero padding, the last block's pool branch is a max
pool, batch norm uses eps = 1e-3, and the input is resized as TF1 does (below).

Outputs are the three tensors the ADM evaluator reads from the graph (openai/guided-diffusion
`evaluations/evaluator.py`): `pool_3` (2048-d, FID, precision/recall), the first 7 channels of `mixed_6/conv`
flattened in NHWC order (7 x 17 x 17 = 2023-d, sFID) and the 1008 logits of `softmax/logits/MatMul`, i.e.
without the bias (the Inception score's softmax; torch-fidelity's `logits_unbiased`).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file as load_safetensors
from torch import nn

from isynth.errors import IsynthError
from isynth.files import sha256_file

INPUT_SIDE_PX = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7   # ADM keeps `mixed_6/conv[..., :7]` of its 192 channels
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023: mixed_6 is 17 x 17 at a 299 x 299 input
NUM_LOGITS = 1008      # the 2015 graph's classifier: 1000 ImageNet classes + 8 unused outputs
BN_EPS = 1e-3
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"  # the hash suffix torch.hub names files by, in both ports' file names
LAYOUT = ("the FID Inception-v3 layout of pytorch-fid's pt_inception-2015-12-05-6726825d.pth and torch-fidelity's "
          "weights-inception-2015-12-05-6726825d.pth")


class ConvBN(nn.Module):
    """Convolution without bias, batch norm, ReLU: every layer of the graph (`conv` + `bn` keys)."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's SAME average pool divides by the pixels inside the image only.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _chain(x: torch.Tensor, *layers: nn.Module) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


class MixedA(nn.Module):
    """35 x 35 block (`mixed`, `mixed_1`, `mixed_2`): 1x1, 5x5, double 3x3 and pool towers."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), _chain(x, self.branch5x5_1, self.branch5x5_2),
                          _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(_avg_pool(x))], 1)


class MixedB(nn.Module):
    """35 -> 17 reduction (`mixed_3`)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x),
                          _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, 3, stride=2)], 1)


class MixedC(nn.Module):
    """17 x 17 block with factorised 7x7 towers (`mixed_4` ... `mixed_7`). Its 1x1 tower comes first in the
    output, so channels 0-191 of `mixed_6`'s output are `mixed_6/conv`, sFID's layer."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          _chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                                 self.branch7x7dbl_4, self.branch7x7dbl_5),
                          self.branch_pool(_avg_pool(x))], 1)


class MixedD(nn.Module):
    """17 -> 8 reduction (`mixed_8`)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([_chain(x, self.branch3x3_1, self.branch3x3_2),
                          _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
                          F.max_pool2d(x, 3, stride=2)], 1)


class MixedE(nn.Module):
    """8 x 8 block with split 1x3 / 3x1 outputs (`mixed_9`, `mixed_10`). The graph's last block pools its
    pool tower with a max pool where the paper has an average (`max_pool=True`), as pytorch-fid notes."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(t), self.branch3x3_2b(t),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)


@dataclass(frozen=True)
class InceptionFeatures:
    """What the metrics read from a batch: pool_3 (N, 2048), spatial (N, 2023), unbiased logits (N, 1008)."""

    pool: torch.Tensor
    spatial: torch.Tensor
    logits: torch.Tensor


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in TF's 2015-12-05 graph, taking uint8 [N, H, W, C] images (C = 1 or 3) of any size."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = MixedA(192, 32)
        self.Mixed_5c = MixedA(256, 64)
        self.Mixed_5d = MixedA(288, 64)
        self.Mixed_6a = MixedB(288)
        self.Mixed_6b = MixedC(768, 128)
        self.Mixed_6c = MixedC(768, 160)
        self.Mixed_6d = MixedC(768, 160)
        self.Mixed_6e = MixedC(768, 192)
        self.Mixed_7a = MixedD(768)
        self.Mixed_7b = MixedE(1280, max_pool=False)
        self.Mixed_7c = MixedE(2048, max_pool=True)
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)

    def forward(self, images: torch.Tensor) -> InceptionFeatures:
        x = prepare(images.to(self.fc.weight.device))  # (N, 3, 299, 299) in [-1, 1]
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)  # (N, 64, 147, 147)
        x = _chain(F.max_pool2d(x, 3, stride=2), self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)  # (N, 192, 71, 71)
        x = _chain(F.max_pool2d(x, 3, stride=2), self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                   self.Mixed_6b, self.Mixed_6c, self.Mixed_6d)  # (N, 768, 17, 17)
        spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (N, 17 * 17 * 7): ADM's NHWC order
        x = _chain(x, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (N, 2048): pool_3
        return InceptionFeatures(pool, spatial, pool @ self.fc.weight.T)  # logits without the bias


def resize_tf1_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of float (N, C, H, W) as TF1's `ResizeBilinear` with align_corners=False, the op inside
    the 2015 graph right after its input (`ExpandDims`, where the ADM evaluator feeds its images).

    Output pixel i samples the input at i * (in / out) - no half-pixel offset, unlike torch's
    `interpolate(align_corners=False)` - between floor and floor + 1, the upper one clamped to the last pixel;
    scale, positions and weights in float32 and the lerp order (along x, then y) as TF's kernel
    (tensorflow `core/kernels/resize_bilinear_op.cc`; torch-fidelity's `interpolate_compat_tensorflow.py`
    does the same)."""
    def axis(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)
        pos = torch.arange(n_out, dtype=torch.float32) * scale  # (n_out,) source coordinates, >= 0
        lo = pos.long()  # truncation = floor for pos >= 0
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo.to(x.device), hi.to(x.device), (pos - lo.float()).to(device=x.device, dtype=x.dtype)

    ylo, yhi, dy = axis(x.shape[2], size[0])
    xlo, xhi, dx = axis(x.shape[3], size[1])
    top, bottom = x[:, :, ylo], x[:, :, yhi]  # (N, C, out_h, W)
    top = top[..., xlo] + (top[..., xhi] - top[..., xlo]) * dx
    bottom = bottom[..., xlo] + (bottom[..., xhi] - bottom[..., xlo]) * dx  # (N, C, out_h, out_w)
    return top + (bottom - top) * dy[:, None]


def prepare(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, 3, 299, 299) in [-1, 1] as the graph's Sub(128) and Mul(1/128); grey
    images are repeated to three channels."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise IsynthError(f"Inception input must be uint8 [N, H, W, C] with C in (1, 3), got {images.dtype} "
                          f"{list(images.shape)}")
    x = images.permute(0, 3, 1, 2).float()  # (N, C, H, W) in [0, 255]
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    return (resize_tf1_bilinear(x, (INPUT_SIDE_PX, INPUT_SIDE_PX)) - 128.0) / 128.0


def _skeleton() -> FIDInceptionV3:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return FIDInceptionV3()


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor the weights file must hold (parameters and batch-norm statistics), in module order."""
    return {k: tuple(v.shape) for k, v in _skeleton().state_dict().items() if not k.endswith("num_batches_tracked")}


def _read_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return load_safetensors(str(path))
    # weights_only: a tensor file never needs arbitrary unpickling, which would run code from the file.
    return torch.load(path, map_location="cpu", weights_only=True)


def load_inception(path: str | os.PathLike, device: torch.device | str = "cpu") -> FIDInceptionV3:
    """The network with the weights at `path` (a .pth state dict or a .safetensors file with the same keys),
    in eval mode. Any problem - no file, not a tensor file, another key set or shape - is one IsynthError
    naming the file and the first bad key."""
    path = Path(path)
    if not path.is_file():
        raise IsynthError(f"Inception weights file not found: {path} (the FID weights {WEIGHTS_FILE}; isynth never "
                          "downloads them)")
    try:
        state = _read_state(path)
    except Exception as e:  # a pickle with code, a truncated zip, random bytes: all mean "not a weights file"
        raise IsynthError(f"{path}: not a PyTorch or safetensors weights file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160] if str(e) else 'unreadable'})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise IsynthError(f"{path}: not a state dict of named tensors (want {LAYOUT})")
    want = expected_shapes()
    for key, shape in want.items():
        if key not in state:
            raise IsynthError(f"{path}: missing key {key}; not {LAYOUT}")
        if tuple(state[key].shape) != shape or not state[key].is_floating_point():
            raise IsynthError(f"{path}: key {key} has shape {list(state[key].shape)} ({state[key].dtype}), want "
                              f"{list(shape)} float; not {LAYOUT}")
    extra = [k for k in state if k not in want and not k.endswith("num_batches_tracked")]
    if extra:
        raise IsynthError(f"{path}: unexpected key {extra[0]} ({len(extra)} in all); not {LAYOUT}")
    bad = next((k for k in want if not bool(torch.isfinite(state[k]).all())), None)
    if bad is not None:
        raise IsynthError(f"{path}: key {bad} holds non-finite values")
    net = _skeleton()
    counters = {k: torch.zeros((), dtype=torch.long) for k in net.state_dict() if k not in want}  # unused in eval
    net.load_state_dict({**{k: state[k].float() for k in want}, **counters}, strict=True, assign=True)
    return net.to(device).eval().requires_grad_(False)


def weights_identity(path: str | os.PathLike) -> dict:
    """The weights file and its SHA-256, recorded beside the metrics: the standard file's starts with 6726825d."""
    return {"inception_weights": str(path), "inception_weights_sha256": sha256_file(path)}


def _batches(images: np.ndarray | Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    if isinstance(images, np.ndarray):
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]
    else:
        yield from images


@torch.no_grad()
def inception_features(net: FIDInceptionV3, images: np.ndarray | Iterable[np.ndarray],
                       batch_size: int = 64) -> InceptionFeatures:
    """Features of uint8 NHWC images (an array, or an iterable of batches such as a streamed .npz), float32 on
    CPU (the statistics are taken in float64)."""
    pools, spatials, logits = [], [], []
    # Full fp32 convolutions on GPUs too: cuDNN's default TF32 would move FID in its third digit.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for batch in _batches(images, batch_size):
            f = net(torch.from_numpy(np.array(batch, dtype=np.uint8, copy=True)))  # writable copy of read-only data
            pools.append(f.pool.float().cpu())
            spatials.append(f.spatial.float().cpu())
            logits.append(f.logits.float().cpu())
    if not pools:
        raise IsynthError("no images to compute Inception features of")
    return InceptionFeatures(torch.cat(pools), torch.cat(spatials), torch.cat(logits))
