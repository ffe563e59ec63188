"""The training loop: exact resumption (in-process crashes, SIGKILL), DDP, FLOPs budgets, LR / EMA schedules,
the log, and re-running finished or mismatched run directories."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import isynth.trainer as trainer
from isynth.checkpoint import CHECKPOINT, CONFIG, LOG, load_checkpoint
from isynth.cli import main as cli_main
from isynth.config import TrainConfig
from isynth.hardware import peak_flops
from isynth.presets import make_run
from isynth.trainer import build, ema_decay_at, lr_at, train

RUN_FILES = {CONFIG, CHECKPOINT, LOG}
LOG_KEYS = {"step", "loss", "lr", "train_flops", "samples_per_s", "mfu", "elapsed_s"}
# rar exercises every kind of per-step randomness: batch choice, label dropout, random orders annealed over
# the run (total 12 -> anneal between steps 6 and 9), and here dropout masks too.
RESUME_OVERRIDES = ["train.max_steps=12", "train.ckpt_every=4", "train.log_every=2",
                    "model.dropout=0.1", "model.attn_dropout=0.1"]


class Crash(Exception):
    """Stands in for a process dying at a chosen point of the loop."""


# --- fixtures and helpers ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One ISYNTH_CACHE for the whole file, with the 1-thread CPU peak measured once."""
    path = tmp_path_factory.mktemp("isynth-cache")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ISYNTH_CACHE", str(path))
        torch.set_num_threads(1)
        try:
            peak_flops(torch.device("cpu"))
        finally:
            torch.set_num_threads(threads)
    return path


@pytest.fixture(autouse=True)
def one_thread(cache, monkeypatch):
    """Tests train in-process on one thread (the tiny model gains nothing from more; steady under load)."""
    monkeypatch.setenv("ISYNTH_CACHE", str(cache))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sub_env(cache: Path) -> dict:
    return dict(os.environ, ISYNTH_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(run_dir) / CHECKPOINT)


def assert_same_tensors(a_dir: Path, b_dir: Path) -> None:
    a, b = tensors(a_dir), tensors(b_dir)
    assert a.keys() == b.keys()
    prefixes = {k.split("/")[0] for k in a}
    assert prefixes == {"model", "ema", "optim"}
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def meta_of(run_dir: Path) -> dict:
    with safe_open(Path(run_dir) / CHECKPOINT, framework="pt") as f:
        return json.loads(f.metadata()["meta"])


def log_of(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (Path(run_dir) / LOG).read_text().splitlines()]


def deterministic(rec: dict) -> dict:
    """The log fields that must be identical between an interrupted and an uninterrupted run."""
    return {k: rec[k] for k in ("step", "loss", "lr", "train_flops")}


def crash_at(monkeypatch, step: int) -> None:
    """Make the loop die in step `step`, after its optimizer update and before its EMA update."""
    real = trainer.ema_decay_at

    def dying(s, decay):
        if s == step:
            raise Crash(f"killed in step {s}")
        return real(s, decay)

    monkeypatch.setattr(trainer, "ema_decay_at", dying)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """The uninterrupted in-process run that the resumed ones must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ISYNTH_CACHE", str(cache))
        torch.set_num_threads(1)
        try:
            train(make_run("rar", "tiny", RESUME_OVERRIDES), out, progress=False)
        finally:
            torch.set_num_threads(threads)
    return out


# --- 1. exact resumption in-process -----------------------------------------------------------------

def test_resume_after_crashes_is_exact(reference, tmp_path, monkeypatch):
    run = make_run("rar", "tiny", RESUME_OVERRIDES)
    out = tmp_path / "run"
    for step, expect_ckpt in ((6, 4), (9, 8)):  # die between checkpoints, twice
        with monkeypatch.context() as mp:
            crash_at(mp, step)
            with pytest.raises(Crash):
                train(run, out, progress=False)
        assert meta_of(out)["step"] == expect_ckpt
    train(run, out, progress=False)
    assert_same_tensors(reference, out)
    m, r = meta_of(out), meta_of(reference)
    assert (m["step"], m["total_steps"], m["train_flops"]) == (r["step"], r["total_steps"], r["train_flops"]) == (
        12, 12, r["flops_per_sample"] * 32 * 12)
    # The log is each step once, and the losses (ckpt_every a multiple of log_every) are the same numbers.
    assert [deterministic(x) for x in log_of(out)] == [deterministic(x) for x in log_of(reference)]
    assert [x["step"] for x in log_of(out)] == [2, 4, 6, 8, 10, 12]
    assert set(os.listdir(out)) == RUN_FILES


def test_crash_during_first_checkpoint_write(reference, tmp_path, monkeypatch):
    """Dying while the first checkpoint is written leaves log lines but no checkpoint, and a temp file."""
    run = make_run("rar", "tiny", RESUME_OVERRIDES)
    out = tmp_path / "run"
    real = trainer.save_checkpoint

    def dying_save(path, *args, **kwargs):
        (Path(path).parent / f".{CHECKPOINT}.x1y2z3.tmp").write_bytes(b"half a safetensors file")
        raise Crash("killed while writing the checkpoint")

    with monkeypatch.context() as mp:
        mp.setattr(trainer, "save_checkpoint", dying_save)
        with pytest.raises(Crash):
            train(run, out, progress=False)
    assert not (out / CHECKPOINT).exists()
    assert [x["step"] for x in log_of(out)] == [2, 4]  # written before the checkpoint
    assert trainer.save_checkpoint is real
    train(run, out, progress=False)
    assert_same_tensors(reference, out)
    assert [deterministic(x) for x in log_of(out)] == [deterministic(x) for x in log_of(reference)]
    assert set(os.listdir(out)) == RUN_FILES


def test_resume_survives_a_torn_log_line(reference, tmp_path, monkeypatch):
    """A kill in the middle of appending to log.jsonl leaves half a line; resuming drops it."""
    run = make_run("rar", "tiny", RESUME_OVERRIDES)
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        crash_at(mp, 6)
        with pytest.raises(Crash):
            train(run, out, progress=False)
    with open(out / LOG, "a") as f:
        f.write('{"step": 6, "loss": 2.1')
    train(run, out, progress=False)
    assert_same_tensors(reference, out)
    assert [deterministic(x) for x in log_of(out)] == [deterministic(x) for x in log_of(reference)]


# --- 2. resumption after SIGKILL of the command ------------------------------------------------------

# `isynth train` exactly as the command line runs it, slowed by 50 ms a step so that the kill surely
# lands before the end (a tiny step takes ~15 ms); the sleep changes no number.
SLOW_CLI = ("import sys, time\n"
            "import isynth.trainer as t\n"
            "real = t.ema_decay_at\n"
            "def slow(step, decay):\n"
            "    time.sleep(0.05)\n"
            "    return real(step, decay)\n"
            "t.ema_decay_at = slow\n"
            "from isynth.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path, cache):
    env = sub_env(cache)
    args = ["train", "rar", "--preset", "tiny", "--steps", "40", "train.ckpt_every=5", "--quiet"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"

    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args, "--out", str(killed)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, seen = time.monotonic() + 240, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                seen = meta_of(killed)["step"]
            except Exception:  # not written yet
                seen = None
            if seen is not None and seen >= 5:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stdout.read().decode()[-2000:]}"
        assert seen is not None and 5 <= seen < 40
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    _, _, _, meta = load_checkpoint(killed / CHECKPOINT)  # the killed run left a loadable checkpoint
    assert 5 <= meta["step"] < 40 and meta["step"] % 5 == 0
    # What a kill inside a checkpoint or log write leaves behind (the names mkstemp would have chosen).
    (killed / f".{CHECKPOINT}.k1ll3d.tmp").write_bytes(b"\0" * 100)
    (killed / f".{LOG}.k1ll3d.tmp").write_text('{"step": 5')

    cmd = [sys.executable, "-m", "isynth", *args]
    for out in (killed, whole):
        done = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    assert_same_tensors(whole, killed)
    assert meta_of(killed)["step"] == 40
    assert [x["step"] for x in log_of(killed)] == list(range(5, 41, 5))
    assert [deterministic(x) for x in log_of(killed)] == [deterministic(x) for x in log_of(whole)]
    assert set(os.listdir(killed)) == RUN_FILES, "stale temporary files after resuming"


# --- 3. DDP ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ddp_two_processes(tmp_path, cache):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to the interpreter")
    out = tmp_path / "ddp"
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "isynth", "train", "ar", "--preset", "tiny",
                           "--steps", "6", "--out", str(out), "--quiet"],
                          env=sub_env(cache), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert set(os.listdir(out)) == RUN_FILES
    weights, ema, opt, meta = load_checkpoint(out / CHECKPOINT)
    assert meta["world_size"] == 2 and meta["step"] == meta["total_steps"] == 6
    assert meta["train_flops"] == 6 * 32 * meta["flops_per_sample"]  # global batch 32, split 16 + 16
    for t in [*weights.values(), *ema.values()]:
        if t.is_floating_point():
            assert torch.isfinite(t).all()
    assert opt["state"], "optimizer state was saved"
    log = log_of(out)
    assert [x["step"] for x in log] == [5, 6]
    assert all(math.isfinite(x["loss"]) and x["loss"] > 0 and 0 < x["mfu"] < 1.5 for x in log)
    assert log[-1]["train_flops"] == meta["train_flops"]


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
        return (ckpt.read_bytes(), ckpt.stat().st_mtime_ns, (out / LOG).read_text(), (out / CONFIG).read_text()) == before

    rc, err = _cli(capsys, *args)
    assert rc == 0 and err == ""
    assert unchanged() and set(os.listdir(out)) == RUN_FILES

    for other in (["--steps", "8"], ["--steps", "4", "model.width=64"], ["--steps", "4", "train.lr=1e-2"]):
        rc, err = _cli(capsys, "train", "ar", "--preset", "tiny", "--out", out, "--quiet", *other)
        assert rc == 2
        assert len(err.strip().splitlines()) == 1 and err.startswith("isynth: error:") and "different config" in err
        assert unchanged()
    rc, err = _cli(capsys, "train", "rar", "--preset", "tiny", "--steps", "4", "--out", out, "--quiet")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and unchanged()


@pytest.mark.slow
@pytest.mark.parametrize("paradigm,extra", [("ar", []), ("rar", ["method.order=random"])])
def test_main_job_size_is_bitwise_reproducible_on_two_threads(tmp_path, cache, paradigm, extra):
    """At the `cpu` preset's batch, gradients that accumulate through indexing are summed by several
    threads in varying order; two identical runs must still give identical weights (exact resume needs it)."""
    args = [sys.executable, "-m", "isynth", "train", paradigm, "--preset", "cpu", "--steps", "3", "--quiet",
            "train.ckpt_every=3", "train.log_every=1", *extra]
    env = {**sub_env(cache), "OMP_NUM_THREADS": "2"}
    for name in ("a", "b"):
        subprocess.run([*args, "--out", str(tmp_path / name)], env=env, check=True, timeout=300)
    assert_same_tensors(tmp_path / "a", tmp_path / "b")
