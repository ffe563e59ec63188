"""The reliability catalogue's cases beyond bad arguments and data files (those: test_cli_errors.py,
test_cli_data_errors.py): every number where it enters, checkpoint corruptions named by tensor or field,
memory estimates and full disks, a second writer, and signals. Each case is a command, its exit status, the
one stderr line it must print, and the files that must be unchanged, absent or still whole.

`test_the_catalogue_covers_every_category` counts the whole catalogue by category (BENCHMARKS.md)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import test_cli_data_errors
import test_cli_errors
import torch
from clitools import CATEGORIES, TRAIN_TINY, Case, Cases, case_tests, copy_run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from isynth.checkpoint import check_meta

CASES = Cases("config fields and overrides")
case = CASES.add
RESUME = ["train", "ar", "--dataset", "digits", *TRAIN_TINY]  # the command that made the `runs` fixture's run a
TINY = ["train", "ar", "--preset", "tiny", "--steps", "2"]


# every number where it enters ------------------------------------------------------------------------

NUMBERS = {
    "guidance-inf": ("sample.guidance.scale=inf", "sample.guidance.scale: must be a finite number"),
    "guidance-nan": ("sample.guidance.scale=nan", "must be a finite number"),
    "guidance-negative": ("sample.guidance.scale=-1", "sample.guidance.scale"),
    "guidance-pow-inf": ("sample.guidance.pow=inf", "must be a finite number"),
    "lr-nan": ("train.lr=nan", "train.lr: must be a finite number"),
    "lr-zero": ("train.lr=0", "train.lr must be > 0"),
    "seed-negative": ("train.seed=-1", "train.seed must be in [0, 2^63)"),
    "seed-beyond-64-bits": ("train.seed=99999999999999999999", "must fit in 64 bits"),
    "seed-fraction": ("train.seed=1.5", "train.seed"),
    "beta1-one": ("train.beta1=1.0", "beta1 and beta2 must be in [0, 1)"),
    "beta2-negative": ("train.beta2=-0.1", "beta1 and beta2"),
    "weight-decay-negative": ("train.weight_decay=-1", "weight_decay"),
    "ema-decay-one": ("train.ema_decay=1", "ema_decay"),
    "grad-clip-inf": ("train.grad_clip=inf", "must be a finite number"),
    "batch-zero": ("train.batch_size=0", "batch_size"),
    "batch-bool": ("train.batch_size=true", "train.batch_size"),
    "skip-negative": ("train.skip_nonfinite=-2", "skip_nonfinite"),
    "eval-samples-two": ("train.eval_num_samples=2", "eval_num_samples must be >= 4"),
    "schedule-unknown": ("train.lr_schedule=linear", "one of"),
    "width-nan": ("model.width=nan", "model.width"),
    "mlp-ratio-inf": ("model.mlp_ratio=inf", "must be a finite number"),
    "dropout-one": ("model.dropout=1.0", "dropouts"),
    "mask-mean-inf": ("method.mask_ratio_mean=inf", "must be a finite number"),
    "mask-std-nan": ("method.mask_ratio_std=nan", "must be a finite number"),
    "num-steps-zero": ("sample.num_steps=0", "num_steps"),
    "head-temperature-inf": ("sample.head.temperature=inf", "must be a finite number"),
    "sample-every-negative": ("train.sample_every=-1", "train.sample_every"),
    "log-to-unknown": ("train.log_to=mlflow", "unknown sink 'mlflow'"),
}
for _name, (_setting, _message) in NUMBERS.items():
    def _build(d: Path, runs, setting=_setting, message=_message) -> Case:
        return Case(["train", "mar", "--preset", "tiny", "--steps", "2", "--out", d / "run", "--quiet", setting],
                    (message,), [d], absent=[d / "run"])
    case(f"number-{_name}")(_build)


# checkpoints named by tensor or field -------------------------------------------------------------------

def _edit_checkpoint(run: Path, change) -> None:
    path = run / "checkpoint.safetensors"
    t = load_file(path)
    with safe_open(path, framework="pt") as f:
        md = f.metadata()
    meta = json.loads(md["meta"])
    change(t, meta)
    save_file(t, path, metadata={**md, "meta": json.dumps(meta)})


CORRUPTIONS = {
    "nan-weight": (lambda t, m: t["model/net.blocks.0.mlp.fc1.weight"].fill_(float("nan")),
                   "weights tensor net.blocks.0.mlp.fc1.weight holds non-finite"),
    "inf-ema": (lambda t, m: t.__setitem__("ema/net.norm.weight", t["ema/net.norm.weight"] * float("inf")),
                "EMA tensor net.norm.weight holds non-finite"),
    "ema-dtype": (lambda t, m: t.__setitem__("ema/net.norm.weight", t["ema/net.norm.weight"].double()),
                  "EMA tensor net.norm.weight is torch.float64"),
    "optim-shape": (lambda t, m: t.__setitem__("optim/0/exp_avg", t["optim/0/exp_avg"][:1]),
                    "optimizer tensor 0/exp_avg"),
    "optim-nan": (lambda t, m: t["optim/1/exp_avg_sq"].fill_(float("nan")), "optimizer tensor 1/exp_avg_sq"),
    "step-negative": (lambda t, m: m.__setitem__("step", -3), "'step' must be a finite integer >= 0"),
    "step-float": (lambda t, m: m.__setitem__("step", 2.5), "'step' must be a finite integer"),
    "step-past-budget": (lambda t, m: m.__setitem__("step", 10_000), "past this run's 2 steps"),
    "flops-string": (lambda t, m: m.__setitem__("train_flops", "many"), "'train_flops'"),
    "time-inf": (lambda t, m: m.__setitem__("elapsed_s", float("inf")), "'elapsed_s'"),
    "missing-tensor": (lambda t, m: t.pop("model/net.norm.weight"), "missing ['net.norm.weight']"),
}
for _name, (_change, _message) in CORRUPTIONS.items():
    def _build(d: Path, runs, change=_change, message=_message) -> Case:
        run = copy_run(runs["a"], d / "run")
        _edit_checkpoint(run, change)
        return Case([*RESUME, "--out", run], (message,), [d])
    case(f"checkpoint-{_name}", "checkpoints and run files")(_build)


@case("checkpoint-edited-for-sampling", "checkpoints and run files")
def _(d, runs):
    run = copy_run(runs["a"], d / "run")
    _edit_checkpoint(run, lambda t, m: t["ema/net.blocks.0.mlp.fc1.weight"].fill_(float("nan")))
    return Case(["sample", run, "--num-samples", "4", "--out", d / "s.npz"], ("EMA weights tensor", "non-finite"),
                [d])


# resources: memory estimates before allocating, full disks ------------------------------------------------

MEMORY = {
    "train-batch": ([*TINY, "train.batch_size=100000000"],
                    ("training needs at least an estimated", "train.batch_size")),
    "model-width": ([*TINY, "model.width=16384", "model.depth=8",
                     "model.num_heads=8"], ("the model's training state needs at least an estimated", "model.width")),
    "shapes-images": ([*TINY, "--dataset", "shapes",
                       "data.num_images=1000000000"], ("the shapes dataset needs at least an estimated",)),
}
for _name, (_args, _frags) in MEMORY.items():
    def _build(d: Path, runs, args=_args, frags=_frags) -> Case:
        return Case([*args, "--out", d / "run", "--quiet"], frags, [d], absent=[d / "run"])
    case(f"memory-{_name}", "resource exhaustion")(_build)


@case("memory-sample-shard", "resource exhaustion")
def _(d, runs):
    return Case(["sample", runs["a"], "--num-samples", "30000000", "--shard-size", "30000000", "--out", d / "s.npz",
                 "sample.batch_size=30000000"], ("sampling one shard needs at least an estimated", "--shard-size"),
                [d, runs["a"]])


@case("memory-eval-samples", "resource exhaustion")
def _(d, runs):
    return Case(["eval", runs["a"], "--num-samples", "1000000000"], ("evaluation needs at least an estimated",),
                [runs["a"]])


@case("memory-pairs-shard", "resource exhaustion")
def _(d, runs):
    return Case(["pairs", runs["teacher"], "--num-pairs", "100000000", "--shard-size", "100000000", "--out",
                 d / "p", "sample.batch_size=100000000"], ("a shard of pairs needs at least an estimated",),
                [d, runs["teacher"]], absent=[d / "p"])


MOUNTS: list[Path] = []


def _small_disk(path: Path, kilobytes: int) -> str:
    """A filesystem of `kilobytes` at `path` (tmpfs, as root), else a prelude whose writer fails the same way
    for every file under `path`: ENOSPC from the write that does not fit."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs", str(path)],
                          capture_output=True)
    if done.returncode == 0:
        MOUNTS.append(path)
        return ""
    return (f"import errno, os\nreal = os.replace\n"
            f"def full(src, dst, *a, **k):\n"
            f"    if str(dst).startswith({str(path)!r}) and os.path.getsize(src) > {kilobytes * 1024}:\n"
            f"        raise OSError(errno.ENOSPC, 'No space left on device', str(src))\n"
            f"    return real(src, dst, *a, **k)\nos.replace = full\n")


@pytest.fixture(scope="module", autouse=True)
def _unmount():
    yield
    for path in MOUNTS:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _whole_checkpoint(run: Path, step: int):
    def check() -> None:
        meta = json.loads(safe_open(run / "checkpoint.safetensors", framework="pt").metadata()["meta"])
        assert check_meta(meta, None, run)["step"] == step
        assert not list(run.glob(".*.tmp")), list(run.glob(".*.tmp"))
    return check


@case("disk-full-checkpoint", "resource exhaustion")
def _(d, runs):
    disk = d / "disk"
    prelude = _small_disk(disk, 700)  # run a (about 560 KB) and not a second checkpoint beside it
    run = copy_run(runs["a"], disk / "run")
    return Case(["train", "ar", "--dataset", "digits", "--preset", "tiny", "--steps", "4", "--quiet", "--out", run],
                ("No space left on device",), prelude=prelude, check=_whole_checkpoint(run, 2))


@case("disk-full-sample", "resource exhaustion")
def _(d, runs):
    disk = d / "disk"
    prelude = _small_disk(disk, 16)
    return Case(["sample", runs["a"], "--num-samples", "2000", "--shard-size", "1000", "--out", disk / "s.npz",
                 "--quiet"], ("No space left on device",), [runs["a"]], prelude=prelude, absent=[disk / "s.npz"])


@case("disk-full-eval", "resource exhaustion")
def _(d, runs):
    disk = d / "disk"
    prelude = _small_disk(disk, 600)
    run = copy_run(runs["a"], disk / "run")
    return Case(["eval", run, "--num-samples", "2000", "--quiet"], ("No space left on device",), [run],
                prelude=prelude)


@case("disk-full-pairs", "resource exhaustion")
def _(d, runs):
    disk = d / "disk"
    prelude = _small_disk(disk, 16)
    return Case(["pairs", runs["teacher"], "--num-pairs", "300", "--shard-size", "150", "--out", disk / "p",
                 "--quiet"], ("No space left on device",), [runs["teacher"]], prelude=prelude)


@case("disk-full-tokenize", "resource exhaustion")
def _(d, runs):
    disk = d / "disk"
    prelude = _small_disk(disk, 16)
    return Case(["tokenize", "--dataset", "digits", "--out", disk / "lat", "--quiet", "tokenizer.kind=patch"],
                ("No space left on device",), prelude=prelude)


@case("disk-full-export", "resource exhaustion")
def _(d, runs):
    disk = d / "disk"
    prelude = _small_disk(disk, 16)
    return Case(["export", runs["a"], "--out", disk / "hub"], ("No space left on device",), [runs["a"]],
                prelude=prelude, absent=[disk / "hub"])


# a second writer --------------------------------------------------------------------------------------------

WRITERS = {
    "train": lambda d, runs: [*TINY, "--quiet", "--out", d / "w"],
    "resume": lambda d, runs: [*RESUME, "--out", d / "w"],
    "sample": lambda d, runs: ["sample", runs["a"], "--num-samples", "4", "--out", d / "w"],
    "pairs": lambda d, runs: ["pairs", runs["teacher"], "--num-pairs", "4", "--out", d / "w", "--quiet"],
    "tokenize": lambda d, runs: ["tokenize", "--dataset", "digits", "--out", d / "w", "--quiet",
                                 "tokenizer.kind=patch"],
    "tokenizer-train": lambda d, runs: ["tokenizer", "train", "fsq", "--dataset", "digits", "--out", d / "w",
                                        "--steps", "1", "--quiet"],
    "export": lambda d, runs: ["export", runs["a"], "--out", d / "w"],
}
for _name, _args in WRITERS.items():
    def _build(d: Path, runs, args=_args, name=_name) -> Case:
        cmd = args(d, runs)
        if name == "resume":
            copy_run(runs["a"], d / "w")
        elif name == "sample":
            cmd[cmd.index(d / "w")] = d / "w.npz"
        target = cmd[cmd.index("--out") + 1]
        return Case(cmd, (str(target), "is being written by process", str(os.getpid())), [d], locked=[target])
    case(f"second-writer-{_name}", "concurrency")(_build)


# signals ------------------------------------------------------------------------------------------------------

SIGNALS = {"SIGINT": (signal.SIGINT, 130, "isynth: interrupted"),
           "SIGTERM": (signal.SIGTERM, 143, "isynth: terminated (SIGTERM)")}
for _sig, (_num, _code, _line) in SIGNALS.items():
    def _train(d: Path, runs, num=_num, code=_code, line=_line) -> Case:
        run = d / "run"
        return Case(["train", "ar", "--preset", "tiny", "--steps", "100000", "--quiet", "--out", run,
                     "train.ckpt_every=2"], (line,), code=code, signal=(num, run / "checkpoint.safetensors"),
                    check=_checkpoint_loads(run))

    def _sample(d: Path, runs, num=_num, code=_code, line=_line) -> Case:
        return Case(["sample", runs["a"], "--num-samples", "1000000", "--shard-size", "16", "--quiet",
                     "--out", d / "s.npz"], (line,), [runs["a"]], code=code,
                    signal=(num, d / ".s.npz.shards" / "shard-00000.npz"), absent=[d / "s.npz"],
                    check=_no_temporaries(d))

    def _pairs(d: Path, runs, num=_num, code=_code, line=_line) -> Case:
        return Case(["pairs", runs["teacher"], "--num-pairs", "100000", "--shard-size", "8", "--quiet",
                     "--out", d / "p"], (line,), [runs["teacher"]], code=code,
                    signal=(num, d / "p" / "shard-00000.safetensors"), check=_no_temporaries(d / "p"))
    case(f"signal-{_sig}-train", "signals")(_train)
    case(f"signal-{_sig}-sample", "signals")(_sample)
    case(f"signal-{_sig}-pairs", "signals")(_pairs)


def _checkpoint_loads(run: Path):
    def check() -> None:
        meta = json.loads(safe_open(run / "checkpoint.safetensors", framework="pt").metadata()["meta"])
        assert check_meta(meta, None, run)["step"] >= 2
        assert all(torch.isfinite(t).all() for t in load_file(run / "checkpoint.safetensors").values()
                   if t.is_floating_point())
        _no_temporaries(run)()
    return check


def _no_temporaries(d: Path):
    def check() -> None:
        left = [p for p in d.rglob(".*") if p.name.endswith((".tmp", ".lock"))]
        assert not left, left
    return check


@pytest.fixture(scope="module")
def runs(runs, tiny_teacher):
    """The CLI tests' runs plus the tiny diffusion teacher of the pair cases."""
    return {**runs, "teacher": tiny_teacher}


outcomes, test_catalogue_case = case_tests(CASES, "reliability")


def test_the_catalogue_covers_every_category():
    """At least 150 cases, in every category the catalogue promises (the counts are in BENCHMARKS.md)."""
    counts = dict.fromkeys(CATEGORIES, 0)
    for cases in (CASES, test_cli_errors.CASES, test_cli_data_errors.CASES):
        for name in cases:
            counts[cases.categories.get(name, cases.category)] += 1
    print(json.dumps(counts, indent=1))
    assert sum(counts.values()) >= 150 and all(counts.values()), counts

