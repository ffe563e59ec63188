"""`isynth sweep` and `isynth report`: a grid of ordinary runs that resumes after a kill with identical
results, shards that cover the grid exactly once, refusals that lose nothing, and the report of a real sweep
opened in a browser."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from browsertools import browser_problems
from clitools import ENV, assert_error, ok, run_cli, snapshot

from isynth.errors import IsynthError
from isynth.sweepgrid import Cell, Grid, Size, parse_shard, shard_cells

# ar, the diffusion teacher and its get student; 2 seeds; tiny models, a few optimizer steps each
GRID = ["--paradigms", "ar,diffusion,get", "--sizes", "tiny", "--flops", "2e9", "--seeds", "0,1",
        "--num-samples", "40", "--num-pairs", "64", "--variant", "diffusion:num_steps=2"]
TIMING = ("images_per_s", "train_wall_s", "eval_wall_s", "pairs_wall_s", "train_time_s", "sample_device")


def _quality(results: dict) -> list[dict]:
    """Every row without its timings (which differ between any two runs)."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in results["rows"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "ref"
    ok(run_cli("sweep", "--out", out, "--quiet", *GRID))
    return out


def test_a_sweep_writes_every_cell_and_a_report(reference):
    results = json.loads((reference / "results.json").read_text())
    assert results["cells_done"] == results["cells_total"] == 6 and not results["missing"]
    cells = {r["cell"] for r in results["rows"]}
    assert cells == {f"{p}-tiny-2e+09-s{s}" for p in ("ar", "diffusion", "get") for s in (0, 1)}
    # ar: unguided and guided; diffusion: unguided, 2 steps, configured; get: configured only
    by = {p: sorted({r["sampling_short"] for r in results["rows"] if r["paradigm"] == p})
          for p in ("ar", "diffusion", "get")}
    assert by == {"ar": ["", "guidance.scale=1.0"], "diffusion": ["", "guidance.scale=1.0", "num_steps=2"],
                  "get": [""]}
    assert all(r["configured"] == (r["sampling_short"] == "") for r in results["rows"])
    get_rows = [r for r in results["rows"] if r["paradigm"] == "get"]
    assert all(r["teacher_train_flops"] > 0 and r["pair_flops"] > 0 for r in get_rows)
    for cell in cells:  # each cell is an ordinary run directory
        assert (reference / "cells" / cell / "config.json").exists()
        assert (reference / "cells" / cell / "samples.png").exists()
    for name in ("fd_vs_training", "fd_vs_sample_flops", "fd_vs_images_per_s", "samples"):
        assert (reference / "figures" / f"{name}.png").stat().st_size > 1000
        assert (reference / "figures" / f"{name}.svg").exists()
    commands = [json.loads(line) for line in (reference / "commands.jsonl").read_text().splitlines()]
    assert len(commands) == 1 and commands[0].startswith("isynth sweep --out")


def test_the_report_of_a_real_sweep_opens_cleanly_in_a_browser(reference, tmp_path):
    assert browser_problems(reference / "report.html", tmp_path / "shot.png") == []
    html = (reference / "report.html").read_text()
    for text in ("Ranking by FD", "Log-linear fits", "isynth sweep --out", "seeds [0, 1]", "P(row beats column)"):
        assert text in html, text
    matrices = json.loads((reference / "pairwise.json").read_text())
    p = matrices["fd"]["tiny 2e+09"]
    assert p["ar"]["diffusion"] + p["diffusion"]["ar"] == pytest.approx(1.0)  # A beats B or B beats A (ties half)


def test_killed_and_sharded_sweeps_give_the_reference_results(reference, tmp_path):
    """Shard 0/2 is killed mid-sweep and re-run, shard 1/2 runs on its own: together they give exactly the
    uninterrupted sweep's rows (timings aside), each cell run once."""
    out = tmp_path / "sharded"
    cmd = [sys.executable, "-m", "isynth", "sweep", "--out", str(out), "--quiet", "--shard", "0/2", *GRID]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list(out.glob("cells/*/rows.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-way: one cell finished, the next one training or evaluating
    proc.wait()
    done_before = {p.parent.name for p in out.glob("cells/*/rows.json")}
    assert done_before, "the first cell should have finished before the kill"
    ok(run_cli("sweep", "--out", out, "--quiet", "--shard", "0/2", *GRID))
    ok(run_cli("sweep", "--out", out, "--quiet", "--shard", "1/2", *GRID))
    ref = json.loads((reference / "results.json").read_text())
    got = json.loads((out / "results.json").read_text())
    assert got["cells_done"] == 6
    assert _quality(got) == _quality(ref)


def test_shards_cover_the_grid_exactly_once_and_keep_get_with_its_teacher():
    grid = Grid(paradigms=("ar", "diffusion", "get", "mar"), sizes=(Size("tiny", "tiny"), Size("cpu", "cpu")),
                budgets=(1e12, 2e12, 4e12), seeds=(0, 1, 2), axes=(("model.depth", ("2", "4")),))
    cells = grid.cells()
    assert len(cells) == 4 * 2 * 3 * 3 * 2 == len(set(cells))
    for n in (1, 2, 3, 5):
        shards = [shard_cells(cells, (i, n)) for i in range(n)]
        assert sorted(c.name for s in shards for c in s) == sorted(c.name for c in cells)
        for s in shards:  # a get cell and its teacher are in the same shard, the teacher first
            names = [c.name for c in s]
            for c in s:
                if c.paradigm == "get":
                    assert names.index(c.teacher.name) < names.index(c.name)
    assert cells[0] == Cell("ar", Size("tiny", "tiny"), 1e12, 0, (("model.depth", "2"),))


@pytest.mark.parametrize("text", ["3/2", "2/2", "-1/2", "1/0", "a/b", "1", "1/2/3"])
def test_a_bad_shard_spec_is_refused(text):
    with pytest.raises(IsynthError, match="--shard"):
        parse_shard(text)


@pytest.mark.parametrize("extra, fragments", [
    (["--paradigms", ""], ["empty", "paradigms"]),
    (["--flops", ""], ["empty", "budgets"]),
    (["--paradigms", "ar,nonsense"], ["unknown paradigm", "nonsense"]),
    (["--axis", "model.nonsense=1,2"], ["model.nonsense"]),
    (["--axis", "model.depth=two"], ["model.depth", "two"]),
    (["--axis", "depth"], ["--axis", "section.field"]),
    (["--flops", "10"], ["less than one step"]),
    (["--flops", "inf"], ["finite"]),
    (["--paradigms", "get"], ["diffusion"]),
    (["--shard", "3/2"], ["--shard"]),
    (["--seeds", "0,0"], ["seed", "twice"]),
    (["--preset", "nonsense"], ["unknown sweep preset", "tradeoffs"]),
    (["--variant", "diffusion"], ["--variant"]),
    (["--variant", "diffusion:nonsense=1"], ["nonsense"]),
])
def test_bad_grids_are_one_line_and_write_nothing(tmp_path, extra, fragments):
    out = tmp_path / "sweep"
    args = [*GRID]
    for i in range(0, len(extra), 2):  # the bad option replaces the good one
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i:i + 2]
    assert_error(run_cli("sweep", "--out", out, "--quiet", *args), *fragments)
    assert not out.exists()


def test_a_directory_of_another_grid_is_refused_and_keeps_its_cells(reference):
    before = snapshot(reference / "cells")
    line = assert_error(run_cli("sweep", "--out", reference, "--quiet", *GRID[:-2], "--seeds", "0,1,2"))
    assert "another grid" in line and "seeds" in line
    assert snapshot(reference / "cells") == before
    # the same directory with no grid options continues the saved grid: everything is finished already
    assert "6 of 6 cells finished" in ok(run_cli("sweep", "--out", reference, "--quiet")).stdout
    assert snapshot(reference / "cells") == before


def test_report_refuses_a_directory_that_is_neither(tmp_path):
    assert_error(run_cli("report", tmp_path), "neither a sweep", "nothing to report")


def test_compare_over_seeds_reports_mean_and_interval(tmp_path):
    out = tmp_path / "compare"
    result = ok(run_cli("compare", "--out", out, "--preset", "tiny", "--paradigms", "ar,mdm", "--flops", "2e9",
                        "--seeds", "2", "--quiet", "train.eval_num_samples=40"))
    table = [line for line in result.stdout.splitlines() if line.startswith("| ar") or line.startswith("| mdm")]
    assert len(table) == 4 and all(" ± " in line and "| 0,1 |" in line for line in table), result.stdout
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert sorted((r["paradigm"], r["seed"], r["run_dir"]) for r in rows if r["configured"]) == [
        ("ar", 0, "ar"), ("ar", 1, "seed1/ar"), ("mdm", 0, "mdm"), ("mdm", 1, "seed1/mdm")]
    assert (out / "seed1" / "ar" / "config.json").exists()
    assert browser_problems(out / "report.html") == []
