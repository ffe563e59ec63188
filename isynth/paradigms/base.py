"""The contract every paradigm implements (STYLE principle 2).

A paradigm owns its corruption / ordering / noise and its input and output layers, and takes the shared
`Transformer` as its network. The trainer, sampler, evaluator and FLOPs accounting only see this contract:

    loss(tokens, labels) -> scalar              training objective on a batch of tokens
    sample(labels, sampling, generator) -> tokens
    train_flops_per_sample() -> int             forward + backward matmul FLOPs for one training sample
    sample_flops(sampling) -> int               matmul FLOPs to generate one image (all network calls)
    nll_bits_per_token(tokens, labels) -> Tensor | None   exact NLL where the model defines one
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from isynth.config import RunConfig, TokenizerConfig
from isynth.tokenizers import Tokenizer


class Paradigm(nn.Module):
    name: ClassVar[str]
    Config: ClassVar[type]          # frozen dataclass of training-side settings (run.method)
    SampleConfig: ClassVar[type]    # frozen dataclass of sampling settings (run.sample)
    discrete: ClassVar[bool | None]  # which tokenizer family it needs; None: either (the head follows it)
    default_tokenizer: ClassVar[TokenizerConfig] = TokenizerConfig()  # presets start from this
    model_defaults: ClassVar[dict] = {}  # backbone fields every preset sets for it (diffusion: adaLN)

    def __init__(self, run: RunConfig, tokenizer: Tokenizer, num_classes: int):
        super().__init__()
        self.run, self.tokenizer, self.num_classes = run, tokenizer, num_classes
        self.seq_len = tokenizer.seq_len
        self.train_step, self.total_steps = 0, 1

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
    def sample(self, labels: Tensor, sampling=None, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def train_flops_per_sample(self) -> int:
        raise NotImplementedError

    def sample_flops(self, sampling=None) -> int:
        raise NotImplementedError

    def nll_bits_per_token(self, tokens: Tensor, labels: Tensor) -> Tensor | None:
        """Per-sample NLL in bits per token, or None where the paradigm has no exact likelihood."""
        return None

    def num_network_evals(self, sampling=None) -> int:
        """Number of backbone calls to generate one batch (NFE), CFG passes counted once."""
        raise NotImplementedError

    def validate_training(self, dataset) -> None:
        """Raise IsynthError if this run cannot train on `dataset` (called before a run directory is made)."""

    def training_data(self, dataset) -> tuple[Tensor, Tensor]:
        """(inputs (N, ...), labels (N,)) the trainer draws its batches from: the tokenised training images;
        GET trains on its teacher's (noise, image) pairs instead."""
        return self.tokenizer.encode(torch.from_numpy(dataset.train_images)), torch.from_numpy(dataset.train_labels)

    # --- helpers ------------------------------------------------------------------------------------
    def sampling_or_default(self, sampling):
        return self.run.sample if sampling is None else sampling

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class FromNoise:
    """Mixin for paradigms whose sample is a deterministic function of Gaussian noise on the token grid
    (`diffusion`'s ODE, GET's one pass); `isynth pairs` stores that noise with the image it maps to."""

    @torch.no_grad()
    def sample(self, labels: Tensor, sampling=None, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(labels.shape[0], self.seq_len, self.token_dim, generator=generator, device=labels.device)
        return self.sample_from(noise, labels, sampling)

    def sample_from(self, noise: Tensor, labels: Tensor, sampling=None) -> Tensor:
        """noise (B, N, D) -> tokens (B, N, D)."""
        raise NotImplementedError
