"""Mask schedules and reveal counts as the papers define them: the inverse of a schedule on the edges of
[0, 1], the counts of a sampling grid worked out by hand, and random masks drawn from the caller's generator."""
from __future__ import annotations

import math

import pytest
import torch

from isynth.masking import elbo_weight, inverse_mask_fraction, mask_fraction, masked_counts, random_masks

SCHEDULES = ["linear", "cosine", "exp", "poly", "log"]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedules_run_from_clean_to_all_masked(schedule):
    """gamma(0) = 0 and gamma(1) = 1, except exp, 1 - e^{-5} at t = 1; the inverse maps those back."""
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    top = 1 - math.exp(-5) if schedule == "exp" else 1.0
    gamma = mask_fraction(schedule, ends)
    torch.testing.assert_close(gamma, torch.tensor([0.0, top], dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(inverse_mask_fraction(schedule, gamma), ends, atol=1e-12, rtol=0)


def test_cosine_inverse_is_safe_just_outside_zero_and_one():
    """A masked fraction computed in floating point may overshoot [0, 1] by a rounding error; the cosine
    inverse clamps it to the ends instead of returning NaN or a time outside [0, 1]."""
    y = torch.tensor([-0.01, -1e-7, 1 + 1e-7, 1.5], dtype=torch.float64)
    want = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(inverse_mask_fraction("cosine", y), want, atol=1e-12, rtol=0)


def test_exp_inverse_of_its_top_value_is_one():
    """exp's largest value is 1 - e^{-5} (at t = 1); anything at or above it maps to t = 1, not infinity."""
    y = torch.tensor([1 - math.exp(-5), 1.0], dtype=torch.float64)
    torch.testing.assert_close(inverse_mask_fraction("exp", y), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("fn", [mask_fraction, inverse_mask_fraction, elbo_weight])
def test_an_unknown_schedule_is_named(fn):
    with pytest.raises(ValueError, match="unknown mask schedule 'quadratic'"):
        fn("quadratic", torch.tensor([0.5]))


def test_one_sampling_step_reveals_everything():
    """K = 1 is allowed (one pass reveals every token), also when the grid ends before t = 0."""
    assert masked_counts(5, [1.0, 0.0], "linear") == [5, 0]
    assert masked_counts(10, [1.0, 0.5], "linear") == [10, 0]
    assert masked_counts(1, [1.0, 0.0], "cosine") == [1, 0]


def test_the_last_step_reveals_all_even_where_the_schedule_is_above_zero():
    """Times ending at t = 0.5: floor(10 * 0.5) = 5 would stay masked, but the last step reveals all."""
    assert masked_counts(10, [1.0, 0.75, 0.5], "linear") == [10, 7, 0]


def test_counts_are_floors_of_n_gamma_in_double_precision():
    """floor(10 * 0.7) = 7: computed in float32, 0.7 is 0.69999999 and the floor would be 6."""
    assert masked_counts(10, [1.0, 0.7, 0.0], "linear") == [10, 7, 0]
    assert masked_counts(100, [1.0, 0.29, 0.0], "linear") == [100, 29, 0]


def test_counts_fall_by_one_where_the_schedule_reveals_too_little():
    """Times 1, 0.99, 0.98 on 4 tokens: floor(4 * 0.99) = 3 and floor(4 * 0.98) = 3; the second step must
    still reveal one token (MAR's max(1, min(masked - 1, ...))), so the counts are 4, 3, 2, 0."""
    assert masked_counts(4, [1.0, 0.99, 0.98, 0.0], "linear") == [4, 3, 2, 0]


def test_counts_keep_one_token_per_remaining_step():
    """A schedule that would reveal everything at once still leaves one token for each later step."""
    assert masked_counts(6, [1.0, 0.01, 0.005, 0.001, 0.0], "linear") == [6, 3, 2, 1, 0]


@pytest.mark.parametrize("times,n", [([1.0], 4), ([1.0, 0.8, 0.6, 0.4, 0.2, 0.0], 4)])
def test_impossible_step_counts_are_refused(times, n):
    with pytest.raises(ValueError, match=f"{len(times) - 1} sampling steps for {n} tokens"):
        masked_counts(n, times, "linear")


def test_random_masks_have_the_asked_counts_per_row():
    counts = torch.tensor([0, 1, 3, 5])
    masks = random_masks(counts, 5, torch.Generator().manual_seed(0))
    assert masks.shape == (4, 5) and masks.dtype == torch.bool
    assert masks.sum(1).tolist() == [0, 1, 3, 5]


def test_random_masks_come_from_the_callers_generator():
    """The same generator seed gives the same masks whatever the global RNG did, and another seed others."""
    counts = torch.full((8,), 4)
    torch.manual_seed(1)
    a = random_masks(counts, 16, torch.Generator().manual_seed(5))
    torch.manual_seed(2)
    b = random_masks(counts, 16, torch.Generator().manual_seed(5))
    c = random_masks(counts, 16, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_mask_positions_are_uniform():
    """Each position is masked with probability count / n (a uniformly random subset)."""
    masks = random_masks(torch.full((4000,), 2), 8, torch.Generator().manual_seed(0))
    freq = masks.float().mean(0)
    torch.testing.assert_close(freq, torch.full((8,), 0.25), atol=0.03, rtol=0)
