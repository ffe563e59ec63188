"""Shared parts of the masked paradigms `maskgit`, `mdm` and `mar`.

eMIGM (You et al. 2025, "Effective and Efficient Masked Image Generation Models", Table 1) unifies MaskGIT,
MAR and masked diffusion: they differ in the masking distribution, the loss weighting and the per-token head.
This module is everything they share, so each paradigm file holds only its own choices:

- the network: class "buffer" tokens in front of the token grid (MAR), an encoder (the shared backbone,
  bidirectional) that either sees only the visible tokens (`mae`, He et al. 2022; MAR) or all tokens with
  mask tokens in place, an optional decoder that fills in mask tokens, and a head per token (`isynth.heads`:
  softmax for discrete tokens, MAR's diffusion head for continuous ones);
- the loss on masked tokens, with a per-sample weight (eMIGM's w(t));
- the K-step sampler: step k runs the network on the partial grid and reveals tokens so that
  floor(N * gamma(t_{k+1})) stay masked, in a random per-sample order (MAR, eMIGM) or by confidence
  (MaskGIT overrides `reveal`); CFG doubles the batch only on steps inside the guidance interval (eMIGM),
  with the schedule's progress the share of tokens revealed after the step (MAR's linear schedule);
- compute accounting: the encoder on visible tokens only, the head on the tokens it models, every CFG pass,
  and training FLOPs as the expectation over the paradigm's masked-count distribution.

Subclasses implement `training_mask` (the masking distribution and weight), `train_count_pmf` (the
distribution of the masked count that `training_mask` draws, for the expected training FLOPs) and
`sampling_schedule`. Their method sections are flat and each declares the network fields below with its
own defaults; `check_masked_net` validates them once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from isynth.backbone import Transformer
from isynth.conditions import Conditions
from isynth.config import RunConfig, check
from isynth.embeddings import ClassEmbedding, learned_positions
from isynth.errors import IsynthError
from isynth.graphs import weights_key
from isynth.guidance import Guidance
from isynth.heads import CategoricalSampling, TokenInput, TokenSampling, build_head, empty_tokens, gather_tokens
from isynth.masking import MaskSchedule, masked_counts
from isynth.paradigms.base import Paradigm
from isynth.tokenizers.base import Tokenizer


def check_masked_net(m) -> None:
    """The network fields every masked method section has: class_dropout (MAR's "fake latent": 0.1),
    num_buffer class tokens in front of the grid (MAR: 64; MaskGIT: 1), mae (the encoder sees visible tokens
    only; the decoder gets mask tokens), decoder_depth (0: no decoder, MaskGIT; None: as deep as the encoder,
    MAR and eMIGM) and null_is_mask_token (eMIGM: the null condition for CFG is the mask token itself)."""
    check(0 <= m.class_dropout < 1, "method.class_dropout must be in [0, 1)")
    check(m.num_buffer >= 1, "method.num_buffer must be >= 1")
    check(m.decoder_depth is None or m.decoder_depth >= 0, "method.decoder_depth must be >= 0 or none")
    check(not m.mae or m.decoder_depth != 0,
          "method.mae=true needs a decoder to fill in the masked tokens (method.decoder_depth >= 1 or none)")


@dataclass(frozen=True)
class MaskedSampling:
    """Sampling of `mdm` and `mar` (MaskGIT's adds the choice temperature)."""

    num_steps: int = 16               # K network passes; each reveals >= 1 token, the last reveals all
    head: TokenSampling = field(default_factory=CategoricalSampling)  # how each revealed token is drawn
    guidance: Guidance = field(default_factory=Guidance)  # progress: tokens revealed after the step / N
    batch_size: int = 256                   # images per sampling batch
    cuda_graphs: bool = True          # replay each step's network call from a CUDA graph (on CUDA; isynth.graphs)

    def __post_init__(self):
        check(self.num_steps >= 1, "sample.num_steps must be >= 1")
        check(self.batch_size > 0, "sample.batch_size must be > 0")


class MaskedParadigm(Paradigm):
    time_end: float = 0.0  # sampling times run over linspace(1, time_end, K + 1) (eMIGM: 1e-5)

    def __init__(self, run: RunConfig, tokenizer: Tokenizer, conditions: Conditions):
        super().__init__(run, tokenizer, conditions)
        m, c, n = run.method, run.model.width, self.seq_len
        self.num_buffer = nb = m.num_buffer
        if run.sample.num_steps > n:
            raise IsynthError(f"sample.num_steps={run.sample.num_steps} exceeds the {n} tokens to reveal")
        self.tok_embed = TokenInput(tokenizer, c)
        self.class_embed = ClassEmbedding(conditions, c, m.class_dropout)
        self.mask_token = nn.Parameter(torch.zeros(c))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.enc_pos = learned_positions(nb + n, c)
        self.encoder = Transformer(run.model)
        depth = run.model.depth if m.decoder_depth is None else m.decoder_depth
        self.decoder = Transformer(dataclasses.replace(run.model, depth=depth)) if depth else None
        self.dec_pos = learned_positions(nb + n, c) if depth else None
        self.head_pos = learned_positions(n, c)  # MAR's position embedding added before the head
        self.head = build_head(tokenizer, c, None if tokenizer.discrete else m.head)  # MaskGIT has no head section

    # --- what subclasses choose -------------------------------------------------------------------
    def training_mask(self, batch: int, device) -> tuple[Tensor, Tensor]:
        """(mask (B, N) bool, True = masked; loss weight (B,)) for one training batch."""
        raise NotImplementedError

    def train_count_pmf(self) -> Tensor:
        """(N + 1,) float64: probability that a training sample has m masked tokens."""
        raise NotImplementedError

    @property
    def sampling_schedule(self) -> MaskSchedule:
        raise NotImplementedError

    # --- network ----------------------------------------------------------------------------------
    def condition(self, labels: Tensor) -> Tensor:
        null = self.mask_token if self.run.method.null_is_mask_token else None
        return self.class_embed(labels, null)  # (B, C)

    def features(self, tokens: Tensor, mask: Tensor, cond: Tensor, visible: int | None = None) -> Tensor:
        """Features (B, N, C) for every position of the grid, given tokens (B, N[, D]) where mask (B, N)
        is False and the condition (B, C). With `mae` every row must have the same number masked; a sampler
        that knows it passes `visible` (then nothing is checked on the host, and the step can be graphed)."""
        b, n, nb = mask.shape[0], self.seq_len, self.num_buffer
        c_ada = cond if self.run.model.adaln else None
        buffers = cond[:, None].expand(b, nb, cond.shape[-1]) + self.enc_pos[:, :nb]  # (B, nb, C)
        if self.run.method.mae:
            if visible is None:
                counts = (~mask).sum(1)
                if (counts != counts[0]).any():
                    raise ValueError("the MAE encoder needs the same number of masked tokens in every row")
                visible = int(counts[0])
            keep = (~mask).to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :visible]  # (B, V)
            x = self.tok_embed(gather_tokens(tokens, keep)) + F.embedding(nb + keep, self.enc_pos[0])  # (B, V, C)
        else:
            x = torch.where(mask[..., None], self.mask_token, self.tok_embed(tokens)) + self.enc_pos[:, nb:]
        h = self.encoder(torch.cat([buffers, x], 1), c_ada)  # (B, nb + V, C)
        if self.decoder is not None:
            grid = h[:, nb:]
            if self.run.method.mae:  # visible features back to their positions, mask tokens elsewhere
                fill = self.mask_token.to(h.dtype).expand(b, n, -1)
                grid = fill.scatter(1, keep[..., None].expand(-1, -1, h.shape[-1]), grid)  # (B, N, C)
            else:
                grid = torch.where(mask[..., None], self.mask_token.to(h.dtype), grid)
            h = self.decoder(torch.cat([h[:, :nb], grid], 1) + self.dec_pos, c_ada)  # (B, nb + N, C)
        return h[:, nb:] + self.head_pos  # (B, N, C)

    # --- training -----------------------------------------------------------------------------------
    def loss(self, tokens: Tensor, labels: Tensor) -> Tensor:
        b = tokens.shape[0]
        mask, weight = self.training_mask(b, tokens.device)
        z = self.features(tokens, mask, self.condition(labels))
        per_token = self.head.loss(z[mask], tokens[mask])  # (M,) over the masked tokens of the batch
        w = weight[:, None].expand(b, self.seq_len)[mask]
        return (per_token * w).sum() / mask.sum()

    # --- sampling -----------------------------------------------------------------------------------
    def sampling_times(self, num_steps: int) -> list[float]:
        return torch.linspace(1.0, self.time_end, num_steps + 1, dtype=torch.float64, device="cpu").tolist()

    def mask_counts(self, s: MaskedSampling) -> list[int]:
        """Tokens still masked before each step and after the last: N = m_0 > m_1 > ... > m_K = 0."""
        if s.num_steps > self.seq_len:
            raise IsynthError(f"sample.num_steps={s.num_steps} exceeds the {self.seq_len} tokens to reveal")
        with torch.device("cpu"):  # plain numbers, also when the model is built on the meta device
            return masked_counts(self.seq_len, self.sampling_times(s.num_steps), self.sampling_schedule)

    def cfg_weights(self, s: MaskedSampling) -> list[float | None]:
        """Guidance weight of each step, None where it runs no unconditional pass. Step k goes from time
        t(k) to s = t(k+1), and the interval tests s, the time of the state the step produces, as eMIGM's
        released sampler does (ML-GSAI/eMIGM): with 16 steps and (0.1, 0.3] it guides steps 11-13."""
        counts, times, n = self.mask_counts(s), self.sampling_times(s.num_steps), self.seq_len
        return [s.guidance.weight((n - counts[k + 1]) / n, times[k + 1]) for k in range(s.num_steps)]

    @torch.no_grad()
    def sample(self, labels: Tensor, sampling: MaskedSampling, generator: torch.Generator | None = None) -> Tensor:
        s, b, n, dev = sampling, labels.shape[0], self.seq_len, labels.device
        counts, weights = self.mask_counts(s), self.cfg_weights(s)
        tokens = empty_tokens(self.tokenizer, b, dev)
        mask = torch.ones(b, n, dtype=torch.bool, device=dev)
        ranks = torch.rand(b, n, generator=generator, device=dev).argsort(1).argsort(1)  # random order (B, N)
        cond = self.condition(labels)
        uncond = self.condition(torch.full_like(labels, self.class_embed.null))
        # Without MAE every step has the same shapes and one CUDA graph serves them all. The MAE encoder sees
        # a different number of tokens at each step, so a graph would serve one step of each batch and hold
        # its activations (MAR-B at batch 256: out of memory at 64 steps): those steps run eagerly, and only
        # the diffusion head's steps, a hundred per reveal, are graphed.
        run_step = self.graphs.run if not self.run.method.mae else lambda _, fn, *inputs, **__: fn(*inputs)
        for k, w in enumerate(weights):
            step = lambda t, m, c, v=n - counts[k]: self.features(t, m, c, visible=v)  # noqa: E731
            if w is None:
                z = run_step("features", step, tokens, mask, cond, weights=weights_key(self))  # (B, N, C)
            else:  # conditional rows then unconditional rows, reading the same partial grid
                z = run_step("features", step, torch.cat([tokens, tokens]), torch.cat([mask, mask]),
                             torch.cat([cond, uncond]), weights=weights_key(self))  # (2B, N, C)
            reveal, values = self.reveal(k, z, w, mask, ranks, counts, s, generator)
            tokens[reveal] = values.to(tokens.dtype)
            mask &= ~reveal
        return tokens

    def reveal(self, k: int, z: Tensor, w: float | None, mask: Tensor, ranks: Tensor, counts: list[int],
               s: MaskedSampling, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Which positions step k reveals (B, N) bool, and their values in row-major order.

        Random order (MAR, eMIGM): the tokens ranked in [m_{k+1}, m_k) of each row's random permutation;
        the head runs on those tokens only (with both CFG halves when w is given).
        """
        reveal = (ranks >= counts[k + 1]) & (ranks < counts[k])  # exactly m_k - m_{k+1} per row
        zr = z[torch.cat([reveal, reveal])] if w is not None else z[reveal]  # (R * r, C)
        return reveal, self.head.sample(zr, s.head, w, generator)

    def num_network_evals(self, sampling: MaskedSampling) -> int:
        return sampling.num_steps

    def unconditional_passes(self, sampling: MaskedSampling) -> int:
        """Steps that run the unconditional half too (the guidance interval cuts these)."""
        return sum(w is not None for w in self.cfg_weights(sampling))

    # --- compute accounting -------------------------------------------------------------------------
    def features_flops(self, visible: float, train: bool = False) -> float:
        """One pass of `features` for one sample with `visible` unmasked tokens."""
        n, nb = self.seq_len, self.num_buffer
        embedded = visible if self.run.method.mae else n
        f = self.encoder.flops(nb + embedded, nb + embedded, train) + self.tok_embed.flops(embedded, train)
        if self.decoder is not None:
            f += self.decoder.flops(nb + n, nb + n, train)
        return f

    def train_flops_given(self, masked: float) -> int:
        """Training FLOPs of one sample with `masked` masked tokens: network, then the head on them."""
        return int(self.features_flops(self.seq_len - masked, train=True) + self.head.train_flops(masked))

    def train_flops_per_sample(self) -> int:
        """Expected over the masked-count distribution (the MAE encoder's cost depends on it)."""
        with torch.device("cpu"):  # plain numbers, also when the model is built on the meta device
            pmf = self.train_count_pmf()
        return int(sum(p * self.train_flops_given(m) for m, p in enumerate(pmf.tolist()) if p > 0))

    def head_sample_flops(self, k: int, counts: list[int], s: MaskedSampling, cfg: bool) -> float:
        """Per image: one head call per step for a batch of sample.batch_size images, which share its
        per-call work (the diffusion head's time embedding)."""
        return self.head.sample_flops(s.batch_size * (counts[k] - counts[k + 1]), s.head, cfg) / s.batch_size

    def sample_flops(self, sampling: MaskedSampling) -> int:
        counts, total = self.mask_counts(sampling), 0.0
        for k, w in enumerate(self.cfg_weights(sampling)):
            cfg = w is not None
            total += (2 if cfg else 1) * self.features_flops(self.seq_len - counts[k])
            total += self.head_sample_flops(k, counts, sampling, cfg)
        return int(total)
