import os
import tempfile

import pytest

import isynth  # noqa: F401  (sets the MKL reproducibility variables before torch loads MKL)
import torch

# Keep the feature-net / peak-FLOPs cache out of the user's home during tests.
os.environ.setdefault("ISYNTH_CACHE", tempfile.mkdtemp(prefix="isynth-test-cache-"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
