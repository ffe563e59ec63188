"""Flow matching (`diffusion`) and GET by their definitions: SD3's shifted time grid worked out by hand,
Euler and Heun on ODEs with closed-form solutions, DiT's zero-initialised output, and GET's solver as plain
fixed-point iterations from zero whose training loss is the distance of the last unrolled state's image."""
from __future__ import annotations

import re

import pytest
import torch

import isynth.paradigms.get as get_module
from isynth.errors import IsynthError
from isynth.flops import counting
from isynth.overrides import apply
from isynth.pairformat import Pairs
from isynth.paradigms.diffusion import (
    Diffusion,
    DiffusionConfig,
    DiffusionSampling,
    evaluation_times,
    flow_times,
    solve,
)
from isynth.paradigms.get import GET, GETConfig, GETSampling
from isynth.presets import make_run
from isynth.trainer import build


def _sigma(t: float, shift: float) -> float:
    """SD3's time shift (Esser et al. 2024, eq. 23): s t / (1 + (s - 1) t)."""
    return shift * t / (1 + (shift - 1) * t)


def test_time_grids_by_hand():
    assert flow_times(1, 1.0) == [1.0, 0.0]
    assert flow_times(2, 1.0) == pytest.approx([1.0, 0.001, 0.0], rel=1e-6)
    last = _sigma(0.001, 3.0)  # the shifted last training timestep, then the grid shifted once more
    want = [1.0, _sigma((1 + last) / 2, 3.0), _sigma(last, 3.0), 0.0]
    assert flow_times(3, 3.0) == pytest.approx(want, rel=1e-6)
    assert all(type(t) is float for t in flow_times(3, 3.0))


def test_evaluation_times_of_euler_and_heun():
    t = flow_times(3, 1.0)
    assert evaluation_times(DiffusionSampling(sampler="euler", num_steps=3)) == t[:3]
    assert evaluation_times(DiffusionSampling(sampler="heun", num_steps=3)) == [t[0], t[1], t[1], t[2], t[2]]
    assert evaluation_times(DiffusionSampling(sampler="heun", num_steps=1)) == [1.0]


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_a_constant_velocity_moves_the_state_by_minus_v(sampler):
    """dx/dt = v from t = 1 to 0 ends at x - v, with any step count."""
    x, v = torch.randn(2, 3, 1), torch.randn(2, 3, 1)
    out = solve(lambda z, t: v.expand_as(z), x.clone(), DiffusionSampling(sampler=sampler, num_steps=4))
    torch.testing.assert_close(out, x - v)


def test_heun_integrates_a_velocity_linear_in_time_exactly_and_euler_does_not():
    """dx/dt = t: x(0) = x(1) - 1/2. Heun's trapezoid is exact for it (EDM Algorithm 1), Euler's left sum
    is off by sum(dt^2) / 2 (its last step, from 0.001 to 0, has the slope at 0.001)."""
    x = torch.zeros(1, 1, 1)
    grid = DiffusionSampling(sampler="heun", num_steps=5)
    heun = solve(lambda z, t: torch.full_like(z, t), x.clone(), grid)
    torch.testing.assert_close(heun, x - 0.5, atol=1e-6, rtol=0)
    t = flow_times(5, 1.0)
    euler = solve(lambda z, t: torch.full_like(z, t), x.clone(), apply(grid, {"sampler": "euler"}, ""))
    want = sum((b - a) * a for a, b in zip(t[:-1], t[1:]))
    torch.testing.assert_close(euler, torch.full_like(x, want), atol=1e-6, rtol=0)
    assert abs(want + 0.5) > 1e-2


def test_heun_uses_the_slope_at_the_end_of_each_step():
    """dx/dt = x: Heun multiplies by 1 + dt + dt^2 / 2 per step (dt < 0), Euler by 1 + dt."""
    x = torch.ones(1, 1, 1)
    t = flow_times(3, 1.0)
    euler, heun = 1.0, 1.0
    for a, b in zip(t[:-1], t[1:]):
        dt = b - a
        euler *= 1 + dt
        heun *= (1 + dt + dt * dt / 2) if b > 0 else 1 + dt  # the last step to t = 0 is an Euler step
    for sampler, want in (("euler", euler), ("heun", heun)):
        out = solve(lambda z, t: z, x.clone(), DiffusionSampling(sampler=sampler, num_steps=3))
        assert out.item() == pytest.approx(want, rel=1e-5)


@pytest.fixture(scope="module")
def diffusion():
    torch.manual_seed(0)
    return build(make_run("diffusion", "tiny"), torch.device("cpu")).model.eval()


def test_a_new_model_predicts_zero_velocity_and_samples_its_noise(diffusion):
    """DiT's zero-initialised output layer: v = 0 at the start, so the ODE leaves the noise as it is."""
    x = torch.randn(2, diffusion.seq_len, diffusion.token_dim)
    assert torch.equal(diffusion.velocity(x, torch.tensor([0.3, 0.9]), torch.tensor([1, 2])), torch.zeros_like(x))
    torch.testing.assert_close(diffusion.sample_from(x, torch.tensor([1, 2]), diffusion.run.sample), x)


def test_the_velocity_reads_the_time(diffusion):
    m = Diffusion(diffusion.run, diffusion.tokenizer, diffusion.conditions).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        x, labels = torch.randn(1, m.seq_len, m.token_dim), torch.tensor([3])
        a, b = m.velocity(x, torch.tensor([0.2]), labels), m.velocity(x, torch.tensor([0.2005]), labels)
    assert not torch.allclose(a, b, atol=1e-6)  # 0.5 of the 1000 training timesteps apart


def test_guided_network_evaluations_cost_two_rows(diffusion):
    s = apply(diffusion.run.sample, {"sampler": "euler", "num_steps": 4, "guidance.scale": 2.0}, "sample.")
    plain = apply(s, {"guidance.scale": 1.0}, "sample.")
    assert diffusion.num_network_evals(s) == 4 and diffusion.unconditional_passes(s) == 4
    assert diffusion.sample_flops(s) == 2 * diffusion.sample_flops(plain) == 8 * diffusion.forward_flops()
    window = apply(s, {"guidance.t_min": 0.5}, "sample.")  # t = 1 and 0.667 of 1, 0.667, 0.334, 0.001
    assert diffusion.unconditional_passes(window) == 2
    assert diffusion.sample_flops(window) == 6 * diffusion.forward_flops()


@pytest.mark.parametrize("make,message", [
    (lambda: DiffusionConfig(class_dropout=1.0), "method.class_dropout must be in [0, 1)"),
    (lambda: DiffusionConfig(logit_std=0.0), "method.logit_std must be > 0"),
    (lambda: DiffusionSampling(num_steps=0), "sample.num_steps must be >= 1"),
    (lambda: DiffusionSampling(shift=0.0), "sample.shift must be > 0"),
    (lambda: DiffusionSampling(batch_size=0), "sample.batch_size must be > 0"),
    (lambda: GETConfig(deq_depth=0), "method.deq_depth must be >= 1"),
    (lambda: GETConfig(deq_mlp_ratio=0.0), "method.deq_mlp_ratio must be > 0"),
    (lambda: GETConfig(train_solver_iters=-1), "method.train_solver_iters must be >= 0"),
    (lambda: GETConfig(grad_steps=0), "method.grad_steps must be >= 1"),
    (lambda: GETSampling(fixed_point_iters=0), "sample.fixed_point_iters must be >= 1"),
    (lambda: GETSampling(batch_size=0), "sample.batch_size must be > 0"),
])
def test_bad_flow_and_get_settings_are_refused_in_words(make, message):
    with pytest.raises(IsynthError, match=f"^{re.escape(message)}$"):
        make()


def test_edge_flow_and_get_settings_are_accepted():
    assert DiffusionConfig(class_dropout=0.0, logit_std=1e-3).logit_std == 1e-3
    assert DiffusionSampling(num_steps=1, shift=1e-3, batch_size=1).num_steps == 1
    assert GETConfig(deq_depth=1, train_solver_iters=0, grad_steps=1, deq_mlp_ratio=0.5).grad_steps == 1
    assert GETSampling(fixed_point_iters=1, batch_size=1).fixed_point_iters == 1


def test_the_backbones_conditioning_is_required_in_words():
    with pytest.raises(IsynthError, match=r"^diffusion conditions every block on \(t, class\) by adaLN-Zero: "
                                          r"set model\.adaln=true$"):
        build(make_run("diffusion", "tiny", ["model.adaln=false"]), torch.device("cpu"))
    with pytest.raises(IsynthError, match=r"^get conditions through qkv, not adaLN: set model\.adaln=false$"):
        build(make_run("get", "tiny", ["model.adaln=true"]), torch.device("cpu"), check_data=False)
    with pytest.raises(IsynthError, match=r"^an unconditional model \(method\.class_cond=false\) has nothing to "
                                          r"guide: set sample\.guidance\.scale=1$"):
        build(make_run("diffusion", "tiny", ["method.class_cond=false", "sample.guidance.scale=2"]),
              torch.device("cpu"))


@pytest.fixture(scope="module")
def get_model():
    torch.manual_seed(0)
    return build(make_run("get", "tiny", ["method.grad_steps=3", "method.fp_correction=false"]),
                 torch.device("cpu"), check_data=False).model


def test_get_without_pairs_says_how_to_make_them(get_model):
    with pytest.raises(IsynthError, match=r"^get trains on teacher pairs: set method\.pairs=DIR \(make them with "
                                          r"`isynth pairs TEACHER_RUN --num-pairs N --out DIR`\)$"):
        get_model.validate_training(None)


def _iterates(m, noise, labels, k):
    """Images of z_1 .. z_k with z_0 = 0, z_{i+1} = f(z_i; u(noise, class)) (GET sec. 3)."""
    with torch.no_grad():
        u = m._injections(noise, labels)
        z, images = torch.zeros(noise.shape[0], m.seq_len, m.run.model.width), []
        for _ in range(k):
            z = m.equilibrium(z, qkv_add=u, final_norm=False)
            images.append(m.out_proj(m.equilibrium.final(z)))
    return images


def test_get_samples_one_iteration_from_zero(get_model):
    m = get_model.eval()
    noise, labels = torch.randn(2, m.seq_len, m.token_dim), torch.tensor([1, 7])
    first = _iterates(m, noise, labels, 2)
    s = apply(m.run.sample, {"fixed_point_iters": 1}, "sample.")
    torch.testing.assert_close(m.sample_from(noise, labels, s), first[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first[0], first[1])


def test_get_return_final_samples_the_kth_iterate(get_model):
    """sample.return_final=true: the state after exactly k iterations; the default is torchdeq's
    lowest-residual iterate among the first k, one of them."""
    m = get_model.eval()
    noise, labels = torch.randn(2, m.seq_len, m.token_dim), torch.tensor([1, 7])
    images = _iterates(m, noise, labels, 4)
    final = apply(m.run.sample, {"fixed_point_iters": 4, "return_final": True}, "sample.")
    torch.testing.assert_close(m.sample_from(noise, labels, final), images[3], atol=1e-5, rtol=1e-5)
    best = m.sample_from(noise, labels, apply(final, {"return_final": False}, "sample."))
    for i in range(2):  # per sample, one of the iterates
        assert any(torch.allclose(best[i], im[i], atol=1e-5, rtol=1e-5) for im in images)


def test_get_injection_carries_the_class(get_model):
    m = get_model.eval()
    noise = torch.randn(1, m.seq_len, m.token_dim)
    s = m.run.sample
    assert not torch.allclose(m.sample_from(noise, torch.tensor([1]), s), m.sample_from(noise, torch.tensor([2]), s))
    assert len(m._injections(noise, torch.tensor([1]))) == m.run.method.deq_depth


@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_get_training_loss_is_the_distance_of_the_last_unrolled_state(get_model, loss):
    """Without fixed-point correction the loss is the L1 (or L2) distance between the image of the state
    after train_solver_iters + grad_steps iterations (0 + 3 here) and the teacher's image."""
    m = get_model
    run = apply(m.run, {"method.loss": loss}, "")
    twin = GET(run, m.tokenizer, m.conditions)
    twin.load_state_dict(m.state_dict())
    noise, target = torch.randn(2, m.seq_len, m.token_dim), torch.randn(2, m.seq_len, m.token_dim)
    labels = torch.tensor([0, 5])
    pred = _iterates(twin.eval(), noise, labels, 3)[-1]
    want = (pred - target).abs().mean() if loss == "l1" else (pred - target).pow(2).mean()
    twin.train()
    torch.testing.assert_close(twin.loss(torch.cat([noise, target], -1), labels), want, atol=1e-5, rtol=1e-5)


def test_get_is_one_unguided_pass_whose_cost_grows_by_one_block_stack_per_iteration(get_model):
    m = get_model
    s = [apply(m.run.sample, {"fixed_point_iters": k}, "sample.") for k in (1, 2, 3)]
    f = [m.sample_flops(x) for x in s]
    assert f[2] - f[1] == f[1] - f[0] == m.equilibrium.flops(m.seq_len, final=False) > 0
    assert [m.num_network_evals(x) for x in s] == [1, 1, 1] and m.unconditional_passes(s[0]) == 0
    assert not GET.guided and Diffusion.guided


def test_get_fixed_point_correction_weights_every_unrolled_state():
    """fp_correction: the loss of the i-th of n unrolled states weighs 0.8^(n - 1 - i) (TorchDEQ's 'exp'
    weights, as the GET authors train)."""
    torch.manual_seed(0)
    m = build(make_run("get", "tiny", ["method.grad_steps=3"]), torch.device("cpu"), check_data=False).model
    noise, target = torch.randn(2, m.seq_len, m.token_dim), torch.randn(2, m.seq_len, m.token_dim)
    labels = torch.tensor([2, 3])
    images = _iterates(m.eval(), noise, labels, 3)
    want = sum(0.8 ** (2 - i) * (img - target).abs().mean() for i, img in enumerate(images))
    m.train()
    torch.testing.assert_close(m.loss(torch.cat([noise, target], -1), labels), want, atol=1e-5, rtol=1e-5)


def test_get_training_flops_with_one_unrolled_step_match_the_counter():
    """grad_steps = 1 (the smallest phantom gradient): analytic and counted training FLOPs agree."""
    torch.manual_seed(0)
    m = build(make_run("get", "tiny", ["method.grad_steps=1"]), torch.device("cpu"), check_data=False).model.train()
    x = torch.randn(4, m.seq_len, 2 * m.token_dim)
    with counting() as fc:
        m.loss(x, torch.arange(4)).backward()
    assert fc.get_total_flops() / 4 == pytest.approx(m.train_flops_per_sample(), rel=1e-9)


def test_get_stacks_follow_the_method_not_the_backbone():
    """method.deq_depth and deq_mlp_ratio shape the equilibrium stack, model.depth the injection stack."""
    m = build(make_run("get", "tiny", ["method.deq_depth=3", "method.deq_mlp_ratio=6", "model.depth=1"]),
              torch.device("cpu"), check_data=False).model
    assert len(m.equilibrium.blocks) == 3 and m.equilibrium.blocks[0].mlp.fc1.out_features == 6 * 32
    assert len(m.injection.blocks) == 1 and m.injection.blocks[0].mlp.fc1.out_features == 4 * 32
    assert m.qkv_inj.out_features == 3 * 32 * 3 and len(m._injections(torch.randn(1, 64, 1), torch.tensor([0]))) == 3


def test_get_names_the_pair_directory_that_does_not_fit(get_model, monkeypatch):
    setup = build(make_run("get", "tiny", ["method.pairs=teacher/pairs"]), torch.device("cpu"), check_data=False)
    manifest = {"seq_len": 16, "token_dim": 4, "image_shape": [8, 8, 1]}
    with pytest.raises(IsynthError, match=r"^teacher/pairs: pairs are for 16 tokens of size 4 from \[8, 8, 1\] "
                                          r"images, but this run has 64 tokens of size 1"):
        setup.model._check_fit(manifest, setup.dataset)


def test_get_reads_the_class_in_training_too(get_model):
    """The class embedding of the injection has no label dropout: training sees every label."""
    m = get_model.train()
    noise = torch.randn(2, m.seq_len, m.token_dim)
    a, b = m._injections(noise, torch.tensor([1, 1])), m._injections(noise, torch.tensor([1, 4]))
    torch.testing.assert_close(a[0][0], b[0][0])
    assert not torch.allclose(a[0][1], b[0][1])
    m.eval()


def test_get_is_built_as_the_paper_describes(get_model):
    """method.deq_depth equilibrium blocks of MLP ratio method.deq_mlp_ratio (tiny: 2 and 4) after a
    model.depth injection stack, a bias-free injection map with one qkv per block, the class embedding at
    PyTorch's N(0, 1) initialisation, and fixed sine-cosine positions that are not weights."""
    m = get_model
    assert len(m.equilibrium.blocks) == 2 and m.equilibrium.blocks[0].mlp.fc1.out_features == 4 * 32
    assert len(m.injection.blocks) == m.run.model.depth == 2
    assert m.qkv_inj.bias is None and m.qkv_inj.out_features == 3 * 32 * 2
    std = m.class_qkv.tables[0].weight.std().item()
    assert 0.8 < std < 1.2
    assert "pos" not in m.state_dict() and m.pos.shape[-1] == 32
    unconditional = build(make_run("get", "tiny", ["method.class_cond=false"]), torch.device("cpu"),
                          check_data=False).model.eval()
    noise = torch.randn(1, unconditional.seq_len, unconditional.token_dim)
    s = unconditional.run.sample
    assert unconditional.class_qkv is None
    torch.testing.assert_close(unconditional.sample_from(noise, torch.tensor([1]), s),
                               unconditional.sample_from(noise, torch.tensor([2]), s))


def test_get_shuffled_pairs_follow_the_shuffle_seed_alone(monkeypatch):
    """The control's re-pairing moves images with their labels against fixed noise, and is fixed by
    method.shuffle_seed, not by the global RNG (exact resumption)."""
    n_pairs = 50
    pairs = Pairs(noise=torch.randn(n_pairs, 64, 1), target=torch.arange(n_pairs * 64.0).reshape(n_pairs, 64, 1),
                  labels=torch.arange(n_pairs) % 10, manifest={"seq_len": 64, "token_dim": 1, "image_shape": [8, 8, 1]})
    monkeypatch.setattr(get_module, "load_pairs", lambda where: pairs)

    def data(seed, global_seed, shuffle=True):
        run = make_run("get", "tiny", ["method.pairs=somewhere", f"method.shuffle_pairs={str(shuffle).lower()}",
                                       f"method.shuffle_seed={seed}"])
        s = build(run, torch.device("cpu"), check_data=False)
        torch.manual_seed(global_seed)
        return s.model.training_data(s.dataset)

    (x1, y1), (x2, y2), (x3, _) = data(0, 1), data(0, 2), data(1, 1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    noise, target = x1.split(1, dim=-1)
    assert torch.equal(noise, pairs.noise)  # the noise stays in place, the images move with their labels
    image = (target[:, 0, 0] / 64).long()
    assert torch.equal(y1, image % 10) and not torch.equal(image, torch.arange(n_pairs))
    x, y = data(0, 1, shuffle=False)
    assert torch.equal(x, torch.cat([pairs.noise, pairs.target], -1)) and torch.equal(y, pairs.labels)
