"""Figures from a small synthetic sweep: each writes a PNG that opens and is not blank and an SVG, leaves no
temporary files, and a metric no group has writes nothing."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from isynth.errors import IsynthError
from isynth.figures import (
    axis_label,
    frontier,
    quality_vs_inference,
    quality_vs_training,
    sample_grid_sheet,
)
from isynth.stats import aggregate, compute_optimal, fits


@pytest.fixture(scope="module")
def rows():
    """Three paradigms (one without a fixed colour), two sizes, three budgets, two seeds, and a guided variant."""
    rng = np.random.default_rng(0)
    out = []
    for paradigm, base, nll in (("ar", 30.0, 2.0), ("diffusion", 25.0, None), ("newthing", 28.0, 1.5)):
        for size, params, gain in (("tiny", 1e5, 0.0), ("cpu", 1e6, 2.0)):
            for budget in (1e12, 1e13, 1e14):
                for seed in range(2):
                    variants = (("", 0.0), ("guidance.scale=2.0", -1.0)) if paradigm == "ar" else (("", 0.0),)
                    for sampling, extra in variants:
                        flops = (1e8 if paradigm != "diffusion" else 1e9) * (10 if size == "cpu" else 1)
                        out.append({
                            "paradigm": paradigm, "size": size, "budget": budget, "seed": seed, "axes": {},
                            "sampling_short": sampling, "train_flops": budget * 0.98, "params": params,
                            "fd": base - gain - 3.0 * np.log10(budget / 1e12) + extra + rng.normal(0, 0.3),
                            "class_accuracy": 0.5 + 0.1 * np.log10(budget / 1e12) + rng.normal(0, 0.01),
                            "nll_bits_per_token": nll, "sample_flops_per_image": flops * (2 if sampling else 1),
                            "images_per_s": 1e11 / flops * (1 + rng.normal(0, 0.05)),
                        })
    return out


@pytest.fixture(scope="module")
def groups(rows):
    return aggregate(rows)


def _check(paths, directory):
    assert [p.suffix for p in paths] == [".png", ".svg"]
    for p in paths:
        assert p.parent == directory and p.stat().st_size > 1000
    with Image.open(paths[0]) as im:
        pixels = np.asarray(im.convert("L"))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200 and pixels.std() > 5  # something is drawn
    assert b"<svg" in paths[1].read_bytes()[:2000]
    assert sorted(f.name for f in directory.iterdir()) == sorted(p.name for p in paths)  # no temporary left


def test_axis_labels_say_which_way_is_better():
    assert axis_label("fd") == "FD (lower is better)"
    assert axis_label("class_accuracy") == "class accuracy (higher is better)"
    assert axis_label("images_per_s") == "images/s (higher is cheaper)"
    assert axis_label("sample_flops_per_image") == "sampling FLOPs/image"


def test_quality_vs_training_with_fits(tmp_path, rows, groups):
    paths = quality_vs_training(groups, "fd", fits(rows, "fd"), tmp_path / "fd-vs-train")
    _check(paths, tmp_path)
    assert b"/decade" in paths[1].read_bytes()  # the fitted slope is in the legend


def test_quality_vs_training_without_fits_and_with_log_fits(tmp_path, rows, groups):
    _check(quality_vs_training(groups, "class_accuracy", None, tmp_path / "acc.v1"), tmp_path)
    log_fits = fits(rows, "fd", log_y=True)
    (tmp_path / "acc.v1.png").unlink()
    (tmp_path / "acc.v1.svg").unlink()
    _check(quality_vs_training(groups, "fd", log_fits, tmp_path / "fd-log"), tmp_path)


@pytest.mark.parametrize("cost", ["sample_flops_per_image", "images_per_s"])
def test_quality_vs_inference(tmp_path, groups, cost):
    _check(quality_vs_inference(groups, "fd", tmp_path / f"fd-vs-{cost}", cost=cost), tmp_path)


def test_frontier(tmp_path, groups):
    paths = frontier(compute_optimal(groups, "fd"), "fd", tmp_path / "frontier")
    _check(paths, tmp_path)
    assert b"cpu" in paths[1].read_bytes()  # the winning size is annotated


def test_a_metric_no_group_has_writes_nothing(tmp_path, rows, groups):
    assert quality_vs_training(groups, "heldout_class_accuracy", fits(rows, "heldout_class_accuracy"),
                               tmp_path / "a") == []
    assert quality_vs_inference(groups, "recall", tmp_path / "b") == []
    assert frontier(compute_optimal(groups, "precision"), "precision", tmp_path / "c") == []
    assert sample_grid_sheet([], tmp_path / "d") == []
    assert list(tmp_path.iterdir()) == []


def test_a_metric_some_groups_lack_is_drawn_for_the_others(tmp_path, groups):
    _check(quality_vs_inference(groups, "nll_bits_per_token", tmp_path / "nll"), tmp_path)


def test_sample_grid_sheet(tmp_path):
    grids_dir = tmp_path / "grids"
    grids_dir.mkdir()
    rng = np.random.default_rng(0)
    grids = []
    for i, mode in enumerate(["L", "RGB", "L", "RGB", "L"]):
        shape = (64, 64) if mode == "L" else (64, 64, 3)
        path = grids_dir / f"grid{i}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
        grids.append((f"paradigm {i}", path))
    out = tmp_path / "sheet"
    out.mkdir()
    _check(sample_grid_sheet(grids, out / "samples", columns=3), out)
    with pytest.raises(IsynthError, match="unreadable sample grid"):
        sample_grid_sheet([("missing", grids_dir / "nope.png")], out / "x")
    with pytest.raises(IsynthError, match="column"):
        sample_grid_sheet(grids, out / "x", columns=0)


def test_loss_curves_overlay_runs_and_refuse_a_non_run(tmp_path):
    from isynth.figures import loss_curves
    for name, scale in (("a", 1.0), ("b", 2.0)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text('{"paradigm": "ar"}')
        (run / "log.jsonl").write_text("\n".join(
            json.dumps({"step": s, "loss": scale / s, "train_flops": 1e9 * s}) for s in range(1, 6)) + "\n{torn")
    paths = loss_curves([tmp_path / "a", tmp_path / "b"], tmp_path / "both")
    assert [p.name for p in paths] == ["both.png", "both.svg"]
    assert Image.open(paths[0]).size[0] > 300
    with pytest.raises(IsynthError, match="no log.jsonl"):
        loss_curves([tmp_path], tmp_path / "x")
