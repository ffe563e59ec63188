"""Teacher pairs (`isynth pairs`) and GET: shards round-trip, resume and append; the pairs are
the teacher's deterministic map; the fixed-point solver converges on a trained model; shuffled pairs;
bad input."""
from __future__ import annotations

import json

import pytest
import torch

from isynth.errors import IsynthError
from isynth.pairformat import MANIFEST, load_pairs, read_manifest
from isynth.pairs import generate_pairs
from isynth.presets import make_run
from isynth.runs import load_trained
from isynth.trainer import build, train


def test_pairs_round_trip_and_are_the_teachers_map(tiny_teacher, tiny_pairs):
    p = load_pairs(tiny_pairs)
    m = p.manifest
    assert m["num_pairs"] == 160 and [s["count"] for s in m["shards"]] == [64, 64, 32]
    assert p.noise.shape == p.target.shape == (160, 64, 1) and p.labels.shape == (160,)
    assert torch.equal(p.labels, torch.arange(160) % 10)  # classes cycle by global index
    assert m["teacher"]["paradigm"] == "diffusion" and m["teacher"]["step"] == 20 and m["teacher"]["ema"]
    assert m["sampling"]["sampler"] == "heun" and m["nfe"] >= 1 and m["teacher_sample_flops_per_pair"] > 0
    assert p.noise.std().item() == pytest.approx(1.0, abs=0.05)
    teacher, _, _ = load_trained(tiny_teacher)
    again = teacher.sample_from(p.noise[:10], p.labels[:10], teacher.run.sample)
    torch.testing.assert_close(again, p.target[:10], rtol=1e-5, atol=1e-5)


def test_resume_and_append_give_the_same_pairs_as_one_run(tiny_teacher, tiny_pairs, tmp_path):
    out = tmp_path / "grown"
    generate_pairs(tiny_teacher, 40, out, shard_size=64, progress=False)        # a partial first shard
    generate_pairs(tiny_teacher, 100, out, shard_size=64, progress=False)       # extends it, then appends
    # A kill after a shard was written but before the manifest listed it: the shard is made again.
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["shards"].pop()
    manifest["num_pairs"] = 64
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / ".shard-00002.safetensors.abc.tmp").write_text("torn")
    generate_pairs(tiny_teacher, 160, out, shard_size=64, progress=False)
    grown, whole = load_pairs(out), load_pairs(tiny_pairs)
    assert not list(out.glob(".*.tmp"))
    for name in ("noise", "target", "labels"):
        torch.testing.assert_close(getattr(grown, name), getattr(whole, name), rtol=1e-5, atol=1e-5)
    before = (out / "shard-00000.safetensors").stat().st_mtime_ns
    generate_pairs(tiny_teacher, 160, out, shard_size=64, progress=False)  # nothing to do
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == before


def test_pairs_bad_input(tiny_teacher, tiny_pairs, tmp_path):
    with pytest.raises(IsynthError, match="num-pairs must be >= 1"):
        generate_pairs(tiny_teacher, 0, tmp_path / "zero", progress=False)
    assert not (tmp_path / "zero").exists()
    ar = train(make_run("ar", "tiny", ["train.max_steps=1"]), tmp_path / "ar", progress=False)
    with pytest.raises(IsynthError, match="'ar' run; a pair teacher must be a 'diffusion' run"):
        generate_pairs(ar, 10, tmp_path / "from-ar", progress=False)
    with pytest.raises(IsynthError, match="different seed"):
        generate_pairs(tiny_teacher, 200, tiny_pairs, seed=1, shard_size=64, progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(IsynthError, match="not a pair directory"):
        generate_pairs(tiny_teacher, 10, tmp_path / "junk", progress=False)
    with pytest.raises(IsynthError, match="no pairs.json"):
        read_manifest(tmp_path)


def test_corrupt_shard_is_one_clear_error(tiny_teacher, tmp_path):
    out = tmp_path / "p"
    generate_pairs(tiny_teacher, 8, out, shard_size=8, progress=False)
    (out / "shard-00000.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(IsynthError, match="corrupt pair shard"):
        load_pairs(out)
    (out / "shard-00000.safetensors").unlink()
    with pytest.raises(IsynthError, match="missing or corrupt pair shard"):
        load_pairs(out)


def test_get_rejects_missing_pairs_and_pairs_of_another_resolution(tiny_pairs, tmp_path):
    with pytest.raises(IsynthError, match="set method.pairs"):
        build(make_run("get", "tiny"), torch.device("cpu"))
    with pytest.raises(IsynthError, match="not a pair directory"):
        build(make_run("get", "tiny", [f"method.pairs={tmp_path}"]), torch.device("cpu"))
    with pytest.raises(IsynthError, match="another resolution"):
        build(make_run("get", "tiny", [f"method.pairs={tiny_pairs}", "tokenizer.patch_size=2"]), torch.device("cpu"))
    with pytest.raises(IsynthError, match="adaln"):
        build(make_run("get", "tiny", [f"method.pairs={tiny_pairs}", "model.adaln=true"]), torch.device("cpu"))
    with pytest.raises(IsynthError, match="grad_steps"):
        make_run("get", "tiny", ["method.grad_steps=0"])
    with pytest.raises(IsynthError, match="fixed_point_iters"):
        make_run("get", "tiny", ["sample.fixed_point_iters=0"])


def test_shuffled_pairs_keep_the_marginals_and_break_the_pairing(tiny_pairs):
    run = make_run("get", "tiny", [f"method.pairs={tiny_pairs}"])
    s_true = build(run, torch.device("cpu"))
    s_shuf = build(make_run("get", "tiny", [f"method.pairs={tiny_pairs}", "method.shuffle_pairs=true"]),
                   torch.device("cpu"))
    (x_true, y_true), (x_shuf, y_shuf) = (s.model.training_data(s.dataset) for s in (s_true, s_shuf))
    noise_t, target_t = x_true.split(1, dim=-1)
    noise_s, target_s = x_shuf.split(1, dim=-1)
    assert torch.equal(noise_t, noise_s)                       # the noise stays in place ...
    moved = (target_t != target_s).flatten(1).any(1).float().mean()
    assert moved > 0.9                                          # ... the images move
    assert torch.equal(torch.sort(target_t.flatten(1).sum(1)).values, torch.sort(target_s.flatten(1).sum(1)).values)
    pairs = load_pairs(tiny_pairs)
    by_image = {tuple(t.flatten().tolist()): int(lab) for t, lab in zip(pairs.target, pairs.labels)}
    # each image keeps its own label (the condition still describes the image)
    assert all(by_image[tuple(t.flatten().tolist())] == int(lab) for t, lab in zip(target_s, y_shuf))


def test_solver_converges_on_a_trained_model(tiny_pairs, tmp_path):
    """After training, the fixed-point iteration converges where it matters: the relative residual
    |f(z) - z| / |f(z)| and the change of the decoded image fall with every iteration. (The blocks are
    un-normalised residual blocks, as in the reference, so |z| itself keeps growing: see get.py.)"""
    torch.manual_seed(0)
    out = train(make_run("get", "tiny", [f"method.pairs={tiny_pairs}", "train.max_steps=150"]), tmp_path / "get",
                progress=False)
    model, _, _ = load_trained(out)
    pairs = load_pairs(tiny_pairs)
    noise, labels = pairs.noise[:32], pairs.labels[:32]
    with torch.no_grad():
        u = model._injections(noise, labels)
        z, outputs, rel = torch.zeros(32, model.seq_len, model.run.model.width), [], []
        for _ in range(12):
            fz = model.equilibrium(z, qkv_add=u, final_norm=False)
            rel.append(((fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1)).mean())
            z = fz
            outputs.append(model._output(z))
    rel = torch.stack(rel)[1:]  # after iterations 1..11 (the first from z = 0 is 1 by definition)
    assert (rel[1:] < rel[:-1]).all() and rel[-1] < 0.15, rel
    change = torch.stack([(b - a).abs().mean() for a, b in zip(outputs, outputs[1:])])[:9]
    assert (change[1:] < change[:-1]).all() and change[-1] < 0.1 * change[0], change
    # and it learned the pairing: the one-step output is far closer to the teacher than the class means
    target = pairs.target[:32]
    class_means = torch.stack([pairs.target[pairs.labels == c].mean(0) for c in range(10)])[labels]
    one_step = model.sample_from(noise, labels, model.run.sample)
    assert (one_step - target).abs().mean() < 0.5 * (class_means - target).abs().mean()


def test_released_state_init_and_unnormalised_injection(tiny_pairs):
    """state_init=noise draws the equilibrium's start from the sampling generator (same seed, same image;
    another seed, another image for the same input noise); inject_norm=false feeds qkv_inj the injection
    transformer's output before its final LayerNorm."""
    torch.manual_seed(0)
    pairs = f"method.pairs={tiny_pairs}"
    ref = build(make_run("get", "tiny", [pairs, "method.state_init=noise", "method.inject_norm=false"]),
                torch.device("cpu")).model.eval()
    noise, labels, s = torch.randn(3, ref.seq_len, ref.token_dim), torch.arange(3), ref.run.sample
    a = ref.sample_from(noise, labels, s, torch.Generator().manual_seed(1))
    assert torch.equal(a, ref.sample_from(noise, labels, s, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, ref.sample_from(noise, labels, s, torch.Generator().manual_seed(2)))
    torch.manual_seed(0)
    plain = build(make_run("get", "tiny", [pairs]), torch.device("cpu")).model.eval()
    assert torch.equal(plain.sample_from(noise, labels, s, torch.Generator().manual_seed(1)),
                       plain.sample_from(noise, labels, s, torch.Generator().manual_seed(2)))  # zeros: noise only
    seen = {}
    for name, m in (("ref", ref), ("plain", plain)):
        handle = m.qkv_inj.register_forward_pre_hook(lambda mod, args, name=name: seen.update({name: args[0]}))
        m.sample_from(noise, labels, s)
        handle.remove()
    std = {k: v.std(-1) for k, v in seen.items()}  # per token: 1 after a LayerNorm (unit weight at init)
    assert torch.allclose(std["plain"], torch.ones_like(std["plain"]), atol=0.05)
    assert not torch.allclose(std["ref"], torch.ones_like(std["ref"]), atol=0.05)
