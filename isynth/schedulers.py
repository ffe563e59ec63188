"""diffusers schedulers, configured once and copied for each use.

A diffusers scheduler is stateful (it counts its steps), so every sampling call needs its own; copying a
configured one is ~4x cheaper than building it. diffusers is imported on first use: the import takes seconds
and only the samplers that use a scheduler need it (the one module-level exception in isynth's imports).
"""
from __future__ import annotations

import copy
import functools


def fresh_scheduler(name: str, num_steps: int, **config):
    """A new `diffusers.<name>(**config)` with `set_timesteps(num_steps)` done."""
    return copy.deepcopy(_configured(name, num_steps, tuple(sorted(config.items()))))


@functools.lru_cache(maxsize=32)
def _configured(name: str, num_steps: int, config: tuple):
    import diffusers

    scheduler = getattr(diffusers, name)(**dict(config))
    scheduler.set_timesteps(num_steps)
    return scheduler
