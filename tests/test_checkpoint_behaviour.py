"""Checkpoints as the run directory promises them: every kind of tensor (weights, EMA, AdamW's moments and
step) and the metadata come back bit for bit; another config's or an edited checkpoint is refused with one
line naming the tensor or field; killed writes leave nothing behind."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from isynth.checkpoint import (
    CHECKPOINT,
    CONFIG,
    LOG,
    check_meta,
    check_optimizer,
    check_state,
    config_changes,
    load_checkpoint,
    load_weights,
    read_config_dict,
    remove_stale_temps,
    save_checkpoint,
)
from isynth.errors import IsynthError


class Tiny(torch.nn.Module):
    """Float, integer and bool state: a linear layer, a norm, an int64 counter and a bool buffer."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.norm = torch.nn.LayerNorm(2)
        self.register_buffer("count", torch.tensor([3, 1], dtype=torch.int64))
        self.register_buffer("flags", torch.tensor([True, False]))


def _trained():
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model.norm(model.lin(torch.randn(4, 3))).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_every_tensor_kind_round_trips_bit_for_bit(tmp_path):
    model, opt = _trained()
    ema = {k: (v * 0.5 if v.is_floating_point() else v.clone()) for k, v in model.state_dict().items()}
    meta = {"step": 7, "train_flops": 1.5e9, "elapsed_s": 2.25, "device": "cpu", "nested": {"a": [1, 2]}}
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, model.state_dict(), ema, opt.state_dict(), meta)
    weights, ema_back, opt_back, meta_back = load_checkpoint(path)
    assert meta_back == meta
    for saved, loaded in ((model.state_dict(), weights), (ema, ema_back)):
        assert saved.keys() == loaded.keys()
        for k in saved:
            assert loaded[k].dtype == saved[k].dtype and torch.equal(loaded[k], saved[k]), k
    want = opt.state_dict()
    assert opt_back["param_groups"] == json.loads(json.dumps(want["param_groups"]))  # betas: a list in JSON
    assert opt_back["state"].keys() == want["state"].keys() == {0, 1, 2, 3}
    for idx, entry in want["state"].items():
        assert opt_back["state"][idx].keys() == entry.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for name, value in entry.items():
            assert torch.equal(opt_back["state"][idx][name], value), (idx, name)
    twin = Tiny()
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    load_weights(twin, weights, path)
    check_optimizer(twin_opt, opt_back, path)
    twin_opt.load_state_dict(opt_back)
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), model.state_dict().values()))


def test_python_number_optimizer_state_is_stored_as_a_tensor(tmp_path):
    """An optimizer state entry that is a plain number (not a tensor) is written as a 0-d tensor."""
    model = Tiny()
    opt_state = {"state": {0: {"step": 3.0}}, "param_groups": [{"params": [0]}]}
    path = tmp_path / "ck.safetensors"
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(path, model.state_dict(), ema, opt_state, {"step": 1})
    _, _, back, _ = load_checkpoint(path)
    assert torch.equal(back["state"][0]["step"], torch.tensor(3.0))


def test_saving_copies_what_is_saved(tmp_path):
    """The file holds the values at the time of saving: non-contiguous views are written as their values."""
    state = {"a": torch.arange(6.0).reshape(2, 3).t(), "b": torch.ones(3)}
    ema = {"a": torch.zeros(3, 2), "b": torch.ones(3)}
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, state, ema, {"state": {}, "param_groups": []}, {"step": 0})
    state["b"].add_(1)
    weights, ema_back, _, _ = load_checkpoint(path)
    assert torch.equal(weights["a"], torch.arange(6.0).reshape(2, 3).t()) and torch.equal(weights["b"], torch.ones(3))
    assert torch.equal(ema_back["a"], torch.zeros(3, 2))


@pytest.mark.parametrize("content,kind", [(b"not a safetensors file", "SafetensorError"), (None, "FileNotFoundError")])
def test_an_unreadable_checkpoint_is_one_line(tmp_path, content, kind):
    path = tmp_path / "ck.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(IsynthError, match=f"^{re.escape(str(path))}: corrupt or unreadable checkpoint \\({kind}\\)$"):
        load_checkpoint(path)


@pytest.mark.parametrize("metadata", [{}, {"meta": "{}"}, {"meta": "{", "param_groups": "[]"}])
def test_a_checkpoint_without_its_metadata_is_refused(tmp_path, metadata):
    path = tmp_path / "ck.safetensors"
    save_file({"model/x": torch.zeros(1)}, path, metadata=metadata or None)
    with pytest.raises(IsynthError, match="corrupt or unreadable checkpoint"):
        load_checkpoint(path)


def test_unknown_tensor_groups_are_ignored(tmp_path):
    path = tmp_path / "ck.safetensors"
    save_file({"model/x": torch.zeros(1), "other/y": torch.ones(1), "ema/x": torch.ones(1)}, path,
              metadata={"meta": json.dumps({"step": 1}), "param_groups": "[]"})
    weights, ema, opt, meta = load_checkpoint(path)
    assert list(weights) == ["x"] and list(ema) == ["x"] and opt == {"state": {}, "param_groups": []}


def _own():
    return {"w": torch.zeros(2, 3), "n": torch.zeros(3, dtype=torch.int64)}


@pytest.mark.parametrize("state,message", [
    ({"w": torch.zeros(2, 3)}, "checkpoint does not match this run's config (weights: missing ['n'])"),
    ({**_own(), "z": torch.zeros(1), "y": torch.zeros(1), "x": torch.zeros(1)},
     "checkpoint does not match this run's config (weights: unexpected ['x', 'y'])"),
    ({"w": torch.zeros(3, 2), "n": torch.zeros(3, dtype=torch.int64)},
     "checkpoint does not match this run's config (weights: shape of w (3, 2) != (2, 3))"),
    ({"w": torch.zeros(2, 3, dtype=torch.float64), "n": torch.zeros(3, dtype=torch.int64)},
     "weights tensor w is torch.float64, the model's is torch.float32"),
    ({"w": torch.full((2, 3), float("nan")), "n": torch.zeros(3, dtype=torch.int64)},
     "weights tensor w holds non-finite values"),
    ({"w": torch.full((2, 3), float("-inf")), "n": torch.zeros(3, dtype=torch.int64)},
     "weights tensor w holds non-finite values"),
])
def test_a_mismatched_state_names_the_first_bad_tensor(state, message):
    with pytest.raises(IsynthError, match=f"^ck: {re.escape(message)}$"):
        check_state(_own(), state, "ck")


def test_missing_tensors_are_named_before_unexpected_ones_and_the_kind_is_said():
    with pytest.raises(IsynthError, match=re.escape("(EMA: missing ['n', 'w'])")):
        check_state(_own(), {"q": torch.zeros(1)}, "ck", "EMA")
    with pytest.raises(IsynthError, match=re.escape("(weights: missing ['a', 'b'])") + "$"):  # the first two
        check_state({**_own(), "a": torch.zeros(1), "b": torch.zeros(1)}, {}, "ck")
    check_state(_own(), _own(), "ck")  # a matching state passes, integer tensors with any values
    check_state({"i": torch.zeros(2, dtype=torch.int64)}, {"i": torch.tensor([2**40, -5])}, "ck")


def test_load_weights_refuses_before_it_changes_anything():
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    bad["lin.bias"] = torch.zeros(5)
    with pytest.raises(IsynthError, match=r"^ck: checkpoint does not match this run's config \(weights: shape of "
                                          r"lin\.bias \(5,\) != \(2,\)\)$"):
        load_weights(model, bad, "ck")
    with pytest.raises(IsynthError, match=r"^ck: EMA tensor lin\.bias holds non-finite values$"):
        load_weights(model, {**model.state_dict(), "lin.bias": torch.full((2,), float("nan"))}, "ck", "EMA")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _opt_state():
    model, opt = _trained()
    return opt, opt.state_dict()


def _edited(change):
    opt, state = _opt_state()
    state = {"state": {i: dict(e) for i, e in state["state"].items()}, "param_groups": state["param_groups"]}
    change(state)
    return opt, state


@pytest.mark.parametrize("change,message", [
    (lambda s: s.update(param_groups="x"), "optimizer state does not match this run's parameter groups"),
    (lambda s: s.update(param_groups=[{"params": [0, 1, 2]}]), "optimizer state does not match this run's parameter"),
    (lambda s: s["param_groups"].append({"params": []}), "optimizer state does not match this run's parameter groups"),
    (lambda s: s["state"].update({4: s["state"][0]}), "optimizer state for parameter 4, the run has 4"),
    (lambda s: s["state"].update({-1: s["state"][0]}), "optimizer state for parameter -1, the run has 4"),
    (lambda s: s["state"][0].update(exp_avg=torch.zeros(3)),
     "optimizer tensor 0/exp_avg (3,) does not fit parameter 0 (2, 3)"),
    (lambda s: s["state"][1].update(step=torch.zeros(1)), "optimizer tensor 1/step (1,) does not fit parameter 1 (2,)"),
    (lambda s: s["state"][1].update(momentum=torch.zeros(2)), "optimizer tensor 1/momentum (2,) does not fit"),
    (lambda s: s["state"][2].update(exp_avg_sq=torch.zeros(2, dtype=torch.float64)),
     "optimizer tensor 2/exp_avg_sq has dtype torch.float64 or non-finite values"),
    (lambda s: s["state"][2].update(step=torch.tensor(2, dtype=torch.int64)),
     "optimizer tensor 2/step has dtype torch.int64 or non-finite values"),
    (lambda s: s["state"][3].update(exp_avg=torch.full((2,), float("inf"))),
     "optimizer tensor 3/exp_avg has dtype torch.float32 or non-finite values"),
    (lambda s: s["state"][3].update(step=torch.tensor(float("nan"))), "optimizer tensor 3/step has dtype"),
])
def test_an_optimizer_state_that_does_not_fit_is_named(change, message):
    opt, state = _edited(change)
    with pytest.raises(IsynthError, match=f"^ck: {re.escape(message)}"):
        check_optimizer(opt, state, "ck")


def test_moments_take_their_parameters_dtype_and_the_step_is_float32():
    """AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype (here float64) and `step` in float32."""
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = torch.optim.AdamW([w])
    w.sum().backward()
    opt.step()
    state = opt.state_dict()
    assert state["state"][0]["exp_avg"].dtype == torch.float64 and state["state"][0]["step"].dtype == torch.float32
    check_optimizer(opt, state, "ck")
    state["state"][0]["exp_avg"] = state["state"][0]["exp_avg"].float()
    with pytest.raises(IsynthError, match=r"^ck: optimizer tensor 0/exp_avg has dtype torch\.float32"):
        check_optimizer(opt, state, "ck")


def test_a_fitting_optimizer_state_passes_also_with_a_parameter_not_yet_stepped():
    opt, state = _opt_state()
    check_optimizer(opt, state, "ck")
    del state["state"][3]
    check_optimizer(opt, state, "ck")


@pytest.mark.parametrize("meta,message", [
    ({"step": -1, "train_flops": 0, "elapsed_s": 0},
     "checkpoint metadata 'step' must be a finite integer >= 0, got -1"),
    ({"step": 2.0, "train_flops": 0, "elapsed_s": 0}, "'step' must be a finite integer >= 0, got 2.0"),
    ({"step": True, "train_flops": 0, "elapsed_s": 0}, "'step' must be a finite integer >= 0, got True"),
    ({"train_flops": 0, "elapsed_s": 0}, "'step' must be a finite integer >= 0, got None"),
    ({"step": 11, "train_flops": 0, "elapsed_s": 0}, "checkpoint step 11 is past this run's 10 steps"),
    ({"step": 3, "train_flops": "1e9", "elapsed_s": 0}, "'train_flops' must be a finite number >= 0, got '1e9'"),
    ({"step": 3, "train_flops": float("inf"), "elapsed_s": 0}, "'train_flops' must be a finite number >= 0, got inf"),
    ({"step": 3, "train_flops": -1.0, "elapsed_s": 0}, "'train_flops' must be a finite number >= 0, got -1.0"),
    ({"step": 3, "train_flops": 1.0, "elapsed_s": float("nan")}, "'elapsed_s' must be a finite number >= 0, got nan"),
    ({"step": 3, "train_flops": 1.0}, "'elapsed_s' must be a finite number >= 0, got None"),
    ([3], "'step' must be a finite integer >= 0, got None"),
])
def test_bad_metadata_is_named_with_its_value(meta, message):
    with pytest.raises(IsynthError, match=f"^ck: {re.escape(message)}$" if message.startswith("checkpoint") else
                       re.escape(message) + "$"):
        check_meta(meta, 10, "ck")


def test_good_metadata_is_returned_as_it_is():
    meta = {"step": 10, "train_flops": 0, "elapsed_s": 1.5, "device": "cpu"}
    assert check_meta(meta, 10, "ck") is meta
    assert check_meta({"step": 0, "train_flops": 2.5e12, "elapsed_s": 0.0}, 10, "ck")["step"] == 0


def test_config_changes_name_every_differing_field_dotted_and_sorted():
    a = {"model": {"width": 32, "depth": 2}, "paradigm": "ar", "train": {"lr": 1e-3}}
    b = {"model": {"width": 64, "depth": 2}, "paradigm": "rar", "sample": {"x": 1}, "train": {"lr": 1e-3}}
    assert config_changes(a, b) == ["model.width: 32 -> 64", "paradigm: 'ar' -> 'rar'", "sample: None -> {'x': 1}"]
    assert config_changes(a, a) == []
    assert config_changes({"m": {"k": {"z": 1}}}, {"m": {"k": {"z": 2}}}) == ["m.k.z: 1 -> 2"]


def test_stale_temporary_files_of_a_killed_write_are_removed(tmp_path):
    names = [f".{CONFIG}.abc.tmp", f".{CHECKPOINT}.x1.tmp", f".{LOG}.zz.tmp"]
    for n in names:
        (tmp_path / n).write_text("half")
    keep = [tmp_path / "other.tmp", tmp_path / CHECKPOINT, tmp_path / LOG]
    for p in keep:
        p.write_text("mine")
    remove_stale_temps(tmp_path)
    assert not any((tmp_path / n).exists() for n in names)
    assert all(p.exists() for p in keep)


def test_reading_a_run_config(tmp_path):
    with pytest.raises(IsynthError, match=f"^{re.escape(str(tmp_path))} is not an isynth run directory "
                                          r"\(no config\.json\)$"):
        read_config_dict(tmp_path)
    (tmp_path / CONFIG).write_text("{not json")
    with pytest.raises(IsynthError, match=r"config\.json: unreadable config \("):
        read_config_dict(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps({"model": {}}))
    with pytest.raises(IsynthError, match=r"config\.json: not an isynth config$"):
        read_config_dict(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps(["paradigm"]))
    with pytest.raises(IsynthError, match="not an isynth config"):
        read_config_dict(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps({"paradigm": "ar", "model": {"width": 8}}))
    assert read_config_dict(tmp_path) == {"paradigm": "ar", "model": {"width": 8}}
