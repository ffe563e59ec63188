"""The training loop's parts by what they promise: the budget in steps, the warm-up + cosine rate at
worked-out points (RAR Table 6's schedule), seeds and batches that are pure functions of the step (exact
resumption), AdamW's parameter groups (GPT-2 / MAR: no decay on biases, norms, embeddings), one optimizer
step with clipping and accumulation, the divergence messages, and the log's truncation on resume."""
from __future__ import annotations

import json
import math
import re
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import isynth.trainer as trainer
from isynth.backbone import Transformer
from isynth.config import TrainConfig
from isynth.errors import Diverged, IsynthError
from isynth.presets import make_run
from isynth.trainer import (
    BatchOrder,
    all_finite,
    append_log,
    build,
    build_optimizer,
    ema_decay_at,
    lr_at,
    prepare_training,
    step_seed,
    total_steps_for,
    train_step,
    truncate_log,
)


def test_a_step_budget_is_taken_as_it_is():
    assert total_steps_for(TrainConfig(max_steps=7), 10**12) == 7


@pytest.mark.parametrize("flops,steps", [(1000.0, 1), (1999.0, 1), (2000.0, 2), (10_500.0, 10)])
def test_a_flops_budget_is_the_whole_steps_it_pays_for(flops, steps):
    """100 FLOPs per sample at batch 10: 1,000 FLOPs a step, whole steps only."""
    assert total_steps_for(TrainConfig(train_flops=flops, batch_size=10), 100) == steps


def test_a_flops_budget_below_one_step_says_what_a_step_costs():
    with pytest.raises(IsynthError,
                       match=r"^train\.train_flops=999 is less than one step \(1e\+03 FLOPs at batch 10\)$"):
        total_steps_for(TrainConfig(train_flops=999.0, batch_size=10), 100)


def test_warmup_rises_linearly_to_the_peak():
    cfg = TrainConfig(lr=2e-3, min_lr=0.0, warmup_fraction=0.25, max_steps=40)
    assert [lr_at(s, 40, cfg) for s in range(10)] == pytest.approx([2e-3 * (s + 1) / 10 for s in range(10)])


@pytest.mark.parametrize("step,progress", [(10, 0.0), (20, 1 / 3), (25, 0.5), (35, 5 / 6), (40, 1.0)])
def test_cosine_decay_after_the_warmup(step, progress):
    """lr(p) = min + (lr - min) (1 + cos(pi p)) / 2 with p the share of the post-warm-up steps done."""
    cfg = TrainConfig(lr=2e-3, min_lr=2e-4, warmup_fraction=0.25, max_steps=40)
    want = 2e-4 + (2e-3 - 2e-4) * (1 + math.cos(math.pi * progress)) / 2
    assert lr_at(step, 40, cfg) == pytest.approx(want)


def test_a_warmup_shorter_than_a_step_is_none():
    """0.05 of 10 steps is 0.5 of a step: no warm-up, the peak rate from step 0."""
    cfg = TrainConfig(lr=1e-3, min_lr=0.0, warmup_fraction=0.05, max_steps=10)
    assert lr_at(0, 10, cfg) == pytest.approx(1e-3)
    assert lr_at(1, 1, TrainConfig(lr=1e-3, min_lr=1e-4, warmup_fraction=0.0, max_steps=1)) == pytest.approx(1e-4)


def test_a_constant_rate_holds_after_the_warmup():
    cfg = TrainConfig(lr=2e-3, min_lr=0.0, warmup_fraction=0.25, lr_schedule="constant", max_steps=40)
    assert lr_at(4, 40, cfg) == pytest.approx(1e-3) and all(lr_at(s, 40, cfg) == 2e-3 for s in (10, 25, 39))


def test_ema_decay_is_capped_by_its_warmup():
    """min(decay, (1 + s) / (10 + s)): 0.1 at the start, the cap from step (10 d - 1) / (1 - d) on."""
    assert ema_decay_at(0, 0.5) == pytest.approx(0.1)
    assert ema_decay_at(8, 0.5) == pytest.approx(0.5)  # (1 + 8) / 18 = 0.5
    assert ema_decay_at(7, 0.5) == pytest.approx(8 / 17)
    assert ema_decay_at(3, 0.99) == pytest.approx(4 / 13)


def test_step_seeds_are_distinct_in_range_and_fixed_across_versions():
    """Every (step, rank) of a run gets its own seed, a pure function of (seed, step, rank): the values are
    pinned because a run resumed by another version must draw the same numbers."""
    seeds = {step_seed(5, s, r) for s in range(500) for r in range(4)}
    assert len(seeds) == 2000
    assert step_seed(0, 0, 0) == 0 and step_seed(1, 2, 3) == 1_009_005_048
    assert step_seed(0, 1, 0) != step_seed(0, 0, 1) != step_seed(1, 0, 0)
    big = step_seed(2**63 - 1, 10**9, 7)
    assert 0 <= big < 2**63 and big == ((2**63 - 1) * 1_000_003 + 10**9) * 1_009 % 2**63 + 7


def test_batches_walk_through_seeded_epoch_permutations():
    order = BatchOrder(10, 4, seed=3)
    stream = np.concatenate([order.indices(s) for s in range(5)])  # 20 indices: two epochs
    assert stream.dtype == np.int64 and len(stream) == 20
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:])  # a fresh permutation per epoch
    assert np.array_equal(stream[:10], np.random.default_rng([3, 0]).permutation(10))
    assert np.array_equal(stream[10:], np.random.default_rng([3, 1]).permutation(10))


def test_a_batch_is_a_function_of_the_step_alone():
    """Random access (a resumed run starts mid-way) gives the batches of a run from step 0."""
    a, b = BatchOrder(10, 4, seed=3), BatchOrder(10, 4, seed=3)
    forward = [a.indices(s).tolist() for s in range(6)]
    backward = [b.indices(s).tolist() for s in reversed(range(6))][::-1]
    assert forward == backward
    assert BatchOrder(10, 4, seed=4).indices(0).tolist() != forward[0]
    assert BatchOrder(3, 8, seed=0).indices(0).tolist()[:3] == np.random.default_rng([0, 0]).permutation(3).tolist()
    assert BatchOrder(10, 4, seed=3).indices(3).tolist() == forward[3]  # a fresh order, first asked in epoch 1


class Net(torch.nn.Module):
    """A paradigm-shaped module: an embedding, a linear layer and a norm, loss = mean squared output."""

    def __init__(self):
        super().__init__()
        self.tok_embed = torch.nn.Embedding(5, 4)
        self.proj = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)

    def forward(self, tokens, labels):
        return self.norm(self.proj(self.tok_embed(tokens))).mul(labels[:, None, None]).square().mean()


def test_adamw_decays_matrices_only():
    net = Net()
    cfg = TrainConfig(lr=3e-3, weight_decay=0.2, beta1=0.8, beta2=0.95, max_steps=1)
    opt = build_optimizer(net, cfg, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert {id(p) for p in decay["params"]} == {id(net.proj.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(net.tok_embed.weight), id(net.proj.bias), id(net.norm.weight),
                                                   id(net.norm.bias)}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert all(g["lr"] == 3e-3 and g["betas"] == (0.8, 0.95) and g["fused"] for g in opt.param_groups)


def _grad_norm(net, tokens, labels):
    net.zero_grad()
    net(tokens, labels).backward()
    norm = torch.sqrt(sum(p.grad.square().sum() for p in net.parameters()))
    net.zero_grad()
    return norm


def test_one_step_sets_the_rate_clips_and_reports_the_norm_before_clipping():
    torch.manual_seed(0)
    start = Net()
    tokens, labels = torch.randint(0, 5, (8, 3)), torch.rand(8) + 0.5
    norm_before = _grad_norm(start, tokens, labels)
    moves = {}
    for clip in (1e9, 1e-12):
        net = Net()
        net.load_state_dict(start.state_dict())
        opt = build_optimizer(net, TrainConfig(max_steps=1, weight_decay=0.0), torch.device("cpu"))
        loss, norm, bad = train_step(net, net, opt, tokens, labels, lr=0.5, grad_clip=clip, amp=nullcontext())
        assert all(g["lr"] == 0.5 for g in opt.param_groups)
        torch.testing.assert_close(norm, norm_before)
        torch.testing.assert_close(loss, start(tokens, labels).detach())
        assert not bad and all(p.grad is None for p in net.parameters())  # gradients are released
        moves[clip] = (net.proj.weight - start.proj.weight).abs().detach()
    # AdamW's first step moves a weight by lr * g / (|g| + eps): lr for a real gradient, almost nothing for
    # one clipped far below eps = 1e-8
    torch.testing.assert_close(moves[1e9], torch.full_like(moves[1e9], 0.5), rtol=1e-2, atol=0)
    assert moves[1e-12].max() < 0.05


def test_accumulated_micro_batches_add_up_to_the_whole_batch():
    torch.manual_seed(0)
    tokens, labels = torch.randint(0, 5, (8, 3)), torch.rand(8) + 0.5
    results = []
    for accum in (1, 2, 4):
        torch.manual_seed(1)
        net = Net()
        opt = build_optimizer(net, TrainConfig(max_steps=1), torch.device("cpu"))
        loss, norm, _ = train_step(net, net, opt, tokens, labels, lr=1e-2, grad_clip=1e9, amp=nullcontext(),
                                   accum=accum)
        results.append((loss, norm, net.proj.weight.detach().clone()))
    for loss, norm, weight in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(norm, results[0][1])
        torch.testing.assert_close(weight, results[0][2])


def test_an_odd_batch_is_one_micro_batch_unless_asked():
    """By default the whole batch is one micro-batch: its loss is the mean over all rows."""
    torch.manual_seed(0)
    net = Net()
    tokens, labels = torch.randint(0, 5, (3, 3)), torch.tensor([0.5, 1.0, 3.0])
    want = net(tokens, labels).detach()
    opt = build_optimizer(net, TrainConfig(max_steps=1), torch.device("cpu"))
    loss, _, _ = train_step(net, net, opt, tokens, labels, 1e-3, 1.0, nullcontext())
    torch.testing.assert_close(loss, want)


class FakeDDP:
    """Stands in for DistributedDataParallel: records which micro-batches ran inside no_sync()."""

    def __init__(self, model):
        self.model, self.synced, self.inside = model, [], False

    def __call__(self, tokens, labels):
        self.synced.append(not self.inside)
        return self.model(tokens, labels)

    def no_sync(self):
        ddp = self

        class Context:
            def __enter__(self):
                ddp.inside = True

            def __exit__(self, *exc):
                ddp.inside = False

        return Context()


def test_ddp_synchronises_only_the_last_micro_batch():
    torch.manual_seed(0)
    net = Net()
    ddp = FakeDDP(net)
    opt = build_optimizer(net, TrainConfig(max_steps=1), torch.device("cpu"))
    train_step(ddp, net, opt, torch.randint(0, 5, (6, 3)), torch.ones(6), 1e-3, 1.0, nullcontext(), accum=3)
    assert ddp.synced == [False, False, True]
    ddp.synced.clear()
    train_step(ddp, net, opt, torch.randint(0, 5, (6, 3)), torch.ones(6), 1e-3, 1.0, nullcontext())
    assert ddp.synced == [True]


class Unlabelled(torch.nn.Module):
    """A tokenizer-like module trained without labels: labels arrive as None."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, x, labels):
        assert labels is None
        return (self.w * x).square().mean()


def test_training_without_labels():
    m = Unlabelled()
    opt = build_optimizer(m, TrainConfig(max_steps=1), torch.device("cpu"))
    loss, _, bad = train_step(m, m, opt, torch.ones(4, 3), None, 1e-3, 1.0, nullcontext(), accum=2)
    assert loss.item() == pytest.approx(1.0) and not bad


class InfiniteGradient(torch.nn.Module):
    """A finite loss (0) whose gradient is infinite: sqrt at 0."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x, labels):
        return self.w.abs().sqrt().sum()


def test_an_infinite_gradient_norm_is_flagged_even_with_a_finite_loss():
    m = InfiniteGradient()
    opt = build_optimizer(m, TrainConfig(max_steps=1), torch.device("cpu"))
    loss, norm, bad = train_step(m, m, opt, torch.zeros(2, 1), torch.zeros(2), 1e-3, 1.0, nullcontext(),
                                 skip_nonfinite=True)
    assert torch.isfinite(loss) and not torch.isfinite(norm) and bool(bad)


def test_without_skipping_a_bad_batch_is_applied():
    """skip_nonfinite is off by default: the update happens (the loop's guard stops training)."""
    torch.manual_seed(0)
    net = Net()
    opt = build_optimizer(net, TrainConfig(max_steps=1), torch.device("cpu"))
    tokens, labels = torch.randint(0, 5, (4, 3)), torch.tensor([1.0, float("nan"), 1.0, 1.0])
    _, _, bad = train_step(net, net, opt, tokens, labels, 1e-2, 1.0, nullcontext())
    assert bool(bad) and not torch.isfinite(net.proj.weight).all()


def test_a_non_finite_loss_is_flagged_and_with_skipping_changes_nothing():
    torch.manual_seed(0)
    net = Net()
    opt = build_optimizer(net, TrainConfig(max_steps=1), torch.device("cpu"))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tokens, labels = torch.randint(0, 5, (4, 3)), torch.tensor([1.0, float("nan"), 1.0, 1.0])
    loss, norm, bad = train_step(net, net, opt, tokens, labels, 1e-2, 1.0, nullcontext(), skip_nonfinite=True)
    assert bool(bad) and not torch.isfinite(loss)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    good = torch.ones(4)
    _, _, bad = train_step(net, net, opt, tokens, good, 1e-2, 1.0, nullcontext(), skip_nonfinite=True)
    assert not bool(bad) and not torch.equal(before["proj.weight"], net.proj.weight)


def test_training_options_reach_every_backbone(monkeypatch):
    compiled = []
    monkeypatch.setattr(Transformer, "compile_training", lambda self: compiled.append(self))
    model = build(make_run("mar", "tiny"), torch.device("cpu")).model
    stacks = [m for m in model.modules() if isinstance(m, Transformer)]
    assert len(stacks) == 2  # encoder and decoder
    prepare_training(model, TrainConfig(max_steps=1, checkpoint_activations=True, compile="auto"), torch.device("cpu"))
    assert all(m.checkpoint_activations for m in stacks) and compiled == []  # auto: CUDA only
    prepare_training(model, TrainConfig(max_steps=1, compile="on"), torch.device("cpu"))
    assert compiled == stacks and not any(m.checkpoint_activations for m in stacks)
    prepare_training(model, TrainConfig(max_steps=1, compile="off"), torch.device("cuda"))
    assert len(compiled) == 2
    prepare_training(model, TrainConfig(max_steps=1, compile="auto"), torch.device("cuda"))
    assert len(compiled) == 4


def test_build_makes_the_model_and_its_budget():
    s = build(make_run("ar", "tiny", ["train.max_steps=9"]), torch.device("cpu"))
    assert s.total_steps == 9 and s.flops_per_sample == s.model.train_flops_per_sample() > 0
    assert s.run.paradigm == "ar" and s.dataset.num_classes == 10
    get = build(make_run("get", "tiny"), torch.device("cpu"), check_data=False)  # no pairs: not validated
    assert get.total_steps == 20
    with pytest.raises(IsynthError, match="get trains on teacher pairs"):
        build(make_run("get", "tiny"), torch.device("cpu"))


def _check(bad, first, skip=0, last=0):
    trainer._check_finite(torch.tensor(bad), torch.tensor(first), TrainConfig(max_steps=1, skip_nonfinite=skip), last)


def test_divergence_messages_name_the_step_and_what_is_kept():
    _check(0, 0)
    _check(2, 5, skip=2)  # within the skip budget
    with pytest.raises(Diverged, match=r"^training diverged at step 5: the loss or gradient norm is not finite; "
                                       r"the checkpoint of step 4 is kept \(lower train\.lr, or skip such batches "
                                       r"with train\.skip_nonfinite=N\)$"):
        _check(1, 5, last=4)
    with pytest.raises(Diverged, match=r"at step 3: .*; no checkpoint was written"):
        _check(1, 3)
    with pytest.raises(Diverged, match=re.escape("training diverged: 3 batches had a non-finite loss or gradient "
                                                 "norm, more than train.skip_nonfinite=2 (the first at step 7); "
                                                 "the checkpoint of step 6 is kept")):
        _check(3, 7, skip=2, last=6)


def test_all_finite_checks_every_value():
    assert all_finite([]) and all_finite([torch.ones(3), torch.zeros(2, 2)])
    assert not all_finite([torch.ones(3), torch.tensor([1.0, float("inf")])])
    assert not all_finite([torch.tensor([float("nan")]), torch.ones(1)])


def test_log_lines_are_appended_one_per_line(tmp_path):
    path = tmp_path / "log.jsonl"
    append_log(path, [])
    assert not path.exists()
    append_log(path, ['{"step": 1}', '{"step": 2}'])
    append_log(path, ['{"step": 3}'])
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'


def test_resuming_drops_log_lines_past_the_checkpoint_and_torn_ones(tmp_path):
    path = tmp_path / "log.jsonl"
    truncate_log(path, 3)  # no log yet: nothing to do
    assert not path.exists()
    lines = [{"step": 1}, {"step": 2.0}, {"step": 3, "loss": 1.5}, {"step": 4}, [5], {"loss": 2}]
    path.write_text('{"step": 0, "lo\n' + "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 5, "lo')
    truncate_log(path, 3)
    assert path.read_text() == '{"step": 1}\n{"step": 3, "loss": 1.5}\n'
    mtime = path.stat().st_mtime_ns
    truncate_log(path, 3)  # already clean: not rewritten
    assert path.stat().st_mtime_ns == mtime
    truncate_log(path, 0)
    assert path.read_text() == ""
