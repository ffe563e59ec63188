import os
import tempfile

import pytest
import torch

# Keep the feature-net / peak-FLOPs cache out of the user's home during tests.
os.environ.setdefault("ISYNTH_CACHE", tempfile.mkdtemp(prefix="isynth-test-cache-"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
