"""The `shapes` dataset and prompt following on it: the generator, its held-out split and class ids, the
attribute net (one head per attribute, trained on its own draw of every class), the per-attribute metrics
(GenEval's protocol, Ghosh et al. 2023), balanced and attribute-filtered labels, and the command line:
`isynth sample --attrs`, `isynth dataset export`, and a tiny run trained and evaluated on shapes."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from clitools import assert_error, ok, run_cli, run_many, snapshot

import isynth.eval.features as features
from isynth import shapes
from isynth.conditions import Conditions
from isynth.config import DataConfig
from isynth.data import load_dataset
from isynth.errors import IsynthError
from isynth.eval import evaluate_samples, get_feature_net
from isynth.runs import balanced_labels, parse_attrs

NAMES = ("shape", "colour", "size", "position")


def _pairs(cond: Conditions, labels: np.ndarray) -> set[tuple[int, int]]:
    attrs = cond.class_attrs()[labels]
    return {(int(s), int(c)) for s, c in attrs[:, :2]}


@pytest.fixture(scope="module")
def data():
    return load_dataset(DataConfig(name="shapes", num_images=3000))  # 2400 training, 600 held-out images


@pytest.fixture(scope="module")
def net(data, shared_cache):
    return get_feature_net(data, shared_cache)  # the session's cache: trained once (~20 s on one core)


# --- the generator and its split ---------------------------------------------------------------------

def test_generator_is_deterministic():
    make = shapes.generate.__wrapped__  # past the lru_cache: really draw twice
    a, b, c = make(60, 0.2, 32, 0), make(60, 0.2, 32, 0), make(60, 0.2, 32, 1)
    for x, y in zip(a[:4], b[:4]):
        assert x.tobytes() == y.tobytes()
    assert a[0].tobytes() != c[0].tobytes()
    assert a[0].shape == (48, 32, 32, 3) and a[2].shape == (12, 32, 32, 3) and a[0].dtype == np.uint8
    assert make(20, 0.2, 8, 0)[0].shape == (16, 8, 8, 3)


def test_heldout_split_holds_the_unseen_pairs(data):
    cond = data.conditions
    assert cond.names == NAMES and cond.sizes == (5, 6, 2, 9) and data.num_classes == 540
    assert len(cond.heldout) == 54  # 3 of 30 (shape, colour) pairs x 2 sizes x 9 positions
    assert not np.isin(data.train_labels, cond.heldout).any()
    held = np.isin(data.eval_labels, cond.heldout)
    assert held.sum() > 20  # ~10% of 600
    assert not _pairs(cond, data.eval_labels[held]) & _pairs(cond, data.train_labels)
    assert _pairs(cond, data.eval_labels[held]) == _pairs(cond, np.array(cond.heldout))  # all three pairs shown
    assert len(_pairs(cond, data.train_labels)) == 27


def test_class_ids_round_trip():
    for cond in (shapes.conditions(), Conditions.classes(10)):
        table = cond.class_attrs()
        assert table.shape == (cond.num_classes, len(cond.names)) and table.dtype == np.int64
        assert np.array_equal(cond.class_of(table), np.arange(cond.num_classes))
        for i in (0, 1, cond.num_classes // 3, cond.num_classes - 1):
            fixed = parse_attrs(cond.describe(i), cond)  # every attribute named: exactly one class
            assert balanced_labels(3, cond, fixed).tolist() == [i, i, i]
    assert shapes.conditions().describe(0) == "shape=circle colour=red size=small position=top-left"
    assert Conditions.classes(10).describe(7) == "class=7"


# --- labels --------------------------------------------------------------------------------------------

def test_balanced_labels():
    cond = shapes.conditions()
    assert np.array_equal(balanced_labels(25, Conditions.classes(10)), np.arange(25) % 10)  # digits as before
    two = balanced_labels(1080, cond)
    assert np.array_equal(np.bincount(two, minlength=540), np.full(540, 2))  # every class equally often
    assert _pairs(cond, two[:30]) == {(s, c) for s in range(5) for c in range(6)}  # held-out pairs early
    asked = balanced_labels(40, cond, {0: 0, 1: 0})  # shape=circle colour=red
    attrs = cond.class_attrs()[asked]
    assert (attrs[:, :2] == 0).all() and len(set(asked[:18].tolist())) == 18  # sizes x positions, then again
    assert np.array_equal(asked[18:36], asked[:18])


@pytest.mark.parametrize("text, fragments", [("shape=hexagon", ["hexagon", "circle, square"]),
                                             ("hue=red", ["hue", "shape, colour, size, position"]),
                                             ("shape", ["NAME=VALUE"]), ("", ["NAME=VALUE"]),
                                             ("shape=circle shape=square", ["twice"])])
def test_parse_attrs_errors(text, fragments):
    with pytest.raises(IsynthError) as e:
        parse_attrs(text, shapes.conditions())
    for frag in fragments:
        assert frag in str(e.value)


# --- the attribute net -----------------------------------------------------------------------------------

def test_attribute_net_reads_real_shapes(net, data, shared_cache, monkeypatch):
    assert net.sizes == (5, 6, 2, 9) and net.recipe == features.SHAPES and not net.training
    assert net.eval_accuracy > 0.95 and net.heldout_accuracy > 0.9  # ~0.998 and 1.0 measured
    x = torch.from_numpy(data.eval_images[:4].copy()).permute(0, 3, 1, 2)  # (4, 3, 32, 32) uint8
    assert net(x).shape == (4, 64) and net.logits(x).shape == (4, 22)
    assert net.predict(net.logits(x)).tolist() == data.conditions.class_attrs()[data.eval_labels[:4]].tolist()
    monkeypatch.setattr(features, "_train", lambda ds: pytest.fail("retrained despite a valid cache"))
    small = load_dataset(DataConfig(name="shapes", num_images=500))  # another size: the same net, from the cache
    again = get_feature_net(small, shared_cache)
    assert again.cache_path == net.cache_path and again.heldout_accuracy is not None
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))


def test_real_heldout_images_score_like_the_net(net, data):
    m = evaluate_samples(data.eval_images, data.eval_labels, data, net)
    json.dumps(m)
    assert m["class_accuracy"] == m["attribute_net_accuracy"] == net.eval_accuracy
    assert m["heldout_class_accuracy"] == m["attribute_net_heldout_accuracy"] == net.heldout_accuracy
    for name in NAMES:
        assert 1 >= m[f"attr_accuracy_{name}"] >= m["class_accuracy"]
        assert m[f"heldout_attr_accuracy_{name}"] >= m["heldout_class_accuracy"]
    assert abs(m["fd"]) < 1e-3 and m["fd_train_vs_eval"] > 0 and m["precision"] > 0.6 and m["recall"] > 0.6
    assert m["memorization_rate"] == 0.0 and "feature_net_accuracy" not in m


def test_wrong_labels_score_low(net, data):
    rng = np.random.default_rng(0)
    m = evaluate_samples(data.eval_images, rng.permutation(data.eval_labels), data, net)
    chance = {"shape": 1 / 5, "colour": 1 / 6, "size": 1 / 2, "position": 1 / 9}
    for name in NAMES:
        assert m[f"attr_accuracy_{name}"] < chance[name] + 0.1, name
    assert m["class_accuracy"] < 0.05 and m["heldout_class_accuracy"] < 0.2
    trained = ~np.isin(data.eval_labels, data.conditions.heldout)  # asks for no held-out class
    m = evaluate_samples(data.eval_images[trained], data.eval_labels[trained], data, net)
    assert m["heldout_class_accuracy"] is None and m["heldout_attr_accuracy_shape"] is None
    assert m["attribute_net_heldout_accuracy"] == net.heldout_accuracy  # the ruler's, on the real split


# --- the command line --------------------------------------------------------------------------------------

# 8x8 images (192 grey tokens, lossless at 256 levels) and 100 of them: the run samples 540 images in seconds
SMALL = ("data.num_images=100", "data.image_size=8", "tokenizer.levels=256")


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "ar"
    ok(run_cli("train", "ar", "--dataset", "shapes", "--preset", "tiny", "--steps", "2", "--out", out, "--quiet",
               *SMALL))
    return out


def test_tiny_run_evaluates_prompt_following(shapes_run, tmp_path):
    c, e = tmp_path / "circles.npz", tmp_path / "bad"
    evaluated, circles, bad_value, bad_name, bad_item = run_many([
        ("eval", shapes_run, "--num-samples", "540"),
        ("sample", shapes_run, "--num-samples", "20", "--out", c, "--attrs", "shape=circle colour=green"),
        ("sample", shapes_run, "--num-samples", "4", "--out", e / "a.npz", "--attrs", "shape=circle colour=purple"),
        ("sample", shapes_run, "--num-samples", "4", "--out", e / "b.npz", "--attrs", "hue=red"),
        ("sample", shapes_run, "--num-samples", "4", "--out", e / "c.npz", "--attrs", "circle")])
    m = json.loads(ok(evaluated).stdout)
    assert m == json.loads((shapes_run / "metrics.json").read_text()) and m["num_samples"] == 540
    keys = ["class_accuracy", "heldout_class_accuracy", "attribute_net_accuracy", "attribute_net_heldout_accuracy",
            *(f"{p}attr_accuracy_{n}" for p in ("", "heldout_") for n in NAMES), "fd_shapes", "precision", "recall",
            "memorization_rate", "inception_score"]
    for key in keys:
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
        assert key.startswith(("fd", "inception")) or 0 <= m[key] <= 1, key
    with np.load(shapes_run / "samples.npz") as f:  # every class once, the held-out ones included
        assert np.array_equal(np.sort(f["labels"]), np.arange(540)) and f["arr_0"].shape == (540, 8, 8, 3)

    info = json.loads(ok(circles).stdout)
    assert info["attrs"] == {"shape": "circle", "colour": "green"} and info["num_samples"] == 20
    cond = shapes.conditions()
    with np.load(c) as f:
        labels, images = f["labels"], f["arr_0"]
    assert labels.dtype == np.int64 and images.shape == (20, 8, 8, 3)
    assert (cond.class_attrs()[labels][:, :2] == [0, 1]).all() and len(set(labels.tolist())) == 18
    assert np.isin(labels, cond.heldout).all()  # circle-green is a held-out pair: asking for it is allowed
    assert_error(bad_value, "--attrs", "purple", "red, green, blue, yellow, magenta, cyan")
    assert_error(bad_name, "--attrs", "hue", "shape, colour, size, position")
    assert_error(bad_item, "--attrs", "NAME=VALUE")
    assert not e.exists()


def test_export(tmp_path):
    s, d, bad_dir = tmp_path / "good" / "s.npz", tmp_path / "good" / "sub" / "d.npz", tmp_path / "bad"
    (bad_dir / "dir.npz").mkdir(parents=True)
    before = snapshot(bad_dir)
    *bad, good_s, good_d = run_many([
        ("dataset", "export", "shapes", "--num-images", "0", "--out", bad_dir / "x.npz"),
        ("dataset", "export", "shapes", "--num-images", "5", "--out", bad_dir / "dir.npz"),
        ("dataset", "export", "shapes", "--num-images", "5", "--out", bad_dir / "x.png"),
        ("dataset", "export", "shapes", "--num-images", "5", "--out", bad_dir / "x.npz", "--image-size", "4"),
        ("dataset", "export", "cifar", "--out", bad_dir / "x.npz"),
        ("dataset", "export", "shapes", "--num-images", "50", "--seed", "3", "--out", s),
        ("dataset", "export", "digits", "--out", d)])
    for result, fragment in zip(bad, ["--num-images", "directory", ".npz", "--image-size", "cifar"]):
        assert_error(result, fragment)
    assert snapshot(bad_dir) == before  # nothing written
    good = [good_s, good_d]
    info = json.loads(ok(good[0]).stdout)
    assert (info["train"], info["heldout"], info["num_classes"]) == (40, 10, 540)
    train, train_ids, held, held_ids, cond = shapes.generate(50, 0.2, 32, 3)
    with np.load(s, allow_pickle=False) as f:  # plain arrays only: nothing needs pickle
        assert np.array_equal(f["arr_0"], np.concatenate([train, held])) and f["arr_0"].dtype == np.uint8
        assert np.array_equal(f["labels"], np.concatenate([train_ids, held_ids])) and f["labels"].dtype == np.int64
        assert f["split"].tolist() == [0] * 40 + [1] * 10
        assert np.array_equal(f["attrs"], cond.class_attrs()[f["labels"]]) and f["attrs"].dtype == np.int64
        assert np.array_equal(f["class_attrs"], cond.class_attrs())
        assert f["heldout_classes"].tolist() == list(cond.heldout)
        assert tuple(f["attr_names"]) == NAMES
        values = json.loads(str(f["attr_values"]))
        assert [tuple(values[n]) for n in NAMES] == list(cond.values)
    digits = load_dataset(DataConfig())
    ok(good[1])
    with np.load(d, allow_pickle=False) as f:
        assert np.array_equal(f["arr_0"], np.concatenate([digits.train_images, digits.eval_images]))
        assert f["attr_names"].tolist() == ["class"] and f["heldout_classes"].size == 0
        assert np.array_equal(f["attrs"][:, 0], f["labels"])
