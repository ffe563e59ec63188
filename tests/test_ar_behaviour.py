"""Next-token prediction (`ar`, `ar-cont`) and RAR (Yu et al. 2024) by what the factorisation means: the
logit of step s sees the label and the tokens of earlier steps only, in whatever order the model generates;
the loss is that factorisation's cross-entropy; RAR's annealing window (eq. 4) and its refusals."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from isynth.diffhead import DiffHeadConfig
from isynth.errors import IsynthError
from isynth.guidance import Guidance
from isynth.heads import CategoricalSampling, gather_tokens
from isynth.overrides import apply
from isynth.paradigms.ar import AR, ARConfig, ARSampling
from isynth.paradigms.rar import RAR, RARConfig
from isynth.presets import make_run
from isynth.scans import scan_order
from isynth.trainer import build


def _model(paradigm: str, *overrides: str):
    torch.manual_seed(0)
    m = build(make_run(paradigm, "tiny", list(overrides)), torch.device("cpu")).model
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random weights everywhere: adaLN-Zero's zeros would hide the condition
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m.eval()


LAYOUTS = {
    "ar": ("ar",),
    "ar-adaln": ("ar", "model.adaln=true"),
    "rar-reference": ("rar", "model.adaln=true", "model.qk_norm=true", "method.cls_token=true",
                      "method.position_condition=true"),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def model(request):
    return _model(*LAYOUTS[request.param])


def test_each_step_sees_the_label_and_earlier_steps_only(model):
    """Changing the token of step j changes no logit of steps <= j and the logit of step j + 1; changing
    the label changes the first step's logit (the class embedding is the first input)."""
    m = model
    tokens = torch.randint(0, m.tokenizer.vocab_size, (2, m.seq_len), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        base = m.logits(tokens, labels)
        assert base.shape == (2, m.seq_len, m.tokenizer.vocab_size)
        for j in (0, 7, m.seq_len - 2):
            other = tokens.clone()
            other[:, j] = (other[:, j] + 1) % m.tokenizer.vocab_size
            changed = m.logits(other, labels)
            torch.testing.assert_close(changed[:, :j + 1], base[:, :j + 1])
            assert not torch.allclose(changed[:, j + 1], base[:, j + 1])
        assert not torch.allclose(m.logits(tokens, torch.tensor([3, 4]))[:, 0], base[:, 0])


def test_in_a_permuted_order_each_step_sees_the_earlier_steps_of_that_order():
    """RAR with target-aware positions in a random order: the logit of step s depends on the tokens at the
    positions generated before s, and on which position s is (the target), not on the rest."""
    m = _model("rar", "method.order=random")
    n = m.seq_len
    order = torch.randperm(n, generator=torch.Generator().manual_seed(3))[None]
    tokens = torch.randint(0, m.tokenizer.vocab_size, (1, n), generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([5])
    with torch.no_grad():
        base = m.logits(tokens, labels, order)
        j = 10  # the step whose token changes: position order[j]
        other = tokens.clone()
        other[0, order[0, j]] = (other[0, order[0, j]] + 1) % m.tokenizer.vocab_size
        changed = m.logits(other, labels, order)
        torch.testing.assert_close(changed[:, :j + 1], base[:, :j + 1])
        assert not torch.allclose(changed[:, j + 1], base[:, j + 1])
        swapped = order.clone()  # the same first 20 steps, different targets afterwards
        swapped[0, 20], swapped[0, 21] = order[0, 21], order[0, 20]
        later = m.logits(tokens, labels, swapped)
        torch.testing.assert_close(later[:, :20], base[:, :20])
        assert not torch.allclose(later[:, 20], base[:, 20])


def test_the_loss_is_the_cross_entropy_of_the_next_token(model):
    m = model
    tokens = torch.randint(0, m.tokenizer.vocab_size, (3, m.seq_len), generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0, 4, 9])
    with torch.no_grad():
        logits = m.logits(tokens, labels)
        loss = m.loss(tokens, labels)
    expected = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    torch.testing.assert_close(loss, expected)
    assert loss.ndim == 0


def test_a_scan_order_loss_reads_the_tokens_in_that_order():
    """method.order=scan with a spiral: the loss is the cross-entropy of the tokens in spiral order."""
    m = _model("rar", "method.order=scan", "method.scan=spiral-in")
    order = scan_order("spiral-in", m.tokenizer.grid)[None].expand(2, -1)
    tokens = torch.randint(0, m.tokenizer.vocab_size, (2, m.seq_len), generator=torch.Generator().manual_seed(6))
    labels = torch.tensor([1, 8])
    with torch.no_grad():
        expected = F.cross_entropy(m.logits(tokens, labels, order).flatten(0, 1),
                                   gather_tokens(tokens, order).flatten())
        torch.testing.assert_close(m.loss(tokens, labels), expected)
        assert torch.equal(m.scan_order(2), order)
        assert m.scan_order(2).shape == (2, m.seq_len)


def test_one_network_pass_per_token_and_one_unconditional_pass_per_guided_token():
    m = _model("ar")
    s = m.run.sample
    guided, plain = apply(s, {"guidance.scale": 3.0}, "sample."), apply(s, {"guidance.scale": 1.0}, "sample.")
    assert m.num_network_evals(guided) == m.num_network_evals(plain) == m.seq_len == 64
    assert m.unconditional_passes(guided) == 64 and m.unconditional_passes(plain) == 0


def test_guidance_doubles_the_network_flops_of_sampling():
    m = _model("ar")
    s = apply(m.run.sample, {"guidance.scale": 1.0}, "sample.")
    plain, guided = m.sample_flops(s), m.sample_flops(apply(s, {"guidance.scale": 2.0}, "sample."))
    assert guided == 2 * plain  # the categorical head's FLOPs are in the network's count per row
    assert m.sample_flops(apply(s, {"kv_cache": False}, "sample.")) > plain  # the prefix again at every step


def test_the_token_family_picks_the_head_sections():
    for cls in (AR, RAR):
        head, sampling = cls.sections(True)
        assert head.head is None and isinstance(sampling.head, CategoricalSampling)
        head, sampling = cls.sections(False)
        assert isinstance(head.head, DiffHeadConfig) and not isinstance(sampling.head, CategoricalSampling)
    assert isinstance(AR.sections(True)[0], ARConfig) and isinstance(RAR.sections(True)[0], RARConfig)
    assert isinstance(RAR.sections(True)[1], ARSampling)


@pytest.mark.parametrize("kwargs,message", [
    ({"class_dropout": 1.0}, "method.class_dropout must be in [0, 1)"),
    ({"class_dropout": -0.1}, "method.class_dropout must be in [0, 1)"),
])
def test_bad_ar_methods_are_refused(kwargs, message):
    with pytest.raises(IsynthError, match=f"^{re.escape(message)}$"):
        ARConfig(**kwargs)
    with pytest.raises(IsynthError, match=f"^{re.escape(message)}$"):
        RARConfig(**kwargs)


def test_bad_ar_sampling_is_refused():
    with pytest.raises(IsynthError, match=r"^sample\.batch_size must be > 0$"):
        ARSampling(batch_size=0)
    with pytest.raises(IsynthError, match=r"^sample\.guidance\.t_min/t_max: next-token prediction guides every "
                                          r"token .*the interval is for masked and flow samplers$"):
        ARSampling(guidance=Guidance(scale=2.0, t_min=0.2))
    assert ARSampling(batch_size=1).batch_size == 1


@pytest.mark.parametrize("kwargs,message", [
    ({"anneal_start_step": -1}, "method.anneal_start_step must be >= 0"),
    ({"anneal_end_step": -1}, "method.anneal_end_step must be >= 0"),
    ({"anneal_start_step": 10, "anneal_end_step": 9}, "method.anneal_end_step must be >= anneal_start_step"),
])
def test_bad_anneal_windows_are_refused(kwargs, message):
    with pytest.raises(IsynthError, match=f"^{re.escape(message)}$"):
        RARConfig(**kwargs)


def test_edge_anneal_windows_are_accepted():
    assert RARConfig(class_dropout=0.0).class_dropout == 0.0 and ARConfig(class_dropout=0.0).class_dropout == 0.0
    assert RARConfig(anneal_start_step=0, anneal_end_step=0).anneal_end_step == 0
    assert RARConfig(anneal_start_step=5, anneal_end_step=5).anneal_start_step == 5
    assert RARConfig(anneal_start_step=None, anneal_end_step=3).anneal_end_step == 3


def test_an_anneal_window_never_ends_before_it_starts():
    """Only the start given, past the default end (3/4 of training): the window is empty at the start."""
    m = _model("rar", "method.anneal_start_step=350")
    m.set_progress(0, 400)
    assert m.anneal_window() == (350, 350)
    m.set_progress(349, 400)
    assert m.current_ratio() == 1.0
    m.set_progress(350, 400)
    assert m.current_ratio() == 0.0 and m.training_order(3, "cpu") is None
    only_end = _model("rar", "method.anneal_end_step=120")
    only_end.set_progress(0, 401)
    assert only_end.anneal_window() == (200, 200)  # start: 401 // 2; the end moved up to it
    default = _model("rar")
    default.set_progress(0, 401)
    assert default.anneal_window() == (200, 300)  # 401 // 2 and 3 * 401 // 4


@pytest.mark.parametrize("order,ratio", [("random", 1.0), ("scan", 0.0)])
def test_the_ablation_endpoints_ignore_the_step(order, ratio):
    m = _model("rar", f"method.order={order}")
    for step in (0, 200, 399):
        m.set_progress(step, 400)
        assert m.current_ratio() == ratio


def test_a_random_ratio_of_one_permutes_every_row_differently():
    m = _model("rar", "method.order=random")
    torch.manual_seed(0)
    order = m.training_order(64, "cpu")
    assert order.shape == (64, m.seq_len)
    assert torch.equal(order.sort(1).values, torch.arange(m.seq_len).expand(64, -1))
    assert len({tuple(r.tolist()) for r in order}) == 64
    assert not (order == torch.arange(m.seq_len)).all(1).any()


def test_annealing_part_way_mixes_in_the_models_scan_not_raster():
    m = _model("rar", "method.scan=alternate", "method.anneal_start_step=0", "method.anneal_end_step=10")
    m.set_progress(9, 10)  # r = 0.1
    torch.manual_seed(0)
    rows = m.training_order(500, "cpu")
    scan = scan_order("alternate", m.tokenizer.grid)
    share = (rows == scan).all(1).float().mean().item()
    assert 0.82 < share < 0.96
    assert not (rows == torch.arange(m.seq_len)).all(1).any()


def test_the_reference_layout_needs_adaln_in_words():
    with pytest.raises(IsynthError, match=r"^method\.position_condition modulates adaLN: it needs model\.adaln=true$"):
        build(make_run("rar", "tiny", ["method.position_condition=true"]), torch.device("cpu"))


def test_the_cls_token_comes_first_and_predicts_nothing():
    """With the cls token the prefix is 2 positions, and still one logit per token comes out."""
    m = _model(*LAYOUTS["rar-reference"])
    assert m.prefix == 2 and m.cls_token is not None
    tokens = torch.randint(0, m.tokenizer.vocab_size, (2, m.seq_len))
    with torch.no_grad():
        before = m.logits(tokens, torch.tensor([1, 2]))
        m.cls_token.add_(1.0)
        after = m.logits(tokens, torch.tensor([1, 2]))
    assert before.shape == (2, m.seq_len, m.tokenizer.vocab_size)
    assert not torch.allclose(before[:, 0], after[:, 0])  # every step attends to the cls token
