"""Datasets and tokenizers: seeded split, validation, exact round trips."""
import numpy as np
import pytest
import torch

from isynth.config import DataConfig, TokenizerConfig
from isynth.data import load_dataset, validate_images
from isynth.errors import IsynthError
from isynth.tokenizers.build import build_tokenizer
from isynth.tokenizers.fixed import GreyLevels, Patches


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig())


def test_digits_split_is_fixed_disjoint_and_complete(digits):
    again = load_dataset(DataConfig())
    assert np.array_equal(digits.eval_images, again.eval_images)
    assert len(digits.train_images) + len(digits.eval_images) == 1797
    assert len(digits.eval_images) == round(1797 * 0.2)
    assert digits.image_shape == (8, 8, 1) and digits.num_classes == 10
    assert set(np.unique(digits.eval_labels)) == set(range(10))
    other = load_dataset(DataConfig(split_seed=1))
    assert not np.array_equal(digits.eval_labels, other.eval_labels)


def test_grey_levels_are_lossless_on_digits(digits):
    tok = build_tokenizer(TokenizerConfig(), digits.image_shape)
    assert tok.discrete and tok.vocab_size == 17 and tok.seq_len == 64
    images = torch.from_numpy(np.concatenate([digits.train_images, digits.eval_images]))
    ids = tok.encode(images)
    assert ids.shape == (1797, 64) and ids.min() == 0 and ids.max() == 16
    assert torch.equal(tok.decode(ids), images)
    assert len(torch.unique(ids)) == 17  # every grey level occurs


def test_grey_levels_on_rgb_order_is_raster_nhwc():
    tok = GreyLevels((4, 4, 3), 256)
    images = torch.randint(0, 256, (2, 4, 4, 3), dtype=torch.uint8)
    ids = tok.encode(images)
    assert ids.shape == (2, 48) and torch.equal(ids.view(2, 4, 4, 3), images.long())
    assert torch.equal(tok.decode(ids), images)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_patches_round_trip(p):
    tok = Patches((8, 8, 3), p)
    images = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)
    x = tok.encode(images)
    assert x.shape == (3, (8 // p) ** 2, p * p * 3) and -1 <= x.min() and x.max() <= 1
    assert torch.equal(tok.decode(x), images)
    # the first token is the top-left patch
    torch.testing.assert_close(x[0, 0], images[0, :p, :p].float().reshape(-1) / 127.5 - 1)


def test_patch_size_must_divide_the_image():
    with pytest.raises(IsynthError, match="does not divide"):
        Patches((8, 8, 1), 3)


@pytest.mark.parametrize("images,labels,message", [
    (np.zeros((4, 8, 8, 1), np.float32), np.zeros(4, np.int64), "must be uint8"),
    (np.zeros((4, 8, 8), np.uint8), np.zeros(4, np.int64), "shape"),
    (np.zeros((4, 8, 8, 2), np.uint8), np.zeros(4, np.int64), "shape"),
    (np.zeros((4, 8, 8, 1), np.uint8), np.zeros(3, np.int64), "labels must have shape"),
    (np.zeros((4, 8, 8, 1), np.uint8), np.zeros(4, np.float32), "labels must be integers"),
    (np.zeros((4, 8, 8, 1), np.uint8), -np.ones(4, np.int64), ">= 0"),
])
def test_validation_names_the_problem(images, labels, message):
    with pytest.raises(IsynthError, match=message):
        validate_images(images, labels, "x.npz")


def test_npz_dataset_loads(tmp_path):
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(path, arr_0=rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8), labels=np.arange(30) % 3)
    ds = load_dataset(DataConfig(name="npz", path=str(path)))
    assert ds.image_shape == (8, 8, 3) and ds.num_classes == 3 and len(ds.eval_images) == 6
