"""The one transformer every paradigm shares.

It maps input vectors x (B, T, C) and an optional condition c, one vector per sequence (B, C) or one per
position (B, T, C) (the RAR reference's class + per-position embedding), to features (B, T, C). It
knows nothing of tokens, masking, ordering or noise: paradigms embed their inputs and read its outputs.
Pre-norm blocks (ViT/GPT-2), `scaled_dot_product_attention` with a causal or bidirectional mask,
optional qk-norm (RAR reference) and optional adaLN-Zero conditioning (DiT, Peebles & Xie 2023).
GET (Geng et al. 2023) conditions by adding vectors to each block's qkv (`qkv_add`) and iterates the blocks to a
fixed point without the final norm (`final_norm=False`).
Incremental decoding writes keys/values into preallocated buffers (`KVCache`): no per-step concatenation.
After the prefix, `decode` feeds one position at a device-side index and attends to a bucket of cache
positions (a multiple of KEY_BUCKET) through a length mask, so steps in one bucket have the same shapes: no
per-step re-planning of attention, and one CUDA graph serves every step of a bucket (`isynth.graphs`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from isynth.config import ModelConfig
from isynth.flops import matmul_flops
from isynth.layers import init_weights, modulate, zero_init

KEY_BUCKET = 32  # decoding attends to the cache in buckets of this many positions


def decode_keys(position: int, max_len: int) -> int:
    """Cache positions a decoding step at `position` attends to: the next multiple of KEY_BUCKET."""
    return min(max_len, (position // KEY_BUCKET + 1) * KEY_BUCKET)


class KVCache:
    """Preallocated keys and values for all layers: (depth, B, heads, max_len, head_dim) each."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype=torch.float32):
        hd = cfg.width // cfg.num_heads
        shape = (cfg.depth, batch, cfg.num_heads, max_len, hd)
        # zeros, not empty: `decode` attends to the whole buffer with the unwritten positions masked, and a
        # masked NaN in uninitialised memory would still reach the output as 0 * NaN
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions already written by `write` (the prefix)
        # set by Transformer.decode for one static-shape step: the write index (1,) and the key mask
        self.position: Tensor | None = None
        self.key_mask: Tensor | None = None
        self.keys = max_len

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, h, T, hd) after the cached prefix and return views of the whole prefix."""
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache overflow: {end} > {self.k.shape[3]}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def write_at(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store one position's k, v (B, h, 1, hd) at the device index `position` and return the first
        `keys` positions of the buffers; those past `position` are masked by `key_mask`."""
        # under autocast qk-norm's LayerNorm returns fp32 keys: stored in the cache's dtype (bf16)
        self.k[layer].index_copy_(2, self.position, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, self.position, v.to(self.v.dtype))
        return self.k[layer, :, :, :self.keys], self.v[layer, :, :, :self.keys]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.width // cfg.num_heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.attn_dropout = cfg.attn_dropout
        # qk-norm stabilises attention logits (Dehghani et al. 2023); used by the RAR reference.
        self.q_norm = nn.LayerNorm(self.head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if cfg.qk_norm else nn.Identity()

    def forward(self, x: Tensor, causal: bool, cache: KVCache | None, layer: int,
                qkv_add: Tensor | None = None) -> Tensor:
        b, t, c = x.shape
        qkv = self.qkv(x) if qkv_add is None else self.qkv(x) + qkv_add  # (B, T, 3C); qkv_add broadcasts
        qkv = qkv.reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, T, hd)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        mask, is_causal = None, causal
        if cache is not None and cache.position is not None:  # a static-shape decoding step
            k, v = cache.write_at(layer, k, v)
            mask, is_causal = cache.key_mask, False
        elif cache is not None:
            start = cache.length
            k, v = cache.write(layer, k, v)
            if start > 0 and causal and t > 1:  # a block of new queries after a cached prefix
                mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(start)
            is_causal = causal and start == 0 and t > 1
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


def _per_position(m: Tensor) -> Tensor:
    """Modulation vectors (B, K) of one condition per sequence -> (B, 1, K); (B, T, K) per position as is."""
    return m.unsqueeze(1) if m.dim() == 2 else m


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.adaln = cfg.adaln
        # With adaLN the affine parameters come from the condition, so the norms have none (DiT), unless
        # model.adaln_norm_affine keeps them as the RAR reference does.
        affine = cfg.norm_affine
        self.norm1 = nn.LayerNorm(cfg.width, elementwise_affine=affine)
        self.norm2 = nn.LayerNorm(cfg.width, elementwise_affine=affine)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.adaln:
            self.modulation = nn.Linear(cfg.width, 6 * cfg.width)

    def forward(self, x: Tensor, c: Tensor | None, causal: bool, cache: KVCache | None, layer: int,
                qkv_add: Tensor | None = None) -> Tensor:
        if not self.adaln:
            x = x + self.drop(self.attn(self.norm1(x), causal, cache, layer, qkv_add))
            return x + self.mlp(self.norm2(x))
        mods = _per_position(self.modulation(F.silu(c))).chunk(6, dim=-1)  # 6 x (B, 1 or T, C)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        x = x + gate1 * self.drop(self.attn(modulate(self.norm1(x), shift1, scale1), causal, cache, layer, qkv_add))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, elementwise_affine=not cfg.adaln)
        if cfg.adaln:
            self.final_modulation = nn.Linear(cfg.width, 2 * cfg.width)
        self.apply(init_weights)
        if cfg.adaln:  # adaLN-Zero: every block starts as the identity
            zero_init(*[blk.modulation for blk in self.blocks], self.final_modulation)
        self.checkpoint_activations = False  # set by the trainer (train.checkpoint_activations)
        self._compiled = None  # the compiled training forward (train.compile)

    def compile_training(self) -> None:
        """Compile the training forward (no KV cache) with torch.compile: Inductor fuses the norms, the
        adaLN modulation, GELU and the residual adds around the matmuls and flash attention. Sampling and
        evaluation stay eager (their per-step shapes are served by CUDA graphs instead)."""
        self._compiled = torch.compile(self._forward)

    def forward(self, x: Tensor, c: Tensor | None = None, causal: bool = False, cache: KVCache | None = None,
                qkv_add: Tensor | list[Tensor] | None = None, final_norm: bool = True) -> Tensor:
        """x: (B, T, C) input vectors; c: (B, C) or per position (B, T, C) condition (required iff adaLN).
        Returns (B, T, C).

        qkv_add: added to every block's qkv projection, one tensor broadcasting to (B, T, 3C) for all blocks
        or a list with one per block (GET's class and injection conditioning). final_norm=False returns the
        residual stream of the last block (GET's equilibrium state)."""
        if self.cfg.adaln and c is None:
            raise ValueError("this backbone uses adaLN and needs a condition vector c")
        if self._compiled is not None and self.training and cache is None:
            return self._compiled(x, c, causal, None, qkv_add, final_norm)
        return self._forward(x, c, causal, cache, qkv_add, final_norm)

    def _forward(self, x: Tensor, c: Tensor | None, causal: bool, cache: KVCache | None,
                 qkv_add: Tensor | list[Tensor] | None, final_norm: bool) -> Tensor:
        per_block = qkv_add if isinstance(qkv_add, (list, tuple)) else [qkv_add] * len(self.blocks)
        recompute = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        for i, blk in enumerate(self.blocks):
            if recompute:  # activations of the block are recomputed in the backward pass (same dropout masks)
                x = checkpoint(blk, x, c, causal, None, i, per_block[i], use_reentrant=False)
            else:
                x = blk(x, c, causal, cache, i, per_block[i])
        if cache is not None:
            cache.length += x.shape[1]
        return self.final(x, c) if final_norm else x

    def decode(self, x: Tensor, c: Tensor | None, cache: KVCache, position: Tensor, keys: int) -> Tensor:
        """One new position per sequence, x (B, 1, C), at sequence index `position` ((1,) long, on the
        device): its keys and values go into the cache there, and it attends to the first `keys` cache
        positions (`decode_keys`: a multiple of KEY_BUCKET past `position`) with those after `position`
        masked. The shapes depend only on the bucket, so the attention kernel is planned once per bucket and
        one CUDA graph per bucket serves all its steps, while a step reads little more of the cache than it
        needs (decoding is bandwidth-bound). Returns (B, 1, C)."""
        cache.position, cache.keys = position, keys
        cache.key_mask = (torch.arange(keys, device=x.device) <= position).view(1, 1, 1, keys)  # (1, 1, 1, keys)
        try:
            for i, blk in enumerate(self.blocks):
                x = blk(x, c, False, cache, i)
        finally:
            cache.position = cache.key_mask = None
        return self.final(x, c)

    def final(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """The output norm (adaLN-modulated when the blocks are)."""
        if not self.cfg.adaln:
            return self.norm(x)
        shift, scale = _per_position(self.final_modulation(F.silu(c))).chunk(2, dim=-1)  # 2 x (B, 1 or T, C)
        return modulate(self.norm(x), shift, scale)

    def new_cache(self, batch: int, max_len: int, device, dtype=torch.float32) -> KVCache:
        return KVCache(self.cfg, batch, max_len, device, dtype)

    def param_count(self) -> int:
        """Analytic parameter count (weights + biases), checked against the modules in the tests."""
        cfg = self.cfg
        c, h, hd = cfg.width, cfg.mlp_hidden, cfg.width // cfg.num_heads
        block = (3 * c * c + 3 * c) + (c * c + c) + (c * h + h) + (h * c + c)  # qkv, proj, fc1, fc2
        block += (c * 6 * c + 6 * c) if cfg.adaln else 0  # adaLN modulation
        block += 2 * 2 * c if cfg.norm_affine else 0  # the two norms' affine
        block += 2 * 2 * hd if cfg.qk_norm else 0
        final = (c * 2 * c + 2 * c) if cfg.adaln else 2 * c
        return cfg.depth * block + final

    def flops_terms(self, per_position: bool = False) -> tuple[int, int, int]:
        """(a, b, c) with flops(q, kv) = a + b q + c q kv for inference: sums over decoding steps in closed
        form (`isynth flops` answers at once for any sequence length)."""
        a = self.flops(0, 0, per_position=per_position)
        b = self.flops(1, 0, per_position=per_position) - a
        return a, b, self.flops(1, 1, per_position=per_position) - a - b

    def decode_flops(self, prefix: int, steps: int, cached: bool, per_position: bool = False) -> int:
        """Inference FLOPs of `steps` causal decoding steps after a `prefix`-position start. With a KV cache
        the first step runs the prefix and step i >= 1 (`decode`) a single query at position k - 1 + i over
        its bucket of `decode_keys` positions, the ones not yet written masked but computed (counted as
        computed); without, each step runs the whole sequence so far (k + i positions at step i)."""
        a, b, c = self.flops_terms(per_position)
        k, n = prefix, steps
        if cached:  # step 0: f(k, k); step i >= 1: f(1, keys(k - 1 + i)), summed bucket by bucket
            length, keys = k + n - 1, 0
            for lo in range(0, length, KEY_BUCKET):  # positions lo .. lo + KEY_BUCKET - 1 share a bucket
                first, last = max(lo, k), min(lo + KEY_BUCKET - 1, length - 1)
                keys += max(0, last - first + 1) * decode_keys(lo, length)
            return self.flops(k, k, per_position=per_position) + (n - 1) * (a + b) + c * keys
        s1 = n * k + n * (n - 1) // 2  # sum of k + i over i < n
        s2 = n * k * k + k * n * (n - 1) + (n - 1) * n * (2 * n - 1) // 6  # sum of (k + i)^2 over i < n
        return n * a + b * s1 + c * s2

    def flops(self, num_queries: int, num_keys: int | None = None, train: bool = False, final: bool = True,
              per_position: bool = False) -> int:
        """Matmul FLOPs for ONE sequence: `num_queries` new positions attending to `num_keys`.

        The dense layers (qkv, output projection, the two MLP layers, and the adaLN modulation of the one
        condition vector, or of every query's with `per_position`) as `matmul_flops`; attention's scores
        QK^T and weighted sum PV as 2 * 2 q kv C, counted in full under a causal mask, as the dense kernels
        compute and FlopCounterMode counts them.
        train=True adds the backward pass: 2x forward for the dense layers (input and weight gradients),
        2.5x for attention, whose flash backward recomputes QK^T (5 matmuls for 2; Dao et al. 2022).
        """
        cfg, q = self.cfg, num_queries
        kv = num_queries if num_keys is None else num_keys
        c, h = cfg.width, cfg.mlp_hidden
        m = q if per_position else 1  # condition vectors modulated
        dense = (matmul_flops(q, c, 3 * c, train) + matmul_flops(q, c, c, train) + matmul_flops(q, c, h, train)
                 + matmul_flops(q, h, c, train) + (matmul_flops(m, c, 6 * c, train) if cfg.adaln else 0))
        attn = 2 * 2 * q * kv * c
        last = matmul_flops(m, c, 2 * c, train) if cfg.adaln and final else 0
        return cfg.depth * (dense + (7 * attn // 2 if train else attn)) + last
