"""Matmul FLOPs: the one analytic formula, and the `torch.utils.flop_counter` count that checks it.

A matmul of (m, k) by (k, n) costs 2 m k n FLOPs. In training, a Linear's backward pass costs 2x its
forward (input and weight gradients) where its input needs a gradient and 1x (the weight gradient only)
where it does not, e.g. a layer reading data or fixed features.

PyTorch's FlopCounterMode knows the CUDA attention kernels but not the CPU flash-attention kernel that
`scaled_dot_product_attention` dispatches to on CPU, so on CPU attention would silently count as zero.
We register PyTorch's own SDPA formulas for that kernel (forward: QK^T and PV, 4*B*h*Tq*Tk*d; backward:
2x that), which makes the counter's total the independent check the analytic formulas are tested against.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

_aten = torch.ops.aten
_registered = False


def matmul_flops(rows: int | float, fan_in: int, fan_out: int, train: bool = False,
                 input_grad: bool = True) -> int | float:
    """FLOPs of a Linear(fan_in, fan_out) on `rows` rows: forward, or forward + backward with `train`."""
    forward = 2 * rows * fan_in * fan_out
    if not train:
        return forward
    return forward * (3 if input_grad else 2)


def _register_cpu_attention() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    @register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
    def _fwd(query, key, value, *args, out_val=None, **kwargs) -> int:
        return sdpa_flop_count(query.shape, key.shape, value.shape)

    @register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)
    def _bwd(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


def counting() -> FlopCounterMode:
    """A FlopCounterMode that also counts CPU attention; use as `with counting() as fc: ...`."""
    _register_cpu_attention()
    return FlopCounterMode(display=False)
