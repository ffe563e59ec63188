"""The shared transformer against a from-scratch reading of its papers: pre-norm blocks (GPT-2 / ViT) with
softmax(QK^T / sqrt(d)) V attention, tanh-GELU MLPs and adaLN-Zero modulation (DiT, Peebles & Xie 2023,
sec. 3.2), written out below with explicit matmuls; the KV cache's decoding steps; dropout only in
training; and the parameter and FLOPs formulas against hand counts and brute-force sums."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from isynth.backbone import KEY_BUCKET, Transformer, decode_keys
from isynth.config import ModelConfig


def _scrambled(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A backbone with every parameter random (adaLN-Zero's zeros would hide the modulation)."""
    torch.manual_seed(seed)
    net = Transformer(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net.eval()


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _layer_norm(x, norm):
    """LayerNorm over the last dimension, with the module's affine parameters where it has them."""
    y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
    return y if norm.weight is None else y * norm.weight + norm.bias


def _linear(x, layer):
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def _reference(net: Transformer, x, c=None, causal=False, qkv_add=None, final_norm=True):
    """The forward pass written from the papers' equations (one sequence batch, no cache)."""
    cfg = net.cfg
    b, t, w = x.shape
    h = cfg.num_heads
    hd = w // h
    for i, blk in enumerate(net.blocks):
        if cfg.adaln:
            m = _linear(F.silu(c), blk.modulation)
            m = m[:, None] if m.dim() == 2 else m
            shift1, scale1, gate1, shift2, scale2, gate2 = (m[..., j * w:(j + 1) * w] for j in range(6))
        a = _layer_norm(x, blk.norm1)
        if cfg.adaln:
            a = a * (1 + scale1) + shift1
        qkv = _linear(a, blk.attn.qkv)
        if qkv_add is not None:
            qkv = qkv + (qkv_add[i] if isinstance(qkv_add, list) else qkv_add)
        q, k, v = (qkv[..., j * w:(j + 1) * w].reshape(b, t, h, hd).transpose(1, 2) for j in range(3))
        if cfg.qk_norm:
            q, k = _layer_norm(q, blk.attn.q_norm), _layer_norm(k, blk.attn.k_norm)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, h, T, T)
        if causal:
            scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        y = _linear((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, w), blk.attn.proj)
        x = x + (gate1 * y if cfg.adaln else y)
        a = _layer_norm(x, blk.norm2)
        if cfg.adaln:
            a = a * (1 + scale2) + shift2
        y = _linear(_gelu_tanh(_linear(a, blk.mlp.fc1)), blk.mlp.fc2)
        x = x + (gate2 * y if cfg.adaln else y)
    if not final_norm:
        return x
    out = _layer_norm(x, net.norm)
    if cfg.adaln:
        m = _linear(F.silu(c), net.final_modulation)
        m = m[:, None] if m.dim() == 2 else m
        out = out * (1 + m[..., w:]) + m[..., :w]
    return out


CONFIGS = [dict(), dict(qk_norm=True), dict(adaln=True), dict(adaln=True, qk_norm=True, adaln_norm_affine=True)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("extra", CONFIGS)
def test_forward_is_the_pre_norm_transformer_of_the_papers(extra, causal):
    cfg = ModelConfig(width=16, depth=2, num_heads=2, mlp_ratio=2.0, **extra)
    net = _scrambled(cfg)
    x, c = torch.randn(3, 5, 16), torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x, c, causal=causal), _reference(net, x, c, causal), atol=1e-5, rtol=1e-5)


def test_a_condition_per_position_modulates_each_position():
    """The RAR reference's (B, T, C) condition: each position gets its own shift, scale and gate."""
    net = _scrambled(ModelConfig(width=16, depth=2, num_heads=4, adaln=True))
    x, c = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x, c, causal=True), _reference(net, x, c, True), atol=1e-5, rtol=1e-5)


def test_qkv_additions_one_for_all_blocks_or_one_per_block():
    """GET's conditioning: vectors added to every block's qkv projection; final_norm=False is the stream."""
    net = _scrambled(ModelConfig(width=16, depth=2, num_heads=2))
    x = torch.randn(2, 4, 16)
    shared = torch.randn(2, 1, 48)
    per_block = [torch.randn(2, 4, 48), torch.randn(2, 4, 48)]
    with torch.no_grad():
        torch.testing.assert_close(net(x, qkv_add=shared), _reference(net, x, qkv_add=shared), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(net(x, qkv_add=per_block, final_norm=False),
                                   _reference(net, x, qkv_add=per_block, final_norm=False), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(net(x, qkv_add=per_block), net(x, qkv_add=per_block[::-1]))


def test_adaln_without_a_condition_is_refused():
    net = Transformer(ModelConfig(width=16, depth=1, num_heads=2, adaln=True))
    with pytest.raises(ValueError, match="this backbone uses adaLN and needs a condition vector c"):
        net(torch.randn(1, 3, 16))


def test_decode_keys_are_the_next_bucket_boundary_capped_at_the_cache():
    assert KEY_BUCKET == 32
    assert [decode_keys(p, 100) for p in (0, 31, 32, 63, 64, 95, 96, 99)] == [32, 32, 64, 64, 96, 96, 100, 100]
    assert decode_keys(5, 20) == 20


@pytest.mark.parametrize("adaln", [False, True])
def test_decoding_one_position_at_a_time_equals_the_causal_pass(adaln):
    """A 40-position sequence crosses a key bucket: prefix of 3 into the cache, then `decode` per position."""
    cfg = ModelConfig(width=16, depth=2, num_heads=2, qk_norm=True, adaln=adaln)
    net = _scrambled(cfg)
    t = 40
    x, c = torch.randn(2, t, 16), torch.randn(2, 16)
    with torch.no_grad():
        full = _reference(net, x, c, causal=True)
        cache = net.new_cache(2, t, "cpu")
        outs = [net(x[:, :3], c, causal=True, cache=cache)]
        for i in range(3, t):
            pos = torch.tensor([i])
            outs.append(net.decode(x[:, i:i + 1], c, cache, pos, decode_keys(i, t)))
        assert cache.position is None and cache.key_mask is None  # a decoding step leaves no state behind
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_a_block_of_queries_after_a_prefix_sees_the_prefix_and_its_own_past():
    net = _scrambled(ModelConfig(width=16, depth=2, num_heads=2))
    x = torch.randn(1, 9, 16)
    with torch.no_grad():
        full = _reference(net, x, causal=True)
        cache = net.new_cache(1, 9, "cpu")
        parts = [net(x[:, :2], causal=True, cache=cache), net(x[:, 2:7], causal=True, cache=cache),
                 net(x[:, 7:9], causal=True, cache=cache)]
    assert cache.length == 9
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_the_cache_holds_exactly_max_len_positions():
    net = _scrambled(ModelConfig(width=8, depth=1, num_heads=2))
    cache = net.new_cache(1, 4, "cpu")
    assert cache.max_len == 4 and cache.k.shape == (1, 1, 2, 4, 4) and cache.length == 0
    assert not cache.k.any() and not cache.v.any()
    with torch.no_grad():
        net(torch.randn(1, 4, 8), causal=True, cache=cache)
    assert cache.length == 4 and cache.k.abs().sum() > 0 and cache.v.abs().sum() > 0
    with pytest.raises(ValueError, match=r"^KV cache overflow: 5 > 4$"):
        net(torch.randn(1, 1, 8), causal=True, cache=cache)


def test_dropout_acts_in_training_only():
    """Evaluation with dropout configured equals the same weights without it; training draws masks."""
    drop = _scrambled(ModelConfig(width=16, depth=2, num_heads=2, dropout=0.5, attn_dropout=0.5))
    plain = _scrambled(ModelConfig(width=16, depth=2, num_heads=2))
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(drop(x, causal=True), plain(x, causal=True))
        drop.train()
        a, b = drop(x, causal=True), drop(x, causal=True)
    assert not torch.allclose(a, b) and not torch.allclose(a, plain(x, causal=True))


@pytest.mark.parametrize("which", ["attn", "resid"])
def test_each_dropout_is_its_own_setting(which):
    """attn_dropout alone and dropout alone each make training stochastic."""
    kw = {"attn_dropout": 0.5} if which == "attn" else {"dropout": 0.5}
    net = _scrambled(ModelConfig(width=16, depth=1, num_heads=2, **kw)).train()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert not torch.allclose(net(x), net(x))


def test_activation_checkpointing_recomputes_the_same_values_and_gradients():
    cfg = ModelConfig(width=16, depth=2, num_heads=2, adaln=True)
    net = _scrambled(cfg).train()
    x, c = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 16)
    qkv = [torch.randn(2, 5, 48), torch.randn(2, 5, 48)]
    y = net(x, c, causal=True, qkv_add=qkv)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    net.checkpoint_activations = True
    y2 = net(x, c, causal=True, qkv_add=qkv)
    (gx2,) = torch.autograd.grad(y2.square().sum(), x)
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(gx2, gx)


def test_compiled_forward_serves_training_only(monkeypatch):
    """compile_training compiles the no-cache training forward; evaluation and cached decoding stay eager."""
    calls = []

    def fake_compile(fn):
        def compiled(*args):
            calls.append(args)
            return fn(*args)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    net = _scrambled(ModelConfig(width=8, depth=1, num_heads=2))
    net.compile_training()
    x = torch.randn(1, 3, 8)
    with torch.no_grad():
        eager = net(x, causal=True)
        net.train()
        compiled = net(x, causal=True)
        assert len(calls) == 1 and calls[0][2] is True and calls[0][3] is None
        net(x, causal=True, cache=net.new_cache(1, 3, "cpu"))
        net.eval()
        net(x)
    assert len(calls) == 1
    torch.testing.assert_close(compiled, eager)


# width 8, 2 heads (head dim 4), MLP 16: qkv 8*24+24, proj 8*8+8, fc1 8*16+16, fc2 16*8+8 = 568 per block;
# two affine norms 2*16; qk-norm 2*2*4; adaLN modulation 8*48+48; final norm 16, or its modulation 8*16+16
@pytest.mark.parametrize("extra,block,final", [
    (dict(), 568 + 32, 16),
    (dict(qk_norm=True), 568 + 32 + 16, 16),
    (dict(adaln=True), 568 + 432, 144),
    (dict(adaln=True, adaln_norm_affine=True), 568 + 432 + 32, 144),
    (dict(adaln=True, qk_norm=True), 568 + 432 + 16, 144),
])
def test_parameter_count_by_hand(extra, block, final):
    net = Transformer(ModelConfig(width=8, depth=2, num_heads=2, mlp_ratio=2.0, **extra))
    assert net.param_count() == 2 * block + final == sum(p.numel() for p in net.parameters())
    assert type(net.param_count()) is int


@pytest.mark.parametrize("extra", [dict(), dict(adaln=True)])
def test_flops_are_affine_in_queries_and_bilinear_in_queries_and_keys(extra):
    """flops(q, kv) = a + b q + c q kv, the closed form `isynth flops` sums over decoding steps."""
    net = Transformer(ModelConfig(width=16, depth=3, num_heads=2, **extra))
    for per_position in (False, True):
        a, b, c = net.flops_terms(per_position)
        assert all(type(v) is int for v in (a, b, c))
        assert a == net.flops(0, 0, per_position=per_position) and c == 3 * 2 * 2 * 16  # depth * 2 matmuls * 2 q kv C
        for q, kv in ((1, 1), (3, 7), (10, 40)):
            assert net.flops(q, kv, per_position=per_position) == a + b * q + c * q * kv


@pytest.mark.parametrize("extra", [dict(), dict(adaln=True)])
@pytest.mark.parametrize("prefix,steps", [(1, 1), (1, 64), (2, 31), (2, 33), (5, 70)])
def test_decode_flops_are_the_sum_over_the_steps(extra, prefix, steps):
    """Brute force: with the cache, step 0 runs the prefix and step i >= 1 one query over its key bucket;
    without, step i runs the prefix + i positions over themselves."""
    net = Transformer(ModelConfig(width=16, depth=2, num_heads=2, **extra))
    length = prefix + steps - 1
    for per_position in (False, True):
        f = lambda q, kv: net.flops(q, kv, per_position=per_position)  # noqa: E731
        cached = f(prefix, prefix) + sum(f(1, decode_keys(prefix - 1 + i, length)) for i in range(1, steps))
        uncached = sum(f(prefix + i, prefix + i) for i in range(steps))
        assert net.decode_flops(prefix, steps, True, per_position) == cached
        assert net.decode_flops(prefix, steps, False, per_position) == uncached
        assert type(net.decode_flops(prefix, steps, False, per_position)) is int  # exact counts, no float
    # by default one condition vector per sequence
    assert net.decode_flops(prefix, steps, True) == net.decode_flops(prefix, steps, True, False)
    assert net.flops_terms() == net.flops_terms(False)


def test_training_flops_by_hand():
    """One block of width 4, MLP 8, no adaLN, 2 queries over 3 keys: dense matmuls 2*q*(4*12 + 4*4 + 4*8 + 8*4)
    forward; attention 2 * 2 * q * kv * C; training triples the dense part and takes 3.5x attention."""
    net = Transformer(ModelConfig(width=4, depth=1, num_heads=1, mlp_ratio=2.0))
    dense, attn = 2 * 2 * (48 + 16 + 32 + 32), 2 * 2 * 2 * 3 * 4
    assert net.flops(2, 3) == dense + attn
    assert net.flops(2, 3, train=True) == 3 * dense + 7 * attn // 2
    assert net.flops(2) == dense + 2 * 2 * 2 * 2 * 4  # keys default to the queries
    ada = Transformer(ModelConfig(width=4, depth=1, num_heads=1, mlp_ratio=2.0, adaln=True))
    modulation, final = 2 * 4 * 24, 2 * 4 * 8  # one condition vector: (1, 4) x (4, 6C) and (4, 2C)
    assert ada.flops(2, 3) == dense + attn + modulation + final
    assert ada.flops(2, 3, final=False) == dense + attn + modulation
    assert ada.flops(2, 3, per_position=True) == dense + attn + 2 * (modulation + final)
