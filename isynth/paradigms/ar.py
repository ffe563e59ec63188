"""Next-token prediction (`ar`, `ar-cont`): raster-order autoregression over tokens.

Sequence [cond, x_1 .. x_N]: the class embedding is the first input and x_i is predicted from
(cond, x_<i) (LlamaGen / Kilian'24 NTP). The tokenizer picks the head: discrete ids get a softmax and
cross-entropy, continuous vectors MAR's per-token diffusion head (`ar-cont`, Fluid's "raster continuous",
Fan et al. 2024), through the one `isynth.heads` contract. The input at step i is x_{i-1}, so the last
token is never an input and the model runs N positions for N targets. Sampling is one token per step with
a KV cache (one forward over the new token), temperature, top-k, top-p (or the diffusion head's sampler)
and classifier-free guidance by a doubled batch with RAR's pow-cosine schedule.

The generation order is a hook (`training_order`): `rar` subclasses this file with random permutations,
fixed scan orders (`isynth.scans`), target-aware positions and the RAR reference's prefix and per-position
adaLN condition; everything else (loss, sampling, NLL, FLOPs) is this one implementation. The guidance
schedule's progress is the share of tokens generated before the step (RAR's i / N).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from isynth.backbone import Transformer, decode_keys
from isynth.conditions import Conditions
from isynth.config import RunConfig, TokenizerConfig, check
from isynth.diffhead import DiffHeadConfig
from isynth.embeddings import ClassEmbedding, learned_positions
from isynth.errors import IsynthError
from isynth.graphs import active as graphs_active
from isynth.graphs import weights_key
from isynth.guidance import Guidance
from isynth.heads import (
    CategoricalSampling,
    TokenInput,
    TokenSampling,
    build_head,
    empty_tokens,
    gather_tokens,
    head_sections,
)
from isynth.paradigms.base import Paradigm
from isynth.tokenizers.base import Tokenizer


@dataclass(frozen=True)
class ARConfig:
    class_dropout: float = 0.1              # label -> null class during training, for CFG (RAR: 0.1)
    head: DiffHeadConfig | None = None      # the diffusion head, with continuous tokens

    def __post_init__(self):
        check(0 <= self.class_dropout < 1, "method.class_dropout must be in [0, 1)")


@dataclass(frozen=True)
class ARSampling:
    head: TokenSampling = field(default_factory=CategoricalSampling)  # how each token is drawn
    guidance: Guidance = field(default_factory=Guidance)  # progress: tokens generated before the step / N
    kv_cache: bool = True           # one new position per step (else the whole prefix again)
    # scan: the model's scan order (raster; rar's method.scan), or random: a permutation per sample (RAR
    # Table 2's "pure random" row is sampled that way), which needs rar's target-aware positions to know
    # which position comes next
    order: Literal["scan", "random"] = "scan"
    batch_size: int = 256           # images per sampling batch
    cuda_graphs: bool = True        # replay each decoding step from a CUDA graph (on CUDA; isynth.graphs)

    def __post_init__(self):
        check(self.batch_size > 0, "sample.batch_size must be > 0")
        # The unconditional rows' KV cache needs every token, so guidance cannot skip steps.
        check(self.guidance.whole_range, "sample.guidance.t_min/t_max: next-token prediction guides every "
              "token (the unconditional rows' KV cache needs each step); the interval is for masked and flow samplers")


class AR(Paradigm[ARConfig, ARSampling]):
    name = "ar"
    discrete = None  # either: the tokenizer picks the head

    @classmethod
    def sections(cls, discrete: bool) -> tuple[ARConfig, ARSampling]:
        head, head_sampling = head_sections(discrete)
        return ARConfig(head=head), ARSampling(head=head_sampling)

    def __init__(self, run: RunConfig[ARConfig, ARSampling], tokenizer: Tokenizer, conditions: Conditions,
                 target_aware: bool = False, scan: Tensor | None = None, cls_token: bool = False,
                 position_condition: bool = False):
        super().__init__(run, tokenizer, conditions)
        c, n = run.model.width, self.seq_len
        self.tok_embed = TokenInput(tokenizer, c)
        self.class_embed = ClassEmbedding(conditions, c, run.method.class_dropout)
        # The sequence is [cls?, cond, x_1 .. x_{N-1}]: RAR's reference puts a learned cls token first.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c)) if cls_token else None
        self.prefix = 2 if cls_token else 1  # positions before the first image token
        self.pos_embed = learned_positions(n + self.prefix, c)  # prefix positions, then image position j
        # RAR's target-aware table: the input at step i also carries the embedding of the position it
        # must predict next (Yu et al. 2024, sec. 3.2), so different orders give different logits.
        self.target_pos_embed = learned_positions(n, c) if target_aware else None
        # The RAR reference's adaLN condition: the class embedding plus a learned embedding of the sequence
        # position, so every step is modulated differently (1d-tokenizer's `timesteps_embeddings`).
        self.step_embed = learned_positions(n + self.prefix - 1, c) if position_condition else None
        if position_condition and not run.model.adaln:
            raise IsynthError("method.position_condition modulates adaLN: it needs model.adaln=true")
        # the model's scan order (N,): position generated at each step; None is raster
        self.register_buffer("scan", scan, persistent=False)
        self.net = Transformer(run.model)
        self.head = build_head(tokenizer, c, run.method.head)

    # --- ordering hook ------------------------------------------------------------------------------
    def training_order(self, batch: int, device) -> Tensor | None:
        """Per-sample generation order (B, N) for a training batch, or None for raster."""
        return None

    # --- network ------------------------------------------------------------------------------------
    def _inputs(self, prev: Tensor, cond: Tensor, order: Tensor | None, start: int) -> Tensor:
        """Input vectors (B, T, C) for sequence positions start .. start+T-1 of [cls?, cond, x_1 ..].

        Position k-1 (k = self.prefix) reads the condition and predicts step 0; position k-1+s, s >= 1,
        reads the token generated at step s-1 and predicts step s. prev: (B, T') those tokens, in
        generation order (T = T' + k when start == 0, else T'); cond: (B, C); order: (B, N) image
        position generated at each step, None for raster.
        """
        k = self.prefix
        t = prev.shape[1] + (k if start == 0 else 0)
        parts = [cond[:, None] + self.pos_embed[:, k - 1:k]] if start == 0 else []  # (B, 1, C)
        if start == 0 and self.cls_token is not None:
            parts.insert(0, (self.cls_token + self.pos_embed[:, :1]).expand(cond.shape[0], -1, -1))  # (B, 1, C)
        if prev.shape[1] > 0:
            j0 = max(start - k, 0)  # generation step of prev[:, 0]
            parts.append(self.tok_embed(prev) + self._positions(self.pos_embed, k + j0, prev.shape[1], order, k))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (B, T, C)
        if self.target_pos_embed is not None:  # the position each step predicts: step s -> order[s]
            first = max(start, k - 1)  # the cls token predicts nothing
            ta = self._positions(self.target_pos_embed, first - (k - 1), start + t - first, order, 0)
            x = x + (ta if first == start else torch.cat([ta.new_zeros(ta.shape[0], 1, ta.shape[2]), ta], 1))
        return x

    def _condition(self, cond: Tensor, start: int, t: int) -> Tensor | None:
        """adaLN's condition for positions start .. start+t-1: the class vector (B, C), or with
        method.position_condition that vector plus each position's learned embedding (B, t, C); None
        without adaLN."""
        if not self.run.model.adaln:
            return None
        return cond if self.step_embed is None else cond[:, None] + self.step_embed[:, start:start + t]

    @staticmethod
    def _positions(table: Tensor, first: int, count: int, order: Tensor | None, offset: int) -> Tensor:
        """Rows of `table` (1, P, C) for generation steps first-offset ... : a slice in raster order, else
        the rows offset + order[:, step]. F.embedding, not table[idx]: its CPU backward is deterministic,
        whereas indexing accumulates gradients in a thread-dependent order (breaks exact resumption)."""
        if order is None:
            return table[:, first:first + count]  # (1, T, C), broadcast over the batch
        steps = torch.arange(first - offset, first - offset + count, device=order.device)
        return F.embedding(offset + order[:, steps], table[0])  # (B, T, C)

    @staticmethod
    def _in_order(tokens: Tensor, order: Tensor | None) -> Tensor:
        """tokens (B, N) or (B, N, D) in raster layout -> the same in generation order."""
        return tokens if order is None else gather_tokens(tokens, order)

    def features(self, seq: Tensor, labels: Tensor, order: Tensor | None = None) -> Tensor:
        """Teacher-forced backbone features (B, N, C) predicting each token of `seq` (generation order)."""
        cond = self.class_embed(labels)  # (B, C)
        x = self._inputs(seq[:, :-1], cond, order, start=0)  # (B, k - 1 + N, C)
        h = self.net(x, self._condition(cond, 0, x.shape[1]), causal=True)
        return h[:, self.prefix - 1:]  # (B, N, C): the cls position predicts nothing

    def scan_order(self, batch: int) -> Tensor | None:
        """The model's scan order for a batch (B, N), None for raster."""
        return None if self.scan is None else self.scan.expand(batch, -1)

    def logits(self, tokens: Tensor, labels: Tensor, order: Tensor | None = None) -> Tensor:
        """Teacher-forced logits (B, N, V) for discrete tokens (B, N) in raster layout, read in `order`."""
        return self.head.logits(self.features(self._in_order(tokens, order), labels, order))

    def loss(self, tokens: Tensor, labels: Tensor) -> Tensor:
        order = self.training_order(tokens.shape[0], tokens.device)
        seq = self._in_order(tokens, order)  # (B, N[, D]) targets in generation order
        h = self.features(seq, labels, order)  # (B, N, C)
        return self.head.loss(h.flatten(0, 1), seq.flatten(0, 1)).mean()

    @torch.no_grad()
    def nll_bits_per_token(self, tokens: Tensor, labels: Tensor) -> Tensor | None:
        """Exact NLL of the scan order's factorisation (the order the model samples in), bits per token;
        None for continuous tokens (the diffusion head gives no exact likelihood)."""
        if not self.tokenizer.discrete:
            return None
        order = self.scan_order(tokens.shape[0])
        logits = self.logits(tokens, labels, order)
        nats = F.cross_entropy(logits.transpose(1, 2), self._in_order(tokens, order), reduction="none")  # (B, N)
        return nats.mean(1) / math.log(2)

    # --- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, labels: Tensor, sampling: ARSampling, generator: torch.Generator | None = None) -> Tensor:
        s, b, n = sampling, labels.shape[0], self.seq_len
        use_cfg, k = s.guidance.on, self.prefix
        order = self.scan_order(b)
        if s.order == "random":
            if self.target_pos_embed is None:
                raise IsynthError("sample.order=random needs target-aware positions (rar with "
                                  "method.target_aware=true): without them the model cannot know which position "
                                  "comes next")
            order = torch.rand(b, n, generator=generator, device=labels.device).argsort(1)  # (B, N) per sample
        rows = torch.cat([labels, torch.full_like(labels, self.class_embed.null)]) if use_cfg else labels
        cond = self.class_embed(rows)  # (R, C), R = 2B with CFG
        row_order = None if order is None else torch.cat([order, order]) if use_cfg else order  # (R, N)
        seq = empty_tokens(self.tokenizer, b, labels.device)  # (B, N[, D]) in generation order
        dev = labels.device.type  # under autocast (bf16 on GPU) keys and values arrive in the autocast dtype
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else cond.dtype
        cache = self._decode_cache(rows.shape[0], n + k - 1, labels.device, dtype) if s.kv_cache else None
        for i in range(n):
            if cache is not None and i > 0:  # one new position, the same shapes at every step
                step = torch.full((1,), i, dtype=torch.long, device=labels.device)
                prev = torch.cat([seq[:, i - 1:i]] * (2 if use_cfg else 1))  # (R, 1[, D])
                keys = decode_keys(k - 1 + i, cache.max_len)
                h = self.graphs.run(f"decode-{keys}", self._decode_fn(cache, keys), prev, cond, step,
                                    *(() if row_order is None else (row_order,)), weights=weights_key(self))  # (R, C)
            else:  # the prefix into the cache, or without a cache the whole sequence so far
                prev = seq[:, :i]
                prev = torch.cat([prev, prev]) if use_cfg else prev  # (R, i) both CFG halves read the same tokens
                x = self._inputs(prev, cond, row_order, 0)
                h = self.net(x, self._condition(cond, 0, x.shape[1]), causal=True, cache=cache)[:, -1]  # (R, C)
            seq[:, i] = self.head.sample(h, s.head, s.guidance.weight(i / n), generator)
        if order is None:
            return seq
        out = torch.empty_like(seq)  # generation order -> raster layout: position order[b, i] holds seq[b, i]
        out[torch.arange(b, device=seq.device)[:, None], order] = seq
        return out

    def _decode_cache(self, rows: int, length: int, device, dtype):
        """The KV cache of a sampling call. A CUDA graph of the decoding step writes into the buffers it
        was captured with, so where steps are graphed the cache is kept with the graphs and reused."""
        if not graphs_active(device):
            return self.net.new_cache(rows, length, device, dtype)
        cache = self.graphs.state(("kv", rows, length, dtype, weights_key(self)),
                                  lambda: self.net.new_cache(rows, length, device, dtype))
        cache.length = 0
        return cache

    def _decode_fn(self, cache, keys: int):
        """Decoding step i >= 1 with a KV cache: the token generated at step i - 1, prev (R, 1[, D]), enters
        at sequence position k - 1 + i (k = self.prefix) and the features (R, C) predicting step i come out.
        Every index is a device tensor (step: (1,) long = i; order: (R, N) or absent for the scan order), so
        the step has no host synchronisation and is captured once per key bucket as a CUDA graph."""
        k = self.prefix

        def step_fn(prev: Tensor, cond: Tensor, step: Tensor, order: Tensor | None = None) -> Tensor:
            gen = step - 1  # generation step of prev
            at = (lambda s: s) if order is None else (lambda s: order.index_select(1, s))  # (1,) or (R, 1)
            x = self.tok_embed(prev) + F.embedding(k + at(gen), self.pos_embed[0])  # (R, 1, C)
            if self.target_pos_embed is not None:  # the position this step predicts
                x = x + F.embedding(at(step), self.target_pos_embed[0])
            c = None
            if self.run.model.adaln:
                c = cond if self.step_embed is None else cond[:, None] + F.embedding(k - 1 + step, self.step_embed[0])
            return self.net.decode(x, c, cache, k - 1 + step, keys)[:, -1]  # (R, C)

        return step_fn

    # --- compute accounting -------------------------------------------------------------------------
    def train_flops_per_sample(self) -> int:
        n, t = self.seq_len, self.seq_len + self.prefix - 1  # N - 1 token inputs (the last is never one), N targets
        return int(self.net.flops(t, t, train=True, per_position=self.step_embed is not None)
                   + self.tok_embed.flops(n - 1, train=True) + self.head.train_flops(n))

    def sample_flops(self, sampling: ARSampling) -> int:
        s, n, k = sampling, self.seq_len, self.prefix
        per_position = self.step_embed is not None
        # step 0: the k prefix positions; then one new query over k+i cached keys, or with no cache the
        # whole sequence of k+i positions again (closed form: isynth.backbone.Transformer.decode_flops)
        net = self.net.decode_flops(k, n, s.kv_cache, per_position)
        embedded = n - 1 if s.kv_cache else n * (n - 1) // 2
        cfg = s.guidance.on
        # One head call per step for the whole batch (both CFG halves inside); its per-call work (the
        # diffusion head's time embedding) is shared by the batch's sample.batch_size images.
        head = n * self.head.sample_flops(s.batch_size, s.head, cfg) / s.batch_size
        return int((2 if cfg else 1) * (net + self.tok_embed.flops(embedded)) + head)

    def num_network_evals(self, sampling: ARSampling) -> int:
        return self.seq_len

    def unconditional_passes(self, sampling: ARSampling) -> int:
        return self.seq_len if sampling.guidance.on else 0


class ARCont(AR):
    """`ar-cont`: the same model on continuous tokens with the diffusion head (Fluid "raster continuous")."""

    name = "ar-cont"
    discrete = False
    default_tokenizer = TokenizerConfig(kind="patch", patch_size=1)
