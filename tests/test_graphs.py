"""Near the hardware's limit: static-shape decoding, CUDA graphs of sampling steps, and the training
options (compile, activation checkpointing, gradient accumulation).

The CPU tests cover every code path that does not need a GPU; the CUDA tests (skipped without one) check
that graphed sampling gives the same samples as the same code run step by step."""
import pytest
import torch

from isynth.backbone import KEY_BUCKET, Transformer, decode_keys
from isynth.config import ModelConfig
from isynth.graphs import StepGraphs, active, capturing
from isynth.overrides import apply
from isynth.presets import make_run
from isynth.runs import sampling_precision
from isynth.trainer import build, build_optimizer, train_step

CUDA = torch.cuda.is_available()


def _model(paradigm: str, *overrides: str, device="cpu"):
    torch.manual_seed(0)
    return build(make_run(paradigm, "tiny", list(overrides)), torch.device(device),
                 check_data=paradigm != "get").model.eval()


def test_decode_keys_are_buckets_past_the_position():
    assert decode_keys(0, 300) == KEY_BUCKET
    assert decode_keys(KEY_BUCKET - 1, 300) == KEY_BUCKET
    assert decode_keys(KEY_BUCKET, 300) == 2 * KEY_BUCKET
    assert decode_keys(299, 300) == 300  # never past the buffer


@pytest.mark.parametrize("adaln", [False, True])
def test_static_decode_steps_equal_a_full_causal_pass(adaln):
    """Prefix through the cache, then one position per step at a device index over a masked key bucket."""
    cfg = ModelConfig(width=32, depth=2, num_heads=4, qk_norm=True, adaln=adaln)
    torch.manual_seed(0)
    net = Transformer(cfg).eval()
    for p in net.parameters():  # away from adaLN-Zero's identity init so the condition matters
        torch.nn.init.normal_(p, std=0.1)
    t = 2 * KEY_BUCKET + 5  # three buckets
    x, c = torch.randn(2, t, 32), torch.randn(2, 32)
    full = net(x, c, causal=True)
    cache = net.new_cache(2, t, "cpu")
    outs = [net(x[:, :3], c, causal=True, cache=cache)]
    for i in range(3, t):
        pos = torch.tensor([i])
        outs.append(net.decode(x[:, i:i + 1], c, cache, pos, decode_keys(i, t)))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_masked_cache_positions_do_not_change_a_step():
    """Positions past the step are masked: what they hold does not matter, as long as it is finite (the
    buffer starts at zeros, since a masked NaN would still reach the output as 0 * NaN)."""
    net = Transformer(ModelConfig(width=16, depth=1, num_heads=2)).eval()
    cache = net.new_cache(1, 8, "cpu")
    assert torch.equal(cache.k, torch.zeros_like(cache.k))
    net(torch.randn(1, 2, 16), causal=True, cache=cache)
    x = torch.randn(1, 1, 16)
    clean = net.decode(x, None, cache, torch.tensor([2]), 8)
    cache.k[..., 3:, :] = 1e4 * torch.randn_like(cache.k[..., 3:, :])  # past the step's position
    cache.v[..., 3:, :] = 1e4 * torch.randn_like(cache.v[..., 3:, :])
    torch.testing.assert_close(net.decode(x, None, cache, torch.tensor([2]), 8), clean)


def test_step_graphs_call_through_outside_a_cuda_capture_context():
    graphs, calls = StepGraphs(), []

    def fn(x):
        calls.append(1)
        return x * 2

    x = torch.ones(3)
    assert torch.equal(graphs.run("f", fn, x), x * 2)
    with capturing(True):  # on CPU there is nothing to capture
        assert not active("cpu")
        assert torch.equal(graphs.run("f", fn, x), x * 2)
    assert len(calls) == 2 and not graphs._steps


@pytest.mark.parametrize("paradigm,overrides", [
    ("ar", ["sample.guidance.scale=2"]), ("rar", ["sample.order=random", "method.cls_token=true"]),
    ("ar-cont", []), ("maskgit", []), ("mdm", []), ("mar", []), ("diffusion", [])])
def test_cpu_samples_are_the_same_inside_and_outside_the_capture_context(paradigm, overrides):
    m = _model(paradigm)
    s = apply(m.run.sample, dict(o.removeprefix("sample.").split("=") for o in overrides if o.startswith("sample.")),
              "sample.")
    labels = torch.arange(4) % m.num_classes
    a = m.sample(labels, s, torch.Generator().manual_seed(1))
    with capturing(True):
        b = m.sample(labels, s, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def _deterministic_ar():
    """`ar` without label dropout: its loss has no randomness, so gradients can be compared exactly."""
    torch.manual_seed(0)
    return build(make_run("ar", "tiny", ["method.class_dropout=0"]), torch.device("cpu")).model.train()


def _one_step(model, tokens, labels, **kwargs):
    opt = build_optimizer(model, model.run.train, torch.device("cpu"))
    loss, norm, _ = train_step(model, model, opt, tokens, labels, 1e-3, 1.0, torch.autocast("cpu", enabled=False),
                               **kwargs)
    return loss, norm, [p.detach().clone() for p in model.parameters()]


def _two_ways(batch: int, second: dict, change=None):
    """One optimizer step of the deterministic `ar` from the same weights, plainly and with `second`'s
    train_step options (and `change` applied to the model): (loss, grad norm, weights) of each."""
    m = _deterministic_ar()
    tokens = torch.randint(0, m.tokenizer.vocab_size, (batch, m.seq_len))
    labels = torch.arange(batch) % m.num_classes
    state = {k: v.clone() for k, v in m.state_dict().items()}
    plain = _one_step(m, tokens, labels)
    m.load_state_dict(state)
    if change:
        change(m)
    return plain, _one_step(m, tokens, labels, **second)


def test_gradient_accumulation_equals_the_whole_batch():
    whole, accum = _two_ways(8, {"accum": 4})
    for a, b in zip([accum[0], accum[1], *accum[2]], [whole[0], whole[1], *whole[2]]):
        torch.testing.assert_close(a, b)  # the same sums in another order: equal to rounding


def test_activation_checkpointing_gives_the_same_gradients():
    plain, recomputed = _two_ways(4, {}, lambda m: setattr(m.net, "checkpoint_activations", True))
    for a, b in zip([recomputed[1], *recomputed[2]], [plain[1], *plain[2]]):
        assert torch.equal(a, b)  # recomputation repeats the same kernels: bit for bit


def test_bad_grad_accum_is_one_clear_error():
    from isynth.errors import IsynthError
    with pytest.raises(IsynthError, match="grad_accum"):
        make_run("ar", "tiny", ["train.batch_size=8", "train.grad_accum=3"])


# --- on a GPU ---------------------------------------------------------------------------------------

@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("paradigm,overrides", [
    ("ar", {"guidance.scale": 2.0}), ("rar", {"order": "random"}), ("ar-cont", {}), ("maskgit", {}),
    ("mdm", {"guidance.scale": 2.0}), ("mar", {"guidance.scale": 2.0}), ("diffusion", {"guidance.scale": 2.0}),
    ("get", {})])
def test_cuda_graphs_give_the_same_samples(paradigm, overrides):
    """The same generator gives identical samples with graphs (captured at the first batch, replayed at
    the second) and without, in bf16 with the sampling weights."""
    m = _model(paradigm, device="cuda")
    s = apply(m.run.sample, overrides, "sample.")
    labels = torch.arange(8, device="cuda") % m.num_classes
    with sampling_precision(m):
        plain = m.sample(labels, s, torch.Generator("cuda").manual_seed(1))
        with capturing(True):
            first = m.sample(labels, s, torch.Generator("cuda").manual_seed(1))
            again = m.sample(labels, s, torch.Generator("cuda").manual_seed(1))
    assert m.graphs._steps or any(getattr(h, "graphs", None) and h.graphs._steps for h in m.modules())
    assert torch.equal(first, plain) and torch.equal(again, plain)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_compiled_training_matches_eager():
    from isynth.trainer import prepare_training
    torch.manual_seed(0)
    run = make_run("ar", "tiny", ["method.class_dropout=0", "train.compile=on"])
    eager = build(run, torch.device("cuda")).model.train()
    compiled = build(run, torch.device("cuda")).model.train()
    compiled.load_state_dict(eager.state_dict())
    prepare_training(compiled, run.train, torch.device("cuda"))
    tokens = torch.randint(0, eager.tokenizer.vocab_size, (8, eager.seq_len), device="cuda")
    labels = torch.arange(8, device="cuda") % eager.num_classes
    torch.testing.assert_close(compiled(tokens, labels), eager(tokens, labels), atol=1e-4, rtol=1e-4)
