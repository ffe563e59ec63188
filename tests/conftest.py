import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import isynth  # noqa: F401  (sets the MKL reproducibility variables before torch loads MKL)

# isort: split
import pytest
import torch

from isynth.hardware import peak_flops

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
def cache(tmp_path_factory):
    """One ISYNTH_CACHE for the training tests, with the 1-thread CPU peak measured once."""
    path = tmp_path_factory.mktemp("isynth-cache")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ISYNTH_CACHE", str(path))
        torch.set_num_threads(1)
        try:
            peak_flops(torch.device("cpu"))
        finally:
            torch.set_num_threads(threads)
    return path


@contextmanager
def _on_one_thread(cache: Path):
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ISYNTH_CACHE", str(cache))
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


@pytest.fixture
def one_thread(cache):
    """Training tests train in-process on one thread (the tiny model gains nothing from more; steady under
    load); use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    with _on_one_thread(cache):
        yield


@pytest.fixture(scope="module")
def single_thread(cache):
    """`one_thread` for a whole module: for module-scoped fixtures that train in-process."""
    with _on_one_thread(cache):
        yield


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
