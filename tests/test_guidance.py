"""Classifier-free guidance: the schedules and interval of `Guidance`, the mixing rule, and the categorical
draw with its filters."""
import math

import pytest
import torch

from isynth.errors import IsynthError
from isynth.guidance import Guidance, guide
from isynth.heads import draw, filter_logits


def test_pow_zero_is_constant_guidance():
    g = Guidance(scale=4.0, schedule="pow-cosine", pow=0.0)
    assert all(g.weight(s / 64) == pytest.approx(4.0) for s in range(64))


@pytest.mark.parametrize("scale,pw", [(16.0, 2.75), (6.9, 1.5), (2.0, 1.0)])
def test_pow_cosine_schedule_values(scale, pw):
    """RAR's schedule (1d-tokenizer's `generate`): w = 1 + (g - 1) (1 - cos(pi (s / N)^pow)) / 2 at step s."""
    n, g = 256, Guidance(scale=scale, schedule="pow-cosine", pow=pw)
    for s in (0, 1, 64, 128, 200, 255):
        expected = 1 + (scale - 1) * (1 - math.cos(((s / n) ** pw) * math.pi)) / 2
        assert g.weight(s / n) == pytest.approx(expected)
    assert g.weight(0.0) == pytest.approx(1.0)  # rises from 1 ...
    assert g.weight(1.0) == pytest.approx(scale)  # ... to g


def test_linear_and_constant_schedules_and_no_guidance():
    assert Guidance(scale=3.0, schedule="linear").weight(0.25) == pytest.approx(1.5)  # MAR: 1 + (w - 1) p
    assert Guidance(scale=3.0).weight(0.25) == 3.0
    assert Guidance(scale=1.0, schedule="linear").weight(0.5) is None  # scale 1: no unconditional pass at all
    assert not Guidance().on and Guidance(scale=0.0).on


def test_interval_runs_no_unconditional_pass_outside_it():
    g = Guidance(scale=2.0, t_min=0.1, t_max=0.3)
    assert [g.weight(0.5, t) for t in (0.05, 0.1, 0.2, 0.3, 0.31)] == [None, None, 2.0, 2.0, None]  # (t_min, t_max]
    assert g.weight(0.5) == 2.0  # a sampler without time: every step
    assert not g.whole_range and Guidance().whole_range


@pytest.mark.parametrize("kwargs,field", [({"scale": -1.0}, "scale"), ({"scale": float("inf")}, "scale"),
                                          ({"pow": -1.0}, "pow"), ({"t_min": 0.5, "t_max": 0.4}, "t_min"),
                                          ({"t_max": 1.5}, "t_max")])
def test_bad_guidance_names_the_field(kwargs, field):
    with pytest.raises(IsynthError, match=f"sample.guidance.{field}"):
        Guidance(**kwargs)


def test_guide_is_uncond_plus_w_times_difference():
    c, u = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(guide(c, u, 1.0), c)
    assert torch.equal(guide(c, u, 0.0), u)
    assert torch.equal(guide(c, u, 3.0), torch.tensor([4.0, -2.0]))


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k2 = filter_logits(logits, top_k=2)
    assert torch.isfinite(k2).tolist() == [[True, True, False, False]]
    p = filter_logits(logits, top_p=0.7)  # 0.5 < 0.7 <= 0.8: the two most likely
    assert torch.isfinite(p).tolist() == [[True, True, False, False]]
    p1 = filter_logits(logits, top_p=0.4)  # the top token alone reaches 0.4
    assert torch.isfinite(p1).tolist() == [[True, False, False, False]]
    assert torch.equal(filter_logits(logits), logits)


def test_draw_follows_the_distribution_and_the_generator():
    probs = torch.tensor([0.1, 0.2, 0.7])
    logits = probs.log().expand(20000, -1)
    ids = draw(logits, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=3).float() / len(ids)
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    again = draw(logits, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)
    cold = draw(logits[:1000], 0.05, torch.Generator().manual_seed(0))  # low temperature: near argmax
    assert (cold == 2).all()
