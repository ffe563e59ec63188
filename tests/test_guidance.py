"""CFG schedules and the categorical draw."""
import math

import pytest
import torch

from isynth.guidance import draw, filter_logits, guide, pow_cosine_scale


def test_pow_zero_is_constant_guidance():
    assert all(pow_cosine_scale(s, 64, 4.0, 0.0) == pytest.approx(4.0) for s in range(64))


@pytest.mark.parametrize("g,pw", [(16.0, 2.75), (6.9, 1.5), (2.0, 1.0)])
def test_pow_cosine_schedule_values(g, pw):
    n = 256
    for s in (0, 1, 64, 128, 200, 255):
        expected = 1 + (g - 1) * (1 - math.cos(((s / n) ** pw) * math.pi)) / 2  # SPEC 1.2
        assert pow_cosine_scale(s, n, g, pw) == pytest.approx(expected)
    assert pow_cosine_scale(0, n, g, pw) == pytest.approx(1.0)  # rises from 1 ...
    assert pow_cosine_scale(n, n, g, pw) == pytest.approx(g)  # ... to g
    assert pow_cosine_scale(n // 2, n, g, 1.0) == pytest.approx(1 + (g - 1) / 2)


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
