"""Flow-matching diffusion: interpolation and target, time sampling, the Euler and Heun ODE samplers against
an analytic solution and against diffusers' flow-matching schedulers, the CFG interval, and bad
configurations."""
from __future__ import annotations

import math

import diffusers
import pytest
import torch

from isynth.errors import IsynthError
from isynth.overrides import apply
from isynth.paradigms.diffusion import DiffusionSampling, evaluation_times, flow_times, solve
from isynth.presets import make_run
from isynth.trainer import build


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build(make_run("diffusion", "tiny"), torch.device("cpu")).model


def test_loss_uses_the_rectified_flow_interpolation_and_velocity_target(model, monkeypatch):
    """x_t = (1 - t) x0 + t eps and the loss is MSE(v, eps - x0): recover eps from what the network sees."""
    seen = {}

    def fake_velocity(x, t, labels):
        seen["x"], seen["t"] = x.clone(), t.clone()
        return torch.zeros_like(x)

    monkeypatch.setattr(model, "velocity", fake_velocity)
    x0 = torch.rand(512, model.seq_len, model.token_dim) * 2 - 1
    loss = model.loss(x0, torch.zeros(512, dtype=torch.long))
    t = seen["t"][:, None, None]
    assert ((seen["t"] > 0) & (seen["t"] < 1)).all()
    eps = (seen["x"] - (1 - t) * x0) / t
    assert loss.item() == pytest.approx(((eps - x0) ** 2).mean().item(), rel=1e-4)
    assert eps.mean().abs() < 0.02 and eps.std().item() == pytest.approx(1.0, abs=0.02)  # really N(0, I)


@pytest.mark.parametrize("kind", ["uniform", "logit-normal"])
def test_time_sampling_distributions(kind):
    run = make_run("diffusion", "tiny", [f"method.time_sampling={kind}", "method.logit_mean=0.5",
                                         "method.logit_std=0.8"])
    m = build(run, torch.device("cpu")).model
    torch.manual_seed(1)
    t = m.sample_times(200_000, "cpu").double()
    if kind == "uniform":
        assert t.mean().item() == pytest.approx(0.5, abs=0.005) and t.var().item() == pytest.approx(1 / 12, abs=0.002)
    else:
        logit = torch.log(t / (1 - t))
        assert logit.mean().item() == pytest.approx(0.5, abs=0.01)
        assert logit.std().item() == pytest.approx(0.8, abs=0.01)


def _gaussian_velocity(mu: float, s: float):
    """The exact flow-matching velocity E[eps - x0 | x_t = x] for data N(mu, s^2) per dimension."""
    def v(x, t):
        a = 1 - t
        var = a * a * s * s + t * t
        centred = x - a * mu
        return t / var * centred - (mu + a * s * s / var * centred)
    return v


def test_euler_and_heun_against_the_analytic_ode_solution():
    """For Gaussian data the probability-flow ODE maps eps to mu + s * eps exactly (the monotone transport of
    N(0, 1) onto N(mu, s^2)). The error must fall as the samplers' orders say: Euler (1st order) halves per
    doubling of the steps, Heun (2nd order) quarters, and Heun is far closer at every step count."""
    mu, s = 0.7, 0.3
    eps = torch.randn(4096, 1, 1)
    err = {sampler: [(solve(_gaussian_velocity(mu, s), eps.clone(), DiffusionSampling(sampler=sampler, num_steps=k))
                      - (mu + s * eps)).abs().mean().item() for k in (4, 8, 16, 32)]
           for sampler in ("euler", "heun")}
    e, h = err["euler"], err["heun"]
    assert all(hk < ek / 4 for ek, hk in zip(e, h)), err
    assert all(1.7 < a / b < 2.3 for a, b in zip(e[1:], e[2:])), err
    assert all(a / b > 3.2 for a, b in zip(h[1:], h[2:])), err
    assert h[-1] < 1e-3, err


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("num_steps,shift", [(1, 1.0), (2, 1.0), (8, 1.0), (13, 1.0), (8, 3.0)])
def test_the_explicit_samplers_are_diffusers_flow_matching_schedulers(sampler, num_steps, shift):
    """The loop written out in diffusion.py is diffusers' FlowMatchEuler/HeunDiscreteScheduler (SD3's grid): the
    network is evaluated at the same times and the final states agree to float32 rounding (diffusers' Heun
    divides by the time at the end of each step, which costs it some precision near t = 0.001)."""
    cls = diffusers.FlowMatchHeunDiscreteScheduler if sampler == "heun" else diffusers.FlowMatchEulerDiscreteScheduler
    sched = cls(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(num_steps)
    s = DiffusionSampling(sampler=sampler, num_steps=num_steps, shift=shift)
    ours, theirs = torch.tensor(evaluation_times(s)), sched.timesteps / 1000
    assert ours.shape == theirs.shape and ours[0] == 1.0
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    velocity = _gaussian_velocity(0.7, 0.3)
    x0 = torch.randn(64, 4, 2, generator=torch.Generator().manual_seed(0))
    x = x0.clone()
    for t in sched.timesteps:
        x = sched.step(velocity(x, float(t) / 1000), t, x).prev_sample
    torch.testing.assert_close(solve(velocity, x0, s), x, rtol=1e-4, atol=1e-4)


def test_time_grid_and_nfe_per_sampler(model):
    t = flow_times(10, 1.0)
    assert len(t) == 11 and t[0] == 1.0 and t[-1] == 0.0 and t[-2] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(t, t[1:]))
    base = model.run.sample
    assert model.num_network_evals(apply(base, {"sampler": "euler", "num_steps": 10}, "sample.")) == 10
    assert model.num_network_evals(apply(base, {"sampler": "heun", "num_steps": 10}, "sample.")) == 19


def test_cfg_interval_skips_unconditional_passes(model):
    """Count the rows of every network call: guided calls run 2B rows, the others B."""
    model.eval()
    rows = []
    real = model.velocity

    def counting(x, t, labels):
        rows.append(x.shape[0])
        return real(x, t, labels)

    s_all = apply(model.run.sample, {"sampler": "heun", "num_steps": 6, "guidance.scale": 3.0, "batch_size": 4},
                  "sample.")
    s_mid = apply(s_all, {"guidance.t_min": 0.3, "guidance.t_max": 0.7}, "sample.")
    model.velocity = counting
    try:
        for s in (s_all, s_mid):
            rows.clear()
            model.sample(torch.arange(4), s, torch.Generator().manual_seed(0))
            assert len(rows) == model.num_network_evals(s) == 11
            assert sum(r == 8 for r in rows) == model.unconditional_passes(s)
    finally:
        del model.velocity
    assert model.unconditional_passes(s_all) == 11
    assert 0 < model.unconditional_passes(s_mid) < 11
    assert model.sample_flops(s_mid) < model.sample_flops(s_all)
    none = apply(s_all, {"guidance.scale": 1.0}, "sample.")
    assert model.unconditional_passes(none) == 0 and model.sample_flops(none) * 2 == model.sample_flops(s_all)


def test_sampling_is_a_deterministic_function_of_the_noise(model):
    """What `isynth pairs` relies on: the same noise gives the same image, whatever the batch around it."""
    model.eval()
    noise = torch.randn(6, model.seq_len, model.token_dim)
    labels = torch.arange(6)
    s = model.run.sample
    a = model.sample_from(noise, labels, s)
    b = torch.cat([model.sample_from(noise[:3], labels[:3], s), model.sample_from(noise[3:], labels[3:], s)])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ema_is_on_by_default():
    for preset in ("tiny", "cpu"):
        assert make_run("diffusion", preset).train.ema_decay > 0


@pytest.mark.parametrize("override, message", [
    ("sample.guidance.t_min=1", "t_min"),
    ("sample.guidance.t_max=1.5", "t_max"),
    ("sample.guidance.scale=inf", "guidance.scale"),
    ("sample.cfg_scale=2", "renamed: use sample.guidance.scale"),
    ("sample.num_steps=0", "num_steps"),
    ("sample.shift=0", "shift"),
    ("sample.sampler=dpm", "sampler"),
    ("method.time_sampling=beta", "time_sampling"),
    ("method.logit_std=0", "logit_std"),
    ("method.class_dropout=1", "class_dropout"),
])
def test_bad_configs_are_rejected(override, message):
    with pytest.raises(IsynthError, match=message):
        make_run("diffusion", "tiny", [override])


def test_needs_adaln_and_continuous_tokens():
    with pytest.raises(IsynthError, match="adaln"):
        build(make_run("diffusion", "tiny", ["model.adaln=false"]), torch.device("cpu"))
    with pytest.raises(IsynthError, match="continuous tokenizer"):
        build(make_run("diffusion", "tiny", ["tokenizer.kind=grey"]), torch.device("cpu"))


def test_shift_moves_steps_towards_noise():
    plain, shifted = flow_times(8, 1.0), flow_times(8, 3.0)
    assert all(s > p for s, p in zip(shifted[1:-1], plain[1:-1])) and math.isclose(shifted[0], 1.0)
