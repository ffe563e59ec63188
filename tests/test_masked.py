"""The masked paradigms (`maskgit`, `mdm`, `mar`): schedules, weights, reveal counts, CFG interval, MAE
encoder, training-count distributions and bad configurations."""
from __future__ import annotations

import math

import pytest
import torch

from isynth.errors import IsynthError
from isynth.masking import elbo_weight, inverse_mask_fraction, mask_fraction, masked_counts
from isynth.overrides import apply
from isynth.presets import make_run
from isynth.trainer import build

SCHEDULES = ["linear", "cosine", "exp", "poly", "log"]


def _model(paradigm: str, *overrides: str):
    torch.manual_seed(0)
    return build(make_run(paradigm, "tiny", list(overrides)), torch.device("cpu")).model


@pytest.mark.parametrize("schedule,formula", [
    ("linear", lambda t: t), ("cosine", lambda t: math.cos(math.pi / 2 * (1 - t))),
    ("exp", lambda t: 1 - math.exp(-5 * t)), ("poly", lambda t: math.sqrt(t)),
    ("log", lambda t: math.log(1 + (math.exp(5) - 1) * t) / 5)])
def test_mask_schedules_match_their_formulas(schedule, formula):
    t = torch.tensor([0.0, 0.1, 0.37, 0.5, 0.9, 1.0], dtype=torch.float64)
    want = torch.tensor([formula(v) for v in t.tolist()], dtype=torch.float64)
    torch.testing.assert_close(mask_fraction(schedule, t), want)
    inner = t[1:-1]
    torch.testing.assert_close(inverse_mask_fraction(schedule, mask_fraction(schedule, inner)), inner)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_elbo_weight_is_gamma_prime_over_gamma(schedule):
    t = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.95], dtype=torch.float64)
    h = 1e-6
    deriv = (mask_fraction(schedule, t + h) - mask_fraction(schedule, t - h)) / (2 * h)
    torch.testing.assert_close(elbo_weight(schedule, t), deriv / mask_fraction(schedule, t), rtol=1e-5, atol=0)
    # the closed forms of eMIGM's Table 4 for the three it lists
    if schedule == "linear":
        torch.testing.assert_close(elbo_weight(schedule, t), 1 / t)
    if schedule == "cosine":
        torch.testing.assert_close(elbo_weight(schedule, t), math.pi / 2 * torch.tan(math.pi / 2 * (1 - t)))
    if schedule == "exp":
        torch.testing.assert_close(elbo_weight(schedule, t), 5 * torch.exp(-5 * t) / (1 - torch.exp(-5 * t)))


def test_masked_counts_follow_mar_cosine_and_always_reveal():
    n, k = 64, 8
    counts = masked_counts(n, torch.linspace(1, 0, k + 1).tolist(), "cosine")
    assert counts[0] == n and counts[-1] == 0
    assert counts[1:-1] == [math.floor(n * math.cos(math.pi / 2 * s / k)) for s in range(1, k)]  # MAR
    for n, k in [(64, 64), (16, 15), (10, 3), (5, 5)]:
        for sched in SCHEDULES:
            c = masked_counts(n, torch.linspace(1, 1e-5, k + 1).tolist(), sched)
            assert c[0] == n and c[-1] == 0 and len(c) == k + 1
            assert all(a > b for a, b in zip(c, c[1:])), (n, k, sched, c)
    with pytest.raises(ValueError):
        masked_counts(4, torch.linspace(1, 0, 6).tolist(), "cosine")


@pytest.mark.parametrize("paradigm,overrides", [("maskgit", ()), ("mdm", ()), ("mar", ()),
                                                ("mdm", ("tokenizer.kind=grey",)), ("mar", ("tokenizer.kind=grey",))])
def test_reveal_counts_per_step(paradigm, overrides):
    """Each step reveals >= 1 token, the same number in every row, and everything by the end."""
    m = _model(paradigm, *overrides).eval()
    s = apply(m.run.sample, {"num_steps": 6, "guidance.scale": 2.0}, "sample.")
    seen, original = [], m.reveal

    def spy(k, z, w, mask, *args):
        reveal, values = original(k, z, w, mask, *args)
        assert not (reveal & ~mask).any(), "revealed an already revealed token"
        seen.append(reveal.sum(1))
        return reveal, values

    m.reveal = spy
    try:
        tokens = m.sample(torch.arange(5), s, torch.Generator().manual_seed(0))
    finally:
        del m.reveal
    counts = m.mask_counts(s)
    assert len(seen) == 6
    for k, per_row in enumerate(seen):
        assert (per_row == per_row[0]).all() and per_row[0] >= 1
        assert per_row[0] == counts[k] - counts[k + 1]
    assert sum(int(r[0]) for r in seen) == m.seq_len
    assert torch.isfinite(tokens.float()).all()


def _rows_per_call(m, s):
    rows = []
    handle = m.encoder.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    try:
        m.sample(torch.arange(4), s, torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    return rows


def test_cfg_interval_skips_unconditional_passes():
    m = _model("mdm").eval()
    base = apply(m.run.sample, {"num_steps": 10, "guidance.scale": 3.0, "guidance.schedule": "constant"}, "sample.")
    always = _rows_per_call(m, base)
    assert always == [8] * 10  # every step runs both halves
    window = apply(base, {"guidance.t_min": 0.3, "guidance.t_max": 0.6}, "sample.")
    rows = _rows_per_call(m, window)
    times = m.sampling_times(10)
    guided = [0.3 < t <= 0.6 for t in times[1:]]  # the time of the state each step produces
    assert rows == [8 if g else 4 for g in guided] and 0 < sum(guided) < 10
    assert m.unconditional_passes(window) == sum(guided)
    assert m.num_network_evals(window) == 10
    assert m.sample_flops(window) < m.sample_flops(base)
    assert _rows_per_call(m, apply(base, {"guidance.scale": 1.0}, "sample.")) == [4] * 10


@pytest.mark.parametrize("paradigm", ["maskgit", "mdm", "mar"])
def test_guidance_over_the_whole_range_guides_every_step(paradigm):
    """Without an interval every step is guided, the last one too, whose state is at t = 0 (MaskGIT, MAR)."""
    m = _model(paradigm).eval()
    s = apply(m.run.sample, {"num_steps": 6, "guidance.scale": 2.0}, "sample.")
    assert all(w is not None for w in m.cfg_weights(s)) and m.unconditional_passes(s) == 6


@pytest.mark.parametrize("steps,interval,expected", [
    (16, (0.1, 0.3), [11, 12, 13]),      # eMIGM's released setting (the current-time rule would give 12-14)
    (16, (0.2, 0.6), [6, 7, 8, 9, 10, 11]),
    (8, (0.1, 0.3), [5, 6]),
    (10, (0.3, 0.6), [4, 5, 6]),       # t(4) = 0.600004 > 0.6: the grid ends at 1e-5, not 0
    (4, (0.0, 1.0), [0, 1, 2, 3]),
])
def test_cfg_interval_follows_the_reference_rule(steps, interval, expected):
    """eMIGM's sampler (ML-GSAI/eMIGM) guides step k when the time it steps to, t(k+1) on linspace(1, 1e-5,
    K+1), lies in (t_min, t_max]; the steps are listed by hand from that rule."""
    m = _model("mdm").eval()
    s = apply(m.run.sample, {"num_steps": steps, "guidance.scale": 2.0, "guidance.schedule": "constant",
                             "guidance.t_min": interval[0], "guidance.t_max": interval[1]}, "sample.")
    assert [k for k, w in enumerate(m.cfg_weights(s)) if w is not None] == expected
    assert m.unconditional_passes(s) == len(expected)


@pytest.mark.parametrize("paradigm,mae", [("mar", True), ("maskgit", False)])
def test_encoder_sees_exactly_the_visible_tokens(paradigm, mae):
    m = _model(paradigm).eval()
    assert m.run.method.mae is mae
    b, n, nb = 3, m.seq_len, m.num_buffer
    tokens = m.tokenizer.encode(torch.randint(0, 256, (b, 8, 8, 1), dtype=torch.uint8))
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[:, ::3] = True
    lengths = []
    handle = m.encoder.register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1]))
    cond = m.condition(torch.arange(b))
    with torch.no_grad():
        z = m.features(tokens, mask, cond)
        other = tokens.clone()
        other[mask] = other[mask] * 0 + (1 if m.tokenizer.discrete else 0.5)  # change only masked tokens
        z_masked_changed = m.features(other, mask, cond)
        changed = tokens.clone()
        changed[~mask] = changed[~mask] * 0 + (2 if m.tokenizer.discrete else -0.5)
        z_visible_changed = m.features(changed, mask, cond)
    handle.remove()
    visible = int((~mask[0]).sum())
    assert lengths[0] == nb + (visible if mae else n)
    torch.testing.assert_close(z, z_masked_changed)  # masked tokens' values never reach the network
    assert not torch.allclose(z, z_visible_changed)


@pytest.mark.parametrize("paradigm,overrides", [
    ("maskgit", ()), ("maskgit", ("method.mask_schedule=exp",)), ("mdm", ()),
    ("mdm", ("method.t_min=0", "method.mask_schedule=linear")), ("mar", ()), ("mar", ("tokenizer.kind=grey",))])
def test_training_count_distribution_matches_its_pmf(paradigm, overrides):
    """The expected training FLOPs use train_count_pmf; it must be the law of what training_mask draws."""
    m = _model(paradigm, *overrides)
    torch.manual_seed(1)
    draws = 3000
    counts = torch.stack([m.training_mask(1, "cpu")[0].sum() for _ in range(draws)])
    empirical = torch.bincount(counts, minlength=m.seq_len + 1).double() / draws
    pmf = m.train_count_pmf()
    assert pmf.shape == (m.seq_len + 1,) and pmf.sum().item() == pytest.approx(1.0, abs=1e-9)
    assert 0.5 * (empirical - pmf).abs().sum() < 0.06  # total variation (sampling noise ~0.04 here)
    mean_flops = sum(p * m.train_flops_given(k) for k, p in enumerate(pmf.tolist()))
    assert m.train_flops_per_sample() == pytest.approx(mean_flops, rel=1e-6)


@pytest.mark.parametrize("overrides", [(), ("tokenizer.kind=grey",)])
def test_mar_mask_ratio_is_truncated_normal_on_07_1(overrides):
    m = _model("mar", *overrides)
    counts = torch.stack([m.training_mask(1, "cpu")[0].sum() for _ in range(500)])
    assert counts.min() >= math.ceil(0.7 * m.seq_len) - 1 and counts.max() <= m.seq_len


def test_mdm_weighting_and_truncation():
    m = _model("mdm", "method.weighting=elbo", "method.t_min=0.4", "method.mask_schedule=linear")
    torch.manual_seed(3)
    for _ in range(20):
        mask, w = m.training_mask(4, "cpu")
        assert (mask.sum(1) == mask.sum(1)[0]).all() and mask.sum(1)[0] >= 2
        p = 1 / w[0].item()  # linear: w = 1/p with p = (1 - 1e-3) max(t, t_min) + 1e-3
        assert p >= (1 - 1e-3) * 0.4 + 1e-3 - 1e-6  # float32
    plain = _model("mdm")
    assert (plain.training_mask(4, "cpu")[1] == 1).all()


def test_mask_token_is_the_null_condition():
    m = _model("mdm").eval()
    null = torch.full((2,), m.class_embed.null)
    torch.testing.assert_close(m.condition(null), m.mask_token.expand(2, -1))
    g = _model("maskgit").eval()
    assert not torch.allclose(g.condition(null), g.mask_token.expand(2, -1))


@pytest.mark.parametrize("paradigm,overrides,message", [
    ("mdm", ["method.t_min=1"], "method.t_min"),
    ("mdm", ["method.t_min=-0.1"], "method.t_min"),
    ("mdm", ["sample.guidance.t_min=0.5", "sample.guidance.t_max=0.4"], "t_min"),
    ("mdm", ["sample.guidance.t_max=1.5"], "t_max"),
    ("mdm", ["sample.guidance.t_min=-0.2"], "t_min"),
    ("mdm", ["method.mask_schedule=quadratic"], "choose one of"),
    ("mdm", ["method.weighting=elbow"], "choose one of"),
    ("mar", ["method.decoder_depth=0"], "needs a decoder"),
    ("mar", ["method.mask_ratio_min=1.2"], "mask_ratio_min"),
    ("mar", ["sample.num_steps=0"], "num_steps"),
    ("mar", ["sample.head.order=4"], "head.order"),
    ("mar", ["sample.head.sampler=euler"], "choose one of"),
    ("mar", ["method.head.diffusion_batch_mul=0"], "diffusion_batch_mul"),
    ("mdm", ["tokenizer.kind=grey", "sample.head.steps=4"], "sample.head"),  # the softmax head has no steps
    ("mdm", ["tokenizer.kind=grey", "method.head.width=4"], "not used by this run"),
    ("maskgit", ["method.head.width=4"], "unknown config field 'method.head'"),
    ("maskgit", ["sample.choice_temperature=-1"], "choice_temperature"),
])
def test_bad_configurations_are_rejected(paradigm, overrides, message):
    with pytest.raises(IsynthError, match=message.replace("(", r"\(")):
        make_run(paradigm, "tiny", overrides)


@pytest.mark.parametrize("paradigm,overrides,message", [
    ("mar", ["tokenizer.kind=grey", "method.head.width=64"], "method.head"),  # no diffusion head on ids
    ("ar-cont", ["tokenizer.kind=grey"], "needs a continuous tokenizer"),
    ("maskgit", ["tokenizer.kind=patch"], "needs a discrete tokenizer"),  # confidence needs probabilities
    ("mar", ["sample.num_steps=65"], "exceeds the 64 tokens"),
])
def test_bad_combinations_are_rejected_at_build(paradigm, overrides, message):
    with pytest.raises(IsynthError, match=message):
        build(make_run(paradigm, "tiny", overrides), torch.device("cpu"))
