"""Hub-format export (`isynth export`) and import (`isynth.from_pretrained`, `isynth sample FOLDER`): the same
samples as the run, without the training data (learned tokenizers and pretrained VAEs travel with the folder),
through huggingface_hub's offline cache, the model card's content, and bad folders refused with one line."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import TRAIN_TINY, assert_error, run_many, snapshot, write_npz
from safetensors.torch import load_file, save_file

import isynth
import isynth.hub as hub
from isynth.cli import main
from isynth.conditions import Conditions
from isynth.config import DataConfig
from isynth.data import load_dataset
from isynth.errors import IsynthError
from isynth.files import sha256_file
from isynth.presets import make_run
from isynth.runs import balanced_labels, load_trained
from isynth.tokenizers.nets import NetConfig, kl_config
from isynth.tokenizers.train import train_tokenizer
from isynth.tokenizers.trainconfig import make_config
from isynth.trainer import train

ROOT = Path(__file__).resolve().parents[1]
REPO = "isynth-test/tiny-ar"
REVISION = "0123456789abcdef0123456789abcdef01234567"
METRICS = {"paradigm": "ar", "step": 2, "fd_digits": 123.25, "class_accuracy": 0.375, "nfe": 64}


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory, single_thread) -> tuple[Path, Path, dict]:
    """A tiny `ar` run made by `isynth train` (which records its command), a metrics.json, and `isynth export`:
    (run, exported folder, what export printed). In-process, as the user's command lines (relative paths)."""
    root = tmp_path_factory.mktemp("hub")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)

        def isynth_(*args: str) -> None:
            mp.setattr(sys, "argv", ["isynth", *args])  # what the command records
            with contextlib.redirect_stdout(printed):
                assert main(list(args)) == 0

        isynth_("train", "ar", "--dataset", "digits", "--out", "run", *TRAIN_TINY)
        (root / "run" / "metrics.json").write_text(json.dumps(METRICS))
        isynth_("export", "run", "--out", "exported")
    return root / "run", root / "exported", json.loads(printed.getvalue())


def _tokens(model, seed: int = 3, n: int = 12) -> torch.Tensor:
    labels = torch.from_numpy(balanced_labels(n, model.conditions))
    return model.sample(labels, model.run.sample, generator=torch.Generator().manual_seed(seed))


def _same_samples(run: Path, folder, **kwargs) -> None:
    trained, _, _ = load_trained(run)
    loaded = isynth.from_pretrained(folder, **kwargs)
    assert not loaded.training and loaded.conditions == trained.conditions
    assert torch.equal(_tokens(trained), _tokens(loaded))


def test_round_trip_gives_identical_samples(ar_run):
    run, folder, _ = ar_run
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    _same_samples(run, folder)
    ema = load_trained(run)[0].state_dict()
    weights = load_file(folder / "model.safetensors")
    assert weights.keys() == ema.keys() and all(torch.equal(weights[k], ema[k]) for k in ema)
    config = json.loads((folder / "config.json").read_text())
    assert config["export"]["image_shape"] == [8, 8, 1]
    assert config["export"]["conditions"] == {"names": ["class"], "values": [[str(i) for i in range(10)]],
                                              "heldout": []}
    assert config["export"]["checkpoint"]["step"] == 2
    assert config["export"]["checkpoint"]["sha256"] == sha256_file(run / "checkpoint.safetensors")
    assert {k: v for k, v in config.items() if k != "export"} == json.loads((run / "config.json").read_text())


def test_loads_through_the_hub_cache_offline(ar_run, tmp_path):
    """A fake huggingface_hub cache (refs/main -> a snapshot holding the folder) read with local_files_only."""
    _, folder, _ = ar_run
    repo = tmp_path / f"models--{REPO.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    assert hub.resolve(REPO, cache_dir=tmp_path, local_files_only=True) == repo / "snapshots" / REVISION
    _same_samples(ar_run[0], REPO, cache_dir=tmp_path, local_files_only=True)
    with pytest.raises(IsynthError, match="isynth-test/absent: not a local folder, and no Hub repository"):
        isynth.from_pretrained("isynth-test/absent", cache_dir=tmp_path, local_files_only=True)
    with pytest.raises(IsynthError, match="is not a folder"):
        isynth.from_pretrained(tmp_path / "no" / "such" / "folder")


def test_card_of_a_run_without_command_or_metrics(ar_run, tmp_path):
    run = _copy(ar_run[0], tmp_path / "run")
    (run / "command.txt").unlink()
    (run / "metrics.json").unlink()
    card = (hub.export_run(run, tmp_path / "exported") / "README.md").read_text()
    assert "The command is unknown" in card and "No metrics" in card


def _copy(folder: Path, dst: Path) -> Path:
    return Path(shutil.copytree(folder, dst))


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "model.safetensors").unlink(), "missing model.safetensors"),
    (lambda f: (f / "model.safetensors").write_bytes(b"\0" * 40), "model.safetensors: corrupt or unreadable"),
    (lambda f: (f / "config.json").unlink(), "is not an exported isynth folder (no config.json)"),
    (lambda f: (f / "config.json").write_text("{"), "config.json: unreadable config"),
    (lambda f: _edit_config(f, lambda c: c.pop("export")), "not an exported isynth config"),
    (lambda f: _edit_config(f, lambda c: c["export"].update(image_shape=[8, 8, 2])), "export.image_shape"),
    (lambda f: _edit_config(f, lambda c: c["export"]["conditions"].update(values=[])), "export.conditions"),
    (lambda f: _edit_config(f, lambda c: c["export"]["conditions"].update(heldout=[10])), "class ids in [0, 10)"),
    (lambda f: _edit_config(f, lambda c: c["export"]["checkpoint"].update(step=-1)), "'step'"),
    (lambda f: _edit_config(f, lambda c: c["model"].update(nope=1)), "config.json: unknown config field"),
    (lambda f: _edit_config(f, lambda c: c["model"].update(width=64)), "shape of"),
    (lambda f: _edit_config(f, lambda c: c["tokenizer"].update(kind="fsq", path="/elsewhere")),
     "tokenizer.path must be a directory inside the folder"),
])
def test_a_damaged_folder_is_refused_with_the_file_named(ar_run, tmp_path, damage, message):
    folder = _copy(ar_run[1], tmp_path / "exported")
    damage(folder)
    with pytest.raises(IsynthError, match=re.escape(message)):
        isynth.from_pretrained(folder)


def test_weights_with_non_finite_or_wrong_dtype_tensors_are_refused(ar_run, tmp_path):
    folder = _copy(ar_run[1], tmp_path / "exported")
    weights = load_file(folder / "model.safetensors")
    name = next(k for k, v in weights.items() if v.is_floating_point())
    for value, message in [(torch.full_like(weights[name], float("nan")), "non-finite"),
                           (weights[name].double(), "torch.float64")]:
        save_file({**weights, name: value}, folder / "model.safetensors")
        with pytest.raises(IsynthError, match=re.escape(message)) as e:
            isynth.from_pretrained(folder)
        assert "model.safetensors" in str(e.value) and name in str(e.value)
    with pytest.raises(IsynthError, match="holds the EMA weights only"):
        isynth.from_pretrained(ar_run[1], use_ema=False)


def test_a_failed_export_leaves_nothing(ar_run, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hub, "model_card", broken)
    with pytest.raises(OSError, match="disk full"):
        hub.export_run(ar_run[0], tmp_path / "exported")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(IsynthError, match="is an exported folder already"):
        hub.export_run(ar_run[1], tmp_path / "again")


def test_conditions_round_trip_with_held_out_classes():
    c = Conditions(("shape", "colour"), (("circle", "square"), ("red", "green", "blue")), heldout=(1, 4))
    assert hub._conditions(json.loads(json.dumps(hub.conditions_dict(c)))) == c


def test_record_command_keeps_one_line_per_distinct_training_command(tmp_path):
    for command in ("isynth train ar --out r", "isynth train ar --out r", "isynth train ar --out r --steps 9"):
        hub.record_command(tmp_path, command)
    assert hub.read_commands(tmp_path) == ["isynth train ar --out r", "isynth train ar --out r --steps 9"]


# --- learned tokenizers and pretrained VAEs travel with the folder --------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_runs(tmp_path_factory, single_thread) -> dict[str, tuple[Path, Path, torch.Tensor]]:
    """`ar` on an FSQ tokenizer and `diffusion` on a pretrained diffusers VAE (16x16 RGB shapes in an .npz):
    kind -> (run, exported folder, tokens sampled from the run). The data and the tokenizer directories are
    then moved away, so loading the folders can only use what they hold."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("hub-tokenizers")
    ds = load_dataset(DataConfig(name="shapes", image_size=16, num_images=60))
    shape_of = ds.conditions.class_attrs()[:, 0]
    write_npz(root / "data.npz", np.concatenate([ds.train_images, ds.eval_images]),
              shape_of[np.concatenate([ds.train_labels, ds.eval_labels])])
    data = ["data.name=npz", f"data.path={root / 'data.npz'}"]
    train_tokenizer(make_config("fsq", "tiny", [*data, "model.downsample=2", "train.max_steps=2"]), root / "fsq",
                    progress=False)
    torch.manual_seed(0)
    vae = kl_config(NetConfig(width=8, mult="1,2", norm_groups=4, latent_channels=3), (16, 16, 3))
    AutoencoderKL(**vae, scaling_factor=0.5).save_pretrained(root / "vae")
    out = {}
    for kind, paradigm, tok in [("fsq", "ar", ["tokenizer.kind=fsq"]),
                                ("vae", "diffusion", ["tokenizer.kind=vae", "tokenizer.patch_size=2"])]:
        run = train(make_run(paradigm, "tiny", [*data, *tok, f"tokenizer.path={root / kind}", "train.max_steps=2"]),
                    root / f"run-{kind}", progress=False)
        out[kind] = (run, hub.export_run(run, root / f"exported-{kind}"), _tokens(load_trained(run)[0]))
    for name in ("data.npz", "fsq", "vae"):
        os.rename(root / name, root / f"moved-{name}")
    return out


@pytest.mark.parametrize("kind, files", [("fsq", ["metrics.json", "tokenizer.json", "weights.safetensors"]),
                                         ("vae", ["config.json", "diffusion_pytorch_model.safetensors"])])
def test_the_tokenizer_is_exported_inside_the_folder(tokenizer_runs, kind, files):
    _, folder, tokens = tokenizer_runs[kind]
    assert sorted(p.name for p in (folder / "tokenizer").iterdir()) == files
    assert json.loads((folder / "config.json").read_text())["tokenizer"]["path"] == "tokenizer"
    model = isynth.from_pretrained(folder)
    assert model.tokenizer.image_shape == (16, 16, 3)
    assert torch.equal(_tokens(model), tokens)


def test_a_corrupt_exported_tokenizer_is_refused(tokenizer_runs, tmp_path):
    folder = _copy(tokenizer_runs["fsq"][1], tmp_path / "exported")
    (folder / "tokenizer" / "weights.safetensors").write_bytes(b"not weights")
    with pytest.raises(IsynthError, match="corrupt tokenizer weights"):
        isynth.from_pretrained(folder)


# --- the command line -----------------------------------------------------------------------------------------

def test_export_command_writes_the_folder_and_its_card(ar_run):
    run, folder, printed = ar_run
    assert printed == {"out": "exported", "files": ["README.md", "config.json", "model.safetensors"]}
    card = (folder / "README.md").read_text()
    front = card.split("---")[1]
    license_ = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    for line in ("library_name: isynth", f"license: {license_.lower()}",
                 "pipeline_tag: unconditional-image-generation", "- class-conditional", "- ar"):
        assert line in front.splitlines(), line
    model, _, meta = load_trained(run)
    s = model.run.sample
    assert (run / "command.txt").read_text() == "isynth train ar --dataset digits --out run " \
        + " ".join(TRAIN_TINY) + "\n"
    for text in (f"training FLOPs: {meta['train_flops']:.3g}", "steps: 2 of 2",
                 f"training FLOPs per sample: {model.train_flops_per_sample():.3g}",
                 f"{model.sample_flops(s):.3g} FLOPs per image, NFE {model.num_network_evals(s)}",
                 f"parameters: {model.num_params():,}", "| fd_digits | 123.2 |", "| class_accuracy | 0.375 |",
                 "isynth train ar --dataset digits --out run --preset tiny --steps 2 --quiet"):
        assert text in card, text


def test_sample_of_the_folder_equals_sample_of_the_run(ar_run, tmp_path, capsys):
    run, folder, _ = ar_run
    printed = []
    for source, out in ((run, tmp_path / "run.npz"), (folder, tmp_path / "folder.npz")):
        assert main(["sample", str(source), "--num-samples", "12", "--seed", "5", "--out", str(out)]) == 0
        printed.append(json.loads(capsys.readouterr().out))
    with np.load(tmp_path / "run.npz") as a, np.load(tmp_path / "folder.npz") as b:
        assert a.files == b.files == ["arr_0", "labels"]
        assert all(np.array_equal(a[k], b[k]) for k in a.files)
    assert (tmp_path / "folder.png").read_bytes() == (tmp_path / "run.png").read_bytes()
    assert printed[0]["sample_flops_per_image"] == printed[1]["sample_flops_per_image"]


def test_bad_input_fails_cleanly(ar_run, tmp_path):
    """Each is one line on stderr, exit 2, and leaves every directory as it was (nothing half-written)."""
    run, folder, _ = ar_run
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "no-ckpt").mkdir()
    shutil.copyfile(run / "config.json", tmp_path / "no-ckpt" / "config.json")
    (tmp_path / "not-a-run").mkdir()
    corrupt = _copy(folder, tmp_path / "corrupt")
    weights = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    out = tmp_path / "out"
    out.mkdir()
    cases = [(("export", run, "--out", tmp_path / "full"), "exists and is not empty"),
             (("export", tmp_path / "no-ckpt", "--out", out / "e1"), "has no checkpoint"),
             (("export", tmp_path / "not-a-run", "--out", out / "e2"), "not an isynth run directory"),
             (("sample", corrupt, "--num-samples", "4", "--out", out / "c.npz"),
              f"{corrupt / 'model.safetensors'}: corrupt")]
    before = snapshot(tmp_path)
    for (_, fragment), result in zip(cases, run_many([args for args, _ in cases])):
        assert_error(result, fragment)
    assert snapshot(tmp_path) == before
