"""Never silently wrong, never a lost result: the divergence guard (stop with exit 3 or skip a bounded number
of bad batches; never a non-finite checkpoint), one writer per run directory, evaluation results replaced
only when whole, and resumption that really starts at the checkpoint's step."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from clitools import assert_error, run_cli
from traintools import Crash, crash_at, log_of, meta_of, sub_env, tensors

import isynth.eval.run_eval as run_eval
import isynth.trainer as trainer
from isynth.errors import Diverged, IsynthError
from isynth.files import writer_lock
from isynth.heads import gather_tokens
from isynth.paradigms.ar import AR
from isynth.presets import make_run
from isynth.trainer import build, build_optimizer, train, train_step

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = ["train.max_steps=20", "train.ckpt_every=10", "train.log_every=5"]


def _nan_at(monkeypatch, steps: set[int]):
    """Make AR's loss NaN at the given (0-based) training steps, none of them 0: a diverging batch. By step,
    not by call: the memory estimate's forward passes (isynth.memory) come before step 0."""
    assert 0 not in steps
    real = AR.loss

    def loss(self, tokens, labels):
        value = real(self, tokens, labels)
        return value * float("nan") if self.train_step in steps else value

    monkeypatch.setattr(AR, "loss", loss)


# --- 1. divergence guard ------------------------------------------------------------------------------

def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _nan_at(monkeypatch, set(range(12, 100)))  # step 13 onwards
    with pytest.raises(Diverged, match="diverged at step 13.*checkpoint of step 10 is kept"):
        train(make_run("ar", "tiny", RUN), out, progress=False)
    assert meta_of(out)["step"] == 10
    assert all(torch.isfinite(t).all() for t in tensors(out).values() if t.is_floating_point())
    assert [r["step"] for r in log_of(out)] == [5, 10]
    assert all(r["loss"] == r["loss"] and r["grad_norm"] > 0 for r in log_of(out))  # finite, logged


def test_divergence_before_the_first_checkpoint_writes_none(tmp_path, monkeypatch):
    _nan_at(monkeypatch, {2})
    with pytest.raises(Diverged, match="at step 3.*no checkpoint was written"):
        train(make_run("ar", "tiny", RUN), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_skipping_bad_batches_leaves_weights_and_optimizer_untouched(cache):
    """train.skip_nonfinite: the fused AdamW reads found_inf on the device and makes no update at all."""
    torch.manual_seed(0)
    s = build(make_run("ar", "tiny"), torch.device("cpu"))
    model, cfg = s.model.train(), s.run.train
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    tokens, labels = s.model.training_data(s.dataset)
    tokens, labels = tokens[:8], labels[:8]
    train_step(model, model, opt, tokens, labels, 1e-3, 1.0, trainer.nullcontext(), True)  # one good step
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    real = model.loss
    model.loss = lambda *a: real(*a) * float("nan")
    _, norm, bad = train_step(model, model, opt, tokens, labels, 1e-3, 1.0, trainer.nullcontext(), True)
    assert bool(bad) and not torch.isfinite(norm)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(moments[k], v) for k, v in opt.state_dict()["state"][0].items())  # step count too
    model.loss = real
    _, _, bad = train_step(model, model, opt, tokens, labels, 1e-3, 1.0, trainer.nullcontext(), True)
    assert not bool(bad) and not torch.equal(before["net.blocks.0.mlp.fc1.weight"],
                                              model.state_dict()["net.blocks.0.mlp.fc1.weight"])


def test_skip_budget_counts_and_then_stops(tmp_path, monkeypatch):
    _nan_at(monkeypatch, {3, 7})
    out = train(make_run("ar", "tiny", [*RUN, "train.skip_nonfinite=2"]), tmp_path / "ok", progress=False)
    assert meta_of(out)["step"] == 20 and log_of(out)[-1]["skipped_batches"] == 2
    assert all(torch.isfinite(t).all() for t in tensors(out).values() if t.is_floating_point())
    _nan_at(monkeypatch, {3, 7})
    with pytest.raises(Diverged, match="2 batches.*skip_nonfinite=1.*first at step 4"):
        train(make_run("ar", "tiny", [*RUN, "train.skip_nonfinite=1"]), tmp_path / "stops", progress=False)


def test_a_diverging_command_exits_3_with_one_line(tmp_path, cache):
    r = run_cli("train", "ar", "--preset", "tiny", "--steps", "10", "--out", tmp_path / "run", "--quiet",
                "train.lr=1e30", "train.log_every=1")
    assert r.returncode == 3, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("isynth: error: training diverged at step"), r.stderr


# --- 4. one writer per run directory ------------------------------------------------------------------

def test_a_second_writer_is_refused_while_the_first_holds_the_directory(tmp_path, cache):
    out = tmp_path / "run"
    with writer_lock(out):
        r = run_cli("train", "ar", "--preset", "tiny", "--steps", "2", "--out", out, "--quiet")
        assert_error(r, str(out), "is being written by process", str(os.getpid()))
        assert not out.exists()
        with pytest.raises(IsynthError, match="being written"):
            with writer_lock(out):
                pass
    with writer_lock(out):  # released with the block
        pass
    assert not list(tmp_path.glob(".*.lock"))  # and its file removed


def test_a_killed_writer_leaves_no_stale_lock(tmp_path, cache):
    out = tmp_path / "run"
    code = ("import sys, time; from isynth.files import writer_lock\n"
            f"with writer_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=sub_env(cache))
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(IsynthError, match=f"process {p.pid}"):
        with writer_lock(out):
            pass
    p.send_signal(signal.SIGKILL)
    p.wait()
    with writer_lock(out):  # the OS released it with the process
        pass


# --- 5. evaluation results replaced only when whole ---------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("eval") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ISYNTH_CACHE", str(cache))
        train(make_run("ar", "tiny", ["train.max_steps=4"]), out, progress=False)
    return out


def _results(run_dir):
    return {n: (run_dir / n).read_bytes() for n in ("samples.npz", "samples.png", "metrics.json")}


def test_a_failing_eval_leaves_the_previous_results(trained, monkeypatch):
    run_eval.evaluate_run(trained, num_samples=20)
    before = _results(trained)

    def broken(*a, **k):
        raise IsynthError("scoring failed")

    monkeypatch.setattr(run_eval, "evaluate_samples", broken)
    with pytest.raises(IsynthError, match="scoring failed"):
        run_eval.evaluate_run(trained, num_samples=30, seed=5)
    assert _results(trained) == before
    assert not list(trained.glob(".eval-*"))


def test_too_few_samples_fail_before_sampling(trained, monkeypatch):
    monkeypatch.setattr(run_eval, "generate", lambda *a, **k: pytest.fail("sampled before validating"))
    with pytest.raises(IsynthError, match="at least 4 samples"):
        run_eval.evaluate_run(trained, num_samples=3)


def test_a_killed_evals_staging_is_cleaned(trained):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = trained / f"{run_eval.STAGE}{dead.pid}"
    stale.mkdir()
    (stale / "samples.npz").write_bytes(b"half")
    run_eval.evaluate_run(trained, num_samples=20)
    assert not stale.exists()
    assert json.loads((trained / "metrics.json").read_text())["num_samples"] == 20


# --- tests that can fail ------------------------------------------------------------------------------

def test_resuming_starts_at_the_checkpoints_step(tmp_path, monkeypatch):
    """A trainer that ignored the checkpoint and retrained from step 0 reaches the same weights (training is
    seeded): count the steps the resumed process takes."""
    run = make_run("ar", "tiny", RUN)
    with monkeypatch.context() as mp:
        crash_at(mp, 12)
        with pytest.raises(Crash):
            train(run, tmp_path / "run", progress=False)
    assert meta_of(tmp_path / "run")["step"] == 10
    real, steps = trainer.train_step, []
    monkeypatch.setattr(trainer, "train_step", lambda *a, **k: steps.append(1) or real(*a, **k))
    train(run, tmp_path / "run", progress=False)
    assert len(steps) == 10 and meta_of(tmp_path / "run")["step"] == 20


def test_rar_loss_reads_the_drawn_permutation():
    """`loss` in random order equals the cross-entropy of the tokens permuted by the order it drew, and is
    not the raster loss."""
    torch.manual_seed(0)
    m = build(make_run("rar", "tiny", ["method.order=random"]), torch.device("cpu")).model.eval()
    tokens, labels = torch.randint(0, m.tokenizer.vocab_size, (4, m.seq_len)), torch.tensor([1, 2, 3, 4])
    torch.manual_seed(1)
    loss = m.loss(tokens, labels)
    torch.manual_seed(1)
    order = m.training_order(4, "cpu")
    expected = F.cross_entropy(m.logits(tokens, labels, order).flatten(0, 1), gather_tokens(tokens, order).flatten())
    torch.testing.assert_close(loss, expected)
    raster = F.cross_entropy(m.logits(tokens, labels).flatten(0, 1), tokens.flatten())
    assert abs(loss.item() - raster.item()) > 1e-4


# --- 6. resource exhaustion ---------------------------------------------------------------------------

def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """ENOSPC from the writer (as a full filesystem raises it) in the second checkpoint write."""
    import errno

    import isynth.files as files
    from isynth.cli import main
    out = tmp_path / "run"
    real, calls = files.save_file, []

    def full(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(files, "save_file", full)
    code = main(["train", "ar", "--preset", "tiny", "--steps", "20", "--out", str(out), "--quiet",
                 "train.ckpt_every=10"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0]
    assert meta_of(out)["step"] == 10 and not list(out.glob(".*.tmp"))


def test_memory_exhaustion_is_one_line(tmp_path, monkeypatch, capsys):
    from isynth.cli import main

    def oom(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 800000000000 bytes")

    monkeypatch.setattr(trainer, "train_step", oom)
    code = main(["train", "ar", "--preset", "tiny", "--steps", "2", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and "out of memory" in err[0] and "batch_size" in err[0]
