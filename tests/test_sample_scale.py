"""`isynth sample` at scale: shards that are pure functions of (checkpoint, settings, labels, seed, index),
constant memory in the number of samples, resumption after a kill, and torchrun processes that write the
file one process writes."""
from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from clitools import ENV, ok, run_cli

import isynth.samplefiles as samplefiles
from isynth.cli import main as cli_main
from isynth.eval.images import save_samples, save_samples_from_shards
from isynth.runs import balanced_labels, generate, load_trained, shard_seed
from isynth.samplefiles import sample_to_file, shard_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def _arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as f:
        return f["arr_0"], f["labels"]


@pytest.fixture(scope="module")
def model(runs):
    m, dataset, _ = load_trained(runs["a"])
    return m, dataset


def test_shards_are_the_generations_of_their_own_seeds(model, runs, tmp_path):
    m, dataset = model
    labels = balanced_labels(23, dataset.conditions)
    info = sample_to_file(m, runs["a"], labels, m.run.sample, tmp_path / "s.npz", seed=5, shard_size=10)
    assert info["shards"] == 3 and info["num_samples"] == info["sampled_now"] == 23 and info["images_per_s"] > 0
    images, got_labels = _arrays(tmp_path / "s.npz")
    want = [generate(m, labels[k * 10:(k + 1) * 10], seed=shard_seed(5, k))[0] for k in range(3)]
    np.testing.assert_array_equal(images, np.concatenate(want))
    np.testing.assert_array_equal(got_labels, labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "s.png"], "shards or locks left behind"


def test_merged_file_equals_np_savez_and_holds_one_shard_at_a_time(tmp_path):
    rng = np.random.default_rng(0)
    parts = [(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 9, n)) for n in (900,) * 7 + (13,)]
    shards = [save_samples(tmp_path / f"p{i}.npz", im, lab) for i, (im, lab) in enumerate(parts)]
    tracemalloc.start()
    save_samples_from_shards(tmp_path / "all.npz", shards)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    total = sum(im.nbytes for im, _ in parts)  # 19 MB of images
    assert peak < total / 3, f"merging held {peak / 1e6:.1f} MB for {total / 1e6:.1f} MB of samples"
    images, labels = _arrays(tmp_path / "all.npz")
    np.testing.assert_array_equal(images, np.concatenate([im for im, _ in parts]))
    np.testing.assert_array_equal(labels, np.concatenate([lab for _, lab in parts]).astype(np.int64))
    assert labels.dtype == np.int64


def test_a_killed_sampling_resumes_to_the_same_file(model, runs, tmp_path, monkeypatch):
    m, dataset = model
    labels = balanced_labels(30, dataset.conditions)
    sample_to_file(m, runs["a"], labels, m.run.sample, tmp_path / "whole.npz", seed=1, shard_size=8)

    calls = []
    real = samplefiles.generate

    def dies_at_the_third_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stands in for a kill between two shards
        return real(*args, **kwargs)

    out = tmp_path / "killed.npz"
    monkeypatch.setattr(samplefiles, "generate", dies_at_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        sample_to_file(m, runs["a"], labels, m.run.sample, out, seed=1, shard_size=8)
    assert not out.exists() and len(list(shard_dir(out).glob("shard-*.npz"))) == 2
    (shard_dir(out) / ".shard-00002.npz.123.abcd.tmp").write_bytes(b"torn")  # what a kill mid-write leaves
    monkeypatch.setattr(samplefiles, "generate", real)
    info = sample_to_file(m, runs["a"], labels, m.run.sample, out, seed=1, shard_size=8)
    assert info["sampled_now"] == 14  # shards 2 and 3 only
    for a, b in zip(_arrays(out), _arrays(tmp_path / "whole.npz")):
        np.testing.assert_array_equal(a, b)
    assert not shard_dir(out).exists()


def test_shards_of_other_settings_are_not_reused(model, runs, tmp_path):
    m, dataset = model
    labels = balanced_labels(12, dataset.conditions)
    out = tmp_path / "s.npz"
    d = shard_dir(out)
    d.mkdir()
    (d / "manifest.json").write_text('{"seed": 99}')
    save_samples(d / "shard-00000.npz", np.zeros((8, 8, 8, 1), np.uint8), labels[:8])  # another seed's
    sample_to_file(m, runs["a"], labels, m.run.sample, out, seed=0, shard_size=8)
    assert _arrays(out)[0][:8].any(), "a stale shard of other settings was merged"


def test_cli_sample_in_shards_with_labels(runs, tmp_path, capsys):
    out = tmp_path / "s.npz"
    rc = cli_main(["sample", str(runs["a"]), "--labels", "3,3,7,1,0", "--shard-size", "2", "--out", str(out),
                   "--quiet"])
    assert rc == 0, capsys.readouterr().err
    images, labels = _arrays(out)
    assert images.shape == (5, 8, 8, 1) and labels.tolist() == [3, 3, 7, 1, 0]
    assert (tmp_path / "s.png").is_file()
    rc = cli_main(["sample", str(runs["a"]), "--shard-size", "0", "--out", str(tmp_path / "t.npz")])
    assert rc == 2 and "--shard-size" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_processes_write_the_single_process_file(runs, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to the interpreter")
    args = ["sample", str(runs["a"]), "--num-samples", "25", "--shard-size", "4", "--seed", "2", "--quiet"]
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "isynth", *args, "--out",
                           str(tmp_path / "ddp.npz")], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert '"processes": 2' in done.stdout and done.stdout.count('"out"') == 1  # rank 0 reports
    ok(run_cli(*args, "--out", tmp_path / "one.npz"))
    for a, b in zip(_arrays(tmp_path / "ddp.npz"), _arrays(tmp_path / "one.npz")):
        np.testing.assert_array_equal(a, b)
    assert sorted(os.listdir(tmp_path)) == ["ddp.npz", "ddp.png", "one.npz", "one.png"]
