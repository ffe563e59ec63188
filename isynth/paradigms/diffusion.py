"""Flow-matching diffusion on the whole continuous token grid (`diffusion`; Kilian et al. 2024; SPEC 1.6).

Rectified flow (Liu et al. 2023; SD3, Esser et al. 2024): x_t = (1 - t) x_0 + t eps, the network predicts
the velocity v = eps - x_0, trained with MSE at t drawn uniformly or logit-normally (SD3's default, m = 0,
s = 1). The network is the shared backbone with adaLN-Zero conditioning on t + class (DiT); class dropout
trains the null class for CFG. Sampling integrates dx/dt = v from t = 1 to 0 with diffusers' flow-matching
Euler or Heun scheduler (deterministic: the sample is a function of the initial noise, which `isynth
pairs` relies on), with CFG constant or only on a t-interval (no unconditional pass outside it).
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from isynth.backbone import Transformer
from isynth.config import RunConfig, TokenizerConfig, check
from isynth.diffhead import FREQ_DIM, timestep_features
from isynth.embeddings import ClassEmbedding, learned_positions
from isynth.errors import IsynthError
from isynth.guidance import guide
from isynth.paradigms.base import FromNoise, Paradigm
from isynth.tokenizers import Tokenizer

NUM_TRAIN_TIMESTEPS = 1000  # diffusers' flow schedulers name times t * 1000; the time features use that scale


@dataclass(frozen=True)
class DiffusionConfig:
    class_dropout: float = 0.1                                       # null class for CFG (DiT: 0.1)
    time_sampling: Literal["logit-normal", "uniform"] = "logit-normal"  # SD3 sec. 3.1: logit-normal(0, 1)
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self):
        check(0 <= self.class_dropout < 1, "method.class_dropout must be in [0, 1)")
        check(self.logit_std > 0, "method.logit_std must be > 0")


@dataclass(frozen=True)
class DiffusionSampleConfig:
    sampler: Literal["euler", "heun"] = "heun"   # Heun: 2 evaluations per step but the last (EDM's choice)
    num_steps: int = 16                          # ODE steps; NFE = num_steps (Euler) or 2 num_steps - 1 (Heun)
    shift: float = 1.0                           # SD3's time shift t -> s t / (1 + (s - 1) t); 1 = uniform
    cfg_scale: float = 1.0                       # guidance weight; 1 = no unconditional pass
    cfg_t_min: float = 0.0                       # CFG only where the evaluated t is in (cfg_t_min, cfg_t_max]
    cfg_t_max: float = 1.0                       # (guidance interval, Kynkäänniemi et al. 2024)
    batch_size: int = 256

    def __post_init__(self):
        check(self.num_steps >= 1, "sample.num_steps must be >= 1")
        check(self.shift > 0, "sample.shift must be > 0")
        check(self.cfg_scale >= 0, "sample.cfg_scale must be >= 0")
        check(0 <= self.cfg_t_min < self.cfg_t_max <= 1,
              f"sample.cfg_t_min={self.cfg_t_min} and cfg_t_max={self.cfg_t_max} must satisfy 0 <= min < max <= 1")
        check(self.batch_size > 0, "sample.batch_size must be > 0")


def ode_scheduler(sampling: DiffusionSampleConfig):
    """A fresh diffusers flow-matching scheduler set to `sampling` (schedulers are stateful: copy a cached one)."""
    return copy.deepcopy(_scheduler_template(sampling.sampler, sampling.num_steps, sampling.shift))


@functools.lru_cache(maxsize=32)
def _scheduler_template(sampler: str, num_steps: int, shift: float):
    import diffusers  # lazy: importing diffusers takes seconds

    cls = diffusers.FlowMatchHeunDiscreteScheduler if sampler == "heun" else diffusers.FlowMatchEulerDiscreteScheduler
    s = cls(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
    s.set_timesteps(num_steps)
    s.set_begin_index(0)  # we always start at t = 1, so skip diffusers' timestep lookup
    return s


def ode_solve(velocity, x: Tensor, sampling: DiffusionSampleConfig) -> Tensor:
    """Integrate dx/dt = velocity(x, t, guided) from t = 1 (noise x) to t = 0 with the configured scheduler.
    `velocity` gets t as a Python float in [0, 1] and whether CFG applies at that t."""
    sched = ode_scheduler(sampling)
    for ts in sched.timesteps:
        t = float(ts) / NUM_TRAIN_TIMESTEPS
        guided = sampling.cfg_scale != 1.0 and sampling.cfg_t_min < t <= sampling.cfg_t_max
        x = sched.step(velocity(x, t, guided), ts, x, return_dict=False)[0]
    return x


class Diffusion(FromNoise, Paradigm):
    name = "diffusion"
    Config = DiffusionConfig
    SampleConfig = DiffusionSampleConfig
    discrete = False
    default_tokenizer = TokenizerConfig(kind="patch", patch_size=1)
    model_defaults = {"adaln": True}

    def __init__(self, run: RunConfig, tokenizer: Tokenizer, num_classes: int):
        super().__init__(run, tokenizer, num_classes)
        if not run.model.adaln:
            raise IsynthError("diffusion conditions every block on (t, class) by adaLN-Zero: set model.adaln=true")
        c, d = run.model.width, tokenizer.token_dim
        self.token_dim = d
        self.in_proj = nn.Linear(d, c)
        self.pos = learned_positions(self.seq_len, c)
        self.time_embed = nn.Sequential(nn.Linear(FREQ_DIM, c), nn.SiLU(), nn.Linear(c, c))
        self.class_embed = ClassEmbedding(num_classes, c, run.method.class_dropout)
        self.backbone = Transformer(run.model)
        self.out_proj = nn.Linear(c, d)
        nn.init.zeros_(self.out_proj.weight)  # DiT's zero-initialised final layer: v starts at 0
        nn.init.zeros_(self.out_proj.bias)

    def velocity(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """x (B, N, D) at times t (B,) in [0, 1], labels (B,) (null = num_classes) -> v (B, N, D)."""
        cond = self.time_embed(timestep_features(t * NUM_TRAIN_TIMESTEPS)) + self.class_embed(labels)  # (B, C)
        h = self.backbone(self.in_proj(x) + self.pos, cond)
        return self.out_proj(h)

    def sample_times(self, batch: int, device) -> Tensor:
        m = self.run.method
        if m.time_sampling == "uniform":
            return torch.rand(batch, device=device)
        return torch.sigmoid(m.logit_mean + m.logit_std * torch.randn(batch, device=device))

    def loss(self, tokens: Tensor, labels: Tensor) -> Tensor:
        x0 = tokens.float()  # (B, N, D)
        t = self.sample_times(x0.shape[0], x0.device)
        eps = torch.randn_like(x0)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        return F.mse_loss(self.velocity(xt, t, labels).float(), eps - x0)

    @torch.no_grad()
    def sample_from(self, noise: Tensor, labels: Tensor, sampling: DiffusionSampleConfig | None = None) -> Tensor:
        """The deterministic map noise (B, N, D) -> tokens (B, N, D): the teacher of `isynth pairs`."""
        s = self.sampling_or_default(sampling)
        null = torch.full_like(labels, self.class_embed.null)

        def velocity(x: Tensor, t: float, guided: bool) -> Tensor:
            if not guided:
                return self.velocity(x, torch.full(labels.shape, t, device=x.device), labels).float()
            tt = torch.full((2 * x.shape[0],), t, device=x.device)
            v = self.velocity(torch.cat([x, x]), tt, torch.cat([labels, null])).float()
            cond, uncond = v.chunk(2)
            return guide(cond, uncond, s.cfg_scale)

        return ode_solve(velocity, noise.float(), s)

    # --- compute accounting (SPEC 2) ------------------------------------------------------------------
    def forward_flops(self, train: bool = False) -> int:
        """One velocity evaluation for one sample: token projections, the time MLP (one row), backbone."""
        n, d, c = self.seq_len, self.token_dim, self.run.model.width
        # Layers reading an input that needs no gradient (noisy tokens, time features) have no input-gradient
        # matmul in the backward pass: 2x forward, not 3x.
        first = 2 * n * d * c + 2 * FREQ_DIM * c   # in_proj, time MLP layer 1
        rest = 2 * n * c * d + 2 * c * c           # out_proj, time MLP layer 2
        return self.backbone.flops(n, train=train) + (2 * first + 3 * rest if train else first + rest)

    def train_flops_per_sample(self) -> int:
        return self.forward_flops(train=True)

    def _evaluations(self, sampling: DiffusionSampleConfig) -> list[bool]:
        """Per network call, whether it is guided (two rows per image)."""
        guided = []
        ode_solve(lambda x, t, g: guided.append(g) or torch.zeros_like(x), torch.zeros(1, 1, 1), sampling)
        return guided

    def sample_flops(self, sampling: DiffusionSampleConfig | None = None) -> int:
        evals = self._evaluations(self.sampling_or_default(sampling))
        return sum(2 if g else 1 for g in evals) * self.forward_flops()

    def num_network_evals(self, sampling: DiffusionSampleConfig | None = None) -> int:
        return len(self._evaluations(self.sampling_or_default(sampling)))

    def unconditional_passes(self, sampling: DiffusionSampleConfig | None = None) -> int:
        return sum(self._evaluations(self.sampling_or_default(sampling)))
