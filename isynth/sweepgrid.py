"""The grid of a sweep: paradigms x model sizes x training-FLOPs budgets x seeds x any `section.field` axis,
as Kilian et al. 2024 ("Computational Tradeoffs in Image Synthesis") measure quality against training and
inference compute per paradigm and size. A grid is a frozen value, saved as `sweep.json` in the sweep's
directory so that a re-run (or another shard) can check that it continues the same study.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from isynth.errors import IsynthError
from isynth.files import read_json
from isynth.overrides import dataset_overrides
from isynth.paradigms import PARADIGMS

# get distils the sampler of a trained `diffusion` run of the same cell (Geng et al. 2023): the teacher.
TEACHER, STUDENT = "diffusion", "get"


@dataclass(frozen=True)
class Size:
    """A model size: a preset, changed by `overrides` (e.g. `model.width=64`)."""
    name: str
    preset: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""
    paradigm: str
    size: Size
    budget: float
    seed: int
    axes: tuple[tuple[str, str], ...] = ()  # (section.field, value) of the extra axes

    @property
    def name(self) -> str:
        extra = "".join(f"-{k}={v}" for k, v in self.axes)
        return f"{self.paradigm}-{self.size.name}-{self.budget:.3g}-s{self.seed}{extra}".replace("/", "_")

    @property
    def teacher(self) -> Cell:
        """The `diffusion` cell whose pairs a `get` cell learns from (same size, budget, seed, axes)."""
        return dataclasses.replace(self, paradigm=TEACHER)

    def overrides(self, grid: Grid) -> list[str]:
        """Every `section.field=value` of this cell's run, in the order they apply."""
        return [*dataset_overrides(grid.dataset), *self.size.overrides, *grid.overrides,
                *(f"{k}={v}" for k, v in self.axes), f"train.train_flops={self.budget}", "train.max_steps=none",
                f"train.seed={self.seed}"]


@dataclass(frozen=True)
class Grid:
    paradigms: tuple[str, ...]
    sizes: tuple[Size, ...]
    budgets: tuple[float, ...]
    seeds: tuple[int, ...]
    axes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    overrides: tuple[str, ...] = ()  # the same for every cell
    dataset: str | None = None  # the command line's --dataset (digits when None)
    # Sampler settings evaluated besides the configured one, per paradigm: each a space-separated list of
    # `sample.` fields (e.g. "num_steps=4"), the points of the inference Pareto fronts.
    variants: tuple[tuple[str, tuple[str, ...]], ...] = ()
    unguided: bool = True  # also evaluate guided paradigms without guidance, as the main job does
    num_samples: int | None = None  # per evaluation (the preset's train.eval_num_samples when None)
    num_pairs: int = 2048  # teacher pairs per get cell

    def __post_init__(self):
        for name in ("paradigms", "sizes", "budgets", "seeds"):
            if not getattr(self, name):
                raise IsynthError(f"the sweep's grid is empty: no {name}")
        unknown = [p for p in self.paradigms if p not in PARADIGMS]
        if unknown:
            raise IsynthError(f"unknown paradigm {unknown[0]!r} in the sweep; choose from {', '.join(PARADIGMS)}")
        if STUDENT in self.paradigms and TEACHER not in self.paradigms:
            raise IsynthError(f"{STUDENT} distils the {TEACHER} cell's sampler: add {TEACHER} to the paradigms")
        for b in self.budgets:
            if not (isinstance(b, (int, float)) and math.isfinite(b) and b > 0):
                raise IsynthError(f"a sweep budget must be a finite number of training FLOPs > 0, got {b!r}")
        for s in self.seeds:
            if not (isinstance(s, int) and 0 <= s < 2**31):
                raise IsynthError(f"a sweep seed must be an integer in [0, 2^31), got {s!r}")
        for name, values in self.axes:
            if "." not in name or not values:
                raise IsynthError(f"sweep axis {name!r} must be section.field with at least one value")
        _unique("paradigm", self.paradigms)
        _unique("size", [s.name for s in self.sizes])
        _unique("budget", self.budgets)
        _unique("seed", self.seeds)
        _unique("axis", [n for n, _ in self.axes])
        for p, _ in self.variants:
            if p not in self.paradigms:
                raise IsynthError(f"sampler variants are given for {p!r}, which is not among the sweep's paradigms")
        if self.num_samples is not None and self.num_samples < 1:
            raise IsynthError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.num_pairs < 1:
            raise IsynthError(f"num_pairs must be >= 1, got {self.num_pairs}")

    def cells(self) -> list[Cell]:
        """Every cell, teachers before their students, seeds innermost (so an early stop has whole groups
        only at the cheapest settings)."""
        order = sorted(self.paradigms, key=list(PARADIGMS).index)
        names = [n for n, _ in self.axes]
        axis_values = list(itertools.product(*(v for _, v in self.axes)))
        return [Cell(p, size, b, seed, tuple(zip(names, vals)))
                for size in self.sizes for b in sorted(self.budgets) for vals in axis_values for p in order
                for seed in self.seeds]

    def variants_of(self, paradigm: str) -> tuple[str, ...]:
        return dict(self.variants).get(paradigm, ())

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict, where: str) -> Grid:
        try:
            return cls(paradigms=tuple(d["paradigms"]),
                       sizes=tuple(Size(s["name"], s["preset"], tuple(s.get("overrides", ()))) for s in d["sizes"]),
                       budgets=tuple(float(b) for b in d["budgets"]), seeds=tuple(d["seeds"]),
                       axes=tuple((n, tuple(str(v) for v in vals)) for n, vals in d.get("axes", ())),
                       overrides=tuple(d.get("overrides", ())), dataset=d.get("dataset"),
                       variants=tuple((p, tuple(v)) for p, v in d.get("variants", ())),
                       unguided=bool(d.get("unguided", True)), num_samples=d.get("num_samples"),
                       num_pairs=int(d.get("num_pairs", 2048)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise IsynthError(f"{where}: not a sweep grid ({type(e).__name__}: {e})") from None


def _unique(what: str, values) -> None:
    seen = [v for i, v in enumerate(values) if v in list(values)[:i]]
    if seen:
        raise IsynthError(f"sweep {what} {seen[0]!r} is given twice")


def read_grid(path: Path) -> Grid:
    return Grid.from_json(read_json(path, "sweep grid"), str(path))


def grid_differences(old: Grid, new: Grid) -> list[str]:
    """What differs between two grids, field by field, for the refusal of a directory from another grid."""
    a, b = old.to_json(), new.to_json()
    return [f"{k}: {json.dumps(a[k])} there, {json.dumps(b[k])} here" for k in a if a[k] != b[k]]


def parse_shard(text: str | None) -> tuple[int, int]:
    """`I/N` (0 <= I < N): this process runs every N-th cell starting at the I-th."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise IsynthError(f"--shard must be I/N with integers 0 <= I < N (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise IsynthError(f"--shard {text}: need N >= 1 and 0 <= I < N (shards are numbered 0 to N-1)")
    return i, n


def shard_cells(cells: list[Cell], shard: tuple[int, int]) -> list[Cell]:
    """Every N-th unit of cells; a `get` cell stays in its teacher's unit, so shards never share a run."""
    i, n = shard
    units: dict[Cell, list[Cell]] = {}
    for c in cells:
        units.setdefault(c.teacher if c.paradigm == STUDENT else c, []).append(c)
    return [c for k, unit in enumerate(units.values()) if k % n == i for c in unit]


def parse_list(text: str, kind, what: str) -> tuple:
    """A comma-separated command-line list of `kind` values."""
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise IsynthError(f"--{what}: cannot read {text!r} as a comma-separated list of {kind.__name__}") from None
    return values


def parse_axis(text: str) -> tuple[str, tuple[str, ...]]:
    """`section.field=v1,v2,...` of --axis."""
    name, sep, values = text.partition("=")
    if not sep or "." not in name or not values:
        raise IsynthError(f"--axis must be section.field=v1,v2,... (e.g. model.depth=2,4), got {text!r}")
    return name, tuple(v for v in values.split(",") if v)

