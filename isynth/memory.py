"""Memory estimates made before allocating, so that a setting the machine cannot hold is refused with one line
and the estimate, instead of a Linux out-of-memory kill (SIGKILL: no message, nothing cleaned up) half-way
through building a model or a batch.

The estimates are lower bounds of the main allocations, not a model of the allocator: training holds the
weights, their gradients, AdamW's two moments and the EMA copy (5 tensors per parameter), plus the activations
autograd saves for the backward pass, *measured* at two small batches with saved-tensor hooks and extended to the
micro-batch (Korthikanti et al. 2022 give the same linear law in closed form for a GPT block). A setting is
refused only when even that lower bound exceeds what the device has available.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from isynth.errors import IsynthError

PROBE_BATCHES = (2, 4)  # two measured forward passes: the saved bytes are linear in the batch


def _cgroup_free() -> int | None:
    """What a container's memory limit (cgroup v2, else v1) leaves, or None without a limit."""
    for limit_file, used_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                   "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, used = Path(limit_file).read_text().strip(), Path(used_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and used.isdigit() and int(limit) < 1 << 60:  # v1 writes a huge number for "none"
            return max(0, int(limit) - int(used))
    return None


def available_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation can take on `device` now: free GPU memory on CUDA; on the host the kernel's
    MemAvailable (or the container's remaining limit, if smaller). None where it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = None
    limit = _cgroup_free()
    return limit if free is None else free if limit is None else min(free, limit)


def human(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if num_bytes < 1000 or unit == "TB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    raise AssertionError("unreachable")


def require(what: str, need: float, device: torch.device, hint: str, detail: str = "") -> None:
    """Refuse `what` with one line if its estimated `need` (made of `detail`) exceeds what `device` has free."""
    free = available_bytes(device)
    if free is not None and need > free:
        raise IsynthError(f"{what} needs at least an estimated {human(need)} of memory"
                          f"{f' ({detail})' if detail else ''} and {device} has {human(free)} available: {hint}")


def state_bytes(module: torch.nn.Module, copies: int) -> int:
    """`copies` tensors the size of every parameter and buffer (works on the meta device: nothing allocated)."""
    return copies * sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


TRAINING_COPIES = 5  # weights, gradients, AdamW's exp_avg and exp_avg_sq, EMA


def _saved_bytes(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor | None, amp) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one forward (parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # A tensor saved by several ops (an input, a view of a fused projection) is held once: by storage.
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        model(tokens, labels)
    return sum(b for ptr, b in seen.items() if ptr not in params)


def saved_bytes(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor | None, amp,
                batch: int) -> float:
    """The activations a training forward of `batch` samples saves for the backward pass: measured at two
    small batches (no backward, no update: weights and optimizer untouched) and extrapolated along the line
    through them, so what does not grow with the batch (masks, position tables) is counted once."""
    (a, b) = [min(n, len(tokens)) for n in PROBE_BATCHES]
    rows = [torch.arange(n) for n in (a, b)]  # index tensors: the token sources of folders and latents take them
    sizes = [_saved_bytes(model, tokens[i], labels[i] if labels is not None else None, amp) for i in rows]
    slope = (sizes[1] - sizes[0]) / (b - a) if b > a else sizes[0] / a
    return max(sizes[0] + slope * (batch - a), 0.0)


def check_training_memory(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor | None,
                          micro_batch: int, amp, device: torch.device) -> float:
    """Refuse a training set-up whose weights, gradients, optimizer state, EMA and saved activations cannot
    fit; returns the estimate in bytes."""
    state = state_bytes(model, TRAINING_COPIES)
    acts = saved_bytes(model, tokens, labels, amp, micro_batch)
    require("training", state + acts, device, "lower train.batch_size, raise train.grad_accum or set "
            "train.checkpoint_activations=true",
            f"{human(state)} of weights, gradients, AdamW moments and EMA, {human(acts)} of activations at "
            f"{micro_batch} samples per micro-batch")
    return state + acts


def check_images_memory(what: str, num_images: int, image_shape: tuple[int, ...], hint: str) -> None:
    """Refuse holding `num_images` uint8 images of `image_shape` in host memory."""
    require(what, float(num_images) * math.prod(image_shape), torch.device("cpu"), hint)
