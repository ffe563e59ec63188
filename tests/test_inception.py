"""Inception metrics (FID, sFID, IS, precision/recall) offline: the FID Inception-v3 network with random weights
of the real layout, loaded through the same loader as the real file; the TF1 resize on known inputs; the
maths against torchmetrics' and the ADM evaluator's formulas on the same features; `isynth fid`, `isynth
score` and `isynth eval --metrics inception`, good and bad inputs. Where $ISYNTH_INCEPTION_WEIGHTS names the
real weights file, its identity is checked too. Inception at 299x299 costs ~0.2 s per image on one core, so
every set here holds 4-8 images."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from clitools import assert_error, copy_run, good_arrays, ok, run_many, savez, snapshot, write_npz
from safetensors.torch import save_file
from torch import nn

import isynth.eval.adm as adm
from isynth.cli import main
from isynth.config import DataConfig
from isynth.data import load_dataset
from isynth.errors import IsynthError
from isynth.eval.adm import Images, Reference, inception_metrics, inception_score, read_reference, read_samples
from isynth.eval.command import weights_for
from isynth.eval.inception import (
    NUM_LOGITS,
    POOL_DIM,
    SPATIAL_DIM,
    WEIGHTS_SHA256_PREFIX,
    FIDInceptionV3,
    expected_shapes,
    inception_features,
    load_inception,
    resize_tf1_bilinear,
)
from isynth.eval.metrics import frechet_distance, gaussian_stats, precision_recall
from isynth.presets import make_run
from isynth.trainer import train

# torchvision documents 27,161,264 parameters for its Inception3 (auxiliary head, 1000 classes); the FID graph
# has no auxiliary head (conv 768->128 1x1 + bn, conv 128->768 5x5 + bn, fc 768->1000: 3,326,696) and 8 more
# logits (8 x 2049 = 16,392). The file also holds the batch-norm running means and variances (34,432 values).
PARAMS = 27_161_264 - 3_326_696 + 16_392
BN_STATS = 34_432


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Random weights in the real file's layout (no num_batches_tracked). Kaiming-normal convolutions keep the
    activations' scale through the ~90 layers (torch's default init shrinks them ~1e-8 fold), and a wide fc
    makes the Inception score differ from 1; its bias must be ignored by the logits."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    nn.init.normal_(net.fc.weight, std=0.1)
    nn.init.normal_(net.fc.bias, std=10.0)
    path = tmp_path_factory.mktemp("weights") / "random-inception.pth"
    torch.save({k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    return path


@pytest.fixture(scope="module")
def net(weights):
    return load_inception(weights)


def _images(n: int, side: int = 8, c: int = 1, seed: int = 0, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, (n, side, side, c), dtype=np.uint8)


# --- the network and its weights file ----------------------------------------------------------------

def test_the_architecture_has_the_weights_files_keys_and_size():
    shapes = expected_shapes()
    assert len(shapes) == 472  # 94 conv + bn layers x 5 tensors + fc weight and bias
    # names as torch-fidelity's converter (utils/util_convert_inception_weights.py) maps the TF graph's layers
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_6a.branch3x3.conv.weight"] == (384, 288, 3, 3)
    assert shapes["Mixed_6d.branch1x1.bn.running_var"] == (192,)  # mixed_6/conv: sFID's layer
    assert shapes["Mixed_7a.branch7x7x3_4.conv.weight"] == (192, 192, 3, 3)
    assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert shapes["fc.weight"] == (NUM_LOGITS, POOL_DIM) and shapes["fc.bias"] == (NUM_LOGITS,)
    stats = sum(int(np.prod(s)) for k, s in shapes.items() if k.endswith(("running_mean", "running_var")))
    assert sum(int(np.prod(s)) for s in shapes.values()) - stats == PARAMS == 23_850_960
    assert stats == BN_STATS and PARAMS + BN_STATS == 23_885_392


def test_weights_load_from_pth_and_safetensors_and_give_the_three_outputs(net, weights, tmp_path):
    copy = tmp_path / "inception.safetensors"
    save_file(torch.load(weights, weights_only=True), copy)
    grey = _images(2)
    f = inception_features(net, grey)
    assert f.pool.shape == (2, POOL_DIM) and f.spatial.shape == (2, SPATIAL_DIM) == (2, 2023)
    assert f.logits.shape == (2, NUM_LOGITS)
    assert torch.equal(inception_features(load_inception(copy), grey).pool, f.pool)
    assert torch.equal(inception_features(net, grey.repeat(3, axis=-1)).pool, f.pool)  # grey = repeated RGB
    assert torch.allclose(f.logits, f.pool @ net.fc.weight.T, rtol=1e-4, atol=1e-4)  # no bias
    seen = []
    hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: seen.append(out))
    try:
        again = inception_features(net, grey)
    finally:
        hook.remove()
    spatial = seen[0][:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # (N, 17, 17, 7) flattened as ADM's NHWC
    assert torch.allclose(again.spatial, spatial)
    assert f.pool.std() > 0.1 and f.spatial.std() > 0.01  # the random weights keep activations alive


def _full_state(**replace) -> dict:
    """Every key at its shape as a stride-0 view (a few bytes on disk), with some tensors replaced."""
    state = {k: torch.zeros(1).expand(s) for k, s in expected_shapes().items()}
    return {**state, **replace}


BAD_WEIGHTS = {
    "garbage.pth": (b"definitely not weights", ("not a PyTorch",)),
    "module.pth": (nn.Linear(2, 2), ("not a PyTorch",)),  # a pickled module: weights_only refuses it
    "list.pth": ([torch.zeros(1)], ("not a state dict",)),
    "other.pth": ({"weight": torch.zeros(3)}, ("missing key Conv2d_1a_3x3.conv.weight",)),
    "imagenet-head.pth": (_full_state(**{"fc.weight": torch.zeros(1000, POOL_DIM)}), ("fc.weight", "[1000, 2048]")),
    "aux.pth": (_full_state(**{"AuxLogits.fc.weight": torch.zeros(1000, 768)}), ("unexpected key AuxLogits.fc",)),
    "nan.pth": (_full_state(**{"Mixed_5b.branch1x1.bn.running_var": torch.full((64,), float("nan"))}),
                ("Mixed_5b.branch1x1.bn.running_var", "non-finite")),
    "garbage.safetensors": (b"\x00" * 16, ("not a PyTorch or safetensors",)),
}


@pytest.mark.parametrize("name", list(BAD_WEIGHTS))
def test_a_bad_weights_file_is_one_line_naming_it_and_the_first_bad_key(name, tmp_path):
    content, fragments = BAD_WEIGHTS[name]
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(IsynthError) as e:
        load_inception(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and all(f in msg for f in fragments), msg


def test_inception_metrics_need_a_weights_file():
    assert weights_for("domain", None) is None and weights_for("domain", Path("w.pth")) is None
    with pytest.raises(IsynthError, match="--inception-weights PATH or set ISYNTH_INCEPTION_WEIGHTS"):
        weights_for("inception", None)


# --- resize and maths ---------------------------------------------------------------------------------

def test_the_resize_is_tf1_bilinear_without_half_pixel_offset():
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]])[None, None]  # (1, 1, 2, 2)
    up = torch.tensor([[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30]], dtype=torch.float32)
    assert torch.equal(resize_tf1_bilinear(x, (4, 4))[0, 0], up)  # output i samples input i * 2 / 4
    row = torch.arange(6.0)[None, None, None].expand(1, 1, 2, 6)
    assert torch.equal(resize_tf1_bilinear(row, (2, 4))[0, 0, 0], torch.tensor([0.0, 1.5, 3.0, 4.5]))
    half_pixel = nn.functional.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)
    assert not torch.equal(half_pixel[0, 0], up)  # torch's default convention differs (pytorch-fid's)
    img = torch.rand(1, 3, 299, 299)
    assert torch.equal(resize_tf1_bilinear(img, (299, 299)), img)
    big = resize_tf1_bilinear(torch.arange(8.0)[None, None, None].expand(1, 1, 8, 8), (299, 299))
    assert big[0, 0, 0, 0] == 0 and big[0, 0, 0, -1] == 7  # the right edge clamps to the last pixel


def test_frechet_distance_matches_torchmetrics_and_the_adm_formula():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(nn.Module):
        num_features = 64

        def forward(self, x):
            return x

    # More samples than dimensions: with fewer, a covariance is singular, the square root of the product's
    # zero eigenvalues is rounding noise (~1e-8 each, varying with the LAPACK threads) and no two
    # implementations can agree to rounding level.
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(200, 64, generator=gen, dtype=torch.float64)
    fake = 0.7 * torch.randn(150, 64, generator=gen, dtype=torch.float64) + 0.3
    tm = FrechetInceptionDistance(feature=Identity())
    tm.update(real, real=True)
    tm.update(fake, real=False)
    ours = frechet_distance(*gaussian_stats(fake), *gaussian_stats(real))
    assert ours == pytest.approx(float(tm.compute()), rel=1e-9)
    (m1, s1), (m2, s2) = (tuple(t.numpy() for t in gaussian_stats(a)) for a in (fake, real))
    assert np.allclose(s1, np.cov(fake.numpy(), rowvar=False))  # ADM's compute_statistics
    covmean = scipy.linalg.sqrtm(s1 @ s2).real  # ADM's FIDStatistics.frechet_distance, in scipy
    assert ours == pytest.approx((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean),
                                 rel=1e-8)
    assert frechet_distance(*gaussian_stats(real), *gaussian_stats(real)) == pytest.approx(0, abs=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torchmetrics' notes on its buffer and a 1-split std
def test_inception_score_matches_torchmetrics():
    from torchmetrics.image.inception import InceptionScore

    logits = 3 * torch.randn(20, NUM_LOGITS, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def tm(part):
        m = InceptionScore(feature=nn.Identity(), splits=1)  # one split: torchmetrics' shuffle is moot
        m.update(part)
        return float(m.compute()[0])

    assert inception_score(logits) == pytest.approx(tm(logits), rel=1e-9)
    assert inception_score(logits, split_size=5) == pytest.approx(np.mean([tm(p) for p in logits.split(5)]),
                                                                  rel=1e-9)
    assert inception_score(torch.zeros(8, NUM_LOGITS)) == pytest.approx(1.0)  # one uniform prediction
    assert inception_score(100 * torch.eye(8, NUM_LOGITS)) == pytest.approx(8.0)  # 8 sure, distinct classes


def test_precision_and_recall_on_constructed_feature_sets():
    line = torch.arange(20.0)[:, None] * torch.tensor([1.0, 0.0])  # 20 points 1 apart: every k=3 radius is 3
    assert precision_recall(line, line[:10], 3) == (1.0, 13 / 20)  # half the manifold: real 0..12 covered
    assert precision_recall(line, line + 100, 3) == (0.0, 0.0)
    assert precision_recall(line, line + 0.5, 3) == (1.0, 1.0)


# --- ADM-layout files -----------------------------------------------------------------------------------

def test_npz_images_stream_in_batches(tmp_path):
    images = _images(10, side=5, c=3)
    for name, save in {"plain.npz": np.savez, "compressed.npz": np.savez_compressed}.items():
        save(tmp_path / name, arr_0=images)
        streamed = read_samples(tmp_path / name)
        assert streamed.shape == images.shape and streamed.array is None
        assert np.array_equal(np.concatenate(list(streamed.batches(3))), images)
    savez(tmp_path / "fortran.npz", arr_0=np.asfortranarray(images))
    assert np.array_equal(np.concatenate(list(read_samples(tmp_path / "fortran.npz").batches(4))), images)


@pytest.mark.parametrize("arrays, fragment", [
    ({"mu": np.zeros(POOL_DIM)}, "mu without sigma"),
    ({"labels": np.zeros(3)}, "neither reference images"),
    ({"mu": np.zeros(POOL_DIM), "sigma": np.full((POOL_DIM, POOL_DIM), np.inf)}, "sigma holds non-finite"),
    ({"arr_0": np.zeros((4, 8, 8, 3), np.float32)}, "arr_0 must be uint8"),
    ({"arr_0": np.zeros((2, 8, 8, 3), np.uint8)}, "at least 4 images"),
])
def test_bad_references_are_one_line(arrays, fragment, tmp_path):
    savez(tmp_path / "ref.npz", **arrays)
    with pytest.raises(IsynthError, match=fragment):
        read_reference(tmp_path / "ref.npz")


def test_a_reference_from_arrays_checks_its_images():
    with pytest.raises(IsynthError, match="at least 4 images"):
        Reference("tiny", Images.from_array(_images(3), "tiny"))


# --- the commands -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli(weights, tmp_path_factory):
    """The commands of this file's CLI tests: `procs` run as real `isynth` processes, launched together (a few
    at a time); `inproc` run through `isynth.cli.main` in this process, as bad inputs fail before any work and
    the ~3 s start-up of a process would be most of their cost. name -> result, and the files they use."""
    d = tmp_path_factory.mktemp("inception-cli")
    samples = write_npz(d / "samples.npz", _images(4, side=16, c=3, seed=1))
    # an ADM reference batch carrying pool_3 statistics but not the spatial ones: FID from them, sFID from arr_0
    savez(d / "batch.npz", arr_0=_images(4, side=16, c=3, seed=2, high=128), mu=np.zeros(POOL_DIM),
          sigma=np.eye(POOL_DIM))
    savez(d / "stats.npz", mu=np.zeros(POOL_DIM), sigma=np.eye(POOL_DIM))
    savez(d / "ref32.npz", arr_0=_images(4, side=32, c=3))
    savez(d / "stats64.npz", mu=np.zeros(64), sigma=np.eye(64))
    (d / "garbage.pth").write_bytes(b"not weights")
    torch.save({"weight": torch.zeros(3)}, d / "keys.pth")
    digits = load_dataset(DataConfig())
    savez(d / "digits.npz", arr_0=digits.eval_images, arr_1=digits.eval_labels)  # guided-diffusion's layout
    data = write_npz(d / "data.npz", *good_arrays(n=20))  # 4 held out
    run = train(make_run("ar", "tiny", ["train.max_steps=2", "data.name=npz", f"data.path={data}",
                                        "tokenizer.levels=256"]), d / "run", progress=False)
    bad_run = copy_run(run, d / "bad-run")
    err = d / "err"
    w = ("--inception-weights", weights)
    procs = {
        "fid": ("fid", samples, d / "batch.npz", *w, "--batch-size", 3, "--out", d / "out" / "fid.json"),
        "eval": ("eval", run, "--num-samples", 4, "--metrics", "inception", *w),
        "score": ("score", d / "digits.npz", "--dataset", "digits", "--out", d / "out" / "score.json"),
        "reference_size": ("fid", samples, d / "ref32.npz", *w, "--out", err / "2.json"),
    }
    inproc = {
        "missing_weights": ("fid", samples, d / "batch.npz", "--inception-weights", d / "nope.pth", "--out",
                            err / "1.json"),
        "garbage_weights": ("fid", samples, d / "batch.npz", "--inception-weights", d / "garbage.pth", "--out",
                            err / "3.json"),
        "wrong_keys": ("fid", samples, d / "batch.npz", "--inception-weights", d / "keys.pth", "--out",
                       err / "4.json"),
        "stats_size": ("fid", samples, d / "stats64.npz", *w, "--out", err / "5.json"),
        "eval_bad_weights": ("eval", bad_run, "--metrics", "inception", "--inception-weights", d / "garbage.pth"),
    }
    paths = {"dir": d, "run": run, "bad_run": bad_run, "bad_run_before": snapshot(bad_run), "err": err,
             "samples": samples, "stats": d / "stats.npz"}
    return dict(zip(procs, run_many(list(procs.values())))), inproc, paths


def _in_process(capsys, args) -> subprocess.CompletedProcess:
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def test_fid_scores_samples_against_an_adm_reference_batch(cli, weights):
    results, _, paths = cli
    out = json.loads(ok(results["fid"]).stdout)
    assert out == json.loads((paths["dir"] / "out" / "fid.json").read_text())
    assert out["inception_weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert isinstance(out[key], float) and np.isfinite(out[key]), key
    assert out["fid"] > 0 and out["sfid"] > 0 and 1 < out["inception_score"] <= 4
    assert out["reference_statistics"] == ["mu"] and out["num_samples"] == out["num_reference_images"] == 4
    assert {"fid", "sfid", "inception_score", "precision_recall", "resize"} <= set(out["conventions"])


def test_a_statistics_reference_gives_fid_only(cli, net, monkeypatch):
    _, _, paths = cli
    calls = []  # the Fréchet maths is tested above; here: which statistics reach it
    monkeypatch.setattr(adm, "frechet_distance", lambda *stats: calls.append(stats) or 1.5)
    out = inception_metrics(net, read_samples(paths["samples"]), read_reference(paths["stats"]))
    (mu_f, sigma_f, mu_r, sigma_r), = calls
    assert mu_f.shape == (POOL_DIM,) and sigma_f.shape == (POOL_DIM, POOL_DIM) and sigma_f.dtype == torch.float64
    assert torch.equal(mu_r, torch.zeros(POOL_DIM, dtype=torch.float64)) and torch.equal(sigma_r, torch.eye(
        POOL_DIM, dtype=torch.float64))  # the file's own mu and sigma
    assert out["fid"] == 1.5 and out["inception_score"] > 1
    assert out["sfid"] is None and out["precision"] is None and out["recall"] is None
    assert out["num_reference_images"] is None and out["reference_statistics"] == ["mu"]


def test_eval_adds_the_inception_metrics_against_the_held_out_split(cli):
    results, _, paths = cli
    printed = json.loads(ok(results["eval"]).stdout)
    written = json.loads((paths["run"] / "metrics.json").read_text())
    assert printed == written and "fd_npz" in written and isinstance(written["precision"], float)  # domain kept
    inc = written["inception"]
    assert inc["num_samples"] == 4 and inc["num_reference_images"] == 4  # 20% of 20 images held out
    assert all(isinstance(inc[k], float) for k in ("fid", "sfid", "inception_score", "precision", "recall"))


def test_score_rates_any_adm_npz_against_a_dataset(cli):
    results, _, paths = cli
    out = json.loads(ok(results["score"]).stdout)
    assert out == json.loads((paths["dir"] / "out" / "score.json").read_text())
    assert out["dataset"] == "digits" and abs(out["fd"]) < 1e-3 and out["class_accuracy"] > 0.9  # real images
    assert "inception" not in out


ERRORS = {
    "missing_weights": ("weights file not found", "nope.pth"),
    "reference_size": ("ref32.npz", "32x32", "16x16"),
    "garbage_weights": ("garbage.pth", "not a pytorch"),
    "wrong_keys": ("keys.pth", "missing key Conv2d_1a_3x3.conv.weight"),
    "stats_size": ("stats64.npz", "mu has shape [64]"),
    "eval_bad_weights": ("garbage.pth",),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_inputs_fail_with_one_line_and_write_nothing(cli, name, capsys):
    results, inproc, paths = cli
    assert_error(results[name] if name in results else _in_process(capsys, inproc[name]), *ERRORS[name])
    assert not paths["err"].exists()  # no --out file, no temporary file, not even the directory
    assert snapshot(paths["bad_run"]) == paths["bad_run_before"]  # the eval failed before sampling


def test_the_weights_path_may_come_from_the_environment(cli, capsys, monkeypatch):
    _, inproc, paths = cli
    monkeypatch.setenv("ISYNTH_INCEPTION_WEIGHTS", str(paths["dir"] / "keys.pth"))
    assert_error(_in_process(capsys, inproc["garbage_weights"][:3]), "keys.pth", "missing key")


# --- the real weights, where the user has them ------------------------------------------------------------

REAL = os.environ.get("ISYNTH_INCEPTION_WEIGHTS")
CIFAR = os.environ.get("ISYNTH_CIFAR10_TRAIN_NPZ")


@pytest.mark.skipif(not REAL, reason="set ISYNTH_INCEPTION_WEIGHTS to the real pt_inception-2015-12-05 file")
def test_the_real_weights_file_is_the_published_one():
    digest = hashlib.sha256(Path(REAL).read_bytes()).hexdigest()
    assert digest.startswith(WEIGHTS_SHA256_PREFIX)  # torch.hub names the file by its SHA-256 prefix
    net = load_inception(REAL)
    assert sum(p.numel() for p in net.parameters()) == PARAMS


@pytest.mark.skipif(not (REAL and CIFAR), reason="needs ISYNTH_INCEPTION_WEIGHTS and ISYNTH_CIFAR10_TRAIN_NPZ")
def test_the_real_weights_give_torch_fidelitys_published_inception_score():
    """torch-fidelity's tests/tf1/numerical_precision/test_metric_isc_fidelity.py: the Inception score of the
    first 100 CIFAR-10 training images is 4.51089784587268 (within 5e-3 of the TF graph), in its convention of
    10 splits after shuffling with np.random.RandomState(2020)."""
    first = next(read_samples(CIFAR).batches(100))
    logits = inception_features(load_inception(REAL), first, batch_size=25).logits
    shuffled = logits[np.random.RandomState(2020).permutation(100)]
    assert inception_score(shuffled, split_size=10) == pytest.approx(4.51089784587268, rel=1e-3)
