"""`isynth sweep`: the command line of a grid of runs (sweepgrid.py, sweep.py)."""
from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

import click
import torch

from isynth.errors import IsynthError
from isynth.studyreport import build_report
from isynth.sweep import GRID_FILE, run_sweep
from isynth.sweepgrid import Grid, Size, parse_axis, parse_list, parse_shard, read_grid
from isynth.sweeppresets import SWEEPS


def _size(name: str) -> Size:
    return Size(name, name)


def _variant(text: str) -> tuple[str, str]:
    paradigm, sep, fields = text.partition(":")
    if not sep or not fields.strip():
        raise IsynthError(f"--variant must be PARADIGM:'field=value ...' (e.g. diffusion:'num_steps=4'), got {text!r}")
    return paradigm, fields.strip()


def build_grid(out: Path, preset: str | None, file: Path | None, options: dict, overrides: tuple[str, ...]) -> Grid:
    """The grid from --preset or --file (or the one saved in --out), with the command line's options replacing
    its fields; without any of these the options alone make the grid."""
    if preset is not None and file is not None:
        raise IsynthError("give --preset or --file, not both")
    if preset is not None:
        if preset not in SWEEPS:
            raise IsynthError(f"unknown sweep preset {preset!r}; choose one of {', '.join(SWEEPS)}")
        base = SWEEPS[preset]
    elif file is not None:
        base = read_grid(file)
    elif (out / GRID_FILE).exists():
        base = read_grid(out / GRID_FILE)
    else:
        missing = [f"--{k}" for k in ("flops",) if options.get(k) is None]
        if missing:
            raise IsynthError(f"a new sweep needs {', '.join(missing)} (or --preset / --file)")
        base = None
    changes: dict = {}
    if options["paradigms"] is not None:
        changes["paradigms"] = parse_list(options["paradigms"], str, "paradigms")
    if options["sizes"] is not None:
        changes["sizes"] = tuple(_size(s) for s in parse_list(options["sizes"], str, "sizes"))
    if options["flops"] is not None:
        changes["budgets"] = parse_list(options["flops"], float, "flops")
    if options["seeds"] is not None:
        changes["seeds"] = parse_list(options["seeds"], int, "seeds")
    if options["axis"]:
        changes["axes"] = tuple(parse_axis(a) for a in options["axis"])
    if options["variant"]:
        by: dict[str, list[str]] = {}
        for p, v in map(_variant, options["variant"]):
            by.setdefault(p, []).append(v)
        changes["variants"] = tuple((p, tuple(v)) for p, v in by.items())
    for key in ("num_samples", "num_pairs", "dataset"):
        if options[key] is not None:
            changes[key] = options[key]
    if overrides:
        changes["overrides"] = tuple(overrides)
    if base is None:
        defaults = {"paradigms": ("ar", "rar", "maskgit", "mdm", "mar", "ar-cont", "diffusion", "get"),
                    "sizes": (_size("cpu"),), "seeds": (0, 1, 2)}
        return Grid(**(defaults | changes))
    return dataclasses.replace(base, **changes) if changes else base


@click.command()
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="The sweep's directory (re-running continues it; cells under DIR/cells).")
@click.option("--preset", default=None, help=f"A named grid: {', '.join(SWEEPS)}.")
@click.option("--file", "file", type=click.Path(path_type=Path), default=None,
              help="A grid as JSON (the format of DIR/sweep.json).")
@click.option("--paradigms", default=None, help="Comma-separated paradigms (default: all eight).")
@click.option("--sizes", default=None, help="Comma-separated presets as model sizes, e.g. cpu-xs,cpu-s,cpu.")
@click.option("--flops", default=None, help="Comma-separated training-FLOPs budgets, e.g. 1e12,3e12.")
@click.option("--seeds", default=None, help="Comma-separated training seeds (default 0,1,2).")
@click.option("--axis", multiple=True, help="Another axis: section.field=v1,v2 (repeatable).")
@click.option("--variant", multiple=True,
              help="A sampler setting evaluated besides the configured one: PARADIGM:'field=value ...' (repeatable).")
@click.option("--num-samples", type=int, default=None, help="Samples per evaluation (default: the preset's).")
@click.option("--num-pairs", type=int, default=None, help="Teacher pairs per get cell (default 2048).")
@click.option("--dataset", default=None, help="digits (default), shapes, an .npz or folder:PATH.")
@click.option("--shard", default=None, help="I/N: run every N-th cell from the I-th (0 <= I < N).")
@click.option("--threads", type=int, default=None,
              help="CPU threads of this process (with N shards on C cores: C/N; default: PyTorch's choice).")
@click.option("--quiet", is_flag=True)
@click.argument("overrides", nargs=-1, metavar="[SECTION.FIELD=VALUE]...")
def sweep(out, preset, file, shard, threads, quiet, overrides, **options):
    """Train and evaluate every cell of a grid: paradigms x sizes x training FLOPs x seeds (x any axis)."""
    grid = build_grid(out, preset, file, options, overrides)
    if threads is not None:
        if not 1 <= threads <= 1024:
            raise IsynthError(f"--threads must be between 1 and 1024, got {threads}")
        torch.set_num_threads(threads)
    summary = run_sweep(grid, out, parse_shard(shard), progress=not quiet, command=command_line())
    report = build_report(out)
    click.echo(f"{summary['cells_done']} of {summary['cells_total']} cells finished; report: {report}")


def command_line() -> str:
    """The running command as a user would type it (`isynth ...`): the arguments `isynth.cli.main` was given
    (also when it is called in-process, e.g. by tests), else this process's."""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    return shlex.join(["isynth", *(obj["argv"] if isinstance(obj, dict) and "argv" in obj else sys.argv[1:])])


@click.command()
@click.argument("directory", type=click.Path(path_type=Path))
def report(directory):
    """Write DIRECTORY/report.html for a sweep or a compare run: tables with confidence intervals, fits,
    figures (also PNG and SVG in DIRECTORY/figures), sample grids, commands, configs, versions and machine."""
    click.echo(str(build_report(directory)))
