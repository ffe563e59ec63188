"""Evaluation: the domain feature net (accuracy, determinism, cache), metrics on known inputs, sample files.
The attribute net on shapes and its prompt-following metrics: test_shapes.py."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import isynth.eval.features as features
from isynth.config import DataConfig
from isynth.data import load_dataset
from isynth.errors import IsynthError
from isynth.eval import evaluate_samples, get_feature_net, load_samples, save_grid, save_samples


@pytest.fixture(scope="session")
def digits():
    return load_dataset(DataConfig())


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("isynth-cache")


@pytest.fixture(scope="session")
def net(digits, cache_dir):
    return get_feature_net(digits, cache_dir)


@pytest.fixture(scope="session")
def noise(digits):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, *digits.image_shape), dtype=np.uint8)
    return images, rng.integers(0, digits.num_classes, 300)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- feature net -----------------------------------------------------------------------------------

def test_feature_net_accuracy_and_shapes(net, digits):
    assert net.eval_accuracy >= 0.9
    assert not net.training
    x = torch.from_numpy(digits.eval_images[:5]).permute(0, 3, 1, 2)  # (5, 1, 8, 8) uint8, torchmetrics' layout
    assert net(x).shape == (5, net.num_features) == (5, 64)
    assert net.logits(x).shape == (5, digits.num_classes)
    assert torch.equal(net(x), net(features.to_input(digits.eval_images[:5])))


def test_training_is_deterministic(net, digits, tmp_path):
    again = get_feature_net(digits, tmp_path)
    assert again.cache_path.parent == tmp_path
    assert _same_weights(net, again)
    assert again.eval_accuracy == net.eval_accuracy


def test_training_leaves_global_rng_alone(digits, tmp_path, monkeypatch):
    monkeypatch.setattr(features, "LABELLED", dataclasses.replace(features.LABELLED, epochs=1))  # only the RNG matters
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    get_feature_net(digits, tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_cache_is_reused(net, digits, cache_dir, monkeypatch):
    assert net.cache_path.is_file() and net.cache_path.parent == cache_dir
    monkeypatch.setattr(features, "_train", lambda ds: pytest.fail("retrained despite a valid cache"))
    monkeypatch.setenv("ISYNTH_CACHE", str(cache_dir))
    cached = get_feature_net(digits)
    assert _same_weights(net, cached) and cached.eval_accuracy == net.eval_accuracy
    assert [p.name for p in cache_dir.iterdir()] == [net.cache_path.name]  # no temp files left behind


def _copy_of(net, ds):
    """Stand-in for training (the real one is covered above): a copy of the session net."""
    copy = features.FeatureNet(ds.image_shape, ds.num_classes)
    copy.load_state_dict(net.state_dict())
    return copy


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_version"])
def test_bad_cache_file_is_replaced(net, digits, tmp_path, monkeypatch, damage):
    if damage == "other_version":  # right file name, stale metadata inside
        monkeypatch.setattr(features, "LABELLED", dataclasses.replace(features.LABELLED, version="featurenet-test"))
    path = features.cache_path(digits, tmp_path)
    good = net.cache_path.read_bytes()
    path.write_bytes({"garbage": b"not a safetensors file", "truncated": good[:200], "other_version": good}[damage])
    calls = []
    monkeypatch.setattr(features, "_train", lambda ds: calls.append(ds) or _copy_of(net, ds))
    fresh = get_feature_net(digits, tmp_path)
    assert len(calls) == 1 and fresh.cache_path == path
    assert _same_weights(get_feature_net(digits, tmp_path), net) and len(calls) == 1  # the replacement loads


def test_different_data_gets_a_different_net_file(digits):
    flipped = dataclasses.replace(digits, train_images=digits.train_images[:, ::-1].copy())
    assert features._data_hash(flipped) != features._data_hash(digits)
    # the held-out split is not in the key: the net's accuracy on it is measured on every load
    assert features._data_hash(dataclasses.replace(digits, eval_images=digits.eval_images[::-1])) == \
        features._data_hash(digits)


# --- metrics ---------------------------------------------------------------------------------------

def test_real_eval_split_scores_like_real_data(net, digits):
    m = evaluate_samples(digits.eval_images, digits.eval_labels, digits, net)
    json.dumps(m)  # plain numbers only
    assert abs(m["fd"]) < 1e-3
    assert m["fd_train_vs_eval"] > 0
    assert m["precision"] > 0.6 and m["recall"] > 0.6
    assert m["class_accuracy"] == net.eval_accuracy == m["feature_net_accuracy"]
    assert m["inception_score"] > 8  # ten near-uniform, confidently classified classes
    assert m["memorization_rate"] == 0.0 and m["mean_nn_distance"] > 0
    assert m["num_samples"] == len(digits.eval_images)
    assert not any(k.startswith(("attr_", "heldout_", "attribute_net")) for k in m)  # one attribute: class only


# Measured before the feature net became an attribute net (one head per attribute): digits' must not move.
DIGITS_BEFORE = {"eval": {"class_accuracy": 355 / 359, "fd_train_vs_eval": 6.891722202301025,
                          "inception_score": 9.020986899165962, "mean_nn_distance": 1.0479231364862658},
                 "noise": {"class_accuracy": 35 / 300, "fd": 477.99761962890625, "precision": 1 / 300,
                           "inception_score": 2.5049351592243316, "mean_nn_distance": 3.5653435445080968}}


def test_digits_metrics_are_unchanged(net, digits, noise):
    # Exact on the machine they were measured on; a CPU with other float kernels may move the last digits.
    assert net.eval_accuracy == 355 / 359
    for name, (images, labels) in {"eval": (digits.eval_images, digits.eval_labels), "noise": noise}.items():
        m = evaluate_samples(images, labels, digits, net)
        for key, before in DIGITS_BEFORE[name].items():
            assert m[key] == pytest.approx(before, rel=1e-4, abs=1e-6), (name, key)


def test_training_images_are_memorised(net, digits):
    m = evaluate_samples(digits.train_images[:200], digits.train_labels[:200], digits, net)
    assert m["memorization_rate"] == 1.0 and m["mean_nn_distance"] == 0.0
    assert m["precision"] > 0.6


def test_noise_scores_badly(net, digits, noise):
    m = evaluate_samples(*noise, digits, net)
    assert m["fd"] > 10 * m["fd_train_vs_eval"]
    assert m["precision"] < 0.05
    assert m["memorization_rate"] == 0.0
    assert m["class_accuracy"] < 0.3


@pytest.mark.parametrize("bad", ["float", "shape", "channels", "labels_len", "labels_float", "label_range",
                                 "one_sample", "knn_k"])
def test_bad_sample_inputs_raise(net, digits, bad):
    images, labels = digits.eval_images[:20], digits.eval_labels[:20]
    kwargs = {}
    if bad == "float":
        images = images.astype(np.float32)
    elif bad == "shape":
        images = np.zeros((20, 16, 16, 1), np.uint8)
    elif bad == "channels":
        images = np.repeat(images, 3, axis=-1)
    elif bad == "labels_len":
        labels = labels[:5]
    elif bad == "labels_float":
        labels = labels.astype(np.float64)
    elif bad == "label_range":
        labels = labels + digits.num_classes
    elif bad == "one_sample":
        images, labels = images[:1], labels[:1]
    elif bad == "knn_k":
        kwargs["knn_k"] = 20
    with pytest.raises(IsynthError) as e:
        evaluate_samples(images, labels, digits, net, **kwargs)
    assert "\n" not in str(e.value)


# --- sample files and grids ------------------------------------------------------------------------

def test_npz_round_trip(digits, tmp_path):
    path = save_samples(tmp_path / "samples", digits.eval_images, digits.eval_labels.astype(np.int32))
    assert path == tmp_path / "samples.npz" and sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]
    images, labels = load_samples(path)
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.array_equal(images, digits.eval_images) and np.array_equal(labels, digits.eval_labels)
    with np.load(path) as f:  # the ADM evaluator convention
        assert sorted(f.files) == ["arr_0", "labels"]


def test_load_samples_errors(tmp_path):
    good = np.zeros((4, 8, 8, 1), np.uint8)
    cases = {
        "missing.npz": None,
        "corrupt.npz": b"PK\x03\x04 this is not a zip",
        "no_labels.npz": dict(arr_0=good),
        "no_images.npz": dict(labels=np.zeros(4, np.int64)),
        "float.npz": dict(arr_0=good.astype(np.float32), labels=np.zeros(4, np.int64)),
        "shape.npz": dict(arr_0=good[..., 0], labels=np.zeros(4, np.int64)),
        "labels.npz": dict(arr_0=good, labels=np.zeros(3, np.int64)),
        "pickle.npz": dict(arr_0=good, labels=np.array([object()] * 4)),
        "array.npy": good,
    }
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, np.ndarray):
            np.save(path, content)
        elif content is not None:
            np.savez(path, **content)
        with pytest.raises(IsynthError) as e:
            load_samples(path)
        assert name in str(e.value) and "\n" not in str(e.value), name
    with pytest.raises(IsynthError):
        save_samples(tmp_path / "x.npz", good.astype(np.int16), np.zeros(4, np.int64))


def test_save_grid(digits, tmp_path):
    from PIL import Image

    path = save_grid(tmp_path / "grid.png", digits.eval_images[:10])
    with Image.open(path) as img:
        assert img.mode == "L" and img.width >= 256
        tiles_per_row, tile = 4, 8 * 8  # ceil(sqrt(10)) tiles of 8 px upscaled 8x (4 * 8 * 8 = 256)
        assert img.size == (tiles_per_row * (tile + 1) - 1, 3 * (tile + 1) - 1)
        grid = np.asarray(img)
    assert np.array_equal(grid[:tile:8, :tile:8], digits.eval_images[0, ..., 0])  # nearest-neighbour upscale
    rgb = save_grid(tmp_path / "rgb.png", np.zeros((3, 8, 8, 3), np.uint8), nrow=3, scale=2)
    with Image.open(rgb) as img:
        assert img.mode == "RGB" and img.size == (3 * 17 - 1, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "rgb.png"]
