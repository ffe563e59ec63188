"""MAR's per-token diffusion head: configs, FLOPs against the counter, the samplers against the exact eps of a
known target and against diffusers' DDPM, a trained toy head, temperature, CFG inside the head, seeds."""
import copy
import math
import subprocess
import sys

import diffusers
import pytest
import torch
from torch import nn

from isynth import diffhead
from isynth.diffhead import DiffHeadConfig, DiffHeadSampling, DiffusionHead, ddpm_step, ddpm_timesteps, dpm_solver
from isynth.errors import IsynthError
from isynth.flops import counting

DDPM, DPM10, DPM14 = DiffHeadSampling("ddpm", 100), DiffHeadSampling("dpm++", 10, 3), DiffHeadSampling("dpm++", 14, 3)

# The toy target: class 0 is N((2, -1), diag(0.25, 1)); class 1 is an even mixture of N((-2, 2), 0.25 I) and
# N((2, 2), 0.25 I). MIXTURES[k] = [(weight, mean, std per dim)].
MIXTURES = {0: [(1.0, (2.0, -1.0), (0.5, 1.0))], 1: [(0.5, (-2.0, 2.0), (0.5, 0.5)), (0.5, (2.0, 2.0), (0.5, 0.5))]}
MEANS = {0: (2.0, -1.0), 1: (0.0, 2.0)}
VARS = {0: (0.25, 1.0), 1: (4.0 + 0.25, 0.25)}


def draw_target(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(labels.shape[0], 2, generator=gen)
    gauss = a * torch.tensor([0.5, 1.0]) + torch.tensor([2.0, -1.0])
    side = torch.where(torch.rand(labels.shape[0], generator=gen) < 0.5, -2.0, 2.0)
    mixture = torch.stack([side, torch.full_like(side, 2.0)], 1) + 0.5 * a
    return torch.where(labels[:, None] == 0, gauss, mixture)


def check_moments(x: torch.Tensor, k: int, mean_tol: float, var_range: tuple[float, float]) -> None:
    """Per-dimension mean and variance of samples x (N, 2) of class k; for the mixture, whose first
    coordinate's mean is 4 (0.5 - p) for a share p of the left mode, the share instead of that mean."""
    mean, ratio = x.mean(0), x.var(0) / torch.tensor(VARS[k])
    dims = (0, 1) if k == 0 else (1,)
    for d in dims:
        assert abs(mean[d].item() - MEANS[k][d]) < mean_tol, (k, d, mean.tolist())
    for d in (0, 1):
        assert var_range[0] < ratio[d].item() < var_range[1], (k, d, ratio.tolist())
    if k == 1:
        left = (x[:, 0] < 0).float().mean().item()
        assert abs(left - 0.5) < 0.08, left


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These small matmuls gain little from a second thread (~1.4x), and when another process holds a core,
    # two OpenMP threads wait on each other: measured 70x slower training on a busy 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained():
    """A small head trained on the toy target, conditioned on one random z per class (~10 s, one thread)."""
    torch.manual_seed(0)  # loss draws t and noise from the global RNG, as in the trainer
    gen = torch.Generator().manual_seed(0)
    z_of_class = torch.randn(2, 8, generator=gen)
    head = DiffusionHead(8, 2, DiffHeadConfig(width=96, depth=3, diffusion_batch_mul=4))
    steps, labels = 600, torch.arange(256) % 2
    opt = torch.optim.Adam(head.parameters(), lr=2e-3)
    warm_cosine = lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warm_cosine)
    for _ in range(steps):
        loss = head.loss(z_of_class[labels], draw_target(labels, gen)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return head.eval(), z_of_class


def random_head(cond_width=24, token_dim=4, **kw) -> DiffusionHead:
    """A head with every weight random (adaLN-Zero would make eps = 0 and hide mistakes)."""
    head = DiffusionHead(cond_width, token_dim, DiffHeadConfig(**{"width": 32, "depth": 2, **kw}))
    for p in head.parameters():
        nn.init.normal_(p, std=0.2)
    return head


# --- configs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,kwargs,field", [
    (DiffHeadConfig, {"width": 0}, "method.head.width"),
    (DiffHeadConfig, {"depth": 0}, "method.head.depth"),
    (DiffHeadConfig, {"diffusion_batch_mul": 0}, "method.head.diffusion_batch_mul"),
    (DiffHeadSampling, {"steps": 0}, "sample.head.steps"),
    (DiffHeadSampling, {"steps": diffhead.T_MAX + 1}, "sample.head.steps"),
    (DiffHeadSampling, {"order": 1}, "sample.head.order"),
    (DiffHeadSampling, {"temperature": 0}, "sample.head.temperature"),
])
def test_bad_settings_name_the_field(cls, kwargs, field):
    with pytest.raises(IsynthError, match=field):
        cls(**kwargs)


# --- schedule, loss, FLOPs -------------------------------------------------------------------------------

def test_schedule_is_diffusers_cosine_and_stays_out_of_checkpoints():
    ref = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    head = DiffusionHead(8, 2, DiffHeadConfig(width=16, depth=1))
    torch.testing.assert_close(head.alphas_cumprod, ref, rtol=1e-5, atol=1e-10)
    assert "alphas_cumprod" not in head.state_dict()
    assert head.to(torch.float64).alphas_cumprod.dtype == torch.float64  # a buffer follows .to()
    # Both samplers start at the same, clipped timestep (LOGSNR_MIN), below the degenerate t = 999.
    assert ddpm_timesteps(100)[0] == diffhead.T_MAX == dpm_solver(12, 3).timesteps[0] < 999
    for n in (1, 7, 64, 100, 500, diffhead.T_MAX):  # up to the most steps allowed, no timestep repeats
        for ts in (ddpm_timesteps(n), dpm_solver(n, 3).timesteps.tolist()):
            assert len(ts) == n and ts[0] == diffhead.T_MAX and all(a > b >= 0 for a, b in zip(ts, ts[1:]))


def test_loss_is_per_token_starts_at_one_and_follows_the_global_seed():
    head = DiffusionHead(8, 3, DiffHeadConfig(width=16, depth=2, diffusion_batch_mul=4))
    z, x = torch.randn(500, 8, requires_grad=True), torch.randn(500, 3)
    torch.manual_seed(1)
    loss = head.loss(z, x)
    assert loss.shape == (500,)
    # adaLN-Zero: the head predicts eps = 0 at initialisation, so the loss is E|eps|^2 = 1 per dimension.
    assert loss.mean().item() == pytest.approx(1.0, abs=0.05)
    torch.manual_seed(1)
    assert torch.equal(head.loss(z, x), loss)
    loss.mean().backward()
    assert z.grad is not None


def test_train_flops_match_the_counter():
    head = random_head(diffusion_batch_mul=3)
    z = torch.randn(10, 24, requires_grad=True)  # as in use: z comes from the transformer
    with counting() as fc:
        head.loss(z, torch.randn(10, 4)).mean().backward()
    assert fc.get_total_flops() == pytest.approx(head.train_flops(10), rel=0.01)


@pytest.mark.parametrize("sampling", [DiffHeadSampling("ddpm", 5), DiffHeadSampling("dpm++", 6, 3),
                                      DiffHeadSampling("dpm++", 5, 2)],
                         ids=["ddpm", "dpm++3", "dpm++2"])
@pytest.mark.parametrize("cfg", [False, True])
def test_sample_flops_match_the_counter(sampling, cfg):
    head = random_head()
    z = torch.randn(14 if cfg else 7, 24)
    with counting() as fc:
        head.sample(z, sampling, 2.0 if cfg else None, torch.Generator().manual_seed(0))
    assert fc.get_total_flops() == pytest.approx(head.sample_flops(7, sampling, cfg), rel=0.01)


@pytest.mark.parametrize("sampler,order", [("ddpm", 3), ("dpm++", 2), ("dpm++", 3)])
def test_network_evaluations_equal_the_steps(sampler, order):
    head, calls = random_head(), []
    head.net.register_forward_hook(lambda *_: calls.append(1))
    for steps in (1, 2, 3, 8, 10, 11, 12, 14):
        s = DiffHeadSampling(sampler, steps, order)
        calls.clear()
        head.sample(torch.randn(6, 24), s, 3.0, torch.Generator().manual_seed(0))  # CFG: one call on 2B rows
        assert len(calls) == steps  # what sample_flops counts (tested against the counter above)


# --- samplers --------------------------------------------------------------------------------------------

def test_ddpm_step_is_diffusers_ddpm_posterior_with_beta_tilde():
    gen = torch.Generator().manual_seed(0)
    x, eps, noise = torch.randn(3, 64, 2, generator=gen)
    abar = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    # DDIM with eta = 1 (the brief's sampler) is the same step on diffusers' evenly divided grid.
    ddim = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, set_alpha_to_one=True,
                                   timestep_spacing="trailing")
    ddim.set_timesteps(100)
    for t in (989, 500, 9):
        prev = t - 10 if t >= 10 else -1
        ours = ddpm_step(t, prev, x, eps, noise)
        torch.testing.assert_close(ours, ddim.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample)
        a_t, a_p = abar[t], (abar[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64))
        beta_tilde = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)  # Ho et al. 2020, eq. 7, respaced
        std = (ours - ddpm_step(t, prev, x, eps, torch.zeros_like(noise))) / noise
        torch.testing.assert_close(std, torch.full_like(std, beta_tilde.sqrt().item()), rtol=1e-4, atol=1e-6)
    # On our grid (any spacing), DDPMScheduler with custom timesteps and beta-tilde is the same step.
    ts = ddpm_timesteps(37)
    ddpm = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, variance_type="fixed_small")
    ddpm.set_timesteps(timesteps=ts)
    for i in (0, 18, 36):
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        theirs = ddpm.step(eps, ts[i], x, generator=torch.Generator().manual_seed(i)).prev_sample
        ours = ddpm_step(ts[i], prev, x, eps, torch.randn(x.shape, generator=torch.Generator().manual_seed(i)))
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


class ExactEps(nn.Module):
    """The exact eps of a Gaussian mixture, E[eps | x_t] = (x_t - sqrt(abar) E[x0 | x_t]) / sqrt(1 - abar),
    standing in for the head's network: it isolates the samplers from training error."""

    def __init__(self, mixture):
        super().__init__()
        self.mixture, self.abar = mixture, diffhead.cosine_alphas_cumprod(torch.float64)

    def forward(self, x, t, cond):
        a = self.abar[int(t.item())]
        al, sg, x = a.sqrt(), (1 - a).sqrt(), x.double()
        log_resp, post_means = [], []
        for w, mu, s in self.mixture:
            mu, s2 = torch.tensor(mu, dtype=torch.float64), torch.tensor(s, dtype=torch.float64) ** 2
            var = al ** 2 * s2 + sg ** 2  # of x_t given the component
            log_resp.append(math.log(w) - 0.5 * ((x - al * mu) ** 2 / var + var.log()).sum(-1))
            post_means.append(mu + s2 * al * (x - al * mu) / var)
        resp = torch.softmax(torch.stack(log_resp, -1), -1)  # (N, K)
        x0 = (resp.unsqueeze(-1) * torch.stack(post_means, 1)).sum(1)  # (N, 2)
        return ((x - al * x0) / sg).float()


@pytest.mark.parametrize("sampling", [DDPM, DPM10, DPM14], ids=["ddpm100", "dpm++10", "dpm++14"])
def test_samplers_with_the_exact_eps_reproduce_the_target(sampling):
    # Mean tolerance: 4 standard errors (<= 0.064 with 4000 samples) plus, for DPM-Solver++, the bias of its
    # clipped start (x_T ignores 0.05 x0; measured <= 0.055 here). DDPM with the small variance beta-tilde (no
    # learned variance) gives up to ~8% too little variance at 100 steps (measured), hence 0.85.
    head = DiffusionHead(4, 2, DiffHeadConfig(width=8, depth=1))
    for k in (0, 1):
        head.net = ExactEps(MIXTURES[k])
        x = head.sample(torch.zeros(4000, 4), sampling, None, torch.Generator().manual_seed(k))
        check_moments(x, k, mean_tol=0.07 if sampling.sampler == "ddpm" else 0.12, var_range=(0.85, 1.15))


@pytest.mark.parametrize("sampling", [DDPM, DPM10, DPM14], ids=["ddpm100", "dpm++10", "dpm++14"])
def test_trained_head_reproduces_the_target(trained, sampling):
    # Tolerances: 4000 samples per class give standard errors <= 0.016 for the means and ~0.022 for the
    # variance ratios; the rest of the budget is the head's own error after 600 steps (measured: means
    # <= 0.1 off, variances <= 17%) and DPM-Solver++'s start bias (see the exact-eps test).
    head, z_of_class = trained
    labels = torch.arange(8000) // 4000
    x = head.sample(z_of_class[labels], sampling, None, torch.Generator().manual_seed(1))
    assert x.shape == (8000, 2) and torch.isfinite(x).all()
    for k in (0, 1):
        check_moments(x[labels == k], k, mean_tol=0.15, var_range=(0.8, 1.25))


def test_temperature_below_one_shrinks_the_ddpm_spread(trained):
    head, z_of_class = trained
    z = z_of_class[torch.zeros(2000, dtype=torch.long)]
    var = {t: head.sample(z, DiffHeadSampling("ddpm", 50, temperature=t), None, torch.Generator().manual_seed(2)).var(0)
           for t in (1.0, 0.5)}
    assert (var[0.5] < 0.8 * var[1.0]).all(), var


# --- CFG, seeds, dtypes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sampling", [DiffHeadSampling("ddpm", 20), DiffHeadSampling("dpm++", 10, 3)],
                         ids=["ddpm", "dpm++"])
def test_cfg_inside_the_head_shares_the_noise_of_both_halves(trained, sampling):
    head, z_of_class = trained
    zc, zu = z_of_class[0].expand(32, -1), z_of_class[1].expand(32, -1)

    def draw(z, w):
        return head.sample(z, sampling, w, torch.Generator().manual_seed(5))

    alone_c, alone_u = draw(zc, None), draw(zu, None)
    close = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(draw(torch.cat([zc, zc]), 1.0), alone_c, **close)  # identical halves, w = 1
    torch.testing.assert_close(draw(torch.cat([zc, zc]), 4.0), alone_c, **close)  # ... any w
    torch.testing.assert_close(draw(torch.cat([zc, zu]), 0.0), alone_u, **close)  # w = 0: the uncond half
    torch.testing.assert_close(draw(torch.cat([zc, zu]), 1.0), alone_c, **close)  # w = 1: the cond half
    assert not torch.allclose(draw(torch.cat([zc, zu]), 3.0), alone_c, atol=1e-2)  # guidance does something


@pytest.mark.parametrize("sampling", [DiffHeadSampling("ddpm", 20), DiffHeadSampling("dpm++", 10, 3)],
                         ids=["ddpm", "dpm++"])
def test_samples_follow_the_generator_seed(trained, sampling):
    head, z_of_class = trained
    z = z_of_class[torch.arange(10) % 2]
    a, b, c = (head.sample(z, sampling, None, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert a.shape == (10, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_head_runs_in_the_dtype_of_z_and_under_autocast(trained):
    head, z_of_class = trained
    z = z_of_class[torch.arange(16) % 2]
    ref = head.sample(z, DPM10, None, torch.Generator().manual_seed(3))
    x64 = copy.deepcopy(head).double().sample(z.double(), DPM10, None, torch.Generator().manual_seed(3))
    assert x64.dtype == torch.float64
    torch.testing.assert_close(x64.float(), ref, atol=1e-3, rtol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = head.sample(z, DPM10, None, torch.Generator().manual_seed(3))
        loss = head.loss(z, torch.randn(16, 2))
    assert xb.dtype == torch.float32 and torch.isfinite(xb).all()
    assert (xb - ref).abs().mean() < 0.2  # bf16 arithmetic, same draw
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()


def test_importing_the_head_does_not_import_diffusers():
    code = "import sys, isynth.diffhead; assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
