"""Classifier-free guidance as Ho & Salimans (2022) define it: the weight of each schedule at worked-out
points, the interval's edges, and the refusals of impossible settings, word for word."""
from __future__ import annotations

import math
import re

import pytest
import torch

from isynth.errors import IsynthError
from isynth.guidance import Guidance, guide


def test_no_guidance_runs_no_unconditional_pass_at_any_time():
    g = Guidance(scale=1.0, schedule="pow-cosine", t_min=0.2, t_max=0.4)
    assert [g.weight(p, t) for p, t in ((0.0, None), (0.5, 0.3), (1.0, 0.0))] == [None, None, None]


@pytest.mark.parametrize("schedule", ["constant", "linear", "pow-cosine"])
def test_the_whole_range_guides_every_step_also_one_at_t_zero(schedule):
    """Without an interval the step that ends at t = 0 is guided too (MaskGIT's and MAR's last step)."""
    g = Guidance(scale=3.0, schedule=schedule)
    assert g.weight(1.0, 0.0) == pytest.approx(3.0)
    assert g.weight(1.0, 1.0) == pytest.approx(3.0)


def test_interval_edges_are_open_below_and_closed_above():
    g = Guidance(scale=2.5, t_min=0.0, t_max=0.5)  # t_min = 0 but not the whole range
    assert g.weight(0.3, 0.0) is None  # (0, 0.5] excludes 0
    assert g.weight(0.3, 1e-9) == 2.5
    assert g.weight(0.3, 0.5) == 2.5
    assert g.weight(0.3, 0.5 + 1e-9) is None
    upper = Guidance(scale=2.5, t_min=0.5, t_max=1.0)
    assert upper.weight(0.3, 1.0) == 2.5 and upper.weight(0.3, 0.5) is None


@pytest.mark.parametrize("progress", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_linear_schedule_rises_from_one_to_the_scale(progress):
    """MAR's linear CFG: w = 1 + (scale - 1) * revealed / N."""
    assert Guidance(scale=5.0, schedule="linear").weight(progress) == pytest.approx(1 + 4 * progress)


def test_pow_cosine_midpoint_and_shape():
    """RAR: w(p) = 1 + (g - 1)(1 - cos(pi p^pow)) / 2; at p^pow = 1/2 the weight is half-way, and a larger
    exponent delays the rise."""
    g = Guidance(scale=9.0, schedule="pow-cosine", pow=2.0)
    assert g.weight(math.sqrt(0.5)) == pytest.approx(5.0)
    assert g.weight(0.5) == pytest.approx(1 + 8 * (1 - math.cos(math.pi / 4)) / 2)
    assert g.weight(0.5) < Guidance(scale=9.0, schedule="pow-cosine", pow=1.0).weight(0.5) == pytest.approx(5.0)


def test_weights_below_one_are_allowed():
    """scale < 1 moves away from the condition (w = 0 is the unconditional model): still a guided step."""
    assert Guidance(scale=0.0).weight(0.5) == 0.0
    assert Guidance(scale=0.5, schedule="linear").weight(1.0) == pytest.approx(0.5)


def test_guide_mixes_elementwise_with_the_weight():
    cond, uncond = torch.tensor([[1.0, -2.0], [0.5, 4.0]]), torch.tensor([[0.0, 2.0], [0.5, 1.0]])
    torch.testing.assert_close(guide(cond, uncond, 2.0), torch.tensor([[2.0, -6.0], [0.5, 7.0]]))
    torch.testing.assert_close(guide(cond, uncond, 0.5), torch.tensor([[0.5, 0.0], [0.5, 2.5]]))


INTERVAL = "sample.guidance.t_min and sample.guidance.t_max must satisfy 0 <= t_min < t_max <= 1"


@pytest.mark.parametrize("kwargs,message", [
    ({"scale": -0.5}, "sample.guidance.scale must be a finite number >= 0, got -0.5"),
    ({"scale": float("nan")}, "sample.guidance.scale must be a finite number >= 0, got nan"),
    ({"pow": -2.0}, "sample.guidance.pow must be a finite number >= 0, got -2.0"),
    ({"pow": float("inf")}, "sample.guidance.pow must be a finite number >= 0, got inf"),
    ({"t_min": 0.5, "t_max": 0.5}, f"{INTERVAL}, got 0.5 and 0.5"),
    ({"t_min": -0.1}, f"{INTERVAL}, got -0.1 and 1.0"),
    ({"t_max": 1.01}, f"{INTERVAL}, got 0.0 and 1.01"),
])
def test_impossible_guidance_is_refused_with_its_values(kwargs, message):
    with pytest.raises(IsynthError, match=f"^{re.escape(message)}$"):
        Guidance(**kwargs)


def test_the_widest_and_the_edge_settings_are_accepted():
    for g in (Guidance(scale=0.0, pow=0.0), Guidance(t_min=0.0, t_max=1.0), Guidance(t_min=0.999, t_max=1.0)):
        assert isinstance(g, Guidance)
