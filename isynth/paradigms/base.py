"""The contract every paradigm implements.

A paradigm owns its corruption / ordering / noise and its input and output layers, and takes the shared
`Transformer` as its network. The trainer, sampler, evaluator and FLOPs accounting only see this contract:

    loss(tokens, labels) -> scalar                training objective on a batch of tokens
    sample(labels, sampling, generator) -> tokens
    train_flops_per_sample() -> int               forward + backward matmul FLOPs for one training sample
    sample_flops(sampling) -> int                 matmul FLOPs to generate one image (all network calls)
    num_network_evals(sampling) -> int            backbone passes per sampled batch (NFE)
    unconditional_passes(sampling) -> int         of those, how many also run the unconditional rows (CFG)
    nll_bits_per_token(tokens, labels) -> Tensor | None   exact NLL where the model defines one

Its configuration is two frozen dataclasses, `Config` (run.method) and `Sampling` (run.sample), made by
`sections(discrete)` for the tokenizer family the run uses. Paradigms whose sample is a deterministic
function of Gaussian noise also implement `FromNoise.sample_from` (the teacher map of `isynth pairs`).
"""
from __future__ import annotations

from typing import ClassVar, Generic

import torch
from torch import Tensor, nn

from isynth.conditions import Conditions
from isynth.config import M, RunConfig, S, TokenizerConfig
from isynth.errors import IsynthError
from isynth.graphs import StepGraphs
from isynth.latents import load_latents
from isynth.tokendata import EncodedOnDemand, training_tokens
from isynth.tokenizers.base import Tokenizer


class Paradigm(nn.Module, Generic[M, S]):
    name: ClassVar[str]
    discrete: ClassVar[bool | None]  # the tokenizer family it needs; None: either (the head follows it)
    guided: ClassVar[bool] = True  # whether its sampler has classifier-free guidance (`sample.guidance`)
    per_token_head: ClassVar[bool] = True  # models tokens with `isynth.heads` (`method.head`, `sample.head`)
    default_tokenizer: ClassVar[TokenizerConfig] = TokenizerConfig()
    model_defaults: ClassVar[dict] = {}  # backbone fields every run of it starts from (diffusion: adaLN)

    @classmethod
    def sections(cls, discrete: bool) -> tuple[M, S]:
        """The default (method, sample) sections for tokens of that family."""
        raise NotImplementedError

    @classmethod
    def check_tokens(cls, discrete: bool) -> None:
        if cls.discrete is not None and cls.discrete != discrete:
            want = "a discrete tokenizer (tokenizer.kind=grey)" if cls.discrete else \
                "a continuous tokenizer (tokenizer.kind=patch)"
            raise IsynthError(f"paradigm {cls.name!r} needs {want}")

    def __init__(self, run: RunConfig[M, S], tokenizer: Tokenizer, conditions: Conditions):
        super().__init__()
        self.run, self.tokenizer, self.conditions = run, tokenizer, conditions
        self.num_classes = conditions.num_classes
        self.seq_len = tokenizer.seq_len
        self.train_step, self.total_steps = 0, 1
        self.graphs = StepGraphs()  # the sampler's captured CUDA graphs (isynth.graphs)

    def forward(self, tokens: Tensor, labels: Tensor) -> Tensor:
        # DDP synchronises gradients of calls through forward, so training calls the module itself.
        return self.loss(tokens, labels)

    def set_progress(self, step: int, total_steps: int) -> None:
        """Told by the trainer before each step; schedules that depend on training progress read it."""
        self.train_step, self.total_steps = step, total_steps

    # --- the contract -----------------------------------------------------------------------------
    def loss(self, tokens: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, labels: Tensor, sampling: S, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def train_flops_per_sample(self) -> int:
        raise NotImplementedError

    def sample_flops(self, sampling: S) -> int:
        raise NotImplementedError

    def num_network_evals(self, sampling: S) -> int:
        """Backbone passes to generate one batch (NFE), CFG passes counted once."""
        raise NotImplementedError

    def unconditional_passes(self, sampling: S) -> int:
        """Of the NFE, the passes that also run the unconditional rows; 0 for a sampler without guidance."""
        raise NotImplementedError

    def nll_bits_per_token(self, tokens: Tensor, labels: Tensor) -> Tensor | None:
        """Per-sample NLL in bits per token, or None where the paradigm has no exact likelihood."""
        return None

    def validate_training(self, dataset) -> None:
        """Raise IsynthError if this run cannot train on `dataset` (called before a run directory is made)."""

    def training_data(self, dataset) -> tuple[Tensor | EncodedOnDemand, Tensor]:
        """(inputs (N, ...), labels (N,)) the trainer draws its batches from: the tokenised training images
        (`isynth.tokendata`), or those cached by `isynth tokenize`; GET trains on its teacher's (noise, image)
        pairs instead."""
        if dataset.latents is not None:
            return load_latents(dataset.latents, self.run.tokenizer)
        return training_tokens(self.tokenizer, dataset.train_images, dataset.train_labels, dataset.flip)

    # --- helpers ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class FromNoise(Paradigm[M, S]):
    """A paradigm whose sample is a deterministic function of Gaussian noise on the token grid
    (`diffusion`'s ODE, GET's one pass); `isynth pairs` stores that noise with the image it maps to."""

    discrete = False
    per_token_head = False
    default_tokenizer = TokenizerConfig(kind="patch", patch_size=1)

    def __init__(self, run: RunConfig[M, S], tokenizer: Tokenizer, conditions: Conditions):
        super().__init__(run, tokenizer, conditions)
        self.token_dim = tokenizer.token_dim

    @torch.no_grad()
    def sample(self, labels: Tensor, sampling: S, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(labels.shape[0], self.seq_len, self.token_dim, generator=generator, device=labels.device)
        return self.sample_from(noise, labels, sampling)

    def sample_from(self, noise: Tensor, labels: Tensor, sampling: S) -> Tensor:
        """noise (B, N, D) -> tokens (B, N, D)."""
        raise NotImplementedError
