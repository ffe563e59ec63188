"""Helpers for tests that run `isynth` as a real subprocess, so exit codes and stderr are what a user sees.

`ENV` is the subprocesses' environment; conftest's session fixture fills it before any test runs (the
session's feature-net cache, never ~/.cache).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

TIMEOUT_S = 300
WORKERS = (os.cpu_count() or 2) + 1  # start-up is partly I/O: one more process than cores keeps them busy
ENV: dict[str, str] = {}  # the subprocesses' environment, set before any test or fixture runs


def run_cli(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    assert ENV.get("ISYNTH_CACHE"), "the _subprocess_env fixture sets the environment"
    return subprocess.run([sys.executable, "-m", "isynth", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def run_many(commands: list[tuple]) -> list[subprocess.CompletedProcess]:
    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(lambda args: run_cli(*args), commands))


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def assert_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, exactly one non-empty stderr line `isynth: error: ...` containing every fragment."""
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.returncode == 2, f"exit {result.returncode}, stderr:\n{result.stderr}"
    assert len(lines) == 1, f"want one stderr line, got {len(lines)}:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("isynth: error: ") and line.strip() != "isynth: error:", line
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
    """A command that must fail cleanly; `watch`ed paths must be exactly as before (or still absent)."""

    args: list
    fragments: tuple[str, ...] = ()
    watch: list[Path] = field(default_factory=list)
    cwd: Path | None = None


class Cases(dict):
    """name -> builder(case_dir, runs) -> Case. Most of the time of a failing command is Python and torch
    start-up, so a test module's cases are launched together (a few processes at a time) by `run`."""

    def add(self, name: str):
        def register(builder: Callable[[Path, dict[str, Path]], Case]):
            self[name] = builder
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
        with ThreadPoolExecutor(WORKERS) as pool:
            futures = {name: pool.submit(run_cli, *c.args, cwd=c.cwd) for name, c in built.items()}
            results = {name: f.result() for name, f in futures.items()}
        after = {p: snapshot(p) for p in watched}
        return {name: (c, results[name], before, after) for name, c in built.items()}


def case_tests(cases: Cases, name: str):
    """A module fixture that runs `cases` and a test per case: one line on stderr naming the problem, exit
    2, and every watched path as it was. Call at the end of the module, once every case is registered."""
    @pytest.fixture(scope="module")
    def outcomes(runs, tmp_path_factory):
        return cases.run(runs, tmp_path_factory.mktemp(name))

    @pytest.mark.parametrize("case", list(cases))
    def test_fails_cleanly(case, outcomes):
        c, result, before, after = outcomes[case]
        assert_error(result, *c.fragments)
        for path in c.watch:
            assert after[path] == before[path], f"{path} changed"

    return outcomes, test_fails_cleanly
