"""The per-token diffusion loss head of MAR (Li et al. 2024, "Autoregressive Image Generation without
Vector Quantization", sec. 3), shared by every continuous-token paradigm.

The transformer produces one vector z per token; a small MLP denoiser eps(x_t | t, z) models the
distribution of the continuous token x given z. Training is the DDPM eps-loss on a 1000-step cosine
schedule (Nichol & Dhariwal 2021), with `diffusion_batch_mul` independent (t, noise) draws per z (MAR
sec. 3.2: more draws per forward pass of the transformer). The network is MAR's SimpleMLPAdaLN: residual
blocks LN -> adaLN modulate -> Linear-SiLU-Linear -> gated residual, conditioned on time embedding + z,
adaLN-Zero initialised so the head starts by predicting eps = 0; it predicts eps only (no learned variance).

Sampling: respaced ancestral DDPM (MAR, 100 steps; temperature scales the noise term), or diffusers'
single-step DPM-Solver++ of order 3 with ~8-14 steps (eMIGM, You et al. 2025). Classifier-free guidance
happens inside the head: conditional and unconditional z share x_t at every step and
eps = eps_u + w (eps_c - eps_u) (MAR).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from isynth.config import check
from isynth.embeddings import TimestepEmbedder
from isynth.flops import matmul_flops
from isynth.graphs import StepGraphs, weights_key
from isynth.guidance import guide
from isynth.layers import init_weights, modulate, zero_init
from isynth.schedulers import fresh_scheduler

NUM_TRAIN_STEPS = 1000  # the discrete training schedule (MAR, eMIGM)


def cosine_alphas_cumprod(dtype: torch.dtype = torch.float32) -> Tensor:
    """alpha_bar (1000,) of the cosine schedule (Nichol & Dhariwal 2021, eq. 17) with betas capped at 0.999,
    as in MAR: diffusers' `squaredcos_cap_v2`, which DPM-Solver++ uses (equality is tested)."""
    f = [math.cos((i / NUM_TRAIN_STEPS + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(NUM_TRAIN_STEPS + 1)]
    betas = torch.tensor([min(1 - f[i + 1] / f[i], 0.999) for i in range(NUM_TRAIN_STEPS)], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).to(dtype)


# Both samplers start at T_MAX, the largest t with logSNR >= LOGSNR_MIN, not at t = 999: the 0.999 cap makes
# abar_999 tiny, where x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) turns an eps error d into 2e4 d; below
# logSNR ~ -4 a small trained head's eps error exceeds the signal. The measurements are in BENCHMARKS.md.
LOGSNR_MIN = -3.0
_ABAR = cosine_alphas_cumprod(torch.float64).tolist()  # the DDPM sampler's coefficients, in float64
T_MAX = max(t for t, a in enumerate(_ABAR) if math.log(a / (1 - a)) / 2 >= LOGSNR_MIN)


@dataclass(frozen=True)
class DiffHeadConfig:
    """The head's network: `method.head` of every paradigm with continuous tokens."""

    width: int = 256                # MLP width (MAR-B 1024, L 1280, H 1536)
    depth: int = 3                  # residual blocks (MAR-B 6, L 8, H 12)
    diffusion_batch_mul: int = 4    # independent (t, noise) draws per conditioning vector (MAR: 4)

    def __post_init__(self):
        check(self.width > 0, "method.head.width must be > 0")
        check(self.depth > 0, "method.head.depth must be > 0")
        check(self.diffusion_batch_mul > 0, "method.head.diffusion_batch_mul must be > 0")


@dataclass(frozen=True)
class DiffHeadSampling:
    """How a continuous token is drawn from the head: `sample.head`."""

    sampler: Literal["ddpm", "dpm++"] = "ddpm" # DDPM ancestral (MAR) or DPM-Solver++ (eMIGM)
    steps: int = 100                # DDPM: respaced steps (MAR 100); DPM-Solver++: 8-14 (eMIGM)
    order: int = 3                  # DPM-Solver++ order (eMIGM: 3, single-step)
    temperature: float = 1.0        # scales DDPM's noise (MAR); the ODE solver has no noise term to scale

    def __post_init__(self):
        # At most one step per timestep from T_MAX down (more would repeat timesteps).
        check(1 <= self.steps <= T_MAX, f"sample.head.steps must be in [1, {T_MAX}]")
        check(self.order in (2, 3), "sample.head.order must be 2 or 3")
        check(self.temperature > 0, "sample.head.temperature must be > 0")


class _Block(nn.Module):
    def __init__(self, w: int):
        super().__init__()
        self.norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(w, w), nn.Linear(w, w)
        self.modulation = nn.Linear(w, 3 * w)

    def forward(self, h: Tensor, silu_c: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(silu_c).chunk(3, dim=-1)  # 3 x (R, W)
        return h + gate * self.fc2(F.silu(self.fc1(modulate(self.norm(h), shift, scale))))


class _Denoiser(nn.Module):
    """MAR's SimpleMLPAdaLN: eps(x_t | t, c), given c's projection `cond` (R, W) computed by the caller."""

    def __init__(self, token_dim: int, w: int, depth: int):
        super().__init__()
        self.input_proj = nn.Linear(token_dim, w)
        self.time_embed = TimestepEmbedder(w)
        self.blocks = nn.ModuleList(_Block(w) for _ in range(depth))
        self.final_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(w, 2 * w)
        self.out_proj = nn.Linear(w, token_dim)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """x (R, D) noisy tokens, t (R,) timesteps or (1,) for all rows, cond (R, W). Returns eps (R, D)."""
        c = self.time_embed(t, cond.dtype) + cond  # (R, W); a (1, W) time row broadcasts
        silu_c = F.silu(c)
        h = self.input_proj(x.to(cond.dtype))  # runs in the dtype of z (or of autocast)
        for blk in self.blocks:
            h = blk(h, silu_c)
        shift, scale = self.final_modulation(silu_c).chunk(2, dim=-1)  # 2 x (R, W)
        return self.out_proj(modulate(self.final_norm(h), shift, scale))


class DiffusionHead(nn.Module):
    """Models p(x | z) of a token x (token_dim) given the transformer output z (cond_width)."""

    def __init__(self, cond_width: int, token_dim: int, cfg: DiffHeadConfig):
        super().__init__()
        self.cfg, self.cond_width, self.token_dim, self.width = cfg, cond_width, token_dim, cfg.width
        self.cond_proj = nn.Linear(cond_width, cfg.width)
        self.net = _Denoiser(token_dim, cfg.width, cfg.depth)
        self.apply(init_weights)
        # adaLN-Zero: identity blocks, eps = 0 at the start
        zero_init(*[blk.modulation for blk in self.net.blocks], self.net.final_modulation, self.net.out_proj)
        # Non-persistent: fixed by the schedule, kept out of checkpoints, follows .to(device).
        self.register_buffer("alphas_cumprod", cosine_alphas_cumprod(), persistent=False)
        self.graphs = StepGraphs()  # each sampling step's denoiser call, graphed (isynth.graphs)

    def loss(self, z: Tensor, target: Tensor) -> Tensor:
        """Per-token eps-MSE (M,) for z (M, cond_width) and clean tokens (M, token_dim); uses the global RNG."""
        m, mul = z.shape[0], self.cfg.diffusion_batch_mul
        cond = self.cond_proj(z).repeat(mul, 1)  # (mul*M, W): project the M rows once, then repeat
        x0 = target.float().repeat(mul, 1)  # (mul*M, D); row r belongs to token r % M
        t = torch.randint(0, NUM_TRAIN_STEPS, (mul * m,), device=z.device)
        noise = torch.randn_like(x0)
        abar = self.alphas_cumprod[t].float().unsqueeze(1)  # (mul*M, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        mse = (self.net(x_t, t, cond).float() - noise).pow(2).mean(-1)  # (mul*M,)
        return mse.view(mul, m).mean(0)  # (M,)

    @torch.no_grad()
    def sample(self, z: Tensor, sampling: DiffHeadSampling, cfg_weight: float | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Tokens (B, token_dim) in z's dtype. z is (B, C), or (2B, C) = [conditional; unconditional] when
        cfg_weight is given. Both samplers start from x_T ~ N(0, I) at t = T_MAX (see LOGSNR_MIN)."""
        if cfg_weight is not None and z.shape[0] % 2:
            raise ValueError("with cfg_weight, z must stack conditional and unconditional rows (2B, C)")
        cond = self.cond_proj(z)  # (R, W): once per call, not per step
        b = z.shape[0] if cfg_weight is None else z.shape[0] // 2
        x = torch.randn(b, self.token_dim, generator=generator, device=z.device)  # x_T; float32 solver state
        if sampling.sampler == "ddpm":
            ts = ddpm_timesteps(sampling.steps)
            for t, prev in zip(ts, ts[1:] + [-1]):
                noise = torch.randn(x.shape, generator=generator, device=x.device)
                x = ddpm_step(t, prev, x, self._eps(x, t, cond, cfg_weight), sampling.temperature * noise)
        else:  # an ODE solver: there is no noise term for temperature to scale, so it is ignored (as in eMIGM)
            solver = dpm_solver(sampling.steps, sampling.order)
            for t in solver.timesteps.tolist():
                x = solver.step(self._eps(x, t, cond, cfg_weight), t, x).prev_sample
        return x.to(z.dtype)

    def _eps(self, x: Tensor, t: int, cond: Tensor, cfg_weight: float | None) -> Tensor:
        """Guided eps (B, D) at timestep t for x (B, D); cond is (B, W), or (2B, W) with cfg_weight."""
        t_row = torch.full((1,), t, device=x.device)  # the time embedding is the same for every row
        if cfg_weight is None:
            # a copy: multistep solvers keep past outputs, and the next replay overwrites the graph's buffer
            eps = self.graphs.run("eps", self.net, x, t_row, cond, weights=weights_key(self))
            return eps.to(torch.float32, copy=True)
        eps = self.graphs.run("eps", self.net, torch.cat([x, x]), t_row, cond, weights=weights_key(self))
        eps_c, eps_u = eps.float().chunk(2)  # 2 x (B, D); one x_t (MAR)
        return guide(eps_c, eps_u, cfg_weight)

    # FLOPs: `matmul_flops` per Linear; in training a layer reading noisy tokens or time features has no
    # input gradient.
    def _denoiser_flops(self, rows: int, time_rows: int, train: bool) -> int:
        """One denoiser evaluation on `rows` rows, with the time embedding computed for `time_rows` rows."""
        w, d = self.width, self.token_dim
        block = matmul_flops(rows, w, 3 * w, train) + 2 * matmul_flops(rows, w, w, train)
        return (matmul_flops(rows, d, w, train, input_grad=False) + self.net.time_embed.flops(time_rows, train)
                + self.cfg.depth * block + matmul_flops(rows, w, 2 * w, train) + matmul_flops(rows, w, d, train))

    def train_flops(self, num_tokens: int) -> int:
        """Forward + backward FLOPs of `loss` on num_tokens tokens whose z requires grad."""
        rows = num_tokens * self.cfg.diffusion_batch_mul
        return self._denoiser_flops(rows, rows, True) + matmul_flops(num_tokens, self.cond_width, self.width, True)

    def sample_flops(self, num_tokens: int, sampling: DiffHeadSampling, cfg: bool) -> int:
        """FLOPs of one `sample` call generating num_tokens tokens (twice the rows with CFG): cond_proj
        once, then one denoiser evaluation per step, for both samplers (tested)."""
        rows = num_tokens * (2 if cfg else 1)
        return matmul_flops(rows, self.cond_width, self.width) + sampling.steps * self._denoiser_flops(rows, 1, False)


def ddpm_timesteps(steps: int, t_max: int = T_MAX) -> list[int]:
    """`steps` respaced timesteps, evenly spaced from t_max down, "trailing" (Lin et al. 2024, Table 2):
    the last is ~t_max / steps, and the step from it ends on clean data."""
    return [int((t_max + 1) * (1 - i / steps) + 0.5) - 1 for i in range(steps)]


def ddpm_step(t: int, prev: int, x: Tensor, eps: Tensor, noise: Tensor) -> Tensor:
    """Ancestral DDPM step t -> prev (-1: clean data) on the respaced schedule: a draw from the posterior
    q(x_prev | x_t, x0) at the x0 predicted from eps (Ho et al. 2020, eq. 6-7), whose variance is the
    respaced beta-tilde (Nichol & Dhariwal 2021, sec. 4). `noise` is N(0, I) times the temperature."""
    a_t, a_p = _ABAR[t], (_ABAR[prev] if prev >= 0 else 1.0)
    beta = 1 - a_t / a_p  # beta of the respaced step
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    mean = (math.sqrt(a_p) * beta * x0 + math.sqrt(1 - beta) * (1 - a_p) * x) / (1 - a_t)
    return mean + math.sqrt(beta * (1 - a_p) / (1 - a_t)) * noise


def dpm_solver(steps: int, order: int):
    """diffusers' single-step DPM-Solver++ on the discrete cosine schedule, eps-prediction, time-uniform steps
    (eMIGM spaces by logSNR; with integer timesteps diffusers' logSNR-like spacings repeat t near 999 and
    fail). lower_order_final=True is what diffusers forces anyway with its final sigma of zero; it starts at
    T_MAX too (tested)."""
    return fresh_scheduler("DPMSolverSinglestepScheduler", steps, num_train_timesteps=NUM_TRAIN_STEPS,
                           beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                           algorithm_type="dpmsolver++", solver_order=order, lower_order_final=True,
                           lambda_min_clipped=LOGSNR_MIN)
