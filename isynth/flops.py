"""Counting FLOPs with `torch.utils.flop_counter`, which checks every analytic count (SPEC 2).

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
