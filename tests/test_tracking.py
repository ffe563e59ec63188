"""Tracking besides log.jsonl: sample grids during training, TensorBoard event files and W&B offline runs
(`train.sample_every`, `train.log_to`), their resumption, and bad or missing sinks."""
from __future__ import annotations

import importlib.util
import json
import struct
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from traintools import RESUME_OVERRIDES, Crash, assert_same_tensors, crash_at, deterministic, log_of, meta_of
from wandb.proto import wandb_internal_pb2

import isynth.tracking as tracking
from isynth.cli import main as cli_main
from isynth.presets import make_run
from isynth.tracking import SAMPLES_DIR, TENSORBOARD_DIR, WANDB_ID
from isynth.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """No account, no network, nothing written outside tmp_path; WANDB_MODE unset: isynth's default is offline."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")


def _events(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _wandb_history(path) -> list[dict]:
    """The history rows of a W&B transaction log (`run-ID.wandb`): LevelDB-style 32 KiB blocks of records
    (CRC32, length, type) holding `Record` protobufs, after a 7-byte header."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 0:
            break
        if kind in (1, 4):  # a whole record, or a record's last piece
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            pending = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in rec.history.item})
    return rows


def test_sample_grids_and_tensorboard(tmp_path):
    out = train(make_run("ar", "tiny", ["train.max_steps=10", "train.sample_every=4", "train.log_to=tensorboard"]),
                tmp_path / "run", progress=False)
    assert sorted(p.name for p in (out / SAMPLES_DIR).iterdir()) == ["step-000004.png", "step-000008.png",
                                                                      "step-000010.png"]
    acc = _events(out)
    log = log_of(out)
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(r["step"], pytest.approx(r["loss"])) for r in log]
    assert [e.step for e in acc.Scalars("grad_norm")] == [5, 10]
    assert [e.step for e in acc.Images("samples")] == [4, 8, 10]


def test_tensorboard_resumes_without_repeating_steps(tmp_path, monkeypatch):
    """Killed at step 7 after logging steps 2, 4, 6 with the checkpoint at 4: resumed, the curve has each
    step once (the events of step 6 written before the kill are purged)."""
    run = make_run("ar", "tiny", ["train.max_steps=10", "train.log_every=2", "train.ckpt_every=4",
                                  "train.log_to=tensorboard"])
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        crash_at(mp, 7)
        with pytest.raises(Crash):
            train(run, out, progress=False)
    assert [e.step for e in _events(out).Scalars("loss")] == [2, 4, 6]
    time.sleep(1.1)  # the resumed writer's file name has a later second, so it is read after the first
    train(run, out, progress=False)
    losses = _events(out).Scalars("loss")
    assert [e.step for e in losses] == [2, 4, 6, 8, 10]
    assert [e.value for e in losses] == [pytest.approx(r["loss"]) for r in log_of(out)]


def test_wandb_offline_run_and_its_resumption(tmp_path, monkeypatch, wandb_env):
    run = make_run("ar", "tiny", ["train.max_steps=10", "train.log_every=2", "train.ckpt_every=4",
                                  "train.sample_every=4", "train.log_to=wandb"])
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        crash_at(mp, 7)
        with pytest.raises(Crash):
            train(run, out, progress=False)
    time.sleep(1.1)  # W&B names an offline run's directory by the second it starts
    train(run, out, progress=False)
    run_id = (out / WANDB_ID).read_text().strip()
    files = sorted((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2, "the resumed attempt continues the same W&B run id"
    rows = [row for f in files for row in _wandb_history(f)]
    logged = [(row["_step"], row["loss"]) for row in rows if "loss" in row]
    assert logged[-3:] == [(6, pytest.approx(log_of(out)[2]["loss"])), (8, pytest.approx(log_of(out)[3]["loss"])),
                           (10, pytest.approx(log_of(out)[4]["loss"]))]
    assert [s for s, _ in logged] == [2, 4, 6, 6, 8, 10]  # offline, each attempt keeps what it logged
    images = [(row["_step"], row["samples/_type"]) for row in rows if "samples/_type" in row]
    assert images == [(4, "image-file"), (8, "image-file"), (10, "image-file")]


def test_resumption_with_sample_grids_is_exact_and_grids_change_nothing(tmp_path, monkeypatch):
    """Grids every 3 steps (between checkpoints too), killed twice: the same weights, EMA, optimizer state,
    log and grids as the uninterrupted run, and the same weights as a run without grids (dropout on: a
    model left in eval mode would train differently)."""
    grids = make_run("rar", "tiny", [*RESUME_OVERRIDES, "train.sample_every=3"])
    whole = train(grids, tmp_path / "whole", progress=False)
    plain = train(make_run("rar", "tiny", RESUME_OVERRIDES), tmp_path / "plain", progress=False)
    out = tmp_path / "killed"
    for step in (7, 10):
        with monkeypatch.context() as mp:
            crash_at(mp, step)
            with pytest.raises(Crash):
                train(grids, out, progress=False)
    train(grids, out, progress=False)
    assert_same_tensors(whole, out)
    assert_same_tensors(whole, plain)
    assert [deterministic(r) for r in log_of(out)] == [deterministic(r) for r in log_of(whole)] == \
        [deterministic(r) for r in log_of(plain)]
    names = ["step-000003.png", "step-000006.png", "step-000009.png", "step-000012.png"]
    assert sorted(p.name for p in (out / SAMPLES_DIR).iterdir()) == names
    assert all((out / SAMPLES_DIR / n).read_bytes() == (whole / SAMPLES_DIR / n).read_bytes() for n in names)


def test_sampling_time_is_not_training_time(tmp_path, monkeypatch):
    real = tracking.generate

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(tracking, "generate", slow)
    out = train(make_run("ar", "tiny", ["train.max_steps=10", "train.sample_every=5"]), tmp_path / "run",
                progress=False)
    assert meta_of(out)["elapsed_s"] < 1.8, "two grids slept 2 s, none of it training"
    assert all(r["samples_per_s"] > 5 * 32 / 1.0 for r in log_of(out))  # 5 steps of 32 and a 1 s sleep: fewer


def _cli(capsys, *args) -> tuple[int, str]:
    rc = cli_main([str(a) for a in args])
    return rc, capsys.readouterr().err


def test_an_unknown_sink_is_one_line_and_no_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = _cli(capsys, "train", "ar", "--preset", "tiny", "--steps", 2, "--quiet", "--out", out,
                   "train.log_to=tensorboard,mlflow")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("isynth: error: train.log_to")
    assert "'mlflow'" in err and not out.exists() and list(tmp_path.iterdir()) == []


def test_a_missing_sink_package_names_its_extra_before_any_run_directory(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a, **k: None if name == "wandb" else
                        real(name, *a, **k))
    out = tmp_path / "run"
    rc, err = _cli(capsys, "train", "ar", "--preset", "tiny", "--steps", 2, "--quiet", "--out", out,
                   "train.log_to=tensorboard,wandb")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "pip install 'isynth[wandb]'" in err and not out.exists() and list(tmp_path.iterdir()) == []
