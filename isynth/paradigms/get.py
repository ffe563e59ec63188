"""GET, the Generative Equilibrium Transformer (`get`; Geng et al. 2023, "One-Step Diffusion Distillation via
Deep Equilibrium Models"; the authors' code: locuslab/get).

A one-step generator distilled from a teacher's (noise, image) pairs (`isynth pairs`). The noise image's
tokens are embedded with fixed sine-cosine positions and run through an injection transformer (the
shared backbone, the class embedding added into every block's qkv); a bias-free linear map turns its
output into one injection u_l per equilibrium block, added (with the class) to that block's qkv. The equilibrium
transformer f(z) = blocks(z; u) (wide MLPs) is solved for z* = f(z*) by fixed-point iteration from z = 0
with `torchdeq`: training runs `train_solver_iters` iterations without gradient, then `grad_steps`
unrolled iterations with gradient (phantom gradient, Geng et al. 2021), and the L1 loss to the teacher
image is applied to every unrolled state with TorchDEQ's exponential weights (fixed-point correction).
Sampling is one pass: the injection once, `fixed_point_iters` iterations, the output layer once.

The blocks are residual and un-normalised (reference: `--norm_type none`), so f need not be contractive:
on trained models the state z grows by a near-constant step per iteration while its direction, and so the
LayerNorm-ed output, converges (relative residual ~ 1/k; tests/test_get.py measures both).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torchdeq import get_deq
from torchdeq.loss import fp_correction

from isynth.backbone import Transformer
from isynth.conditions import Conditions
from isynth.config import RunConfig, check
from isynth.embeddings import ClassEmbedding, sincos_positions
from isynth.errors import IsynthError
from isynth.flops import matmul_flops
from isynth.graphs import weights_key
from isynth.pairformat import check_pairs_fit, load_pairs, read_manifest
from isynth.paradigms.base import FromNoise
from isynth.tokenizers.base import Tokenizer


@dataclass(frozen=True)
class GETConfig:
    pairs: str | None = None        # pair directory from `isynth pairs` (required to train)
    shuffle_pairs: bool = False     # control (GET sec. 5): re-pair noise and images at random
    shuffle_seed: int = 0                   # the re-pairing permutation of shuffle_pairs
    class_cond: bool = True         # class embedding added into the injection blocks' qkv
    deq_depth: int = 3              # equilibrium blocks (GET: 3)
    deq_mlp_ratio: float = 6.0      # their MLP ratio (GET: 6-16)
    train_solver_iters: int = 0     # fixed-point iterations without gradient before the unrolled ones (run.sh: 0)
    grad_steps: int = 6             # unrolled phantom-gradient iterations (run.sh: --grad 6)
    fp_correction: bool = True      # loss on every unrolled state (TorchDEQ 'exp' weights), else the last only
    loss: Literal["l1", "l2"] = "l1"        # distance to the teacher's image (GET: L1)
    # The authors' code (locuslab/get, models/get.py) starts the equilibrium state from randn_like and feeds
    # qkv_inj the injection transformer's output without its final LayerNorm; isynth's defaults (zeros, with
    # the norm) are the lighter variant measured in BENCHMARKS.md, `noise` / false match the reference.
    state_init: Literal["zeros", "noise"] = "zeros"
    inject_norm: bool = True                # normalise features before the injection map (the reference does not)

    def __post_init__(self):
        check(self.deq_depth >= 1, "method.deq_depth must be >= 1")
        check(self.deq_mlp_ratio > 0, "method.deq_mlp_ratio must be > 0")
        check(self.train_solver_iters >= 0, "method.train_solver_iters must be >= 0")
        check(self.grad_steps >= 1, "method.grad_steps must be >= 1")


@dataclass(frozen=True)
class GETSampling:
    fixed_point_iters: int = 6      # solver iterations in the one sampling pass (GET eval: 6)
    # which iterate is the sample: false = the one of smallest residual |f(z) - z| (torchdeq's fixed_point_iter
    # default, which the authors' eval uses), true = the state after exactly fixed_point_iters iterations
    return_final: bool = False
    batch_size: int = 256                   # images per sampling batch
    cuda_graphs: bool = True          # replay each step's network call from a CUDA graph (on CUDA; isynth.graphs)

    def __post_init__(self):
        check(self.fixed_point_iters >= 1, "sample.fixed_point_iters must be >= 1")
        check(self.batch_size > 0, "sample.batch_size must be > 0")


class GET(FromNoise[GETConfig, GETSampling]):
    name = "get"
    guided = False  # one pass, no classifier-free guidance (as the paper)

    @classmethod
    def sections(cls, discrete: bool) -> tuple[GETConfig, GETSampling]:
        return GETConfig(), GETSampling()

    def __init__(self, run: RunConfig[GETConfig, GETSampling], tokenizer: Tokenizer, conditions: Conditions):
        super().__init__(run, tokenizer, conditions)
        if run.model.adaln:
            raise IsynthError("get conditions through qkv, not adaLN: set model.adaln=false")
        m, c, d = run.method, run.model.width, tokenizer.token_dim
        self.in_proj = nn.Linear(d, c)
        self.register_buffer("pos", sincos_positions(tokenizer.grid, c), persistent=False)
        self.class_qkv = ClassEmbedding(conditions, 3 * c, 0.0, init_std=None) if m.class_cond else None
        self.injection = Transformer(run.model)
        if not m.inject_norm:  # the reference feeds qkv_inj the blocks' output as it is: no unused norm
            self.injection.norm = nn.Identity()
        self.qkv_inj = nn.Linear(c, 3 * c * m.deq_depth, bias=False)
        self.equilibrium = Transformer(dataclasses.replace(run.model, depth=m.deq_depth, mlp_ratio=m.deq_mlp_ratio))
        # PyTorch's default initialisation, not the reference's zero init, which slowed learning at this scale
        # (BENCHMARKS.md). f_tol=0: every solve runs its full iteration count, the cost accounted for.
        self.out_proj = nn.Linear(c, d)
        self.deq = get_deq(f_solver="fixed_point_iter", f_max_iter=m.train_solver_iters, f_tol=0.0,
                           grad=m.grad_steps, sup_gap=1 if m.fp_correction else -1,
                           eval_f_max_iter=run.sample.fixed_point_iters)

    # --- data ---------------------------------------------------------------------------------------
    def _pairs_dir(self) -> str:
        if self.run.method.pairs is None:
            raise IsynthError("get trains on teacher pairs: set method.pairs=DIR (make them with "
                              "`isynth pairs TEACHER_RUN --num-pairs N --out DIR`)")
        return self.run.method.pairs

    def _check_fit(self, manifest: dict, dataset) -> None:
        check_pairs_fit(manifest, self.run.method.pairs, self.seq_len, self.token_dim, dataset.image_shape)

    def validate_training(self, dataset) -> None:
        self._check_fit(read_manifest(self._pairs_dir()), dataset)

    def training_data(self, dataset) -> tuple[Tensor, Tensor]:
        """(noise ++ target (P, N, 2D), labels (P,)); with shuffle_pairs the images (and their labels) are
        permuted against the noise, which destroys the teacher's pairing but keeps both marginals."""
        p = load_pairs(self._pairs_dir())
        self._check_fit(p.manifest, dataset)
        target, labels = p.target, p.labels
        if self.run.method.shuffle_pairs:
            perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.run.method.shuffle_seed))
            target, labels = target[perm], labels[perm]
        return torch.cat([p.noise, target], dim=-1), labels

    # --- network ------------------------------------------------------------------------------------
    def _injections(self, noise: Tensor, labels: Tensor) -> list[Tensor]:
        """noise (B, N, D) -> per-equilibrium-block qkv injections, each (B, N, 3C)."""
        cls = self.class_qkv(labels)[:, None] if self.class_qkv is not None else None  # (B, 1, 3C)
        h = self.injection(self.in_proj(noise) + self.pos, qkv_add=cls)
        u = self.qkv_inj(h).chunk(self.run.method.deq_depth, dim=-1)
        return [ui + cls for ui in u] if cls is not None else list(u)  # the class enters every qkv (reference)

    def _solve(self, noise: Tensor, labels: Tensor, iters: int | None = None,
               generator: torch.Generator | None = None, return_final: bool = False) -> list[Tensor]:
        """Equilibrium states (B, N, C): every unrolled state in training, [z*] in eval mode. The state starts
        at zeros, or (state_init=noise) at Gaussian noise drawn from `generator`."""
        u = self._injections(noise, labels)
        eq = lambda z, *u: self.equilibrium(z, qkv_add=list(u), final_norm=False)  # noqa: E731
        # each solver iteration's network call, graphed when sampling (isynth.graphs; a plain call in training),
        # copied out of the graph's buffer because the solver keeps past iterates
        f = lambda z: self.graphs.run("equilibrium", eq, z, *u, weights=weights_key(self)).clone()  # noqa: E731
        shape = (noise.shape[0], self.seq_len, self.run.model.width)
        z0 = torch.zeros(shape, device=noise.device, dtype=u[0].dtype) if self.run.method.state_init == "zeros" \
            else torch.randn(shape, generator=generator, device=noise.device).to(u[0].dtype)
        solver = {} if iters is None else {"f_max_iter": iters}
        if return_final:  # passed to torchdeq's solver, which otherwise keeps the lowest-residual iterate
            solver["return_final"] = True
        states, _ = self.deq(f, z0, **({"solver_kwargs": solver} if solver else {}))
        return states

    def _output(self, z: Tensor) -> Tensor:
        return self.out_proj(self.equilibrium.final(z))  # (B, N, D)

    def loss(self, tokens: Tensor, labels: Tensor) -> Tensor:
        noise, target = tokens.float().split(self.token_dim, dim=-1)  # 2 x (B, N, D)
        preds = [self._output(z).float() for z in self._solve(noise, labels)]
        crit = (lambda a, b: (a - b).abs().mean()) if self.run.method.loss == "l1" else \
            (lambda a, b: (a - b).pow(2).mean())
        return fp_correction(crit, (preds, target))

    @torch.no_grad()
    def sample(self, labels: Tensor, sampling: GETSampling, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(labels.shape[0], self.seq_len, self.token_dim, generator=generator, device=labels.device)
        return self.sample_from(noise, labels, sampling, generator)

    @torch.no_grad()
    def sample_from(self, noise: Tensor, labels: Tensor, sampling: GETSampling,
                    generator: torch.Generator | None = None) -> Tensor:
        """noise (B, N, D) -> tokens; with state_init=noise the initial state is drawn from `generator` too."""
        s = sampling
        was_training = self.training
        self.eval()
        try:
            (z,) = self._solve(noise.float(), labels, iters=s.fixed_point_iters, generator=generator,
                               return_final=s.return_final)
        finally:
            self.train(was_training)
        return self._output(z).float()

    # --- compute accounting ---------------------------------------------------------------------------
    def _flops(self, iters_no_grad: int, iters_grad: int, outputs: int) -> int:
        """Injection once, solver iterations without and with gradient, the output layer `outputs` times;
        the input projection reads noise, which needs no gradient."""
        n, d, c, m = self.seq_len, self.token_dim, self.run.model.width, self.run.method
        train = iters_grad > 0
        total = (self.injection.flops(n, train=train) + matmul_flops(n, d, c, train, input_grad=False)
                 + matmul_flops(n, c, 3 * c * m.deq_depth, train)
                 + iters_no_grad * self.equilibrium.flops(n, final=False)
                 + outputs * matmul_flops(n, c, d, train))
        if train:  # torchdeq's unrolled iterations start from a state that requires grad (counted in full)
            total += iters_grad * self.equilibrium.flops(n, train=True, final=False)
        return total

    def train_flops_per_sample(self) -> int:
        m = self.run.method
        return self._flops(m.train_solver_iters, m.grad_steps, m.grad_steps if m.fp_correction else 1)

    def sample_flops(self, sampling: GETSampling) -> int:
        return self._flops(sampling.fixed_point_iters, 0, 1)

    def num_network_evals(self, sampling: GETSampling) -> int:
        return 1  # one pass; its fixed-point iterations are in sample_flops

    def unconditional_passes(self, sampling: GETSampling) -> int:
        return 0
