"""The masked paradigms (`maskgit`, `mdm`, `mar`) by their papers' definitions: the law of the training mask
count against independent computations (exact for MaskGIT's ceil(N gamma(t)), scipy's truncated normal for
MAR, numerical integration of eMIGM's Binomial mixture), the weighted loss over masked tokens, each step's
guidance weight, the released sampling defaults, and the refusals (MaskGIT's reveal step:
test_maskgit_behaviour.py)."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from scipy import integrate, stats

from isynth.config import TokenizerConfig
from isynth.errors import IsynthError
from isynth.overrides import apply
from isynth.paradigms.mar import MAR, MARConfig
from isynth.paradigms.masked import MaskedSampling
from isynth.paradigms.maskgit import MaskGIT, MaskGITConfig, MaskGITSampling
from isynth.paradigms.mdm import MDM, MDMConfig
from isynth.presets import make_run
from isynth.tokenizers.build import build_tokenizer
from isynth.trainer import build


def _model(paradigm: str, *overrides: str):
    torch.manual_seed(0)
    return build(make_run(paradigm, "tiny", list(overrides)), torch.device("cpu")).model.eval()


@pytest.fixture(scope="module")
def maskgit():
    return _model("maskgit")


def test_maskgit_linear_count_law_is_uniform_on_one_to_n():
    """ceil(N t) = m for (m - 1)/N < t <= m/N: with gamma(t) = t every count 1..N has probability 1/N."""
    m = _model("maskgit", "method.mask_schedule=linear")
    pmf = m.train_count_pmf()
    want = torch.full((m.seq_len + 1,), 1 / m.seq_len, dtype=torch.float64)
    want[0] = 0
    torch.testing.assert_close(pmf, want)


def test_maskgit_cosine_count_law_by_its_inverse(maskgit):
    """gamma(t) = cos(pi/2 (1 - t)): P(m) = t(m/N) - t((m-1)/N) with t(y) = 1 - 2 acos(y) / pi."""
    n = maskgit.seq_len
    t = [1 - 2 * math.acos(k / n) / math.pi for k in range(n + 1)]
    want = torch.tensor([0.0] + [t[k] - t[k - 1] for k in range(1, n + 1)], dtype=torch.float64)
    torch.testing.assert_close(maskgit.train_count_pmf(), want)


def test_mar_count_law_is_scipys_truncated_normal():
    """MAR: ratio ~ N(1, 0.25) truncated to [0.7, 1], ceil(N ratio) masked: P(m) = F(m/N) - F((m-1)/N)."""
    m = _model("mar", "method.mask_ratio_min=0.6", "method.mask_ratio_mean=0.9", "method.mask_ratio_std=0.2")
    n, lo, mean, sd = m.seq_len, 0.6, 0.9, 0.2
    law = stats.truncnorm((lo - mean) / sd, (1 - mean) / sd, loc=mean, scale=sd)
    want = torch.tensor([0.0] + [law.cdf(k / n) - law.cdf((k - 1) / n) for k in range(1, n + 1)], dtype=torch.float64)
    torch.testing.assert_close(m.train_count_pmf(), want, atol=1e-9, rtol=0)
    assert m.train_count_pmf()[: math.floor(0.6 * n)].sum() == 0  # never fewer than 60% masked


@pytest.mark.parametrize("schedule,t_min", [("exp", 0.2), ("linear", 0.0)])
def test_mdm_count_law_is_the_binomial_mixture(schedule, t_min):
    """eMIGM: t ~ U(0, 1), t <- max(t, t_min), p = (1 - 1e-3) t + 1e-3, m ~ Binomial(N, gamma(p)), m >= 2.
    Integrated with scipy's quad per count (the clamp puts mass t_min at t = t_min)."""
    m = _model("mdm", f"method.mask_schedule={schedule}", f"method.t_min={t_min}")
    n = m.seq_len
    gamma = {"exp": lambda p: 1 - math.exp(-5 * p), "linear": lambda p: p}[schedule]

    def prob(k, t):
        return stats.binom.pmf(k, n, gamma((1 - 1e-3) * t + 1e-3))

    raw = [integrate.quad(lambda t: prob(k, t), t_min, 1, limit=200)[0] + t_min * prob(k, t_min) for k in range(n + 1)]
    want = torch.tensor([0.0, 0.0, raw[0] + raw[1] + raw[2]] + raw[3:], dtype=torch.float64)
    torch.testing.assert_close(m.train_count_pmf(), want / want.sum(), atol=2e-5, rtol=0)


def test_maskgit_masks_a_different_count_per_row_unless_mae(maskgit):
    """One t per sample (MaskGIT); one per batch with the MAE encoder (rows must be rectangular)."""
    torch.manual_seed(0)
    mask, weight = maskgit.training_mask(64, "cpu")
    counts = mask.sum(1)
    assert len(set(counts.tolist())) > 10 and counts.min() >= 1 and counts.max() <= maskgit.seq_len
    assert torch.equal(weight, torch.ones(64))
    mae = _model("maskgit", "method.mae=true", "method.decoder_depth=1")
    mask, _ = mae.training_mask(16, "cpu")
    assert len(set(mask.sum(1).tolist())) == 1


def test_mar_and_mdm_mask_one_count_per_batch():
    for m in (_model("mar"), _model("mdm")):
        torch.manual_seed(1)
        mask, weight = m.training_mask(8, "cpu")
        assert len(set(mask.sum(1).tolist())) == 1 and weight.shape == (8,)
        assert len({tuple(r.tolist()) for r in mask}) > 1  # but different positions per row


def test_mdm_elbo_weight_is_gamma_prime_over_gamma_at_the_drawn_time():
    """exp schedule: w = 5 e^{-5p} / (1 - e^{-5p}), so p = log(1 + 5 / w) / 5; the masked count is
    Binomial(N, gamma(p)) at that same p, and p is uniform on [1e-3, 1] (t_min = 0)."""
    m = _model("mdm", "method.weighting=elbo", "method.t_min=0", "method.mask_schedule=exp")
    torch.manual_seed(2)
    ps, residuals = [], []
    for _ in range(300):
        mask, w = m.training_mask(4, "cpu")
        assert torch.allclose(w, w[0].expand(4)) and mask.sum(1)[0].item() >= 2
        p = math.log1p(5 / w[0].item()) / 5
        ps.append(p)
        residuals.append(mask.sum(1)[0].item() / m.seq_len - (1 - math.exp(-5 * p)))
    assert min(ps) >= 1e-3 - 1e-6 and max(ps) <= 1 + 1e-6
    assert abs(sum(ps) / len(ps) - (1 + 1e-3) / 2) < 0.05  # mean of U(1e-3, 1)
    assert abs(sum(residuals) / len(residuals)) < 0.02  # the count follows the same p


def test_mdm_time_truncation_raises_the_masked_count():
    """t_min = 0.9 with gamma linear: p >= 0.9, E[max(t, 0.9)] = 0.905, so about 90% are masked."""
    m = _model("mdm", "method.t_min=0.9", "method.mask_schedule=linear")
    torch.manual_seed(3)
    counts = torch.tensor([m.training_mask(1, "cpu")[0].sum().item() for _ in range(200)])
    assert abs(counts.float().mean() - 0.905 * m.seq_len) < 1.5 and counts.min() >= 0.75 * m.seq_len
    assert torch.equal(m.training_mask(2, "cpu")[1], torch.ones(2))  # weighting none: w = 1


def test_the_loss_is_the_weighted_mean_over_masked_tokens(maskgit, monkeypatch):
    """sum over masked tokens of w(row) * CE / number of masked tokens, with the mask and weight drawn."""
    m = maskgit
    n = m.seq_len
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[0, :5], mask[1, 10:13] = True, True
    weight = torch.tensor([2.0, 0.5])
    monkeypatch.setattr(m, "training_mask", lambda b, device: (mask, weight))
    tokens = torch.randint(0, m.tokenizer.vocab_size, (2, n), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 6])
    with torch.no_grad():
        logits = m.head.logits(m.features(tokens, mask, m.condition(labels)))  # (B, N, V)
        ce = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")  # (B, N)
        want = (2.0 * ce[0, :5].sum() + 0.5 * ce[1, 10:13].sum()) / 8
        torch.testing.assert_close(m.loss(tokens, labels), want)


def test_sampling_times_run_from_one_to_the_paradigms_end(maskgit):
    assert maskgit.sampling_times(4) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    mdm = _model("mdm")
    assert mdm.sampling_times(2) == pytest.approx([1.0, 0.500005, 1e-5])


def test_mar_reveals_on_mars_cosine_counts_with_linear_guidance():
    """floor(64 cos(pi/2 k/4)) = 59, 45, 24 still masked after steps 0-2; the weight after step k is
    1 + (w - 1) * revealed / N (MAR's linear CFG) with revealed = 5, 19, 40, 64."""
    m = _model("mar")
    s = apply(m.run.sample, {"num_steps": 4, "guidance.scale": 3.0, "guidance.schedule": "linear"}, "sample.")
    assert m.mask_counts(s) == [64, 59, 45, 24, 0]
    assert m.cfg_weights(s) == pytest.approx([1 + 2 * r / 64 for r in (5, 19, 40, 64)])
    assert m.num_network_evals(s) == 4 and m.unconditional_passes(s) == 4


def test_too_many_steps_are_refused_when_asked_for(maskgit):
    s = apply(maskgit.run.sample, {"num_steps": 65}, "sample.")
    with pytest.raises(IsynthError, match=r"^sample\.num_steps=65 exceeds the 64 tokens to reveal$"):
        maskgit.mask_counts(s)
    with pytest.raises(IsynthError, match=r"^sample\.num_steps=65 exceeds the 64 tokens to reveal$"):
        build(make_run("maskgit", "tiny", ["sample.num_steps=65"]), torch.device("cpu"))
    assert maskgit.mask_counts(apply(s, {"num_steps": 64}, "sample."))[-2:] == [1, 0]


def test_released_sampling_defaults():
    """eMIGM's released sampler: 16 steps, DPM-Solver++ with 8 head steps; MAR's: 64 steps, linear CFG."""
    _, mdm = MDM.sections(False)
    assert mdm.num_steps == 16 and mdm.head.sampler == "dpm++" and mdm.head.steps == 8
    _, mar = MAR.sections(False)
    assert mar.num_steps == 64 and mar.guidance.schedule == "linear"


def test_decoder_depth_and_mask_token_initialisation():
    """method.decoder_depth sets the decoder's blocks (none: as deep as the encoder); the mask token
    starts at truncated-normal(0.02), as MAR's."""
    deep = _model("mar", "model.depth=2")
    shallow = _model("mar", "model.depth=2", "method.decoder_depth=1")
    assert len(deep.decoder.blocks) == 2 and len(shallow.decoder.blocks) == 1 and len(shallow.encoder.blocks) == 2
    assert 0.01 < deep.mask_token.std().item() < 0.03


def test_maskgit_sections_and_defaults():
    method, sampling = MaskGIT.sections(True)
    assert isinstance(method, MaskGITConfig) and isinstance(sampling, MaskGITSampling)
    assert sampling.guidance.schedule == "linear" and sampling.num_steps == 8


@pytest.mark.parametrize("make,message", [
    (lambda: MaskGITConfig(class_dropout=1.0), "method.class_dropout must be in [0, 1)"),
    (lambda: MaskGITConfig(num_buffer=0), "method.num_buffer must be >= 1"),
    (lambda: MaskGITConfig(decoder_depth=-1), "method.decoder_depth must be >= 0 or none"),
    (lambda: MaskGITConfig(mae=True, decoder_depth=0),
     "method.mae=true needs a decoder to fill in the masked tokens (method.decoder_depth >= 1 or none)"),
    (lambda: MDMConfig(t_min=1.0), "method.t_min must be in [0, 1), got 1.0"),
    (lambda: MDMConfig(t_min=-0.5), "method.t_min must be in [0, 1), got -0.5"),
    (lambda: MARConfig(mask_ratio_min=0.0), "method.mask_ratio_min must be in (0, 1)"),
    (lambda: MARConfig(mask_ratio_min=1.0), "method.mask_ratio_min must be in (0, 1)"),
    (lambda: MARConfig(mask_ratio_std=0.0), "method.mask_ratio_std must be > 0"),
    (lambda: MaskedSampling(num_steps=0), "sample.num_steps must be >= 1"),
    (lambda: MaskedSampling(batch_size=0), "sample.batch_size must be > 0"),
    (lambda: MaskGITSampling(num_steps=0), "sample.num_steps must be >= 1"),
    (lambda: MaskGITSampling(choice_temperature=-0.1), "sample.choice_temperature must be >= 0"),
    (lambda: MaskGITSampling(batch_size=0), "sample.batch_size must be > 0"),
])
def test_bad_masked_settings_are_refused_in_words(make, message):
    with pytest.raises(IsynthError, match=f"^{re.escape(message)}$"):
        make()


def test_edge_masked_settings_are_accepted():
    assert MaskGITConfig(class_dropout=0.0, num_buffer=1, decoder_depth=None, mae=True).mae
    assert MDMConfig(t_min=0.0).t_min == 0.0 and MARConfig(mask_ratio_min=0.99).mask_ratio_min == 0.99
    assert MaskedSampling(num_steps=1, batch_size=1).num_steps == 1
    assert MaskGITSampling(num_steps=1, choice_temperature=0.0, batch_size=1).num_steps == 1


def test_mdm_needs_two_tokens():
    with pytest.raises(IsynthError, match=r"^mdm masks at least 2 tokens per sample: the token grid needs >= 2 "
                                          r"tokens$"):
        build(make_run("mdm", "tiny", ["tokenizer.patch_size=8", "sample.num_steps=1"]), torch.device("cpu"))


@pytest.fixture(scope="module")
def mar():
    return _model("mar")


def test_the_mae_encoder_takes_a_single_row(mar):
    tokens = torch.randn(1, mar.seq_len, mar.tokenizer.token_dim)
    mask = torch.zeros(1, mar.seq_len, dtype=torch.bool)
    mask[0, ::2] = True
    with torch.no_grad():
        z = mar.features(tokens, mask, mar.condition(torch.tensor([3])))
    assert z.shape == (1, mar.seq_len, mar.run.model.width) and torch.isfinite(z).all()


def test_the_mae_encoder_refuses_ragged_rows_in_words(mar):
    tokens = torch.randn(2, mar.seq_len, mar.tokenizer.token_dim)
    mask = torch.zeros(2, mar.seq_len, dtype=torch.bool)
    mask[0, :5], mask[1, :6] = True, True
    with pytest.raises(ValueError, match="^the MAE encoder needs the same number of masked tokens in every row$"):
        mar.features(tokens, mask, mar.condition(torch.tensor([1, 2])))


def test_mdm_takes_a_grid_of_exactly_two_tokens():
    """Two 4 x 4 patches of an 8 x 4 image: the smallest grid eMIGM's count (at least 2 masked) allows."""
    setup = build(make_run("mdm", "tiny", ["sample.num_steps=2"]), torch.device("cpu"))
    tokenizer = build_tokenizer(TokenizerConfig(kind="patch", patch_size=4), (8, 4, 1))
    m = MDM(setup.run, tokenizer, setup.dataset.conditions)
    assert m.seq_len == 2 and m.training_mask(3, "cpu")[0].all()


def test_mar_may_mask_a_single_token():
    """A mask ratio near 0 masks ceil(N r) = 1 token, never 0."""
    m = _model("mar", "method.mask_ratio_min=0.001", "method.mask_ratio_mean=0.001", "method.mask_ratio_std=0.001")
    torch.manual_seed(0)
    assert {m.training_mask(2, "cpu")[0].sum(1)[0].item() for _ in range(20)} == {1}


def test_step_times_and_weights_are_plain_numbers_on_the_meta_device(maskgit):
    """`isynth flops` builds models on the meta device: the sampler's accounting still gets numbers."""
    s = apply(maskgit.run.sample, {"num_steps": 4, "guidance.scale": 2.0}, "sample.")
    weights = maskgit.cfg_weights(s)
    with torch.device("meta"):
        assert maskgit.sampling_times(4) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
        assert maskgit.cfg_weights(s) == weights
