"""Frozen configs, presets, `section.field=value` overrides and config.json read back."""
import dataclasses
import json

import pytest

from isynth.config import ModelConfig, TrainConfig
from isynth.errors import IsynthError
from isynth.flopsreport import flops_report
from isynth.overrides import RENAMED, apply, parse_overrides
from isynth.paradigms import PARADIGMS, run_from_dict
from isynth.presets import PRESETS, make_run


def test_configs_are_frozen():
    run = make_run("ar", "tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.model.width = 3


def test_overrides_parse_types():
    run = make_run("rar", "tiny", ["model.width=64", "model.adaln=true", "train.lr=1e-3", "method.order=random",
                                   "method.anneal_start_step=none", "sample.head.top_k=5", "train.max_steps=1e3",
                                   "sample.guidance.schedule=pow-cosine", "sample.guidance.pow=2.5"])
    assert run.model.width == 64 and run.model.adaln is True and run.train.lr == 1e-3
    assert run.method.order == "random" and run.method.anneal_start_step is None
    assert run.sample.head.top_k == 5 and run.train.max_steps == 1000
    assert run.sample.guidance.schedule == "pow-cosine" and run.sample.guidance.pow == 2.5


@pytest.mark.parametrize("override,message", [
    ("model.nope=1", "unknown config field 'model.nope'"),
    ("nope.width=1", "unknown config field 'nope'"),
    ("model=3", "is a section"),
    ("sample.guidance=3", "is a section"),
    ("model.width.x=3", "has no field"),
    ("model.width=abc", "expected an integer"),
    ("model.adaln=maybe", "expected true or false"),
    ("method.order=sideways", "choose one of"),
    ("sample.guidance.schedule=cubic", "choose one of"),
    ("train.lr=-1", "train.lr"),
    ("model.num_heads=3", "divisible"),
    ("train.max_steps=0", "must be > 0"),
    ("train.train_flops=-5", "must be a finite number > 0"),
    ("train.train_flops=inf", "train.train_flops: must be a finite number"),
    ("method.head.width=8", "not used by this run"),  # discrete tokens: the softmax head has no settings
    ("sample.head.steps=8", "unknown config field 'sample.head.steps'"),
    ("width", "expected section.field=value"),
])
def test_bad_overrides_are_rejected_with_a_clear_message(override, message):
    with pytest.raises(IsynthError, match=message.replace(".", r"\.").replace("(", r"\(")):
        make_run("rar", "tiny", [override])


@pytest.mark.parametrize("old,new", sorted(RENAMED.items()))
def test_old_names_say_the_new_name(old, new):
    paradigm = "mar" if old.startswith("method.") or "head" in old and "top" not in old else "rar"
    with pytest.raises(IsynthError, match=f"'{old}' was renamed: use {new.split()[0]}"):
        make_run(paradigm, "tiny", [f"{old}=1"])


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


def test_apply_on_a_single_section_and_with_typed_values():
    m = apply(ModelConfig(), parse_overrides(["depth=7"]))
    assert m.depth == 7 and m.width == ModelConfig().width
    assert apply(ModelConfig(), {"mlp_ratio": 3, "qk_norm": True}).mlp_ratio == 3.0
    for bad in ({"depth": 2.5}, {"qk_norm": 1}, {"width": "x"}):
        with pytest.raises(IsynthError, match="model"):
            apply(ModelConfig(), bad, "model.")


def test_the_token_family_decides_the_head_sections():
    cont, disc = make_run("mdm", "tiny"), make_run("mdm", "tiny", ["tokenizer.kind=grey"])
    assert cont.method.head.width == 32 and cont.sample.head.steps == 4 and cont.sample.head.sampler == "dpm++"
    assert disc.method.head is None and dataclasses.asdict(disc.sample.head) == {"temperature": 1.0, "top_k": 0,
                                                                                "top_p": 1.0}
    assert make_run("maskgit", "tiny").sample.guidance.schedule == "linear"  # MaskGIT / MAR: linear in revealed
    assert make_run("mdm", "tiny").sample.guidance.schedule == "constant"   # eMIGM: constant on an interval
    with pytest.raises(IsynthError, match="needs a continuous tokenizer"):
        make_run("ar-cont", "tiny", ["tokenizer.kind=grey"])
    assert make_run("mar", "tiny", ["tokenizer.kind=grey"]).method.head is None  # Fluid's random-discrete cell
    with pytest.raises(IsynthError, match="t_min/t_max"):  # next-token prediction guides every token
        make_run("ar", "tiny", ["sample.guidance.t_min=0.5"])


@pytest.mark.parametrize("preset,params", [("rar-b", 261e6), ("rar-l", 461e6), ("rar-xl", 955e6), ("rar-xxl", 1499e6)])
def test_rar_paper_sizes(preset, params):
    """RAR Table 1, at ImageNet's 256 tokens from a 1024-code VQ and 1000 classes."""
    rep = flops_report("rar", preset, [], seq_len=256, vocab_size=1024, num_classes=1000)
    assert rep["params"] == pytest.approx(params, rel=0.03)
    assert rep["sampling"]["guidance"]["scale"] > 1 and rep["sampling"]["guidance"]["schedule"] == "pow-cosine"


def test_every_preset_builds_for_every_paradigm_and_sets_only_fields_it_has():
    """A preset setting a field the run does not have would raise here (apply rejects unknown fields)."""
    for p in PARADIGMS:
        for name in PRESETS:
            assert make_run(p, name).paradigm == p
        for family in (["tokenizer.kind=grey"], ["tokenizer.kind=patch"]):
            if PARADIGMS[p].discrete in (None, family[0].endswith("grey")):
                for name in PRESETS:
                    make_run(p, name, family)


def test_config_json_round_trip_and_strict_reading():
    for p in PARADIGMS:
        run = make_run(p, "cpu")
        assert run_from_dict(json.loads(run.to_json())) == run
    data = json.loads(make_run("mar", "tiny").to_json())
    data["sample"]["head"]["steps"] = "4"  # a string where a number belongs: not parsed, rejected
    with pytest.raises(IsynthError, match="sample.head.steps"):
        run_from_dict(data)
    data = json.loads(make_run("mar", "tiny").to_json())
    data["sample"]["cfg_scale"] = 2.0  # a config.json of an earlier version
    with pytest.raises(IsynthError, match="renamed: use sample.guidance.scale"):
        run_from_dict(data)
    del data["sample"]["cfg_scale"], data["train"]["lr_schedule"], data["model"]["adaln_norm_affine"]
    # settings added by a later version take their defaults (the earlier behaviour): older runs stay readable
    assert run_from_dict(data) == make_run("mar", "tiny")
    del data["model"]
    with pytest.raises(IsynthError, match="no 'model'"):  # a whole section missing is a broken file
        run_from_dict(data)
    rar = json.loads(make_run("rar", "tiny").to_json())
    rar["method"]["order"], rar["sample"]["order"] = "raster", "raster"  # values an earlier version wrote
    assert run_from_dict(rar) == make_run("rar", "tiny", ["method.order=scan"])


def test_the_cpu_preset_trains_for_the_main_jobs_budget():
    """Without a budget, `isynth train` gets what the README's main-job table shows: its 6e12 FLOPs."""
    from isynth.compare import DEFAULT_TRAIN_FLOPS
    for p in PARADIGMS:
        run = make_run(p, "cpu")
        assert run.train.train_flops == DEFAULT_TRAIN_FLOPS and run.train.max_steps is None
    assert make_run("ar", "cpu", ["train.max_steps=10"]).train.train_flops is None


def test_config_listing_covers_every_field_with_type_and_help():
    from isynth.configdoc import describe

    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]

    for p in PARADIGMS:
        run = make_run(p, "cpu")
        rows = describe(run)
        assert [r["field"] for r in rows] == [f for f in leaves(run.to_dict()) if f != "paradigm"]
        assert all(r["type"] and r["help"] for r in rows), [r["field"] for r in rows if not r["help"]]


@pytest.mark.parametrize("paradigm", ["rar", "mar", "get"])
def test_config_file_round_trips_a_runs_config_json(tmp_path, paradigm):
    from isynth.configfile import config_overrides
    run = make_run(paradigm, "tiny", ["model.width=48", "train.max_steps=7", "sample.batch_size=9"])
    path = tmp_path / "config.json"
    path.write_text(run.to_json())
    assert make_run(paradigm, "cpu", config_overrides(path, paradigm)) == run
    # the command line comes after the file and wins
    assert make_run(paradigm, "cpu", [*config_overrides(path, paradigm), "model.width=32"]).model.width == 32


def test_config_file_in_yaml_and_toml_and_its_errors(tmp_path):
    from isynth.configfile import config_overrides
    (tmp_path / "a.yaml").write_text("model:\n  width: 64\ntrain:\n  max_steps: 5\n  train_flops: null\n")
    (tmp_path / "a.toml").write_text("[model]\nwidth = 64\n[sample.guidance]\nscale = 3.0\n")
    assert make_run("ar", "cpu", config_overrides(tmp_path / "a.yaml", "ar")).train.max_steps == 5
    run = make_run("ar", "cpu", config_overrides(tmp_path / "a.toml", "ar"))
    assert run.model.width == 64 and run.sample.guidance.scale == 3.0
    (tmp_path / "bad.yaml").write_text("model: [1\n")
    (tmp_path / "other.json").write_text(make_run("mar", "tiny").to_json())
    (tmp_path / "x.ini").write_text("")
    for name, message in [("bad.yaml", "not valid YAML"), ("other.json", "'mar' configuration"),
                          ("x.ini", "unknown format"), ("missing.json", "no such file")]:
        with pytest.raises(IsynthError, match=message):
            config_overrides(tmp_path / name, "ar")


def test_isynth_config_command_prints_every_field():
    from click.testing import CliRunner

    from isynth.cli import cli
    result = CliRunner().invoke(cli, ["config", "rar", "--preset", "rar-b", "model.depth=2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(ln.startswith("model.depth ") and " 2 " in ln for ln in lines)
    from isynth.configdoc import describe
    assert len(lines) == len(describe(make_run("rar", "rar-b", ["model.depth=2"])))


def test_sample_labels_are_parsed_and_checked():
    from isynth.runs import parse_labels
    assert parse_labels("3, 3,7", 10).tolist() == [3, 3, 7]
    for bad in ("3,x", "10", "-1", "3,,4"):
        with pytest.raises(IsynthError, match="--labels"):
            parse_labels(bad, 10)
