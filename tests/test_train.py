"""The training loop: FLOPs budgets, LR / EMA schedules, the log, and re-running finished or mismatched run
directories (resumption: test_resume.py)."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from traintools import LOG_KEYS, RUN_FILES, log_of, meta_of

from isynth.checkpoint import CHECKPOINT, CONFIG, LOG, load_checkpoint
from isynth.cli import main as cli_main
from isynth.config import TrainConfig
from isynth.presets import make_run
from isynth.trainer import build, ema_decay_at, lr_at, train

pytestmark = pytest.mark.usefixtures("one_thread")


# --- 4. FLOPs budget ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ar_per_step():
    s = build(make_run("ar", "tiny"), torch.device("cpu"))
    assert s.run.train.batch_size == 32
    return s.flops_per_sample, s.flops_per_sample * s.run.train.batch_size


def _cli(capsys, *args) -> tuple[int, str]:
    rc = cli_main([str(a) for a in args])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("steps, extra", [(3, 0.0), (3, 0.5), (2, 0.999)])
def test_flops_budget_sets_steps(tmp_path, capsys, ar_per_step, steps, extra):
    per_sample, per_step = ar_per_step
    budget = per_step * (steps + extra)
    out = tmp_path / "run"
    rc, err = _cli(capsys, "train", "ar", "--preset", "tiny", "--flops", repr(float(budget)), "--out", out, "--quiet")
    assert rc == 0, err
    meta = meta_of(out)
    assert meta["step"] == meta["total_steps"] == steps == math.floor(budget / per_step)
    assert meta["flops_per_sample"] == per_sample
    assert log_of(out)[-1]["step"] == steps
    assert log_of(out)[-1]["train_flops"] == meta["train_flops"] == steps * per_sample * 32
    assert meta["train_flops"] <= budget
    assert json.loads((out / CONFIG).read_text())["train"]["max_steps"] is None


def test_flops_budget_below_one_step_is_rejected(tmp_path, capsys, ar_per_step):
    _, per_step = ar_per_step
    out = tmp_path / "parent" / "run"
    rc, err = _cli(capsys, "train", "ar", "--preset", "tiny", "--flops", per_step / 2, "--out", out, "--quiet")
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("isynth: error:") and "one step" in err
    assert not out.exists() and not out.parent.exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]


# --- 5. schedules ------------------------------------------------------------------------------------

def test_lr_warmup_then_cosine_to_min_lr():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_fraction=0.1, max_steps=100)
    total = 100  # warm-up: steps 0..9
    assert lr_at(0, total, cfg) == pytest.approx(1e-4)
    assert lr_at(4, total, cfg) == pytest.approx(5e-4)
    assert lr_at(9, total, cfg) == pytest.approx(1e-3)
    assert lr_at(10, total, cfg) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(55, total, cfg) == pytest.approx((1e-3 + 1e-5) / 2)  # half-way through the cosine
    assert lr_at(100, total, cfg) == pytest.approx(1e-5)  # the end of the schedule is min_lr
    last = lr_at(99, total, cfg)
    assert 1e-5 < last < 1e-5 + 1e-6
    lrs = [lr_at(s, total, cfg) for s in range(total)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert all(1e-5 <= x <= 1e-3 + 1e-12 for x in lrs)


def test_constant_lr_after_warmup_and_without():
    """train.lr_schedule=constant (MAR, GET): the warm-up, then lr to the end; no warm-up: lr from step 0."""
    cfg = TrainConfig(lr=1e-3, warmup_fraction=0.1, lr_schedule="constant", max_steps=100)
    assert lr_at(4, 100, cfg) == pytest.approx(5e-4)
    assert all(lr_at(s, 100, cfg) == 1e-3 for s in range(10, 101))
    flat = TrainConfig(lr=1e-3, warmup_fraction=0.0, lr_schedule="constant", max_steps=100)
    assert all(lr_at(s, 100, flat) == 1e-3 for s in range(101))
    no_warmup = TrainConfig(lr=2e-3, min_lr=0.0, warmup_fraction=0.0, max_steps=10)
    assert lr_at(0, 10, no_warmup) == pytest.approx(2e-3)
    assert lr_at(5, 10, no_warmup) == pytest.approx(1e-3)


def test_ema_decay_warmup():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(10, 0.999) == pytest.approx(11 / 20)
    assert ema_decay_at(80, 0.9) == pytest.approx(0.9)  # (1+80)/(10+80) = 0.9: the cap is reached
    assert ema_decay_at(79, 0.9) == pytest.approx(80 / 89)
    assert ema_decay_at(10**6, 0.999) == 0.999
    assert ema_decay_at(5, 0.0) == 0.0
    ds = [ema_decay_at(s, 0.999) for s in range(20_000)]
    assert all(a <= b for a, b in zip(ds, ds[1:])) and ds[-1] == 0.999


def test_ema_follows_the_weights(tmp_path):
    """One step: EMA = lerp(init, w1, 1 - 0.1). With ema_decay = 0 the EMA is the weights."""
    run = make_run("ar", "tiny", ["train.max_steps=1"])
    torch.manual_seed(run.train.seed)  # what train() does before building
    init = build(run, torch.device("cpu")).model.state_dict()
    train(run, tmp_path / "one", progress=False)
    weights, ema, _, _ = load_checkpoint(tmp_path / "one" / CHECKPOINT)
    floats = [k for k in init if init[k].is_floating_point()]
    assert any(not torch.equal(weights[k], init[k]) for k in floats)
    for k in floats:
        torch.testing.assert_close(ema[k], torch.lerp(init[k], weights[k], 0.9), rtol=0, atol=1e-6)
    train(make_run("ar", "tiny", ["train.max_steps=3", "train.ema_decay=0"]), tmp_path / "zero", progress=False)
    weights, ema, _, _ = load_checkpoint(tmp_path / "zero" / CHECKPOINT)
    assert all(torch.equal(weights[k], ema[k]) for k in weights)


# --- 6. the log --------------------------------------------------------------------------------------

def test_log_contents(tmp_path, ar_per_step):
    per_sample, per_step = ar_per_step
    run = make_run("ar", "tiny", ["train.max_steps=11", "train.log_every=2", "train.ckpt_every=5"])
    out = train(run, tmp_path / "run", progress=False)
    log = log_of(out)
    assert [x["step"] for x in log] == [2, 4, 6, 8, 10, 11]  # the last, partial window is logged too
    for rec in log:
        assert set(rec) == LOG_KEYS
        assert math.isfinite(rec["loss"]) and rec["loss"] > 0
        assert rec["lr"] == pytest.approx(lr_at(rec["step"] - 1, 11, run.train))  # the lr of the logged step
        assert rec["train_flops"] == rec["step"] * per_step
        assert rec["samples_per_s"] > 0
        assert 0 < rec["mfu"] < 1.5
    elapsed = [x["elapsed_s"] for x in log]
    assert all(a <= b for a, b in zip(elapsed, elapsed[1:])) and elapsed[-1] > 0
    assert log[0]["loss"] > log[-1]["loss"], "the model learns something in 11 steps"
    meta = meta_of(out)
    assert meta["train_flops"] == log[-1]["train_flops"] and meta["elapsed_s"] == pytest.approx(elapsed[-1], abs=0.01)
    assert meta["flops_per_sample"] == per_sample and meta["world_size"] == 1 and meta["peak_flops"] > 0


# --- 7. re-running a run directory -------------------------------------------------------------------

def test_rerun_finished_is_noop_and_other_config_is_rejected(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "ar", "--preset", "tiny", "--steps", "4", "--out", out, "--quiet"]
    rc, err = _cli(capsys, *args)
    assert rc == 0, err
    ckpt = out / CHECKPOINT
    before = (ckpt.read_bytes(), ckpt.stat().st_mtime_ns, (out / LOG).read_text(), (out / CONFIG).read_text())

    def unchanged():
        now = (ckpt.read_bytes(), ckpt.stat().st_mtime_ns, (out / LOG).read_text(), (out / CONFIG).read_text())
        return now == before

    rc, err = _cli(capsys, *args)
    assert rc == 0 and err == ""
    assert unchanged() and set(os.listdir(out)) == RUN_FILES | {"command.txt"}  # `isynth train` records itself

    # (another --steps alone extends the run: test_extend.py)
    for other in (["--steps", "8", "model.width=64"], ["--steps", "4", "train.lr=1e-2"]):
        rc, err = _cli(capsys, "train", "ar", "--preset", "tiny", "--out", out, "--quiet", *other)
        assert rc == 2
        assert len(err.strip().splitlines()) == 1 and err.startswith("isynth: error:") and "different config" in err
        assert unchanged()
    rc, err = _cli(capsys, "train", "rar", "--preset", "tiny", "--steps", "4", "--out", out, "--quiet")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and unchanged()


