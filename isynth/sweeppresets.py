"""Named sweeps. `tradeoffs` is Kilian et al. 2024's protocol ("Computational Tradeoffs in Image Synthesis":
quality against training and inference compute, per paradigm and model size) at laptop scale, on digits:
all eight paradigms, three sizes of the main job's recipe, four budgets spanning 10x, three seeds, and the
sampler settings whose cost the inference fronts trade against quality. `tradeoffs-gpu` is the same study at
GET's model sizes (Geng et al. 2023) and GPU budgets.
"""
from __future__ import annotations

from isynth.sweepgrid import Grid, Size

ALL = ("ar", "rar", "maskgit", "mdm", "mar", "ar-cont", "diffusion", "get")

# Sampler settings besides each paradigm's configured one: fewer and more steps (NFE) for the iterative
# samplers, fewer fixed-point iterations for GET. Guided paradigms are also evaluated without guidance.
_VARIANTS = (("maskgit", ("num_steps=4", "num_steps=16")), ("mdm", ("num_steps=4",)), ("mar", ("num_steps=4",)),
             ("diffusion", ("num_steps=4", "num_steps=16")), ("get", ("fixed_point_iters=2",)))

SWEEPS: dict[str, Grid] = {
    "tradeoffs": Grid(paradigms=ALL, sizes=(Size("cpu-xs", "cpu-xs"), Size("cpu-s", "cpu-s"), Size("cpu", "cpu")),
                      budgets=(1.5e11, 3e11, 6e11, 1.5e12), seeds=(0, 1, 2), variants=_VARIANTS,
                      num_samples=500, num_pairs=512),
    "tradeoffs-gpu": Grid(paradigms=ALL, sizes=(Size("get-t", "get-t"), Size("get-m", "get-m"),
                                                Size("get-s", "get-s")),
                          budgets=(1e15, 3e15, 1e16, 3e16), seeds=(0, 1, 2), variants=_VARIANTS,
                          num_samples=10_000, num_pairs=16_384),
}
