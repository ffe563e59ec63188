"""RAR (Yu et al. 2024): annealed random orders and target-aware positional embeddings."""
import pytest
import torch

from isynth.errors import IsynthError
from isynth.flopsreport import flops_report
from isynth.overrides import apply
from isynth.paradigms.rar import random_ratio
from isynth.presets import make_run
from isynth.scans import SCANS, scan_order
from isynth.trainer import build


def _model(*overrides):
    torch.manual_seed(0)
    return build(make_run("rar", "tiny", list(overrides)), torch.device("cpu")).model


def test_random_ratio_anneals_linearly_from_one_to_zero():
    assert random_ratio(0, 100, 200) == 1.0
    assert random_ratio(99, 100, 200) == 1.0
    assert random_ratio(100, 100, 200) == 1.0
    assert random_ratio(150, 100, 200) == pytest.approx(0.5)
    assert random_ratio(200, 100, 200) == 0.0
    assert random_ratio(10_000, 100, 200) == 0.0


def test_default_anneal_window_is_half_to_three_quarters_of_training():
    m = _model()
    m.set_progress(0, 400)  # RAR: epochs 200 -> 300 of 400
    assert m.anneal_window() == (200, 300)
    m2 = _model("method.anneal_start_step=10", "method.anneal_end_step=30")
    m2.set_progress(0, 400)
    assert m2.anneal_window() == (10, 30)
    m2.set_progress(20, 400)
    assert m2.current_ratio() == pytest.approx(0.5)


def test_orders_are_permutations_and_endpoints_are_pure():
    m = _model("method.order=random")
    order = m.training_order(16, "cpu")
    assert torch.equal(order.sort(1).values, torch.arange(m.seq_len).expand(16, -1))
    assert not torch.equal(order, torch.arange(m.seq_len).expand(16, -1))
    assert _model("method.order=scan").training_order(16, "cpu") is None
    annealed = _model()
    annealed.set_progress(399, 400)
    assert annealed.training_order(4, "cpu") is None  # r = 0 after the anneal: raster


def test_mixed_ratio_mixes_raster_and_random_rows():
    m = _model("method.anneal_start_step=0", "method.anneal_end_step=100")
    m.set_progress(50, 100)  # r = 0.5
    torch.manual_seed(0)
    order = m.training_order(400, "cpu")
    raster = (order == torch.arange(m.seq_len)).all(1).float().mean()
    assert 0.35 < raster < 0.65


def _logits_at(m, order, step):
    tokens = torch.randint(0, m.tokenizer.vocab_size, (1, m.seq_len), generator=torch.Generator().manual_seed(0))
    return m.logits(tokens, torch.tensor([4]), order)[0, step]


@pytest.mark.parametrize("step", [0, 5, 30])
def test_target_aware_positions_fig3b(step):
    """Seed 001 Fig. 3b: orders agreeing on the first `step` targets but not the next give identical logits
    at that step without target-aware positions, and different ones with them."""
    n = 64
    o1 = torch.arange(n)
    o2 = o1.clone()
    o2[step], o2[step + 1] = o1[step + 1], o1[step]  # same first `step` targets, different next target
    o1, o2 = o1[None], o2[None]
    plain = _model("method.target_aware=false").eval()
    torch.testing.assert_close(_logits_at(plain, o1, step), _logits_at(plain, o2, step))
    aware = _model("method.target_aware=true").eval()
    assert not torch.allclose(_logits_at(aware, o1, step), _logits_at(aware, o2, step))


def test_training_loss_reads_tokens_in_the_permuted_order():
    """With target-aware positions the loss of a permuted sequence is not the raster loss."""
    m = _model("method.order=random").eval()
    tokens = torch.randint(0, m.tokenizer.vocab_size, (2, m.seq_len))
    labels = torch.tensor([1, 2])
    order = torch.stack([torch.randperm(m.seq_len) for _ in range(2)])
    logits = m.logits(tokens, labels, order)
    assert logits.shape == (2, m.seq_len, m.tokenizer.vocab_size)
    assert not torch.allclose(logits, m.logits(tokens, labels))


def test_bad_anneal_window_is_rejected():
    with pytest.raises(IsynthError, match="anneal_end_step"):
        make_run("rar", "tiny", ["method.anneal_start_step=50", "method.anneal_end_step=10"])


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_random_order_sampling_is_the_same_with_and_without_kv_cache(cfg):
    """sample.order=random (RAR Table 2's pure-random row): a permutation per sample, drawn from the
    generator; the KV cache changes nothing, and each sample's order differs from raster."""
    m = _model("method.order=random").eval()
    s = apply(m.run.sample, {"order": "random", "guidance.scale": cfg}, "sample.")
    labels = torch.arange(6) % m.class_embed.null
    cached = m.sample(labels, s, torch.Generator().manual_seed(3))
    uncached = m.sample(labels, apply(s, {"kv_cache": False}, ""), torch.Generator().manual_seed(3))
    assert torch.equal(cached, uncached)
    raster = m.sample(labels, apply(s, {"order": "scan"}, ""), torch.Generator().manual_seed(3))
    assert not torch.equal(cached, raster)
    # where each step's token lands: a head that returns the step number i shows out[b, order[b, i]] = i,
    # i.e. every row is a permutation of the steps, and rows differ
    m = _model("method.order=random", "tokenizer.levels=256").eval()  # ids up to 255: a step number is a token
    steps = iter(range(10**6))
    m.head.sample = lambda h, *a: torch.full((labels.shape[0],), next(steps) % m.seq_len, dtype=torch.long)
    placed = m.sample(labels, s, torch.Generator().manual_seed(3))
    assert all(sorted(row.tolist()) == list(range(m.seq_len)) for row in placed)
    assert len({tuple(row.tolist()) for row in placed}) == len(labels)


def test_random_order_sampling_needs_target_aware_positions():
    with pytest.raises(IsynthError, match="target-aware"):
        m = _model("method.target_aware=false").eval()
        m.sample(torch.arange(2), apply(m.run.sample, {"order": "random"}, "sample."), torch.Generator())
    ar = build(make_run("ar", "tiny"), torch.device("cpu")).model.eval()
    with pytest.raises(IsynthError, match="target-aware"):
        ar.sample(torch.arange(2), apply(ar.run.sample, {"order": "random"}, "sample."), torch.Generator())


def test_scan_orders_on_a_4x4_grid():
    """RAR Table 3's six scans (its appendix figure), written out by hand for a 4 x 4 grid."""
    expected = {
        "raster": list(range(16)),
        "spiral-in": [0, 1, 2, 3, 7, 11, 15, 14, 13, 12, 8, 4, 5, 6, 10, 9],
        "spiral-out": [9, 10, 6, 5, 4, 8, 12, 13, 14, 15, 11, 7, 3, 2, 1, 0],
        "z-curve": [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15],
        "subsample": [0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15],
        "alternate": [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11, 15, 14, 13, 12],
    }
    assert set(expected) == set(SCANS)
    for name, order in expected.items():
        assert scan_order(name, (4, 4)).tolist() == order, name
    for name in SCANS:  # any grid, odd and rectangular too: a permutation
        for grid in ((5, 3), (1, 7), (8, 8)):
            assert sorted(scan_order(name, grid).tolist()) == list(range(grid[0] * grid[1])), (name, grid)


def _scrambled(m):
    """Random weights everywhere (adaLN-Zero's zero init would make every block the identity)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m.eval()


@pytest.mark.parametrize("scan", ["spiral-in", "subsample"])
def test_a_scan_order_is_trained_and_sampled_in(scan):
    """method.scan: the order annealing ends in (training) and the one sampling follows; the token drawn
    at step i lands at position scan[i]."""
    m = _model(f"method.scan={scan}", "method.order=scan", "tokenizer.levels=256")
    order = scan_order(scan, m.tokenizer.grid)
    assert torch.equal(m.training_order(3, "cpu"), order.expand(3, -1))
    steps = iter(range(10**6))
    m.head.sample = lambda h, *a: torch.full((2,), next(steps) % m.seq_len, dtype=torch.long)
    placed = m.eval().sample(torch.arange(2), m.run.sample, torch.Generator().manual_seed(0))
    assert torch.equal(placed[0][order], torch.arange(m.seq_len))
    mixed = _model(f"method.scan={scan}", "method.anneal_start_step=0", "method.anneal_end_step=100")
    mixed.set_progress(50, 100)
    rows = mixed.training_order(400, "cpu")
    assert 0.35 < (rows == order).all(1).float().mean() < 0.65  # the rest are random permutations


REFERENCE = ("model.adaln=true", "model.qk_norm=true", "method.cls_token=true", "method.position_condition=true")


@pytest.mark.parametrize("order,cfg", [("scan", 1.0), ("scan", 2.0), ("random", 2.0)])
def test_reference_layout_samples_the_same_with_and_without_kv_cache(order, cfg):
    """The cls token and the per-position adaLN condition (1d-tokenizer's modeling/rar.py) through the KV
    cache: the prefix is fed at once, then one position with its own modulation per step."""
    m = _scrambled(_model(*REFERENCE))
    s = apply(m.run.sample, {"order": order, "guidance.scale": cfg}, "sample.")
    labels = torch.arange(4) % m.class_embed.null
    cached = m.sample(labels, s, torch.Generator().manual_seed(3))
    assert torch.equal(cached, m.sample(labels, apply(s, {"kv_cache": False}, ""), torch.Generator().manual_seed(3)))


def test_reference_layout_modulates_each_position():
    """With position_condition the same input at two positions is modulated differently: the features of
    a sequence change when only the per-position embedding changes."""
    m = _scrambled(_model(*REFERENCE))
    tokens, labels = torch.randint(0, m.tokenizer.vocab_size, (2, m.seq_len)), torch.tensor([1, 2])
    before = m.logits(tokens, labels)
    with torch.no_grad():
        m.step_embed[:, 5].add_(1.0)  # sequence position 5 (the cls token is position 0)
    after = m.logits(tokens, labels)
    torch.testing.assert_close(before[:, :4], after[:, :4])  # causal: earlier outputs unchanged
    assert not torch.allclose(before[:, 4], after[:, 4])  # output index 4 is sequence position 5


def test_reference_needs_adaln():
    with pytest.raises(IsynthError, match="model.adaln"):
        _model("method.position_condition=true")


def test_rar_b_as_released_has_the_reference_parameter_count():
    """RAR-B (1024 codes, 256 tokens, 1000 classes) has 260,923,648 parameters in 1d-tokenizer's
    modeling/rar.py. Its tables hold rows no input reads, which isynth does not allocate: pos_embed and the
    target-aware table have image_seq_len + 1024 rows (isynth: 256 + 2 and 256), timesteps_embeddings
    image_seq_len + 100 (isynth: 256 + 1), and the shared embedding table a mask-token row that RAR never
    uses. Everything else matches parameter for parameter."""
    params = flops_report("rar", "rar-b", [], seq_len=256, vocab_size=1024, num_classes=1000)["params"]
    unread = (1280 - 258) + (1280 - 256) + (356 - 257) + 1
    assert params + unread * 768 == 260_923_648
    light = flops_report("rar", "rar-b", ["method.cls_token=false", "method.position_condition=false",
                                          "model.adaln_norm_affine=false"], seq_len=256, vocab_size=1024,
                         num_classes=1000)["params"]
    assert params - light == 768 + 768 + 257 * 768 + 24 * 2 * 2 * 768  # cls, its position, step table, norms
