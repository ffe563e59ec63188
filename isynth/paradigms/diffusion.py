"""Flow-matching diffusion on the whole continuous token grid (`diffusion`; the diffusion paradigm of
Kilian et al. 2024, "Computational Tradeoffs in Image Synthesis").

Rectified flow (Liu et al. 2023; SD3, Esser et al. 2024): x_t = (1 - t) x_0 + t eps, the network predicts
the velocity v = eps - x_0, trained with MSE at t drawn uniformly or logit-normally (SD3's default, m = 0,
s = 1). The network is the shared backbone with adaLN-Zero conditioning on t + class (DiT); class dropout
trains the null class for CFG. Sampling integrates dx/dt = v from t = 1 to 0 with Euler's method or Heun's
(EDM, Karras et al. 2022, Algorithm 1, without churn), written out below: it is deterministic, so the sample is
a function of the initial noise, which `isynth pairs` relies on. CFG is constant or follows a schedule of
progress 1 - t, and runs only on the guidance interval (no unconditional pass outside it).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from isynth.backbone import Transformer
from isynth.conditions import Conditions
from isynth.config import RunConfig, check
from isynth.embeddings import ClassEmbedding, TimestepEmbedder, learned_positions
from isynth.errors import IsynthError
from isynth.flops import matmul_flops
from isynth.graphs import weights_key
from isynth.guidance import Guidance, guide
from isynth.paradigms.base import FromNoise
from isynth.tokenizers.base import Tokenizer

TIME_SCALE = 1000  # the time embedding reads t * 1000, the scale of DiT's and SD3's 1000 training timesteps


@dataclass(frozen=True)
class DiffusionConfig:
    class_dropout: float = 0.1                                       # null class for CFG (DiT: 0.1)
    class_cond: bool = True          # false: unconditional, every label read as the null class (GET's teacher)
    time_sampling: Literal["logit-normal", "uniform"] = "logit-normal"  # SD3 sec. 3.1: logit-normal(0, 1)
    logit_mean: float = 0.0                 # logit-normal time sampling: mean (SD3)
    logit_std: float = 1.0                  # logit-normal time sampling: standard deviation

    def __post_init__(self):
        check(0 <= self.class_dropout < 1, "method.class_dropout must be in [0, 1)")
        check(self.logit_std > 0, "method.logit_std must be > 0")


@dataclass(frozen=True)
class DiffusionSampling:
    sampler: Literal["euler", "heun"] = "heun"   # Heun: 2 evaluations per step but the last (EDM's choice)
    num_steps: int = 16                          # ODE steps; NFE = num_steps (Euler) or 2 num_steps - 1 (Heun)
    shift: float = 1.0                           # SD3's time shift t -> s t / (1 + (s - 1) t); 1 = uniform
    guidance: Guidance = field(default_factory=Guidance)  # progress: 1 - t
    batch_size: int = 256                   # images per sampling batch
    cuda_graphs: bool = True          # replay each step's network call from a CUDA graph (on CUDA; isynth.graphs)

    def __post_init__(self):
        check(self.num_steps >= 1, "sample.num_steps must be >= 1")
        check(self.shift > 0, "sample.shift must be > 0")
        check(self.batch_size > 0, "sample.batch_size must be > 0")


def flow_times(num_steps: int, shift: float) -> list[float]:
    """The time grid t_0 = 1 > ... > t_{K-1} > t_K = 0 of K steps, as SD3's reference sampler and diffusers'
    FlowMatch schedulers build it: K times evenly spaced from 1 to the shifted last training timestep
    sigma(1 / 1000), each then shifted by sigma(t) = s t / (1 + (s - 1) t); then 0. Float32 values."""
    def sigma(t):
        return shift * t / (1 + (shift - 1) * t)

    t = torch.linspace(1.0, sigma(torch.tensor(1.0 / TIME_SCALE, dtype=torch.float32)).item(), num_steps,
                       dtype=torch.float64)
    return sigma(t).float().tolist() + [0.0]


def evaluation_times(sampling: DiffusionSampling) -> list[float]:
    """The time of every network evaluation of `solve`, in order: each step's start, and for Heun each
    step's end but the last (t = 0, where the Euler step is final)."""
    t = flow_times(sampling.num_steps, sampling.shift)
    if sampling.sampler == "euler":
        return t[:-1]
    return [t[0]] + [u for u in t[1:-1] for _ in range(2)]


def solve(velocity: Callable[[Tensor, float], Tensor], x: Tensor, sampling: DiffusionSampling) -> Tensor:
    """Integrate dx/dt = velocity(x, t) from t = 1 (noise x) to t = 0: Euler, or Heun's second-order
    correction with the slope at the step's end (EDM Algorithm 1, lines 5-8)."""
    t = flow_times(sampling.num_steps, sampling.shift)
    for t_cur, t_next in zip(t[:-1], t[1:]):
        d = velocity(x, t_cur)
        x_next = x + (t_next - t_cur) * d
        if sampling.sampler == "heun" and t_next > 0:
            x_next = x + (t_next - t_cur) * 0.5 * (d + velocity(x_next, t_next))
        x = x_next
    return x


class Diffusion(FromNoise[DiffusionConfig, DiffusionSampling]):
    name = "diffusion"
    model_defaults = {"adaln": True}

    @classmethod
    def sections(cls, discrete: bool) -> tuple[DiffusionConfig, DiffusionSampling]:
        return DiffusionConfig(), DiffusionSampling()

    def __init__(self, run: RunConfig[DiffusionConfig, DiffusionSampling], tokenizer: Tokenizer,
                 conditions: Conditions):
        super().__init__(run, tokenizer, conditions)
        if not run.model.adaln:
            raise IsynthError("diffusion conditions every block on (t, class) by adaLN-Zero: set model.adaln=true")
        if not run.method.class_cond and run.sample.guidance.on:
            raise IsynthError("an unconditional model (method.class_cond=false) has nothing to guide: set "
                              "sample.guidance.scale=1")
        c, d = run.model.width, tokenizer.token_dim
        self.in_proj = nn.Linear(d, c)
        self.pos = learned_positions(self.seq_len, c)
        self.time_embed = TimestepEmbedder(c)
        self.class_embed = ClassEmbedding(conditions, c, run.method.class_dropout)
        self.backbone = Transformer(run.model)
        self.out_proj = nn.Linear(c, d)
        nn.init.zeros_(self.out_proj.weight)  # DiT's zero-initialised final layer: v starts at 0
        nn.init.zeros_(self.out_proj.bias)

    def velocity(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """x (B, N, D) at times t (B,) in [0, 1], labels (B,) (null = num_classes) -> v (B, N, D)."""
        if not self.run.method.class_cond:
            labels = torch.full_like(labels, self.class_embed.null)
        cond = self.time_embed(t * TIME_SCALE) + self.class_embed(labels)  # (B, C)
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
    def sample_from(self, noise: Tensor, labels: Tensor, sampling: DiffusionSampling) -> Tensor:
        """The deterministic map noise (B, N, D) -> tokens (B, N, D): the teacher of `isynth pairs`."""
        null = torch.full_like(labels, self.class_embed.null)

        def velocity(x: Tensor, t: float) -> Tensor:
            w = sampling.guidance.weight(1 - t, t)
            if w is None:  # a copy: Heun keeps the slope while the next evaluation replays the graph
                tt = torch.full(labels.shape, t, device=x.device)
                return self.graphs.run("velocity", self.velocity, x, tt, labels,
                                       weights=weights_key(self)).to(torch.float32, copy=True)
            tt = torch.full((2 * x.shape[0],), t, device=x.device)
            v = self.graphs.run("velocity", self.velocity, torch.cat([x, x]), tt, torch.cat([labels, null]),
                                weights=weights_key(self))
            cond, uncond = v.float().chunk(2)
            return guide(cond, uncond, w)

        return solve(velocity, noise.float(), sampling)

    # --- compute accounting ---------------------------------------------------------------------------
    def forward_flops(self, train: bool = False) -> int:
        """One velocity evaluation for one sample: token projections, the time MLP (one row), backbone.
        The input projection reads noisy tokens, which need no gradient."""
        n, d, c = self.seq_len, self.token_dim, self.run.model.width
        return (self.backbone.flops(n, train=train) + matmul_flops(n, d, c, train, input_grad=False)
                + self.time_embed.flops(1, train) + matmul_flops(n, c, d, train))

    def train_flops_per_sample(self) -> int:
        return self.forward_flops(train=True)

    def _guided(self, sampling: DiffusionSampling) -> list[bool]:
        """Per network evaluation, whether it is guided (two rows per image)."""
        return [sampling.guidance.weight(1 - t, t) is not None for t in evaluation_times(sampling)]

    def sample_flops(self, sampling: DiffusionSampling) -> int:
        return sum(2 if g else 1 for g in self._guided(sampling)) * self.forward_flops()

    def num_network_evals(self, sampling: DiffusionSampling) -> int:
        return len(evaluation_times(sampling))

    def unconditional_passes(self, sampling: DiffusionSampling) -> int:
        return sum(self._guided(sampling))
