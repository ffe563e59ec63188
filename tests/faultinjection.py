"""Kill-point fault injection: every command that writes results is killed at each of its commits, then run
again, and must reach exactly the results of a run that was never killed, with nothing left over.

A commit is a rename into place (`os.replace` / `os.rename`: every file isynth writes goes to a temporary
name first, and run directories, eval results and sample files appear by renames). The child process counts
them and calls `os._exit` (no cleanup, as SIGKILL) just before or just after commit k, for every k. Between
two commits the disk holds the same files, so these kill points cover every state a kill can leave, up to
the content of temporary files, which are never read.

`python tests/faultinjection.py` runs every kill point of every scenario and prints the table of
BENCHMARKS.md; tests/test_faults.py runs a few of them in the suite.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from isynth.files import sha256_file

KILLED = 137
CHILD = r"""
import os, sys
k, when, count_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
calls = [0]

def killing(real):
    def commit(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k and when == "before":
            os._exit(137)
        out = real(*args, **kwargs)
        if calls[0] == k and when == "after":
            os._exit(137)
        return out
    return commit

os.replace, os.rename = killing(os.replace), killing(os.rename)
from isynth.cli import main
rc = main(sys.argv[4:])
if count_file != "-":
    with open(count_file, "w") as f:
        f.write(str(calls[0]))
sys.exit(rc)
"""
# Fields that measure time, not results.
TIMING = {"seconds", "elapsed_s", "samples_per_s", "mfu", "images_per_s", "train_time_s", "peak_flops",
          "peak_source"}


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _read(p: Path, work: Path | None = None) -> object:
    """A file's content for comparison: arrays and tensors by value, JSON without timings, other files by
    bytes (PNG grids of the same arrays are the same bytes), the work directory's path (in recorded commands)
    replaced by a placeholder; raises if the file does not read back whole."""
    if p.suffix == ".safetensors":
        return {k: v.tobytes() for k, v in load_file(p).items()}  # its metadata holds timings
    if p.suffix == ".npz":
        with np.load(p) as f:
            return {k: f[k].tobytes() for k in f.files}
    if p.suffix == ".svg":
        return "<svg>"  # matplotlib writes a date and ids into SVGs
    data = p.read_bytes().replace(str(work).encode(), b"<work>") if work else p.read_bytes()
    if p.suffix == ".json":
        return _strip(json.loads(data))
    if p.suffix == ".jsonl":
        return [_strip(json.loads(line)) for line in data.decode().splitlines()]
    return data


def state(root: Path, work: Path | None = None) -> dict[str, object]:
    """Every entry under `root` by relative path. Lock and temporary files are listed too: a finished command
    must leave none."""
    return {str(p.relative_to(root)): "<dir>" if p.is_dir() else _read(p, work) for p in sorted(root.rglob("*"))}


def torn(root: Path) -> list[str]:
    """The files under their final names that do not read back whole (a kill must never leave one)."""
    bad = []
    for p in sorted(root.rglob("*")) if root.exists() else []:
        if p.is_file() and not p.name.startswith("."):
            try:
                _read(p)
            except Exception as e:  # noqa: BLE001 - any failure to read back is what is looked for
                bad.append(f"{p.relative_to(root)}: {type(e).__name__}")
    return bad


@dataclass
class Scenario:
    """A command run in a work directory prepared by `prepare` (which may copy shared inputs into it);
    `root` is what it writes (compared whole)."""

    name: str
    args: Callable[[Path], list]
    prepare: Callable[[Path], None] = lambda work: None
    root: str = "."
    invariant: Callable[[Path], list[str]] = lambda work: []  # what must hold right after a kill


def run_child(env: dict, work: Path, args: list, k: int = 0, when: str = "before", count: Path | None = None
              ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(k), when, str(count or "-"), *map(str, args)],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)


def _fresh(base: Path, name: str, sc: Scenario) -> Path:
    work = base / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sc.prepare(work)
    return work


def reference(env: dict, base: Path, sc: Scenario) -> tuple[dict, int]:
    """The uninterrupted run's results and its number of commits."""
    work = _fresh(base, f"{sc.name}-reference", sc)
    done = run_child(env, work, sc.args(work), count=base / f"{sc.name}.commits")
    assert done.returncode == 0, done.stderr[-3000:]
    return state(work / sc.root, work), int((base / f"{sc.name}.commits").read_text())


def kill_and_rerun(env: dict, base: Path, sc: Scenario, k: int, when: str) -> dict:
    """Kill at commit k, check what is on disk, run again; the outcome of this kill point."""
    work = _fresh(base, f"{sc.name}-{k}-{when}", sc)
    killed = run_child(env, work, sc.args(work), k, when)
    left = torn(work / sc.root) + sc.invariant(work)
    again = run_child(env, work, sc.args(work))
    return {"k": k, "when": when, "killed": killed.returncode == KILLED, "torn": left,
            "rerun_ok": again.returncode == 0, "stderr": again.stderr[-2000:], "work": work}


def check_scenario(env: dict, base: Path, sc: Scenario, points: list[tuple[int, str]] | None = None,
                   workers: int = 3) -> dict:
    """Run `points` (default: before and after every commit) and compare each with the reference."""
    want, commits = reference(env, base, sc)
    points = points or [(k, w) for k in range(1, commits + 1) for w in ("before", "after")]
    points = [(k if k > 0 else commits + 1 + k, w) for k, w in points]  # negative: from the end
    with ThreadPoolExecutor(workers) as pool:
        outcomes = list(pool.map(lambda p: kill_and_rerun(env, base, sc, *p), points))
    for o in outcomes:
        o["same"] = o["rerun_ok"] and state(o["work"] / sc.root, o["work"]) == want
    return {"scenario": sc.name, "commits": commits, "outcomes": outcomes}


def describe(result: dict) -> str:
    bad = [o for o in result["outcomes"] if not (o["killed"] and o["same"] and not o["torn"])]
    return (f"| {result['scenario']} | {result['commits']} | {len(result['outcomes'])} | "
            f"{sum(o['killed'] and o['same'] for o in result['outcomes'])} | "
            f"{sum(bool(o['torn']) for o in result['outcomes'])} | {'none' if not bad else len(bad)} |")


def eval_results_agree(work: Path) -> list[str]:
    """After a killed eval, metrics.json describes the samples.npz beside it, or a committed eval's results
    wait in their commit directory for the next eval to move in (`isynth.eval.run_eval.recover_results`)."""
    run = work / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    if metrics["samples_sha256"] == sha256_file(run / "samples.npz") or list(run.glob(".eval-commit-*")):
        return []
    return ["metrics.json describes another samples.npz and no committed eval is waiting"]


def scenarios(shared: Path) -> list[Scenario]:
    """The commands that write results, on tiny runs (`shared` holds a trained ar run and diffusion teacher)."""
    def with_run(work: Path) -> None:
        shutil.copytree(shared / "run", work / "run")

    def with_evaluated_run(work: Path) -> None:
        shutil.copytree(shared / "evaluated", work / "run")

    return [
        Scenario("train", lambda w: ["train", "ar", "--preset", "tiny", "--steps", "4", "--out", w / "out", "--quiet",
                                     "train.ckpt_every=2", "train.log_every=1"], root="out"),
        Scenario("sample", lambda w: ["sample", w / "run", "--num-samples", "12", "--shard-size", "4", "--quiet",
                                      "--out", w / "s.npz"], with_run),
        Scenario("pairs", lambda w: ["pairs", shared / "teacher", "--num-pairs", "12", "--shard-size", "4", "--quiet",
                                     "--out", w / "pairs"], root="pairs"),
        Scenario("tokenize", lambda w: ["tokenize", "--dataset", "digits", "--shard-size", "500", "--quiet",
                                        "--out", w / "latents", "tokenizer.kind=patch"], root="latents"),
        Scenario("eval", lambda w: ["eval", w / "run", "--num-samples", "20", "--seed", "3", "--quiet"],
                 with_evaluated_run, invariant=eval_results_agree),
    ]


def prepare_shared(env: dict, shared: Path) -> None:
    """A 2-step ar run (also once evaluated) and a 20-step diffusion teacher, made once."""
    shared.mkdir(parents=True, exist_ok=True)
    jobs = [["train", "ar", "--preset", "tiny", "--steps", "2", "--out", shared / "run", "--quiet"],
            ["train", "diffusion", "--preset", "tiny", "--steps", "20", "--out", shared / "teacher", "--quiet"]]
    for done in ThreadPoolExecutor(2).map(lambda a: run_child(env, shared, a), jobs):
        assert done.returncode == 0, done.stderr[-2000:]
    shutil.copytree(shared / "run", shared / "evaluated")
    done = run_child(env, shared, ["eval", shared / "evaluated", "--num-samples", "20", "--seed", "1"])
    assert done.returncode == 0, done.stderr[-2000:]


def main() -> None:
    import os
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="isynth-faults-"))
    env = dict(os.environ, ISYNTH_CACHE=str(base / "cache"), OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    prepare_shared(env, base / "shared")
    print("| command | commits | kill points (before and after each) | reruns identical to an uninterrupted run "
          "| torn files after the kill | failures |")
    print("|---|---|---|---|---|---|")
    for sc in scenarios(base / "shared"):
        print(describe(check_scenario(env, base, sc)), flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s on {os.cpu_count()} cores; work in {base}")


if __name__ == "__main__":
    main()
