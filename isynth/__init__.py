"""isynth: transformer image-generation paradigms on one shared backbone, compared at equal compute."""
import os

# Exact resumption needs bitwise-reproducible CPU training. MKL (PyTorch's CPU BLAS) otherwise uses fewer
# threads when the machine is busy (MKL_DYNAMIC), which reorders floating-point sums, and may pick code
# paths by memory alignment (conditional numerical reproducibility, MKL_CBWR). Set before torch loads MKL;
# a user's own setting wins.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("MKL_CBWR", "AUTO")

__version__ = "0.1.0"

# Imported only now: the variables above must be set before anything loads torch.
from isynth.hub import from_pretrained  # noqa: E402

__all__ = ["__version__", "from_pretrained"]
