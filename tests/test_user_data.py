"""User data: image folders (classes, unconditional, resizing, the memory-mapped cache, bad folders), RGB .npz
files, flips, the grey tokenizer refusing to quantise, and the latents cache (round trip, refusal of another
tokenizer, resumption)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from isynth.config import DataConfig, TokenizerConfig
from isynth.data import load_dataset
from isynth.errors import IsynthError
from isynth.folder import center_crop
from isynth.latents import MANIFEST, load_latents, tokenize
from isynth.presets import make_run
from isynth.tokendata import EncodedOnDemand, training_tokens
from isynth.tokenizers.build import build_tokenizer
from isynth.trainer import build, train


def _folder(root, classes=("cat", "dog"), n=6, size=(40, 48), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    for c in classes:
        d = root / c if c else root
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(d / f"{i}.png")
    return root


def test_folder_classes_split_and_memory_mapped_cache(tmp_path):
    root = _folder(tmp_path / "pets")
    d = load_dataset(DataConfig(name="folder", path=str(root), image_size=32))
    assert d.conditions.values == (("cat", "dog"),) and d.num_classes == 2
    assert isinstance(d.train_images, np.memmap) and d.train_images.shape[1:] == (32, 32, 3)
    assert len(d.train_images) + len(d.eval_images) == 12 and set(d.train_labels.tolist()) <= {0, 1}
    again = load_dataset(DataConfig(name="folder", path=str(root), image_size=32))  # from the cache
    assert np.array_equal(np.asarray(again.eval_images), np.asarray(d.eval_images))
    unconditional = load_dataset(DataConfig(name="folder", path=str(_folder(tmp_path / "flat", classes=("",))),
                                            image_size=16))
    assert unconditional.num_classes == 1 and unconditional.image_shape == (16, 16, 3)


def test_center_crop_is_adm_style():
    img = Image.fromarray(np.arange(80 * 160, dtype=np.uint8).reshape(80, 160) % 255, "L")
    out = center_crop(img, 20)
    assert out.shape == (20, 20)


@pytest.mark.parametrize("make,message", [
    (lambda r: r.mkdir(), "holds no images"),
    (lambda r: _folder(r, size=(10, 12)), "smaller than data.image_size"),
    (lambda r: (_folder(r, classes=("a",)), _folder(r, classes=("b",), mode="L")), "mixes RGB"),
    (lambda r: (_folder(r, classes=("a",)), (r / "loose.png").write_bytes((r / "a" / "0.png").read_bytes())),
     "both class subfolders and loose images"),
    (lambda r: (r.mkdir(), (r / "x.png").write_bytes(b"broken"), (r / "y.png").write_bytes(b"")), "could be read"),
    (lambda r: (r.mkdir(), Image.new("RGBA", (40, 40)).save(r / "a.png")), "RGBA"),
])
def test_bad_folders_are_one_clear_error(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(IsynthError, match=message):
        load_dataset(DataConfig(name="folder", path=str(root), image_size=32))
    assert not list((tmp_path / "cache").glob("folders/*")) if (tmp_path / "cache").exists() else True


def test_unreadable_files_are_skipped_with_a_count(tmp_path, capsys):
    root = _folder(tmp_path / "pets")
    (root / "cat" / "torn.png").write_bytes((root / "cat" / "0.png").read_bytes()[:40])
    d = load_dataset(DataConfig(name="folder", path=str(root), image_size=32))
    assert len(d.train_images) + len(d.eval_images) == 12
    assert "skipped 1 unreadable" in capsys.readouterr().err


def test_rgb_npz_and_flips(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8), np.arange(30) % 3
    with open(tmp_path / "rgb.npz", "wb") as f:
        np.savez(f, arr_0=images, labels=labels)
    cfg = DataConfig(name="npz", path=str(tmp_path / "rgb.npz"), flip=True)
    d = load_dataset(cfg)
    assert d.image_shape == (8, 8, 3)
    tok = build_tokenizer(TokenizerConfig(kind="patch", patch_size=2), d.image_shape)
    tokens, labels_t = training_tokens(tok, d.train_images, d.train_labels, d.flip)
    n = len(d.train_images)
    assert len(tokens) == len(labels_t) == 2 * n and torch.equal(labels_t[:n], labels_t[n:])
    assert torch.equal(tok.decode(tokens[n:]), torch.from_numpy(np.ascontiguousarray(d.train_images[:, :, ::-1])))
    with pytest.raises(IsynthError, match="data.flip"):
        DataConfig(name="shapes", flip=True)  # a mirrored shape would be at another position


def test_grey_tokenizer_refuses_to_quantise_rgb_but_not_digits(tmp_path):
    with pytest.raises(IsynthError, match="tokenizer.levels=256"):
        build(make_run("ar", "tiny", ["data.name=shapes", "data.num_images=20"]), torch.device("cpu"))
    build(make_run("ar", "tiny", ["data.name=shapes", "data.num_images=20", "tokenizer.levels=256"]),
          torch.device("cpu"))
    build(make_run("ar", "tiny"), torch.device("cpu"))  # digits: 17 levels are exact


def test_folder_streams_tokens_per_batch(tmp_path):
    root = _folder(tmp_path / "pets")
    d = load_dataset(DataConfig(name="folder", path=str(root), image_size=16, flip=True))
    tok = build_tokenizer(TokenizerConfig(kind="patch", patch_size=4), d.image_shape)
    tokens, labels = training_tokens(tok, d.train_images, d.train_labels, d.flip)
    assert isinstance(tokens, EncodedOnDemand) and len(tokens) == len(labels) == 2 * len(d.train_images)
    n = len(d.train_images)
    batch = tokens[torch.tensor([0, n])]  # an image and its mirror
    assert torch.equal(tok.decode(batch[1:]), tok.decode(batch[:1]).flip(2))
    out = train(make_run("mar", "tiny", ["data.name=folder", f"data.path={root}", "data.image_size=16",
                                         "tokenizer.patch_size=4", "train.max_steps=2"]), tmp_path / "run",
                progress=False)
    assert (out / "checkpoint.safetensors").is_file()


def test_latents_round_trip_refusal_and_resume(tmp_path):
    d = load_dataset(DataConfig())
    cfg = TokenizerConfig(kind="patch", patch_size=2)
    tok = build_tokenizer(cfg, d.image_shape)
    m = tokenize(tok, cfg, DataConfig(), d, tmp_path / "lat", shard_size=500, progress=False)
    tokens, labels = load_latents(tmp_path / "lat", cfg)
    assert torch.equal(tokens, tok.encode(torch.from_numpy(d.train_images)))
    assert torch.equal(labels, torch.from_numpy(d.train_labels)) and len(m["shards"]) == 3
    with pytest.raises(IsynthError, match="another tokenizer.*patch_size 2 -> 1"):
        load_latents(tmp_path / "lat", TokenizerConfig(kind="patch", patch_size=1))
    # resume: drop the last shard from the manifest, as a kill before its write would
    manifest = json.loads((tmp_path / "lat" / MANIFEST).read_text())
    manifest["shards"].pop()
    (tmp_path / "lat" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IsynthError, match="incomplete"):
        load_latents(tmp_path / "lat", cfg)
    tokenize(tok, cfg, DataConfig(), d, tmp_path / "lat", shard_size=500, progress=False)
    assert torch.equal(load_latents(tmp_path / "lat", cfg)[0], tokens)
    with pytest.raises(IsynthError, match="different shard_size"):
        tokenize(tok, cfg, DataConfig(), d, tmp_path / "lat", shard_size=400, progress=False)
    run = make_run("mar", "tiny", ["data.name=latents", f"data.path={tmp_path / 'lat'}", "tokenizer.patch_size=2",
                                   "train.max_steps=2"])
    assert (train(run, tmp_path / "run", progress=False) / "checkpoint.safetensors").is_file()
