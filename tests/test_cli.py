"""The `isynth` command line's successful paths, run as real subprocesses (bad input: test_cli_errors.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from clitools import TRAIN_TINY, good_arrays, ok, run_cli, run_many, snapshot, write_npz

from isynth.paradigms import PARADIGMS


@pytest.fixture(scope="module")
def run_a(runs) -> Path:
    return runs["a"]


# --- successes --------------------------------------------------------------------------------------

def test_train_on_user_npz(tmp_path):
    images, labels = good_arrays()
    data = write_npz(tmp_path / "mine.npz", images, labels)
    out = tmp_path / "run"
    # random pixels take every grey value: 256 levels keep them (17 would quantise them, which is refused)
    ok(run_cli("train", "ar", "--dataset", data, "--out", out, *TRAIN_TINY, "tokenizer.levels=256"))
    assert {p.name for p in out.iterdir()} == {"config.json", "checkpoint.safetensors", "log.jsonl", "loss.png",
                                               "loss.svg", "command.txt"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["name"] == "npz" and cfg["data"]["path"] == str(data)
    assert cfg["train"]["max_steps"] == 2 and cfg["model"]["width"] == 32
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and math.isfinite(log[-1]["loss"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.npz", "run"]  # no temporary directory left


def test_train_into_empty_directory_and_rerun_is_a_noop(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    args = ("train", "ar", "--out", out, "--preset", "tiny", "--steps", "1", "--quiet")
    ok(run_cli(*args))
    assert (out / "checkpoint.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    before = snapshot(out)
    ok(run_cli(*args))  # same config, already at its budget
    assert snapshot(out) == before


def test_sample_writes_npz_and_grid_and_kv_cache_is_exact(run_a, tmp_path):
    common = ("sample", run_a, "--num-samples", "20", "--seed", "3", "--cfg-scale", "2")
    kv, no_kv = run_many([(*common, "--out", tmp_path / "kv" / "s.npz"),  # a missing parent is created
                          (*common, "--out", tmp_path / "nokv.npz", "--no-kv-cache")])
    info, info2 = json.loads(ok(kv).stdout), json.loads(ok(no_kv).stdout)
    assert info["num_samples"] == 20 and info["sampling"]["kv_cache"] is True
    assert info["sampling"]["guidance"]["scale"] == 2.0 and info2["sampling"]["kv_cache"] is False
    assert info2["sample_flops_per_image"] > info["sample_flops_per_image"]
    with np.load(tmp_path / "kv" / "s.npz") as f:
        assert sorted(f.files) == ["arr_0", "labels"]
        images, labels = f["arr_0"], f["labels"]
    assert images.dtype == np.uint8 and images.shape == (20, 8, 8, 1)
    assert labels.dtype == np.int64 and labels.tolist() == [i % 10 for i in range(20)]
    assert (tmp_path / "kv" / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "nokv.png").is_file()
    with np.load(tmp_path / "nokv.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], images)
        np.testing.assert_array_equal(f["labels"], labels)


def test_sample_attrs_on_digits(run_a, tmp_path):
    """--attrs on a labelled dataset: its one attribute is `class` (shapes: test_shapes.py)."""
    out = tmp_path / "threes.npz"
    info = json.loads(ok(run_cli("sample", run_a, "--num-samples", "6", "--out", out, "--attrs", "class=3")).stdout)
    assert info["attrs"] == {"class": "3"}
    with np.load(out) as f:
        assert f["labels"].tolist() == [3] * 6


METRIC_KEYS = ["class_accuracy", "fd_digits", "precision", "recall", "memorization_rate", "nll_bits_per_token",
               "images_per_s", "sample_flops_per_image"]


def test_eval_writes_metrics(run_a):
    result = ok(run_cli("eval", run_a, "--num-samples", "20"))
    printed = json.loads(result.stdout)
    saved = json.loads((run_a / "metrics.json").read_text())
    assert printed == saved
    for key in METRIC_KEYS:
        assert isinstance(saved[key], (int, float)) and math.isfinite(saved[key]), (key, saved.get(key))
    assert 0 <= saved["class_accuracy"] <= 1 and 0 <= saved["memorization_rate"] <= 1
    assert 0 <= saved["precision"] <= 1 and 0 <= saved["recall"] <= 1
    assert saved["images_per_s"] > 0 and saved["sample_flops_per_image"] > 0
    assert saved["step"] == 2 and saved["paradigm"] == "ar" and saved["num_samples"] == 20
    assert (run_a / "samples.npz").is_file() and (run_a / "samples.png").is_file()


def test_flops(tmp_path):
    tiny, rar_b = run_many([("flops", "ar", "--preset", "tiny"),
                            ("flops", "rar", "--preset", "rar-b", "--seq-len", "256", "--vocab-size", "1024",
                             "--num-classes", "1000")])
    info = json.loads(ok(tiny).stdout)
    for key in ["params", "train_flops_per_sample", "sample_flops_per_image", "width", "depth", "seq_len"]:
        assert isinstance(info[key], int) and info[key] > 0, key
    assert (info["width"], info["depth"], info["seq_len"]) == (32, 2, 64)
    info = json.loads(ok(rar_b).stdout)
    assert abs(info["params"] - 261e6) / 261e6 < 0.02, info["params"]  # RAR-B: 261M (RAR Table 1)
    assert (info["seq_len"], info["vocab_size"], info["width"], info["depth"]) == (256, 1024, 768, 24)


# GET's parameter counts (locuslab/get STAT.md) at CIFAR-10's grid: 32x32x3 in 2x2 patches.
GET_PARAMS = {"get-t": 8.6e6, "get-m": 19.2e6, "get-s": 37.2e6, "get-b": 62.2e6, "get-b+": 83.5e6}


def test_flops_of_every_paradigm_and_the_get_sizes():
    cmds = [("flops", p, "--preset", "cpu") for p in PARADIGMS]
    cmds += [("flops", "get", "--preset", name, "--seq-len", "256", "--token-dim", "12", "--num-classes", "10")
             for name in GET_PARAMS]
    results = run_many(cmds)
    for cmd, result in zip(cmds, results[:len(PARADIGMS)]):
        info = json.loads(ok(result).stdout)
        assert info["train_flops_per_sample"] > 0 and info["sample_flops_per_image"] > 0 and info["nfe"] >= 1, cmd
    for (name, paper), result in zip(GET_PARAMS.items(), results[len(PARADIGMS):]):
        info = json.loads(ok(result).stdout)
        assert abs(info["params"] - paper) / paper < 0.015, (name, info["params"])
        assert info["sample_flops_per_image_variants"] == {"as_configured": info["sample_flops_per_image"]}


def test_compare_tiny(tmp_path):
    out = tmp_path / "cmp"
    result = ok(run_cli("compare", "--out", out, "--preset", "tiny", "--flops", "2e9", "--num-pairs", "96", "--quiet"))
    summary = json.loads((out / "results.json").read_text())
    guided = [p for p in PARADIGMS if p != "get"]  # get has no guidance: one row
    names = [r["paradigm"] for r in summary["rows"]]
    assert names == [n for p in guided for n in (p, p)] + ["get"]  # without guidance, then the preset's g = 2
    scales = [r["sampling"].get("guidance", {}).get("scale") for r in summary["rows"]]
    assert scales == [1.0, 2.0] * len(guided) + [None]
    assert summary["train_flops_budget"] == 2e9
    for row in summary["rows"]:
        assert 0 < row["train_flops"] <= 2e9 and row["step"] >= 1
        assert (out / row["paradigm"] / "samples.png").is_file()
    get = summary["rows"][-1]
    teacher = json.loads((out / "diffusion" / "metrics.json").read_text())
    assert get["teacher_train_flops"] == teacher["train_flops"] and get["num_pairs"] == 96
    manifest = json.loads((out / "get-pairs" / "pairs.json").read_text())
    assert get["pair_flops"] == 96 * manifest["teacher_sample_flops_per_pair"]
    md = (out / "results.md").read_text()
    for name in PARADIGMS:
        assert sum(line.startswith(f"| {name} |") for line in md.splitlines()) == (1 if name == "get" else 2), md
    assert "| ar |" in result.stdout


# --- help -------------------------------------------------------------------------------------------

def test_help():
    commands = [[], ["train"], ["sample"], ["eval"], ["flops"], ["pairs"], ["compare"]]
    results = run_many([(*c, flag) for c in commands for flag in ("--help", "-h")])
    for c, (long, short) in zip(commands, zip(results[::2], results[1::2])):
        assert "Usage: isynth" in ok(long).stdout, c
        assert ok(short).stdout == long.stdout


def test_dataset_export_help():
    long, short = run_many([("dataset", "export", "--help"), ("dataset", "export", "-h")])
    assert "Usage: isynth dataset export" in ok(long).stdout and "heldout_classes" in long.stdout
    assert ok(short).stdout == long.stdout


def test_bare_command_shows_help():
    result = ok(run_cli())  # like --help, not a multi-line "isynth: error: Usage: ..."
    assert "Usage: isynth" in result.stdout and result.stderr == ""
