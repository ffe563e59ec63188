"""Learned tokenizers (vq, fsq, lfq, kl) and pretrained diffusers VAEs (vae): the interface, the analytic
FLOPs against the counter, training quality, exact resumption, the manifest's refusals and the command.

Training runs on 16x16 shapes saved as an .npz with the shape as label: the feature net (perceptual loss and
rFD) then trains on these 240 images in about a second, where shapes' own evaluator trains on its balanced
draw of every class (~20 s).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import assert_error, ok, write_npz
from safetensors.torch import load_file

import isynth.tokenizers.train as tok_train
from isynth.config import DataConfig, TokenizerConfig
from isynth.data import load_dataset
from isynth.errors import IsynthError
from isynth.flops import counting
from isynth.tokenizers.build import build_tokenizer
from isynth.tokenizers.learned import WEIGHTS, build_net, load_learned, to_float, tokenizer_for
from isynth.tokenizers.nets import Decoder, Encoder, NetConfig, kl_config, kl_flops
from isynth.tokenizers.store import MANIFEST
from isynth.tokenizers.train import METRICS, Objective, train_flops_per_image, train_tokenizer
from isynth.tokenizers.trainconfig import make_config

KINDS = ("vq", "fsq", "lfq", "kl")
SHAPE = (16, 16, 3)
# f = 2 (8x8 tokens): the tiny nets learn a 16x16 image through 64 tokens within 60 steps, not through 16
QUICK = ["model.downsample=2"]


class Crash(Exception):
    """Stands in for the process dying in a chosen step."""


@pytest.fixture(scope="module")
def data_npz(tmp_path_factory) -> Path:
    ds = load_dataset(DataConfig(name="shapes", image_size=16, num_images=300))
    images = np.concatenate([ds.train_images, ds.eval_images])
    labels = ds.conditions.class_attrs()[np.concatenate([ds.train_labels, ds.eval_labels])][:, 0]  # the shape
    return write_npz(tmp_path_factory.mktemp("data") / "shapes16.npz", images, labels)


@pytest.fixture(scope="module")
def data(data_npz) -> list[str]:
    return ["data.name=npz", f"data.path={data_npz}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data, single_thread) -> dict[str, Path]:
    """Each kind trained once at the tiny preset."""
    root = tmp_path_factory.mktemp("tokenizers")
    for kind in KINDS:
        train_tokenizer(make_config(kind, "tiny", [*data, *QUICK]), root / kind, progress=False)
    return {kind: root / kind for kind in KINDS}


def _eval_images(data: list[str]) -> torch.Tensor:
    ds = load_dataset(DataConfig(name="npz", path=data[1].partition("=")[2]))
    return torch.from_numpy(np.array(ds.eval_images))


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))).mean())


# --- FLOPs -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [NetConfig(width=8, mult="1,2", norm_groups=4),
                                 NetConfig(width=8, mult="1,2,4", downsample=8, blocks=2, norm_groups=4),
                                 NetConfig(width=16, downsample=2)])
def test_conv_nets_flops_match_the_counter(cfg):
    enc, dec = Encoder(cfg, 3, 6), Decoder(cfg, 3, 6)
    x = torch.randn(2, 3, 32, 32)
    with counting() as fc:
        z = enc(x)
    assert z.shape == (2, 6, 32 // cfg.downsample, 32 // cfg.downsample)
    assert fc.get_total_flops() == 2 * enc.flops(32, 32)
    with counting() as fc:
        y = dec(z)
    assert y.shape == x.shape
    assert fc.get_total_flops() == 2 * dec.flops(*z.shape[2:])


@pytest.mark.parametrize("attention", [False, True])
def test_autoencoder_kl_flops_match_the_counter(attention):
    from diffusers import AutoencoderKL

    config = kl_config(NetConfig(width=8, mult="1,2", norm_groups=4, attention=attention), SHAPE)
    vae = AutoencoderKL(**config)
    x = torch.randn(2, 3, 16, 16)
    with counting() as fc, torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    encode, decode = kl_flops(config, 16, 16)
    assert fc.get_total_flops() == 2 * encode
    with counting() as fc, torch.no_grad():
        vae.decode(z)
    assert fc.get_total_flops() == 2 * decode


@pytest.mark.parametrize("kind", KINDS)
def test_training_and_tokenizer_flops_match_the_counter(kind, data, single_thread):
    cfg = make_config(kind, "tiny", data)
    ds = load_dataset(cfg.data)
    net = build_net(kind, cfg.model, SHAPE, cfg.loss.commit, cfg.loss.entropy, cfg.loss.kl)
    tok = tokenizer_for(kind, net, cfg.model, SHAPE)
    images = torch.from_numpy(np.array(ds.train_images[:4]))
    net.train()
    net(to_float(images))  # vq: the k-means initialisation of the codebook, once
    feature_net = tok_train.get_feature_net(ds)
    objective = Objective(net, feature_net, cfg)
    with counting() as fc:
        objective(images).backward()
    analytic = train_flops_per_image(tok, tok_train.feature_forward_flops(feature_net, SHAPE))
    assert fc.get_total_flops() / 4 == pytest.approx(analytic, rel=0.01)
    net.eval()
    with counting() as fc:
        tokens = tok.encode(images)
    assert fc.get_total_flops() / 4 == tok.encode_flops()
    with counting() as fc:
        tok.decode(tokens)
    assert fc.get_total_flops() / 4 == tok.decode_flops()


# --- the trained tokenizers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_shapes_types_and_ranges(kind, trained):
    tok = build_tokenizer(TokenizerConfig(kind=kind, path=str(trained[kind])), SHAPE)
    images = torch.randint(0, 256, (5, *SHAPE), dtype=torch.uint8)
    tokens = tok.encode(images)
    assert tok.grid == (8, 8) and tok.seq_len == 64
    if kind == "kl":
        assert not tok.discrete and tok.vocab_size == 0 and tok.token_dim == 4
        assert tokens.shape == (5, 64, 4) and tokens.dtype == torch.float32
    else:
        assert tok.discrete and tok.token_dim == 1
        assert tokens.shape == (5, 64) and tokens.dtype == torch.int64
        assert 0 <= int(tokens.min()) and int(tokens.max()) < tok.vocab_size == {"vq": 64, "fsq": 45, "lfq": 64}[kind]
    out = tok.decode(tokens)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(tok.decode(tokens[:2]), out[:2])  # batch-independent, deterministic
    assert tok.encode_flops() > 0 and tok.decode_flops() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_close_after_a_short_training(kind, trained, data):
    """decode(encode(x)) on held-out images: far better than the untrained net, and closer to x than the
    reconstruction of another image's tokens (the tokens carry the image, in the right order)."""
    tok = build_tokenizer(TokenizerConfig(kind=kind, path=str(trained[kind])), SHAPE)
    x = _eval_images(data)
    tokens = tok.encode(x)
    own, other = _psnr(tok.decode(tokens), x), _psnr(tok.decode(tokens.roll(1, dims=0)), x)
    cfg = make_config(kind, "tiny", [*data, *QUICK])
    untrained = tokenizer_for(kind, build_net(kind, cfg.model, SHAPE).eval(), cfg.model, SHAPE)
    assert own > _psnr(untrained.decode(untrained.encode(x)), x) + 5
    assert own > other + 0.5, (own, other)
    metrics = json.loads((trained[kind] / METRICS).read_text())
    assert metrics["psnr"] == pytest.approx(own, abs=0.01)
    assert metrics["rfd"] >= 0 and metrics["encode_images_per_s"] > 0 and metrics["decode_images_per_s"] > 0
    if kind != "kl":
        assert 0 < metrics["codebook_usage"] <= 1 and 1 <= metrics["perplexity"] <= tok.vocab_size


def test_kl_scaling_factor_and_moments(trained, data):
    tok = load_learned(trained["kl"], SHAPE, patch_size=2)
    manifest = json.loads((trained["kl"] / MANIFEST).read_text())
    assert tok.scale == manifest["scaling_factor"] > 0
    assert tok.grid == (4, 4) and tok.token_dim == 2 * 2 * 4  # 2x2 latent cells per token
    x = _eval_images(data)
    tokens = tok.encode(x)
    assert 0.5 < float(tokens.std()) < 2.0  # roughly unit variance, as the scaling factor intends
    mean, std = tok.encode_moments(x)
    assert torch.allclose(mean, tokens) and mean.shape == std.shape and bool((std > 0).all())
    flat = load_learned(trained["kl"], SHAPE)
    assert torch.equal(flat.decode(flat.encode(x)), tok.decode(tokens))  # grouping cells changes nothing else


def test_manifest_refusals(trained, tmp_path):
    with pytest.raises(IsynthError, match="holds a vq tokenizer, not tokenizer.kind=fsq"):
        build_tokenizer(TokenizerConfig(kind="fsq", path=str(trained["vq"])), SHAPE)
    with pytest.raises(IsynthError, match=r"trained on \[16, 16, 3\] images; this dataset's are \[32, 32, 3\]"):
        build_tokenizer(TokenizerConfig(kind="vq", path=str(trained["vq"])), (32, 32, 3))
    with pytest.raises(IsynthError, match="patch_size=2 groups the latent cells"):
        build_tokenizer(TokenizerConfig(kind="vq", path=str(trained["vq"]), patch_size=2), SHAPE)
    with pytest.raises(IsynthError, match="no tokenizer.json"):
        build_tokenizer(TokenizerConfig(kind="fsq", path=str(tmp_path)), SHAPE)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in (MANIFEST, WEIGHTS):
        (broken / name).write_bytes((trained["fsq"] / name).read_bytes())
    data = bytearray((broken / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (broken / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(IsynthError, match="corrupt tokenizer weights"):
        build_tokenizer(TokenizerConfig(kind="fsq", path=str(broken)), SHAPE)
    (broken / WEIGHTS).unlink()
    with pytest.raises(IsynthError, match="missing tokenizer weights"):
        build_tokenizer(TokenizerConfig(kind="fsq", path=str(broken)), SHAPE)
    with pytest.raises(IsynthError, match="is an isynth tokenizer directory, not a diffusers folder: use "
                                          "tokenizer.kind=kl"):
        build_tokenizer(TokenizerConfig(kind="vae", path=str(trained["kl"])), SHAPE)


# --- exact resumption ------------------------------------------------------------------------------------------

def test_resumption_after_kills_is_exact(tmp_path, data, single_thread, monkeypatch):
    """vq has the most state (k-means initialisation, EMA codebook, dead-code replacement): killed twice
    between checkpoints, it reaches the same weights as an uninterrupted run."""
    cfg = make_config("vq", "tiny", [*data, "train.max_steps=12", "train.ckpt_every=4", "train.log_every=2"])
    train_tokenizer(cfg, tmp_path / "reference", progress=False)
    real = tok_train.ema_decay_at
    for step in (6, 9):
        def dying(s, decay, step=step):
            if s == step:
                raise Crash(s)
            return real(s, decay)
        with monkeypatch.context() as mp:
            mp.setattr(tok_train, "ema_decay_at", dying)
            with pytest.raises(Crash):
                train_tokenizer(cfg, tmp_path / "resumed", progress=False)
        assert not (tmp_path / "resumed" / MANIFEST).exists()
    train_tokenizer(cfg, tmp_path / "resumed", progress=False)
    for name in ("checkpoint.safetensors", WEIGHTS):
        a, b = load_file(tmp_path / "reference" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    logs = [[{k: rec[k] for k in ("step", "loss", "lr", "train_flops")} for rec in map(json.loads, lines)]
            for lines in ((tmp_path / d / "log.jsonl").read_text().splitlines() for d in ("reference", "resumed"))]
    assert logs[0] == logs[1] and [rec["step"] for rec in logs[1]] == [2, 4, 6, 8, 10, 12]
    ref = json.loads((tmp_path / "reference" / MANIFEST).read_text())
    assert json.loads((tmp_path / "resumed" / MANIFEST).read_text())["weights_sha256"] == ref["weights_sha256"]
    # Once finished, the same command changes nothing and returns the metrics.
    before = {p.name: p.read_bytes() for p in (tmp_path / "resumed").iterdir()}
    assert train_tokenizer(cfg, tmp_path / "resumed", progress=False) == json.loads(
        (tmp_path / "resumed" / METRICS).read_text())
    assert before == {p.name: p.read_bytes() for p in (tmp_path / "resumed").iterdir()}
    with pytest.raises(IsynthError, match="another config"):
        train_tokenizer(make_config("vq", "tiny", [*data, "train.max_steps=13"]), tmp_path / "resumed", progress=False)


# --- pretrained diffusers VAEs ---------------------------------------------------------------------------------

def test_vae_loads_a_local_diffusers_folder(tmp_path):
    from diffusers import AutoencoderKL

    config = kl_config(NetConfig(width=8, mult="1,2", norm_groups=4, latent_channels=3), SHAPE)
    torch.manual_seed(0)
    AutoencoderKL(**config, scaling_factor=0.5).save_pretrained(tmp_path / "vae")
    tok = build_tokenizer(TokenizerConfig(kind="vae", path=str(tmp_path / "vae"), patch_size=2), SHAPE)
    assert tok.scale == 0.5 and not tok.discrete and tok.grid == (2, 2) and tok.token_dim == 12  # f = 4, p = 2
    images = torch.randint(0, 256, (3, *SHAPE), dtype=torch.uint8)
    with counting() as fc:
        tokens = tok.encode(images)
    assert tokens.shape == (3, 4, 12) and tokens.dtype == torch.float32
    assert fc.get_total_flops() / 3 == tok.encode_flops() == kl_flops(config, 16, 16)[0]
    out = tok.decode(tokens)
    assert out.shape == images.shape and out.dtype == torch.uint8
    with pytest.raises(IsynthError, match="no config.json"):
        build_tokenizer(TokenizerConfig(kind="vae", path=str(tmp_path)), SHAPE)
    with pytest.raises(IsynthError, match="3-channel images; this dataset's have 1"):
        build_tokenizer(TokenizerConfig(kind="vae", path=str(tmp_path / "vae")), (16, 16, 1))
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    with pytest.raises(IsynthError, match="cannot load the AutoencoderKL"):
        build_tokenizer(TokenizerConfig(kind="vae", path=str(tmp_path / "vae")), SHAPE)


# --- bad settings -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, overrides, message", [
    ("vq", ["model.downsample=3"], "model.downsample=3 must be a power of 2"),
    ("vq", ["model.mult=1,2,2,2"], "has 4 levels; downsample 4 has 3"),
    ("vq", ["model.width=10"], "model.norm_groups=4 must divide every level's width [10, 20, 20]"),
    ("fsq", ["model.levels=8,2"], "each must be >= 3"),
    ("fsq", ["model.levels=8,x"], "comma-separated integers"),
    ("lfq", ["model.codebook_size=1000"], "lfq needs a power of 2"),
    ("kl", ["loss.kl=-1"], "loss.kl must be a finite number >= 0"),
    ("kl", ["loss.recon=l3"], "loss.recon"),
    ("kl", ["kind=vq"], "invalid override 'kind'"),
    ("kl", ["model.nope=1"], "unknown config field 'model.nope'"),
    ("vae", [], "unknown tokenizer kind 'vae'"),
])
def test_bad_settings_are_refused(kind, overrides, message):
    with pytest.raises(IsynthError, match=re.escape(message)):
        make_config(kind, "tiny", overrides)


def test_impossible_budget_and_grid_are_refused_before_anything_is_written(tmp_path, data, single_thread):
    with pytest.raises(IsynthError, match="less than one step"):
        train_tokenizer(make_config("fsq", "tiny", [*data, "train.max_steps=none", "train.train_flops=1e6"]),
                        tmp_path / "a", progress=False)
    with pytest.raises(IsynthError, match="downsampling factor 32 does not divide the image size 16x16"):
        train_tokenizer(make_config("fsq", "tiny", [*data, "model.downsample=32", "model.mult=1"]), tmp_path / "b",
                        progress=False)
    with pytest.raises(IsynthError, match="unknown tokenizer preset 'huge'"):
        make_config("fsq", "huge")
    assert list(tmp_path.iterdir()) == []


# --- the command -------------------------------------------------------------------------------------------------

def _cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, ISYNTH_CACHE=os.environ["ISYNTH_CACHE"], OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "isynth", "tokenizer", "train", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_command_trains_and_refuses_bad_input(tmp_path, data_npz):
    out, bad = tmp_path / "fsq", tmp_path / "bad"
    common = ["--dataset", data_npz, "--preset", "tiny", "--quiet"]
    with ThreadPoolExecutor(3) as pool:  # most of a command's time is starting Python and torch
        result, unknown, too_coarse = pool.map(lambda args: _cli(*args), [
            ("fsq", "--out", out, *common, "--steps", "3"),
            ("jpeg", "--out", bad, *common),
            ("vq", "--out", bad, *common, "model.downsample=32")])
    metrics = json.loads(ok(result).stdout)
    assert metrics["steps"] == 3 and metrics == json.loads((out / METRICS).read_text())
    assert {MANIFEST, WEIGHTS, METRICS, "train_config.json", "checkpoint.safetensors", "log.jsonl",
            "reconstructions.png"} == {p.name for p in out.iterdir()}
    assert load_learned(out, SHAPE, kind="fsq").vocab_size == 45
    assert_error(unknown, "unknown tokenizer kind", "jpeg")
    assert_error(too_coarse, "downsampling factor 32", "16x16")
    assert not bad.exists()
