"""Bad input on the `isynth` command line, run as real subprocesses: configs, overrides, budgets, run
directories, checkpoints, sampling, pairs (bad data files: test_cli_data_errors.py).

Project rule: ONE line on stderr starting with `isynth: error:` that names the problem, exit status 2, no
Python traceback, and no half-written run directory, checkpoint or pair shard.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from clitools import TRAIN_TINY, Case, Cases, case_tests, copy_run

from isynth.presets import make_run

CASES = Cases("config fields and overrides")
case = CASES.add


# config, overrides, budgets ------------------------------------------------------------------------

BAD_CONFIG = {
    "unknown-paradigm": (["train", "nope", *TRAIN_TINY], ["unknown paradigm", "nope"]),
    "unknown-preset": (["train", "ar", "--preset", "huge", "--steps", "2"], ["unknown preset", "huge"]),
    "unknown-field": (["train", "ar", *TRAIN_TINY, "model.nope=1"], ["model.nope"]),
    "unknown-section": (["train", "ar", *TRAIN_TINY, "nope.width=1"], ["nope"]),
    "section-as-field": (["train", "ar", *TRAIN_TINY, "model=3"], ["model", "section"]),
    "no-equals": (["train", "ar", *TRAIN_TINY, "model.width"], ["invalid override", "model.width"]),
    "width-not-int": (["train", "ar", *TRAIN_TINY, "model.width=abc"], ["model.width", "abc", "integer"]),
    "width-fraction": (["train", "ar", *TRAIN_TINY, "model.width=32.5"], ["model.width", "integer"]),
    "lr-negative": (["train", "ar", *TRAIN_TINY, "train.lr=-1"], ["train.lr"]),
    "lr-nan": (["train", "ar", *TRAIN_TINY, "train.lr=nan"], ["train.lr"]),
    "heads-not-dividing": (["train", "ar", *TRAIN_TINY, "model.num_heads=3"], ["num_heads=3", "width=32"]),
    "bad-bool": (["train", "ar", *TRAIN_TINY, "model.qk_norm=maybe"], ["model.qk_norm", "maybe"]),
    "bad-choice": (["train", "ar", *TRAIN_TINY, "tokenizer.kind=jpeg"], ["tokenizer.kind", "jpeg"]),
    "paradigm-override": (["train", "ar", *TRAIN_TINY, "paradigm=rar"], ["paradigm"]),
    "steps-zero": (["train", "ar", "--preset", "tiny", "--steps", "0"], ["max_steps", "> 0"]),
    "steps-negative": (["train", "ar", "--preset", "tiny", "--steps", "-3"], ["max_steps", "-3"]),
    "steps-not-int": (["train", "ar", "--preset", "tiny", "--steps", "abc"], ["--steps", "abc"]),
    "flops-zero": (["train", "ar", "--preset", "tiny", "--flops", "0"], ["train_flops", "> 0"]),
    "flops-negative": (["train", "ar", "--preset", "tiny", "--flops", "-1e9"], ["train_flops"]),
    "flops-below-one-step": (["train", "ar", "--preset", "tiny", "--flops", "1"], ["less than one step"]),
    "flops-inf": (["train", "ar", "--preset", "tiny", "--flops", "inf"], ["train_flops", "inf"]),
    "flops-override-inf": (["train", "ar", "--preset", "tiny", "train.train_flops=inf"], ["train_flops", "inf"]),
    "flops-nan": (["train", "ar", "--preset", "tiny", "--flops", "nan"], ["train_flops"]),
    "steps-and-flops": (["train", "ar", "--preset", "tiny", "--steps", "2", "--flops", "1e12"], ["--steps", "--flops"]),
    "no-budget": (["train", "ar", "--preset", "tiny", "train.max_steps=none"], ["budget"]),
    "unknown-dataset": (["train", "ar", "--preset", "tiny", "--steps", "2", "--dataset", "cifar"], ["cifar"]),
    "unknown-option": (["train", "ar", *TRAIN_TINY, "--nope"], ["--nope"]),
    "missing-paradigm": (["train", "--preset", "tiny"], ["paradigm"]),
}

for _name, (_args, _frags) in BAD_CONFIG.items():
    def _build(d: Path, runs, args=_args, frags=_frags) -> Case:
        return Case([*args, "--out", d / "run"], tuple(frags), [d], cwd=d)
    case(f"config-{_name}")(_build)


@case("unknown-command")
def _(d, runs):
    return Case(["nope"], ("nope",), [d], cwd=d)


@case("train-without-out")
def _(d, runs):
    return Case(["train", "ar", *TRAIN_TINY], ("--out",), [d], cwd=d)


# run directories -----------------------------------------------------------------------------------

@case("out-is-non-run-dir", "run directories")
def _(d, runs):
    (d / "stuff").mkdir()
    (d / "stuff" / "notes.txt").write_text("mine")
    return Case(["train", "ar", "--out", d / "stuff", *TRAIN_TINY], ("not an isynth run directory",), [d])


@case("out-is-a-file", "run directories")
def _(d, runs):
    (d / "file").write_text("mine")
    return Case(["train", "ar", "--out", d / "file", *TRAIN_TINY], ("not an isynth run directory",), [d])


@case("out-under-a-file", "run directories")
def _(d, runs):
    (d / "file").write_text("mine")
    return Case(["train", "ar", "--out", d / "file" / "run", *TRAIN_TINY], ("file",), [d])


@case("retrain-other-config", "run directories")
def _(d, runs):
    return Case(["train", "ar", "--dataset", "digits", "--out", runs["a"], *TRAIN_TINY, "model.width=64"],
                ("different config", "model.width", "32", "64"), [runs["a"]])


@case("retrain-other-paradigm", "run directories")
def _(d, runs):
    return Case(["train", "rar", "--dataset", "digits", "--out", runs["a"], *TRAIN_TINY],
                ("different config", "paradigm"), [runs["a"]])


# checkpoints and configs of runs -------------------------------------------------------------------

@case("foreign-checkpoint-eval", "checkpoints and run files")
def _(d, runs):
    return Case(["eval", runs["b"], "--num-samples", "10"], ("checkpoint does not match",), [runs["b"]])


@case("foreign-checkpoint-sample", "checkpoints and run files")
def _(d, runs):
    return Case(["sample", runs["b"], "--num-samples", "10", "--out", d / "s.npz"], ("checkpoint does not match",),
                [runs["b"], d])


@case("foreign-checkpoint-resume", "checkpoints and run files")
def _(d, runs):
    return Case(["train", "ar", "--dataset", "digits", "--out", runs["b"], "--preset", "tiny", "--steps", "1",
                 "--quiet", "model.width=64"], ("checkpoint does not match",), [runs["b"]])


def _damaged_run(d: Path, runs, damage: str) -> Path:
    run = copy_run(runs["a"], d / "run")
    ckpt = run / "checkpoint.safetensors"
    data = ckpt.read_bytes()
    ckpt.write_bytes(np.random.default_rng(0).bytes(len(data)) if damage == "random" else data[: len(data) // 2])
    return run


@case("corrupt-checkpoint-eval", "checkpoints and run files")
def _(d, runs):
    return Case(["eval", _damaged_run(d, runs, "random"), "--num-samples", "10"], ("checkpoint", "corrupt"), [d])


@case("truncated-checkpoint-sample", "checkpoints and run files")
def _(d, runs):
    run = _damaged_run(d, runs, "truncated")
    return Case(["sample", run, "--num-samples", "10", "--out", d / "s.npz"], ("checkpoint", "corrupt"), [d])


@case("corrupt-checkpoint-resume", "checkpoints and run files")
def _(d, runs):
    run = _damaged_run(d, runs, "random")
    return Case(["train", "ar", "--dataset", "digits", "--out", run, *TRAIN_TINY], ("checkpoint", "corrupt"), [d])


@case("config-json-not-json", "checkpoints and run files")
def _(d, runs):
    run = copy_run(runs["a"], d / "run")
    (run / "config.json").write_text("{nope")
    return Case(["eval", run, "--num-samples", "10"], ("config",), [d])


@case("config-json-incomplete", "checkpoints and run files")
def _(d, runs):
    run = copy_run(runs["a"], d / "run")
    cfg = json.loads((run / "config.json").read_text())
    del cfg["model"]
    (run / "config.json").write_text(json.dumps(cfg))
    return Case(["sample", run, "--num-samples", "10", "--out", d / "s.npz"], ("config",), [d])


# sample and eval -----------------------------------------------------------------------------------

@case("sample-no-checkpoint", "sampling and evaluation settings")
def _(d, runs):
    (d / "run").mkdir()
    shutil.copyfile(runs["a"] / "config.json", d / "run" / "config.json")
    return Case(["sample", d / "run", "--out", d / "s.npz"], ("no checkpoint",), [d])


@case("sample-not-a-run", "sampling and evaluation settings")
def _(d, runs):
    (d / "run").mkdir()
    return Case(["sample", d / "run", "--out", d / "s.npz"], ("not an isynth run directory",), [d])


@case("sample-missing-dir", "sampling and evaluation settings")
def _(d, runs):
    return Case(["sample", d / "run", "--out", d / "s.npz"], ("not an isynth run directory",), [d])


_SAMPLE_BAD = {
    "num-samples-0": (["--num-samples", "0"], ["--num-samples", "0"]),
    "num-samples-negative": (["--num-samples", "-5"], ["--num-samples", "-5"]),
    "temperature-0": (["sample.head.temperature=0"], ["sample.head.temperature"]),
    "old-name": (["sample.temperature=0.5"], ["sample.temperature", "renamed", "sample.head.temperature"]),
    "unknown-field": (["nope=1"], ["nope"]),
    "cfg-negative": (["--cfg-scale", "-1"], ["guidance.scale"]),
    "labels-against-count": (["--labels", "1,2,3", "--num-samples", "20"],
                             ["--labels gives 3 class ids", "--num-samples is 20"]),
}
for _name, (_args, _frags) in _SAMPLE_BAD.items():
    def _build(d: Path, runs, args=_args, frags=_frags) -> Case:
        return Case(["sample", runs["a"], "--out", d / "s.npz", *args], tuple(frags), [d, runs["a"]])
    case(f"sample-{_name}", "sampling and evaluation settings")(_build)


@case("sample-out-not-npz", "sampling and evaluation settings")
def _(d, runs):
    return Case(["sample", runs["a"], "--out", d / "x.txt"], (".npz", "x.txt"), [d, runs["a"]])


@case("eval-not-a-run", "sampling and evaluation settings")
def _(d, runs):
    return Case(["eval", d], ("not an isynth run directory",), [d])


@case("eval-exported-folder", "sampling and evaluation settings")
def _(d, runs):
    from isynth.hub import export_run

    export_run(runs["a"], d / "hub")
    return Case(["eval", d / "hub"], ("written by `isynth export`, not a run directory", "isynth sample"), [d])


@case("eval-one-sample", "sampling and evaluation settings")
def _(d, runs):
    return Case(["eval", runs["a"], "--num-samples", "1"], ("--num-samples",), [runs["a"]])


@case("eval-bad-sampling", "sampling and evaluation settings")
def _(d, runs):
    return Case(["eval", runs["a"], "--num-samples", "10", "sample.head.top_p=2"], ("top_p",), [runs["a"]])


# flops and compare ---------------------------------------------------------------------------------

@case("flops-unknown-paradigm")
def _(d, runs):
    return Case(["flops", "nope"], ("unknown paradigm",), [d], cwd=d)


@case("flops-vocab-without-seq-len")
def _(d, runs):
    return Case(["flops", "ar", "--preset", "tiny", "--vocab-size", "1024"], ("--seq-len",), [d], cwd=d)


@case("flops-seq-len-0")
def _(d, runs):
    return Case(["flops", "ar", "--preset", "tiny", "--seq-len", "0"], ("--seq-len",), [d], cwd=d)


# pairs and get -------------------------------------------------------------------------------------

@case("pairs-teacher-not-diffusion", "pairs and distillation")
def _(d, runs):
    return Case(["pairs", runs["a"], "--num-pairs", "10", "--out", d / "p"], ("'ar' run", "'diffusion'"),
                [d, runs["a"]])


@case("pairs-zero", "pairs and distillation")
def _(d, runs):
    return Case(["pairs", runs["a"], "--num-pairs", "0", "--out", d / "p"], ("--num-pairs", "0"), [d, runs["a"]])


@case("pairs-teacher-not-a-run", "pairs and distillation")
def _(d, runs):
    return Case(["pairs", d, "--num-pairs", "5", "--out", d / "p"], ("not an isynth run directory",), [d])


@case("get-without-pairs", "pairs and distillation")
def _(d, runs):
    return Case(["train", "get", "--out", d / "run", *TRAIN_TINY], ("method.pairs", "isynth pairs"), [d])


@case("shuffle-pairs-not-get", "pairs and distillation")
def _(d, runs):
    return Case(["train", "ar", "--out", d / "run", *TRAIN_TINY, "--shuffle-pairs"], ("--shuffle-pairs", "'ar'"), [d])


@case("get-cfg-scale", "pairs and distillation")
def _(d, runs):
    (d / "run").mkdir()
    (d / "run" / "config.json").write_text(make_run("get", "tiny", ["method.pairs=p"]).to_json())
    return Case(["eval", d / "run", "--cfg-scale", "2"], ("'get' has no guidance",), [d])


@case("get-pairs-corrupt-shard", "pairs and distillation")
def _(d, runs):
    pairs = d / "pairs"
    pairs.mkdir()
    manifest = {"format": "isynth-pairs/1", "num_pairs": 4, "seq_len": 64, "token_dim": 1, "image_shape": [8, 8, 1],
                "shards": [{"file": "shard-00000.safetensors", "count": 4, "seconds": 0.1}]}
    (pairs / "pairs.json").write_text(json.dumps(manifest))
    (pairs / "shard-00000.safetensors").write_bytes(b"garbage")
    return Case(["train", "get", "--out", d / "run", *TRAIN_TINY, f"method.pairs={pairs}"],
                ("shard-00000.safetensors", "corrupt pair shard"), [d])


@case("get-pairs-missing", "pairs and distillation")
def _(d, runs):
    return Case(["train", "get", "--out", d / "run", *TRAIN_TINY, f"method.pairs={d / 'nope'}"],
                ("not a pair directory",), [d])


_COMPARE_BAD = {
    "get-without-teacher": (["--paradigms", "ar,get"], ["include diffusion"]),
    "num-pairs-zero": (["--num-pairs", "0"], ["--num-pairs"]),
    "unknown-paradigm": (["--paradigms", "nope"], ["unknown paradigm", "nope"]),
    "one-unknown-paradigm": (["--paradigms", "ar,nope"], ["nope"]),
    "unknown-preset": (["--preset", "huge"], ["unknown preset"]),
    "flops-zero": (["--flops", "0"], ["flops"]),
    "flops-below-one-step": (["--flops", "1"], ["less than one step"]),
    "bad-override": (["model.width=abc"], ["model.width"]),
}
for _name, (_args, _frags) in _COMPARE_BAD.items():
    def _build(d: Path, runs, args=_args, frags=_frags) -> Case:
        defaults = [x for opt, val in (("--preset", "tiny"), ("--flops", "2e9")) if opt not in args for x in (opt, val)]
        return Case(["compare", "--out", d / "cmp", "--quiet", *defaults, *args], tuple(frags), [d], cwd=d)
    case(f"compare-{_name}")(_build)


outcomes, test_bad_input_fails_cleanly = case_tests(CASES, "errors")
