"""Exact resumption of training: in-process crashes at any point, SIGKILL of the command, a torn log line,
and bitwise-reproducible training at the main job's size; DDP on two processes."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from traintools import (
    RESUME_OVERRIDES,
    RUN_FILES,
    Crash,
    assert_same_tensors,
    crash_at,
    deterministic,
    log_of,
    meta_of,
    sub_env,
)

import isynth.trainer as trainer
from isynth.checkpoint import CHECKPOINT, LOG, load_checkpoint
from isynth.presets import make_run
from isynth.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, single_thread):
    """The uninterrupted in-process run that the resumed ones must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(make_run("rar", "tiny", RESUME_OVERRIDES), out, progress=False)
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
    assert set(os.listdir(killed)) == RUN_FILES | {"command.txt"}, "stale temporary files after resuming"


# --- 3. DDP ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ddp_two_processes(tmp_path, cache):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to the interpreter")
    out, single = tmp_path / "ddp", tmp_path / "single"
    # Without label dropout the loss is a function of the batch alone, so two processes with 16 images each
    # must follow one process with all 32, if and only if their gradients are averaged (DDP).
    args = ["-m", "isynth", "train", "ar", "--preset", "tiny", "--steps", "6", "--quiet", "method.class_dropout=0"]
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", *args, "--out", str(out)],
                          env=sub_env(cache), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    one = subprocess.run([sys.executable, *args, "--out", str(single)], env=sub_env(cache), capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    w_ddp, w_one = load_checkpoint(out / CHECKPOINT)[0], load_checkpoint(single / CHECKPOINT)[0]
    for k in w_one:
        torch.testing.assert_close(w_ddp[k], w_one[k], rtol=1e-4, atol=1e-5, msg=k)
    assert set(os.listdir(out)) == RUN_FILES | {"command.txt"}  # rank 0 alone records the command
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
