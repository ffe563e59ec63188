"""Helpers for tests that run `isynth` as a process of its own, so exit codes and stderr are what a user sees.

`ENV` is the subprocesses' environment; conftest's session fixture fills it before any test runs (the
session's feature-net cache, never ~/.cache).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import forkcli
import numpy as np
import pytest

from isynth.files import writer_lock

TIMEOUT_S = 300
WORKERS = (os.cpu_count() or 2) + 1  # start-up is partly I/O: one more process than cores keeps them busy
ENV: dict[str, str] = {}  # the subprocesses' environment, set before any test or fixture runs


def run_cli(*args, cwd: Path | None = None, prelude: str = "") -> subprocess.CompletedProcess:
    """`isynth ARGS...` as a process of its own (tests/forkcli.py); `prelude` is Python it runs first (e.g. a
    writer that finds the disk full), then the command line."""
    assert ENV.get("ISYNTH_CACHE"), "the _subprocess_env fixture sets the environment"
    return forkcli.run([str(a) for a in args], cwd, ENV, prelude, TIMEOUT_S)


def run_cli_signalled(*args, signum: int, when: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`isynth ARGS...` sent `signum` as soon as the path `when` exists (a checkpoint, a shard)."""
    return forkcli.run([str(a) for a in args], cwd, ENV, timeout=TIMEOUT_S, signal_when=(signum, when))


def run_many(commands: list[tuple]) -> list[subprocess.CompletedProcess]:
    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(lambda args: run_cli(*args), commands))


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def assert_error(result: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> str:
    """Exit `code`, exactly one non-empty stderr line containing every fragment: `isynth: error: ...` for an
    error (2, 3), `isynth: ...` for a signal (130 interrupted, 143 terminated)."""
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.returncode == code, f"exit {result.returncode}, want {code}, stderr:\n{result.stderr}"
    assert len(lines) == 1, f"want one stderr line, got {len(lines)}:\n{result.stderr}"
    line = lines[0]
    prefix = "isynth: error: " if code in (2, 3) else "isynth: "
    assert line.startswith(prefix) and line.strip() != prefix.strip(), line
    for frag in fragments:
        assert frag.lower() in line.lower(), f"{frag!r} not in {line!r}"
    return line


def snapshot(path: Path) -> dict[str, str]:
    """Every entry under `path` (hidden temporary files included) with a content hash; {} if absent."""
    if not path.exists():
        return {}
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def savez(path: Path, **arrays) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would otherwise append .npz to odd names
        np.savez(f, **arrays)


def write_npz(path: Path, images, labels=None) -> Path:
    savez(path, arr_0=images, **({} if labels is None else {"labels": labels}))
    return path


def good_arrays(n: int = 40, h: int = 8, w: int = 8, c: int = 1, classes: int = 4):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, h, w, c), dtype=np.uint8), np.arange(n, dtype=np.int64) % classes


TRAIN_TINY = ("--preset", "tiny", "--steps", "2", "--quiet")


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@dataclass
class Case:
    """A command that must fail cleanly: exit `code` with one stderr line holding every fragment; `watch`ed
    paths exactly as before (or still absent), `absent` paths not there, and `check(result)` (more
    conditions, e.g. a checkpoint that still loads) true. The test holds the writer lock of every `locked`
    directory while the command runs; `prelude` is Python the command's process runs first (a patched
    writer); with `signal` = (signum, path) the command gets the signal once the path exists."""

    args: list
    fragments: tuple[str, ...] = ()
    watch: list[Path] = field(default_factory=list)
    cwd: Path | None = None
    code: int = 2
    absent: list[Path] = field(default_factory=list)
    locked: list[Path] = field(default_factory=list)
    prelude: str = ""
    signal: tuple[int, Path] | None = None
    check: Callable[[], None] | None = None


CATEGORIES = ("config fields and overrides", "run directories", "checkpoints and run files", "data files",
              "sampling and evaluation settings", "pairs and distillation", "concurrency", "signals",
              "resource exhaustion")


class Cases(dict):
    """name -> builder(case_dir, runs) -> Case, each in a category (CATEGORIES). Most of the time of a failing
    command is Python and torch start-up, so a test module's cases are launched together (a few processes at
    a time) by `run`."""

    def __init__(self, category: str):
        super().__init__()
        assert category in CATEGORIES, category
        self.category, self.categories = category, {}

    def add(self, name: str, category: str | None = None):
        def register(builder: Callable[[Path, dict[str, Path]], Case]):
            self[name] = builder
            self.categories[name] = category or self.category
            assert self.categories[name] in CATEGORIES, self.categories[name]
            return builder
        return register

    def run(self, runs: dict[str, Path], base: Path) -> dict:
        """Build every case in its own directory, snapshot what it watches, run all, snapshot again:
        name -> (case, result, before, after)."""
        built = {}
        for name, builder in self.items():
            d = base / name
            d.mkdir()
            built[name] = builder(d, runs)
        watched = {p for c in built.values() for p in c.watch}
        before = {p: snapshot(p) for p in watched}
        with ExitStack() as held, ThreadPoolExecutor(WORKERS) as pool:
            for path in {p for c in built.values() for p in c.locked}:
                held.enter_context(writer_lock(path))
            futures = {name: pool.submit(_launch, c) for name, c in built.items()}
            results = {name: f.result() for name, f in futures.items()}
        after = {p: snapshot(p) for p in watched}
        return {name: (c, results[name], before, after) for name, c in built.items()}


def _launch(c: Case) -> subprocess.CompletedProcess:
    if c.signal is not None:
        return run_cli_signalled(*c.args, signum=c.signal[0], when=c.signal[1], cwd=c.cwd)
    return run_cli(*c.args, cwd=c.cwd, prelude=c.prelude)


def case_tests(cases: Cases, name: str):
    """A module fixture that runs `cases` and a test per case: one line on stderr naming the problem, exit
    2, and every watched path as it was. Call at the end of the module, once every case is registered."""
    @pytest.fixture(scope="module")
    def outcomes(runs, tmp_path_factory):
        return cases.run(runs, tmp_path_factory.mktemp(name))

    @pytest.mark.parametrize("case", list(cases))
    def test_fails_cleanly(case, outcomes):
        c, result, before, after = outcomes[case]
        assert_error(result, *c.fragments, code=c.code)
        for path in c.watch:
            assert after[path] == before[path], f"{path} changed"
        for path in c.absent:
            assert not path.exists(), f"{path} exists"
        if c.check is not None:
            c.check()

    return outcomes, test_fails_cleanly
