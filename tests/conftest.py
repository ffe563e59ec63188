import os
import tempfile
from pathlib import Path

import pytest

import isynth  # noqa: F401  (sets the MKL reproducibility variables before torch loads MKL)
import torch

# Keep the feature-net / peak-FLOPs cache out of the user's home during tests.
os.environ.setdefault("ISYNTH_CACHE", tempfile.mkdtemp(prefix="isynth-test-cache-"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_cache() -> Path:
    """The session's ISYNTH_CACHE (set above): the feature net is trained once for every CLI test."""
    return Path(os.environ["ISYNTH_CACHE"])


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A tiny `diffusion` run (20 steps, seconds): the pair teacher of the GET tests."""
    from isynth.presets import make_run
    from isynth.trainer import train

    out = tmp_path_factory.mktemp("teacher") / "diffusion"
    torch.manual_seed(0)
    return train(make_run("diffusion", "tiny"), out, progress=False)


@pytest.fixture(scope="session")
def tiny_pairs(tiny_teacher, tmp_path_factory) -> Path:
    """160 teacher pairs of the tiny teacher, in shards of 64 (the last one partial)."""
    from isynth.pairs import generate_pairs

    out = tmp_path_factory.mktemp("pairs") / "pairs"
    generate_pairs(tiny_teacher, 160, out, shard_size=64, progress=False)
    return out


@pytest.fixture(scope="session", autouse=True)
def _subprocess_env(shared_cache):
    """`isynth` subprocesses (tests/clitools.py) share the session's feature-net cache, never ~/.cache."""
    import clitools

    clitools.ENV.update(os.environ, ISYNTH_CACHE=str(shared_cache))


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    """`a`: a tiny `ar` run on digits (2 steps). `b`: the same command with model.width=64 and 1 step,
    whose checkpoint is then replaced by a's, i.e. a checkpoint from another config. Trained in parallel
    through the command line, once for every CLI test."""
    import shutil

    from clitools import TRAIN_TINY, ok, run_many

    work = tmp_path_factory.mktemp("cli-runs")
    a, b = work / "run-a", work / "run-b"
    for result in run_many([("train", "ar", "--dataset", "digits", "--out", a, *TRAIN_TINY),
                            ("train", "ar", "--dataset", "digits", "--out", b, "--preset", "tiny", "--steps", "1",
                             "--quiet", "model.width=64")]):
        ok(result)
    shutil.copyfile(a / "checkpoint.safetensors", b / "checkpoint.safetensors")
    return {"a": a, "b": b}
