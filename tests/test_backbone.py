"""The shared transformer: masks, KV cache, adaLN-Zero; and AR's cached decoding and exact NLL."""
import math

import pytest
import torch

from isynth.backbone import Transformer
from isynth.config import ModelConfig
from isynth.overrides import apply
from isynth.presets import make_run
from isynth.trainer import build


@pytest.mark.parametrize("adaln", [False, True])
def test_kv_cache_gives_the_same_outputs_as_a_full_causal_pass(adaln):
    cfg = ModelConfig(width=32, depth=3, num_heads=4, qk_norm=True, adaln=adaln)
    net = Transformer(cfg).eval()
    if adaln:  # leave adaLN-Zero's identity init so the condition matters
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.1)
    x, c = torch.randn(2, 10, 32), torch.randn(2, 32)
    full = net(x, c, causal=True)
    cache = net.new_cache(2, 10, "cpu")
    steps = [net(x[:, :4], c, causal=True, cache=cache)]  # prefill of 4 positions
    steps += [net(x[:, 4:7], c, causal=True, cache=cache)]  # a block of 3 after a cached prefix (explicit mask)
    steps += [net(x[:, i:i + 1], c, causal=True, cache=cache) for i in range(7, 10)]  # one at a time
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_cache_overflow_is_an_error():
    net = Transformer(ModelConfig(width=16, depth=1, num_heads=2)).eval()
    cache = net.new_cache(1, 3, "cpu")
    with pytest.raises(ValueError, match="overflow"):
        net(torch.randn(1, 4, 16), causal=True, cache=cache)


def test_causal_mask_hides_the_future_and_bidirectional_does_not():
    net = Transformer(ModelConfig(width=16, depth=2, num_heads=2)).eval()
    x = torch.randn(1, 6, 16)
    y = x.clone()
    y[:, 4:] += torch.randn(1, 2, 16)  # (a constant shift would vanish in the pre-norm)
    causal_x, causal_y = net(x, causal=True), net(y, causal=True)
    torch.testing.assert_close(causal_x[:, :4], causal_y[:, :4])
    assert not torch.allclose(net(x)[:, :4], net(y)[:, :4])


def test_adaln_zero_starts_as_identity_blocks():
    net = Transformer(ModelConfig(width=16, depth=2, num_heads=2, adaln=True))
    x, c = torch.randn(2, 5, 16), torch.randn(2, 16)
    expected = torch.nn.functional.layer_norm(x, (16,))
    torch.testing.assert_close(net(x, c), expected)


@pytest.fixture(scope="module")
def ar_model():
    torch.manual_seed(0)
    return build(make_run("ar", "tiny", ["model.adaln=true"]), torch.device("cpu")).model.eval()


def test_ar_cached_logits_equal_teacher_forced_logits(ar_model):
    m = ar_model
    labels = torch.tensor([3, 7])
    tokens = torch.randint(0, m.tokenizer.vocab_size, (2, m.seq_len))
    full = m.logits(tokens, labels)  # (B, N, V)
    cond = m.class_embed(labels)
    cache = m.net.new_cache(2, m.seq_len, "cpu")
    stepwise = []
    for i in range(m.seq_len):
        x = m._inputs(tokens[:, i - 1:i] if i else tokens[:, :0], cond, None, start=i)
        stepwise.append(m.head.logits(m.net(x, cond, causal=True, cache=cache)))
    torch.testing.assert_close(torch.cat(stepwise, 1), full, atol=1e-5, rtol=1e-5)


def test_ar_samples_identical_with_and_without_cache(ar_model):
    s = ar_model.run.sample
    labels = torch.arange(10)
    for scale in (1.0, 3.0):
        a, b = (ar_model.sample(labels, apply(s, {"kv_cache": kv, "guidance.scale": scale}, "sample."),
                                torch.Generator().manual_seed(3)) for kv in (True, False))
        assert torch.equal(a, b)


def test_ar_nll_of_a_uniform_model_is_log2_vocab(ar_model):
    m = ar_model
    head = m.head.proj
    saved = head.weight.detach().clone(), head.bias.detach().clone()
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    try:
        tokens = torch.randint(0, m.tokenizer.vocab_size, (4, m.seq_len))
        bits = m.nll_bits_per_token(tokens, torch.arange(4))
        torch.testing.assert_close(bits, torch.full((4,), math.log2(m.tokenizer.vocab_size)))
    finally:
        with torch.no_grad():
            head.weight.copy_(saved[0])
            head.bias.copy_(saved[1])


def test_ar_nll_matches_cross_entropy_of_logits(ar_model):
    m = ar_model
    tokens = torch.randint(0, m.tokenizer.vocab_size, (3, m.seq_len))
    labels = torch.tensor([1, 2, 3])
    logp = m.logits(tokens, labels).log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)  # (B, N)
    torch.testing.assert_close(m.nll_bits_per_token(tokens, labels), -logp.mean(1) / math.log(2))


@pytest.mark.parametrize("adaln,qk_norm", [(False, False), (True, True), (False, True)])
def test_analytic_param_count(adaln, qk_norm):
    net = Transformer(ModelConfig(width=48, depth=3, num_heads=4, mlp_ratio=3.0, adaln=adaln, qk_norm=qk_norm))
    assert net.param_count() == sum(p.numel() for p in net.parameters())


def test_ar_sampling_under_bf16_autocast(ar_model):
    """The GPU path (bf16 autocast) exercised on CPU: the KV cache takes the autocast dtype."""
    s = apply(ar_model.run.sample, {"kv_cache": True, "guidance.scale": 2.0}, "sample.")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = ar_model.sample(torch.arange(3), s, torch.Generator().manual_seed(0))
    assert tokens.shape == (3, ar_model.seq_len) and tokens.max() < ar_model.tokenizer.vocab_size
