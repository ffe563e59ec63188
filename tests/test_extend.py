"""Extending a finished run with a larger budget, and fine-tuning a new run from another run's weights
(`--init-from`)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from clitools import snapshot, write_npz
from traintools import Crash, assert_same_tensors, crash_at, deterministic, events_of, log_of, meta_of

from isynth.checkpoint import CHECKPOINT, CONFIG, load_checkpoint
from isynth.cli import main as cli_main
from isynth.config import DataConfig
from isynth.data import load_dataset
from isynth.files import sha256_file
from isynth.finetune import INIT_FROM
from isynth.presets import make_run
from isynth.trainer import lr_at, train

pytestmark = pytest.mark.usefixtures("one_thread")

FLAT = ["train.lr_schedule=constant", "train.warmup_fraction=0"]  # the same rate at every step of every total


def _cli(capsys, *args) -> tuple[int, str, str]:
    rc = cli_main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _one_error_line(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("isynth: error:"), err
    for frag in fragments:
        assert frag in err, err


# --- extension ---------------------------------------------------------------------------------------

def test_a_constant_rate_run_extended_from_20_to_40_steps_is_the_40_step_run(tmp_path, capsys):
    """Weights, EMA, optimizer state and the logged losses: bit for bit (batch order, per-step seeds and the
    EMA's warm-up are functions of the seed and the step, not of the total)."""
    tiny = ["train", "ar", "--preset", "tiny", "--quiet", *FLAT]
    extended, whole = tmp_path / "extended", tmp_path / "whole"
    rc, _, err = _cli(capsys, *tiny, "--steps", 20, "--out", extended)
    assert rc == 0, err
    rc, out, err = _cli(capsys, *tiny, "--steps", 40, "--out", extended)
    assert rc == 0, err
    assert out.splitlines()[0] == (f"{extended}: budget extended from 20 to 40 steps at step 20; the learning rate "
                                   "follows the 40-step schedule from here")
    assert _cli(capsys, *tiny, "--steps", 40, "--out", whole)[0] == 0
    assert_same_tensors(whole, extended)
    assert [deterministic(r) for r in log_of(extended)] == [deterministic(r) for r in log_of(whole)]
    assert events_of(extended) == [{"step": 20, "event": "extended", "from_total_steps": 20, "to_total_steps": 40}]
    assert json.loads((extended / CONFIG).read_text()) == json.loads((whole / CONFIG).read_text())
    assert meta_of(extended)["total_steps"] == 40
    rc, out, _ = _cli(capsys, *tiny, "--steps", 40, "--out", extended)  # finished: nothing more to log
    assert rc == 0 and len(events_of(extended)) == 1


def test_a_cosine_run_continues_on_the_new_totals_schedule(tmp_path, capsys):
    """A step budget switched to a FLOPs budget: the steps after the extension take lr_at(step, new total)."""
    out = tmp_path / "run"
    run20 = make_run("ar", "tiny", ["train.max_steps=20", "train.log_every=2"])
    train(run20, out, progress=False)
    per_step = meta_of(out)["flops_per_sample"] * run20.train.batch_size
    run30 = make_run("ar", "tiny", ["train.max_steps=none", f"train.train_flops={per_step * 30.5!r}",
                                    "train.log_every=2"])
    train(run30, out, progress=False)
    log = log_of(out)
    assert [r["step"] for r in log] == list(range(2, 31, 2))
    for r in log:
        total, cfg = (20, run20.train) if r["step"] <= 20 else (30, run30.train)
        assert r["lr"] == lr_at(r["step"] - 1, total, cfg)
    assert log[10]["lr"] > log[9]["lr"], "the rate jumps back up from the 20-step schedule's end"
    assert events_of(out) == [{"step": 20, "event": "extended", "from_total_steps": 20, "to_total_steps": 30}]
    saved = json.loads((out / CONFIG).read_text())["train"]
    assert saved["max_steps"] is None and saved["train_flops"] == per_step * 30.5
    assert meta_of(out)["step"] == 30


def test_a_budget_below_the_steps_done_is_refused_and_changes_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    tiny = ["train", "ar", "--preset", "tiny", "--quiet", "--out", out]
    assert _cli(capsys, *tiny, "--steps", 20)[0] == 0
    before = snapshot(out)
    rc, _, err = _cli(capsys, *tiny, "--steps", 10)
    _one_error_line(rc, err, "trained 20 steps", "at least --steps 20")
    assert snapshot(out) == before
    # Above the steps done but below the old total (a run killed at step 15 of 40, checkpoint 10): shortened.
    short = tmp_path / "short"
    with monkeypatch.context() as mp:
        crash_at(mp, 15)
        with pytest.raises(Crash):
            train(make_run("ar", "tiny", ["train.max_steps=40"]), short, progress=False)
    train(make_run("ar", "tiny", ["train.max_steps=20"]), short, progress=False)
    assert events_of(short) == [{"step": 10, "event": "shortened", "from_total_steps": 40, "to_total_steps": 20}]
    assert meta_of(short)["step"] == 20 and [r["step"] for r in log_of(short)] == [5, 10, 15, 20]


# --- fine-tuning -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source(tmp_path_factory, single_thread):
    """A tiny `ar` run on digits: the weights fine-tuning starts from."""
    out = tmp_path_factory.mktemp("source") / "digits-ar"
    train(make_run("ar", "tiny", ["train.max_steps=40"]), out, progress=False)
    return out


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory, cache):
    """A user dataset: the digits mirrored left to right, 8x8 grey with the same 10 classes, as an .npz."""
    d = load_dataset(DataConfig())
    path = tmp_path_factory.mktemp("data") / "mirrored.npz"
    return write_npz(path, d.train_images[:, :, ::-1].copy(), d.train_labels)


def test_fine_tuning_on_another_dataset_starts_from_the_source(tmp_path, capsys, source, mirrored):
    tuned, fresh = tmp_path / "tuned", tmp_path / "fresh"
    args = ["train", "ar", "--preset", "tiny", "--steps", 10, "--dataset", mirrored, "--quiet", "train.log_every=1"]
    rc, out, err = _cli(capsys, *args, "--out", tuned, "--init-from", source)
    assert rc == 0, err
    assert f"{tuned}: starts from the EMA weights of {source.resolve()} at step 40" in out
    assert _cli(capsys, *args, "--out", fresh)[0] == 0
    record = json.loads((tuned / INIT_FROM).read_text())
    assert record == {"run_dir": str(source.resolve()), "paradigm": "ar", "step": 40, "weights": "ema",
                      "checkpoint_sha256": sha256_file(source / CHECKPOINT)}
    assert log_of(tuned)[0]["loss"] < log_of(fresh)[0]["loss"] - 0.3, "the digits' weights fit mirrored digits"
    assert json.loads((tuned / CONFIG).read_text())["data"]["path"] == str(mirrored)


def test_a_fine_tuning_run_starts_from_the_source_ema_and_resumes_from_its_own_checkpoint(tmp_path, source,
                                                                                          monkeypatch):
    """Killed before its first checkpoint, with the source gone, the run resumes from its step-0 checkpoint
    and reaches the uninterrupted run's weights."""
    run = make_run("ar", "tiny", ["train.max_steps=12", "train.ckpt_every=6", "train.log_every=3"])
    whole = train(run, tmp_path / "whole", progress=False, init_from=source)
    weights, ema, opt, meta = load_checkpoint(whole / CHECKPOINT)
    moved = shutil.move(source, tmp_path / "moved")
    try:
        out = tmp_path / "killed"
        with monkeypatch.context() as mp:
            crash_at(mp, 4)
            with pytest.raises(Crash):
                train(run, out, progress=False, init_from=moved)
        start, start_ema, start_opt, start_meta = load_checkpoint(out / CHECKPOINT)
        _, src_ema, _, _ = load_checkpoint(moved / CHECKPOINT)
        assert start_meta["step"] == 0 and start_opt["state"] == {}
        assert all(torch.equal(start[k], src_ema[k]) and torch.equal(start_ema[k], src_ema[k]) for k in src_ema)
        train(run, out, progress=False)  # resumed without --init-from, the source not there
    finally:
        shutil.move(moved, source)
    assert_same_tensors(whole, out)
    assert [deterministic(r) for r in log_of(out)] == [deterministic(r) for r in log_of(whole)]


def test_an_exported_folder_is_a_source_like_its_run(tmp_path, capsys, source):
    """`isynth export`'s model.safetensors holds the run's EMA weights: a run started from the folder starts
    where one started from the run does, and trains to the same weights."""
    from isynth.hub import WEIGHTS, export_run

    folder = export_run(source, tmp_path / "hub")
    args = ["train", "ar", "--preset", "tiny", "--steps", 3, "--quiet"]
    rc, out, err = _cli(capsys, *args, "--out", tmp_path / "from-folder", "--init-from", folder)
    assert rc == 0, err
    assert f"starts from the EMA weights of {folder} at step 40" in out
    assert _cli(capsys, *args, "--out", tmp_path / "from-run", "--init-from", source)[0] == 0
    assert_same_tensors(tmp_path / "from-run", tmp_path / "from-folder")
    record = json.loads((tmp_path / "from-folder" / INIT_FROM).read_text())
    assert record == {"run_dir": str(folder.resolve()), "paradigm": "ar", "step": 40, "weights": "ema",
                      "checkpoint_sha256": sha256_file(folder / WEIGHTS), "exported": True}
    rc, _, err = _cli(capsys, "train", "maskgit", "--preset", "tiny", "--steps", 2, "--quiet", "--init-from", folder,
                      "--out", tmp_path / "other")
    _one_error_line(rc, err, "is a 'ar' run", "'maskgit'")
    assert not (tmp_path / "other").exists()


def test_bad_sources_are_refused_with_one_line_and_no_run_directory(tmp_path, capsys, source):
    tiny = ["--preset", "tiny", "--steps", 2, "--quiet", "--init-from"]
    new = tmp_path / "new"
    d = load_dataset(DataConfig())
    four = write_npz(tmp_path / "four.npz", d.train_images, d.train_labels % 4)  # digits in 4 classes, not 10
    no_ckpt = tmp_path / "no-ckpt"
    no_ckpt.mkdir()
    (no_ckpt / CONFIG).write_text((source / CONFIG).read_text())
    for args, fragments in [
        (["maskgit", *tiny, source], ("is a 'ar' run", "'maskgit'")),
        (["ar", *tiny, source, "model.width=64"],
         ("does not match", "shape of pos_embed", "(1, 65, 32) != (1, 65, 64)")),
        (["ar", *tiny, source, "--dataset", four], ("does not match", "class")),
        (["ar", *tiny, tmp_path / "nowhere"], ("--init-from", "nowhere", "no such run directory")),
        (["ar", *tiny, no_ckpt], ("no checkpoint",)),
        (["ar", *tiny, tmp_path], ("not an isynth run directory",)),
    ]:
        rc, _, err = _cli(capsys, "train", *args, "--out", new)
        _one_error_line(rc, err, *fragments)
        assert not new.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["four.npz", "no-ckpt"]
    existing = tmp_path / "existing"
    assert _cli(capsys, "train", "ar", "--preset", "tiny", "--steps", 2, "--quiet", "--out", existing)[0] == 0
    before = snapshot(existing)
    rc, _, err = _cli(capsys, "train", "ar", *tiny, source, "--out", existing)
    _one_error_line(rc, err, "already holds a run", "without --init-from")
    assert snapshot(existing) == before
