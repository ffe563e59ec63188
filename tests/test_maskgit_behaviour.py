"""MaskGIT's sampler step by its paper (Chang et al. 2022, sec. 3.2): every masked token is drawn and the most
confident are revealed, confidence being the drawn token's log-probability over the vocabulary plus annealed
Gumbel choice noise; the draw follows the guided, filtered, tempered logits. The head's logits are replaced by
a function of the position, so each expectation is worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from isynth.heads import CategoricalSampling
from isynth.paradigms.maskgit import MaskGITSampling
from isynth.presets import make_run
from isynth.trainer import build


@pytest.fixture(scope="module")
def maskgit():
    torch.manual_seed(0)
    return build(make_run("maskgit", "tiny"), torch.device("cpu")).model.eval()


def _peaked_logits(monkeypatch, m, peaks: dict[int, int], uncond_peaks: dict[int, int] | None = None):
    """Replace the head's logits by a function of the row's position: position j with a peak at id v
    has logit 30 for v and 0 elsewhere; other positions are flat. z carries the position in its first
    feature, and, with an unconditional half, 1 in its second feature."""
    v = m.tokenizer.vocab_size

    def logits(z):
        pos, half = z[:, 0].round().long(), z[:, 1].round().long()
        out = torch.zeros(z.shape[0], v)
        for i, (p, h) in enumerate(zip(pos.tolist(), half.tolist())):
            table = uncond_peaks if h == 1 and uncond_peaks is not None else peaks
            if p in table:
                out[i, table[p]] = 30.0
        return out

    monkeypatch.setattr(m.head, "logits", logits)


def _position_features(b: int, n: int, c: int, halves: int = 1):
    z = torch.zeros(halves * b, n, c)
    z[:, :, 0] = torch.arange(n, dtype=torch.float32)
    if halves == 2:
        z[b:, :, 1] = 1.0
    return z


def test_maskgit_reveals_the_most_confident_tokens(maskgit, monkeypatch):
    """Without Gumbel noise the revealed tokens are those the model is surest of (MaskGIT sec. 3.2): here
    the three positions with a peaked distribution, revealed with their peak's id; the flat ones stay."""
    m, n = maskgit, maskgit.seq_len
    peaks = {3: 5, 17: 9, 40: 2}
    _peaked_logits(monkeypatch, m, peaks)
    s = MaskGITSampling(num_steps=4, choice_temperature=0.0)
    mask = torch.ones(2, n, dtype=torch.bool)
    counts = [n, n - 3, 10, 5, 0]
    reveal, values = m.reveal(0, _position_features(2, n, 32), None, mask, None, counts, s,
                              torch.Generator().manual_seed(0))
    assert reveal.sum(1).tolist() == [3, 3]
    assert reveal[:, [3, 17, 40]].all()
    assert values.tolist() == [5, 9, 2, 5, 9, 2]


def test_maskgit_keeps_revealed_tokens_and_reveals_among_the_masked(maskgit, monkeypatch):
    m, n = maskgit, maskgit.seq_len
    peaks = {3: 5, 17: 9, 40: 2}
    _peaked_logits(monkeypatch, m, peaks)
    s = MaskGITSampling(num_steps=4, choice_temperature=0.0)
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[0, 3] = False  # already revealed: never revealed again
    reveal, values = m.reveal(1, _position_features(1, n, 32), None, mask, None, [n, n - 1, n - 3, 1, 0], s,
                              torch.Generator().manual_seed(0))
    assert not reveal[0, 3] and reveal.sum().item() == 2 and reveal[0, [17, 40]].all()
    assert values.tolist() == [9, 2]


def test_maskgit_draws_from_the_guided_logits(maskgit, monkeypatch):
    """uncond + w (cond - uncond): with w = 0 the unconditional half's token is drawn, with w = 3 the
    conditional half's (its logit 90 against -60)."""
    m, n = maskgit, maskgit.seq_len
    _peaked_logits(monkeypatch, m, {j: 4 for j in range(n)}, {j: 7 for j in range(n)})
    s = MaskGITSampling(num_steps=2, choice_temperature=0.0)
    mask = torch.ones(1, n, dtype=torch.bool)
    for w, token in ((0.0, 7), (3.0, 4)):
        reveal, values = m.reveal(0, _position_features(1, n, 32, halves=2), w, mask, None, [n, n // 2, 0], s,
                                  torch.Generator().manual_seed(0))
        assert reveal.sum().item() == n // 2 and set(values.tolist()) == {token}


def test_maskgit_choice_noise_decides_among_equally_confident_tokens(maskgit, monkeypatch):
    """All positions flat: with choice noise the revealed set depends on the generator; at the last step
    every masked token is revealed."""
    m, n = maskgit, maskgit.seq_len
    _peaked_logits(monkeypatch, m, {})
    s = MaskGITSampling(num_steps=4, choice_temperature=4.5)
    mask = torch.ones(1, n, dtype=torch.bool)
    z = _position_features(1, n, 32)
    a, _ = m.reveal(0, z, None, mask, None, [n, 32, 16, 8, 0], s, torch.Generator().manual_seed(0))
    b, _ = m.reveal(0, z, None, mask, None, [n, 32, 16, 8, 0], s, torch.Generator().manual_seed(1))
    assert a.sum() == b.sum() == 32 and not torch.equal(a, b)
    last, _ = m.reveal(3, z, None, mask, None, [n, 32, 16, 8, 0], s, torch.Generator().manual_seed(0))
    assert last.all()


def test_maskgit_head_temperature_and_filters_shape_the_draw(maskgit, monkeypatch):
    """Token ids are drawn from softmax(filtered logits / temperature): top_k = 1 is the arg-max, top_p keeps
    the smallest set reaching p, and a low temperature sharpens the distribution to its computed law."""
    m, n = maskgit, maskgit.seq_len
    v = m.tokenizer.vocab_size
    ramp = torch.linspace(0, 1, v)
    monkeypatch.setattr(m.head, "logits", lambda z: ramp.expand(z.shape[0], v).clone())
    mask = torch.ones(32, n, dtype=torch.bool)
    z = _position_features(32, n, 32)

    def drawn(head):
        s = MaskGITSampling(num_steps=1, choice_temperature=0.0, head=head)
        return m.reveal(0, z, None, mask, None, [n, 0], s, torch.Generator().manual_seed(0))[1]

    assert set(drawn(CategoricalSampling(top_k=1, temperature=5.0)).tolist()) == {v - 1}
    probs = ramp.softmax(0)  # top_p = 0.15 keeps the two most likely ids (each ~0.087 of the mass)
    assert probs[-1] < 0.15 < probs[-2:].sum()
    assert set(drawn(CategoricalSampling(top_p=0.15)).tolist()) == {v - 2, v - 1}
    ids = drawn(CategoricalSampling(temperature=0.05))
    want = (ramp / 0.05).softmax(0)[-1].item()  # about 0.72
    assert abs((ids == v - 1).float().mean().item() - want) < 0.05


def test_maskgit_confidence_is_the_log_probability_over_the_vocabulary(maskgit, monkeypatch):
    """Two masked positions, one revealed: a two-way tie (log p = log 1/2) loses to a peak of 8 over 16 zeros
    (log p = log e^8 / (e^8 + 16)), whatever the other rows hold."""
    m, n = maskgit, maskgit.seq_len
    v = m.tokenizer.vocab_size

    def logits(z):
        out = torch.zeros(z.shape[0], v)
        pos = z[:, 0].round().long()
        out[pos == 0, :2] = 10.0
        out[pos == 1, 2] = 8.0
        return out

    monkeypatch.setattr(m.head, "logits", logits)
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, :2] = True
    s = MaskGITSampling(num_steps=2, choice_temperature=0.0)
    for seed in range(4):
        reveal, values = m.reveal(0, _position_features(1, n, 32), None, mask, None, [2, 1, 0], s,
                                  torch.Generator().manual_seed(seed))
        assert reveal[0].nonzero().flatten().tolist() == [1] and values.tolist() == [2]


def test_maskgit_choice_noise_is_gumbel_top_k_with_the_annealed_temperature(maskgit, monkeypatch):
    """Confidence log p + tau * Gumbel with tau = choice_temperature * (1 - (k + 1) / K): revealing the most
    confident of three masked tokens is the Gumbel-max trick, i.e. it picks token i with probability
    softmax(log p / tau)_i (Kool et al. 2019). Two peaked tokens (log p = 0) and a flat one (log p = -log V):
    with tau = log V the flat one is revealed with probability e^-1 / (2 + e^-1) = 0.155."""
    m, n = maskgit, maskgit.seq_len
    v = m.tokenizer.vocab_size
    _peaked_logits(monkeypatch, m, {0: 1, 1: 2})  # position 2 stays flat
    b = 3000
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[:, :3] = True
    s = MaskGITSampling(num_steps=2, choice_temperature=2 * math.log(v))  # k = 0 of K = 2: tau = log V
    reveal, _ = m.reveal(0, _position_features(b, n, 32), None, mask, None, [3, 2, 0], s,
                         torch.Generator().manual_seed(0))
    assert (reveal.sum(1) == 1).all()
    flat = reveal[:, 2].float().mean().item()
    want = math.exp(-1) / (2 + math.exp(-1))
    assert abs(flat - want) < 0.025, (flat, want)
