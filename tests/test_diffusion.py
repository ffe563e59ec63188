"""Flow-matching diffusion (SPEC 1.6): interpolation and target, time sampling, the Euler and Heun ODE
samplers against an analytic solution, the CFG interval, and bad configurations."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from isynth.errors import IsynthError
from isynth.paradigms.diffusion import DiffusionSampleConfig, ode_solve
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
    run = make_run("diffusion", "tiny", [f"method.time_sampling={kind}", "method.logit_mean=0.5", "method.logit_std=0.8"])
    m = build(run, torch.device("cpu")).model
    torch.manual_seed(1)
    t = m.sample_times(200_000, "cpu").double()
    if kind == "uniform":
        assert t.mean().item() == pytest.approx(0.5, abs=0.005) and t.var().item() == pytest.approx(1 / 12, abs=0.002)
    else:
        logit = torch.log(t / (1 - t))
        assert logit.mean().item() == pytest.approx(0.5, abs=0.01) and logit.std().item() == pytest.approx(0.8, abs=0.01)


def _gaussian_velocity(mu: float, s: float):
    """The exact flow-matching velocity E[eps - x0 | x_t = x] for data N(mu, s^2) per dimension."""
    def v(x, t, guided):
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
    err = {sampler: [(ode_solve(_gaussian_velocity(mu, s), eps.clone(), DiffusionSampleConfig(sampler=sampler, num_steps=k))
                      - (mu + s * eps)).abs().mean().item() for k in (4, 8, 16, 32)]
           for sampler in ("euler", "heun")}
    e, h = err["euler"], err["heun"]
    assert all(hk < ek / 4 for ek, hk in zip(e, h)), err
    assert all(1.7 < a / b < 2.3 for a, b in zip(e[1:], e[2:])), err
    assert all(a / b > 3.2 for a, b in zip(h[1:], h[2:])), err
    assert h[-1] < 1e-3, err


def test_nfe_per_sampler(model):
    base = model.run.sample
    assert model.num_network_evals(dataclasses.replace(base, sampler="euler", num_steps=10)) == 10
    assert model.num_network_evals(dataclasses.replace(base, sampler="heun", num_steps=10)) == 19


def test_cfg_interval_skips_unconditional_passes(model):
    """Count the rows of every network call: guided calls run 2B rows, the others B."""
    model.eval()
    rows = []
    real = model.velocity

    def counting(x, t, labels):
        rows.append(x.shape[0])
        return real(x, t, labels)

    s_all = dataclasses.replace(model.run.sample, sampler="heun", num_steps=6, cfg_scale=3.0, batch_size=4)
    s_mid = dataclasses.replace(s_all, cfg_t_min=0.3, cfg_t_max=0.7)
    model.velocity = counting
    try:
        for s in (s_all, s_mid):
            rows.clear()
            model.sample(torch.arange(4), s, generator=torch.Generator().manual_seed(0))
            assert len(rows) == model.num_network_evals(s) == 11
            assert sum(r == 8 for r in rows) == model.unconditional_passes(s)
    finally:
        del model.velocity
    assert model.unconditional_passes(s_all) == 11
    assert 0 < model.unconditional_passes(s_mid) < 11
    assert model.sample_flops(s_mid) < model.sample_flops(s_all)
    none = dataclasses.replace(s_all, cfg_scale=1.0)
    assert model.unconditional_passes(none) == 0 and model.sample_flops(none) * 2 == model.sample_flops(s_all)


def test_sampling_is_a_deterministic_function_of_the_noise(model):
    """What `isynth pairs` relies on: the same noise gives the same image, whatever the batch around it."""
    model.eval()
    noise = torch.randn(6, model.seq_len, model.token_dim)
    labels = torch.arange(6)
    a = model.sample_from(noise, labels)
    b = torch.cat([model.sample_from(noise[:3], labels[:3]), model.sample_from(noise[3:], labels[3:])])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ema_is_on_by_default():
    for preset in ("tiny", "cpu"):
        assert make_run("diffusion", preset).train.ema_decay > 0


@pytest.mark.parametrize("override, message", [
    ("sample.cfg_t_min=1", "cfg_t_min"),
    ("sample.cfg_t_max=1.5", "cfg_t_max"),
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
    from isynth.paradigms.diffusion import ode_scheduler

    plain = ode_scheduler(DiffusionSampleConfig(sampler="euler", num_steps=8)).sigmas
    shifted = ode_scheduler(DiffusionSampleConfig(sampler="euler", num_steps=8, shift=3.0)).sigmas
    assert (shifted[1:-1] > plain[1:-1]).all() and math.isclose(shifted[0].item(), 1.0)
