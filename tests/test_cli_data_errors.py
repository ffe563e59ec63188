"""Bad user data on the `isynth` command line (`--dataset some.npz`), run as real subprocesses.

Project rule: ONE line on stderr starting with `isynth: error:` that names the problem, exit status 2, no
Python traceback, and no half-written run directory, checkpoint or pair shard.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from clitools import TRAIN_TINY, Case, Cases, case_tests, good_arrays, savez, write_npz

CASES = Cases("data files")
case = CASES.add


def _train(d: Path, data, *fragments, extra=()) -> Case:
    return Case(["train", "ar", "--dataset", data, "--out", d / "run", *TRAIN_TINY, *extra], fragments, [d])


# .npz datasets -------------------------------------------------------------------------------------

def _npz_case(name: str, make: Callable[[Path], Path | None], *fragments: str):
    @case(f"npz-{name}")
    def build(d: Path, runs) -> Case:
        f = d / "data.npz"
        made = make(f)
        return _train(d, made or f, *fragments)


IMAGES, LABELS = good_arrays()


def _damaged_compressed(f: Path) -> None:
    with open(f, "wb") as fh:  # np.savez_compressed with damaged deflate data
        np.savez_compressed(fh, arr_0=np.tile(IMAGES, (10, 1, 1, 1)), labels=np.tile(LABELS, 10))
    data = bytearray(f.read_bytes())
    for i in range(60, 110):
        data[i] ^= 0x5A
    f.write_bytes(bytes(data))


def _truncated(f: Path) -> None:
    write_npz(f, IMAGES, LABELS)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _with_label(value, dtype=np.int64):
    def make(f: Path) -> None:
        labels = LABELS.astype(dtype)
        labels[5] = value
        write_npz(f, IMAGES, labels)
    return make


def _npy_named_npz(f: Path) -> None:
    with open(f, "wb") as fh:
        np.save(fh, IMAGES)


def _npy(f: Path) -> Path:
    np.save(f.with_suffix(".npy"), IMAGES)
    return f.with_suffix(".npy")


_npz_case("missing", lambda f: f.with_name("nope.npz"), "not found", "nope.npz")
_npz_case("quantised-by-grey-levels", lambda f: write_npz(f, IMAGES, LABELS) and None, "tokenizer.levels=256")
_npz_case("random-bytes", lambda f: f.write_bytes(np.random.default_rng(1).bytes(4096)) and None,
          "data.npz", "not a readable .npz")
_npz_case("empty-file", lambda f: f.write_bytes(b"") and None, "data.npz", "not a readable .npz")
_npz_case("truncated", _truncated, "data.npz", "not a readable .npz")
_npz_case("corrupt-compressed", _damaged_compressed, "data.npz", "not a readable .npz")
_npz_case("no-labels", lambda f: write_npz(f, IMAGES) and None, "missing", "labels")
_npz_case("no-arr_0", lambda f: savez(f, images=IMAGES, labels=LABELS), "missing", "arr_0")
_npz_case("images-float32", lambda f: write_npz(f, IMAGES.astype(np.float32), LABELS) and None, "uint8", "float32")
_npz_case("images-ndim3", lambda f: write_npz(f, IMAGES[..., 0], LABELS) and None, "shape", "[40, 8, 8]")
_npz_case("images-2-channels", lambda f: write_npz(f, np.concatenate([IMAGES, IMAGES], -1), LABELS) and None,
          "shape", "[40, 8, 8, 2]")
_npz_case("images-zero-height", lambda f: write_npz(f, np.zeros((40, 0, 8, 1), np.uint8), LABELS) and None,
          "shape", "[40, 0, 8, 1]")
_npz_case("one-image", lambda f: write_npz(f, IMAGES[:1], LABELS[:1]) and None, "at least 2")
_npz_case("labels-wrong-length", lambda f: write_npz(f, IMAGES, LABELS[:-3]) and None, "labels", "[40]", "[37]")
_npz_case("labels-2d", lambda f: write_npz(f, IMAGES, LABELS[:, None]) and None, "labels", "[40, 1]")
_npz_case("labels-float", lambda f: write_npz(f, IMAGES, LABELS.astype(np.float64)) and None, "labels", "integers")
_npz_case("labels-negative", _with_label(-1), "labels", ">= 0", "-1")
_npz_case("labels-uint64-overflow", _with_label(np.iinfo(np.uint64).max, np.uint64), "labels", "int64")
_npz_case("labels-huge", _with_label(10**12), "labels", "classes")  # would size a 10^12-row class table
_npz_case("object-array", lambda f: write_npz(f, np.array([IMAGES[0], None], dtype=object), LABELS[:2]) and None,
          "data.npz")
_npz_case("npy-content", _npy_named_npz, "data.npz", "not an .npz")
_npz_case("npy-file", _npy, "data.npy", ".npz")



outcomes, test_bad_data_fails_cleanly = case_tests(CASES, "data-errors")
