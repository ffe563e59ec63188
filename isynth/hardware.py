"""Devices, distributed set-up and the peak FLOP/s that MFU is measured against.

MFU = achieved training FLOP/s / peak FLOP/s (model FLOPs utilisation, PaLM, Chowdhery et al. 2022). On CPU
the peak is *measured* (an fp32 matmul, cached per machine); on CUDA it is the datasheet dense bf16 figure for
known GPUs, else measured.
"""
from __future__ import annotations

import json
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, FLOP/s.
_DATASHEET_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12,
                   "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "4090": 165e12}


def cache_dir() -> Path:
    """Where measured peaks and feature nets are cached: $ISYNTH_CACHE, else ~/.cache/isynth."""
    env = os.environ.get("ISYNTH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "isynth"


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; fp32 on CPU, where bf16 matmuls are ~100x slower than fp32 (BENCHMARKS.md)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_distributed() -> tuple[int, int]:
    """(rank, world_size); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(default_device())
        else:  # share the cores between the processes on one machine
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        dist.init_process_group(backend)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 0.5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(3):
        a @ b  # warm-up
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            a @ b
            reps += 1
        sync()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) for the training precision on `device`."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _DATASHEET_BF16.items():
            if key in name:
                return value, f"datasheet dense bf16 ({name})"
        return _measure_matmul_peak(device, torch.bfloat16, n=8192), f"measured bf16 matmul ({name})"
    key = f"{platform.processor() or platform.machine()}-{torch.get_num_threads()}threads-torch{torch.__version__}"
    path = cache_dir() / "cpu_peak.json"
    try:
        cached = json.loads(path.read_text())
        if key in cached:
            return cached[key], "measured fp32 matmul (cached)"
    except (OSError, ValueError):
        cached = {}
    value = _measure_matmul_peak(device, torch.float32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({**cached, key: value}))
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs a re-measurement
    return value, "measured fp32 matmul"
