"""RAR, randomized autoregressive modeling (`rar`; Yu et al. 2024, "Randomized Autoregressive Visual
Generation").

Next-token prediction (this subclasses `ar`) where each training sample's order is a random permutation
with probability r, else the scan order `method.scan` (raster by default; RAR Table 3 anneals to each of six
scans, `isynth.scans`). r = 1 until `anneal_start_step`, then falls linearly to 0 at `anneal_end_step`
(paper: epochs 200 -> 300 of 400, i.e. 50% -> 75% of training, the defaults here). `order = random` /
`scan` are the ablation endpoints (RAR Table 2). Target-aware positions (RAR sec. 3.2, Fig. 3b) tell each
input which position comes next; `target_aware = false` removes them for the ablation. Sampling is in the
scan order with the KV cache, exactly as `ar`, or with `sample.order=random` a fresh permutation per sample
(the order RAR samples its "pure random" Table 2 row in), the KV cache kept.

The released model (bytedance/1d-tokenizer, `modeling/rar.py`) differs from this lighter default in two
ways, both options here and both set by the `rar-*` presets: a learned cls token in front of the class
token (`cls_token`), and an adaLN condition that is the class embedding plus a learned per-position
embedding (`position_condition`), which makes every position's modulation a matmul of its own (counted in
the FLOPs). The reference also trains without EMA (the presets set `train.ema_decay=0`, which makes the
EMA weights the trained ones).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from isynth.conditions import Conditions
from isynth.config import RunConfig, check
from isynth.diffhead import DiffHeadConfig
from isynth.heads import head_sections
from isynth.paradigms.ar import AR, ARSampling
from isynth.scans import SCANS, scan_order
from isynth.tokenizers.base import Tokenizer


@dataclass(frozen=True)
class RARConfig:
    class_dropout: float = 0.1              # label -> null class during training, for CFG (RAR: 0.1)
    order: Literal["anneal", "random", "scan"] = "anneal" # anneal random -> scan order (RAR), or one endpoint
    scan: Literal[SCANS] = "raster"         # the fixed order annealing ends in (RAR Table 3), sampled in
    anneal_start_step: int | None = None    # None: 50% of training steps
    anneal_end_step: int | None = None      # None: 75% of training steps
    target_aware: bool = True               # add the embedding of the position predicted next (RAR sec. 3.2)
    cls_token: bool = False                 # a learned cls token before the class token (the reference's)
    position_condition: bool = False        # adaLN on class + learned per-position embedding (the reference's)
    head: DiffHeadConfig | None = None      # the diffusion head, with continuous tokens

    def __post_init__(self):
        check(0 <= self.class_dropout < 1, "method.class_dropout must be in [0, 1)")
        s, e = self.anneal_start_step, self.anneal_end_step
        check(s is None or s >= 0, "method.anneal_start_step must be >= 0")
        check(e is None or e >= 0, "method.anneal_end_step must be >= 0")
        check(s is None or e is None or e >= s, "method.anneal_end_step must be >= anneal_start_step")


def random_ratio(step: int, start: int, end: int) -> float:
    """Probability r of a random permutation at `step` (RAR eq. 4; 1d-tokenizer's `get_rar_random_ratio`)."""
    if step < start:
        return 1.0
    if step >= end:
        return 0.0
    return 1.0 - (step - start) / (end - start)


class RAR(AR):
    name = "rar"

    @classmethod
    def sections(cls, discrete: bool) -> tuple[RARConfig, ARSampling]:
        head, head_sampling = head_sections(discrete)
        return RARConfig(head=head), ARSampling(head=head_sampling)

    def __init__(self, run: RunConfig[RARConfig, ARSampling], tokenizer: Tokenizer, conditions: Conditions):
        m = run.method
        scan = None if m.scan == "raster" else scan_order(m.scan, tokenizer.grid)
        super().__init__(run, tokenizer, conditions, target_aware=m.target_aware, scan=scan,
                         cls_token=m.cls_token, position_condition=m.position_condition)

    def anneal_window(self) -> tuple[int, int]:
        m, total = self.run.method, self.total_steps
        start = m.anneal_start_step if m.anneal_start_step is not None else total // 2
        end = m.anneal_end_step if m.anneal_end_step is not None else (3 * total) // 4
        return start, max(start, end)

    def current_ratio(self) -> float:
        order = self.run.method.order
        if order != "anneal":
            return 1.0 if order == "random" else 0.0
        return random_ratio(self.train_step, *self.anneal_window())

    def training_order(self, batch: int, device) -> Tensor | None:
        r = self.current_ratio()
        if r <= 0.0:
            return self.scan_order(batch)
        perms = torch.rand(batch, self.seq_len, device=device).argsort(dim=1)  # (B, N) uniform permutations
        scan = self.scan_order(batch)
        scan = torch.arange(self.seq_len, device=device).expand(batch, -1) if scan is None else scan
        use_random = torch.rand(batch, 1, device=device) < r  # (B, 1)
        return torch.where(use_random, perms, scan)
