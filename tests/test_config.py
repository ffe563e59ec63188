"""Frozen configs, presets and `section.field=value` overrides."""
import dataclasses

import pytest

from isynth.config import ModelConfig, TrainConfig, parse_overrides, with_overrides
from isynth.errors import IsynthError
from isynth.presets import PRESETS, make_run
from isynth.report import flops_report


def test_configs_are_frozen():
    run = make_run("ar", "tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.model.width = 3


def test_overrides_parse_types():
    run = make_run("rar", "tiny", ["model.width=64", "model.adaln=true", "train.lr=1e-3", "method.order=random",
                                   "method.anneal_start_step=none", "sample.top_k=5", "train.max_steps=1e3"])
    assert run.model.width == 64 and run.model.adaln is True and run.train.lr == 1e-3
    assert run.method.order == "random" and run.method.anneal_start_step is None
    assert run.sample.top_k == 5 and run.train.max_steps == 1000


@pytest.mark.parametrize("override,message", [
    ("model.nope=1", "unknown config field 'model.nope'"),
    ("nope.width=1", "unknown config field 'nope'"),
    ("model=3", "is a section"),
    ("model.width.x=3", "has no field"),
    ("model.width=abc", "expected an integer"),
    ("model.adaln=maybe", "expected true or false"),
    ("method.order=sideways", "choose one of"),
    ("train.lr=-1", "train.lr"),
    ("model.num_heads=3", "divisible"),
    ("train.max_steps=0", "must be > 0"),
    ("train.train_flops=-5", "must be a finite number > 0"),
    ("train.train_flops=inf", "must be a finite number > 0"),
    ("width", "expected section.field=value"),
])
def test_bad_overrides_are_rejected_with_a_clear_message(override, message):
    with pytest.raises(IsynthError, match=message.replace(".", r"\.").replace("(", r"\(")):
        make_run("rar", "tiny", [override])


def test_one_budget_replaces_the_other():
    run = make_run("ar", "tiny", ["train.train_flops=1e12"])
    assert run.train.max_steps is None and run.train.train_flops == 1e12
    with pytest.raises(IsynthError, match="exactly one training budget"):
        TrainConfig(max_steps=5, train_flops=1e9)


def test_unknown_paradigm_and_preset():
    with pytest.raises(IsynthError, match="unknown paradigm"):
        make_run("gan", "tiny")
    with pytest.raises(IsynthError, match="unknown preset"):
        make_run("ar", "huge")


def test_with_overrides_on_a_single_section():
    m = with_overrides(ModelConfig(), parse_overrides(["depth=7"]))
    assert m.depth == 7 and m.width == ModelConfig().width


@pytest.mark.parametrize("preset,params", [("rar-b", 261e6), ("rar-l", 461e6), ("rar-xl", 955e6), ("rar-xxl", 1499e6)])
def test_rar_paper_sizes(preset, params):
    """seed 001 Table 1, at ImageNet's 256 tokens from a 1024-code VQ and 1000 classes."""
    rep = flops_report("rar", preset, [], seq_len=256, vocab_size=1024, num_classes=1000)
    assert rep["params"] == pytest.approx(params, rel=0.03)
    assert rep["sampling"]["cfg_scale"] > 1


def test_every_preset_builds_for_every_paradigm():
    from isynth.paradigms import PARADIGMS

    for p in PARADIGMS:
        for name in PRESETS:
            assert make_run(p, name).paradigm == p
