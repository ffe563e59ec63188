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
