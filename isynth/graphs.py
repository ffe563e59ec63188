"""CUDA graphs for samplers' per-step network calls.

A sampler's step is a few hundred small kernels (about twenty per layer); on a GPU at sampling batch sizes
launching them costs more than running them (a profile of RAR-B decoding showed 1.3 s of wall time for
0.23 s of kernels). A CUDA graph records the step's kernels once and replays them with one launch
(`torch.cuda.graphs`). Replay reads and writes the same memory every time, so a step is captured once per
input signature (its name, the shapes, dtypes and devices of its tensor inputs, and the weights it reads)
and each call copies its inputs into the captured ones. Everything a captured step reads that is not an
input must live as long as the graph and keep its address (the weights, a KV cache the store also keeps).

Graphs are used only inside `capturing(True)`, which the sampling entry points (`isynth.runs.generate`,
the benchmarks) enter with the run's `sample.cuda_graphs`. Elsewhere (training, tests calling `sample`
directly), on a CPU, or with graphs turned off, a step is simply called: the same code runs either way, so
samples are identical with and without graphs (tested on a GPU when one is present).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

_ACTIVE: ContextVar[bool] = ContextVar("isynth_cuda_graphs", default=False)


@contextmanager
def capturing(enabled: bool) -> Iterator[None]:
    """Within this context, steps run through a `StepGraphs` are captured and replayed on CUDA."""
    token = _ACTIVE.set(enabled)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active(device) -> bool:
    """Whether steps on `device` are replayed from CUDA graphs here."""
    return _ACTIVE.get() and torch.device(device).type == "cuda"


def _signature(inputs: tuple[Tensor, ...]) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)


class _Captured:
    """One step recorded as a CUDA graph, with its static inputs and outputs."""

    def __init__(self, fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], pool):
        self.inputs = tuple(t.clone() for t in inputs)
        # Warm-up on a side stream first (cuBLAS workspaces, lazy initialisation), as the PyTorch docs ask.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(*self.inputs)

    def __call__(self, inputs: tuple[Tensor, ...]) -> Tensor:
        for static, t in zip(self.inputs, inputs):
            static.copy_(t)
        self.graph.replay()
        return self.output


class StepGraphs:
    """A model's captured steps. `run(name, fn, *inputs)` returns fn(*inputs), replayed from a CUDA graph
    on CUDA inside `capturing(True)`. The output is the graph's own buffer, and the graphs of one store
    share a memory pool: the next replay of any of its steps may overwrite it, so a caller uses (or copies)
    it first. fn must be the same computation for the same name and may close over nothing that changes
    between calls but the weights."""

    def __init__(self):
        self._steps: dict[tuple, _Captured] = {}
        self._state: dict[tuple, object] = {}
        self._pool = None

    def run(self, name: str, fn: Callable[..., Tensor], *inputs: Tensor, weights: tuple = ()) -> Tensor:
        if not active(inputs[0].device) or torch.cuda.is_current_stream_capturing():
            return fn(*inputs)
        key = (name, weights, torch.is_autocast_enabled("cuda"), _signature(inputs))
        step = self._steps.get(key)
        if step is None:
            if self._pool is None:  # one memory pool for all of a model's graphs: steps run one at a time
                self._pool = torch.cuda.graph_pool_handle()
            step = self._steps[key] = _Captured(fn, inputs, self._pool)
        return step(inputs)

    def state(self, key: tuple, make: Callable[[], object]) -> object:
        """A buffer that captured steps read or write (a KV cache), kept for as long as the graphs are."""
        if key not in self._state:
            self._state[key] = make()
        return self._state[key]

    def clear(self) -> None:
        self._steps.clear()
        self._state.clear()
        self._pool = None


def weights_key(module: torch.nn.Module) -> tuple:
    """Identifies the weights a captured step reads: their address and dtype (moving or casting the model
    makes new tensors, and a graph captured on the old ones must not be replayed)."""
    p = next(module.parameters())
    return (p.data_ptr(), p.dtype, p.device)
