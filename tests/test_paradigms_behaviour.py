"""The paradigm registry and the base contract: names, default runs per token family, the refusals of a
wrong tokenizer or config file, and what every paradigm inherits (forward is the loss, training progress,
the training data of a dataset)."""
from __future__ import annotations

import re

import pytest
import torch

from isynth.config import TokenizerConfig
from isynth.errors import IsynthError
from isynth.paradigms import PARADIGMS, build_paradigm, default_run, paradigm_class, run_from_dict
from isynth.paradigms.ar import AR, ARCont
from isynth.paradigms.base import Paradigm
from isynth.paradigms.diffusion import Diffusion
from isynth.paradigms.maskgit import MaskGIT
from isynth.presets import make_run
from isynth.trainer import build

NAMES = ["ar", "rar", "maskgit", "mdm", "mar", "ar-cont", "diffusion", "get"]


def test_the_registry_holds_every_paradigm_by_name():
    assert list(PARADIGMS) == NAMES
    assert all(paradigm_class(n).name == n for n in NAMES)
    with pytest.raises(IsynthError, match=f"^unknown paradigm 'gan'; choose one of {re.escape(', '.join(NAMES))}$"):
        paradigm_class("gan")


def test_default_runs_follow_the_paradigms_tokenizer_and_backbone_defaults():
    assert default_run("ar").tokenizer == TokenizerConfig() and default_run("ar").method.head is None
    cont = default_run("ar-cont")
    assert cont.tokenizer.kind == "patch" and cont.method.head is not None
    assert default_run("diffusion").model.adaln and not default_run("ar").model.adaln
    patch = default_run("mar", TokenizerConfig(kind="grey"))
    assert patch.tokenizer.kind == "grey" and patch.method.head is None and patch.paradigm == "mar"


@pytest.mark.parametrize("name,kind,want", [
    ("maskgit", "patch", "a discrete tokenizer (tokenizer.kind=grey)"),
    ("ar-cont", "grey", "a continuous tokenizer (tokenizer.kind=patch)"),
    ("diffusion", "grey", "a continuous tokenizer (tokenizer.kind=patch)"),
])
def test_a_wrong_token_family_is_refused_in_words(name, kind, want):
    with pytest.raises(IsynthError, match=f"^{re.escape(f'paradigm {name!r} needs {want}')}$"):
        default_run(name, TokenizerConfig(kind=kind))
    paradigm_class(name).check_tokens(kind != "grey")  # the right family passes


def test_build_paradigm_checks_the_tokenizer_it_is_given():
    setup = build(make_run("ar-cont", "tiny"), torch.device("cpu"))
    grey = build(make_run("ar", "tiny"), torch.device("cpu"))
    with pytest.raises(IsynthError, match="needs a continuous tokenizer"):
        build_paradigm(setup.run, grey.model.tokenizer, grey.dataset.conditions)
    model = build_paradigm(setup.run, setup.model.tokenizer, setup.dataset.conditions)
    assert isinstance(model, ARCont) and not isinstance(model, MaskGIT)


def test_config_dicts_round_trip_and_refuse_what_is_not_one():
    run = make_run("rar", "tiny", ["model.width=48", "method.order=scan"])
    assert run_from_dict(run.to_dict()) == run
    for other in (make_run("mar", "tiny", ["tokenizer.kind=grey"]), make_run("ar", "tiny", ["tokenizer.kind=patch"])):
        assert run_from_dict(other.to_dict()) == other  # the tokenizer's family decides the head sections
    with pytest.raises(IsynthError, match="unknown config field 'tokenizer.nope'"):
        run_from_dict({**run.to_dict(), "tokenizer": {"nope": 1}})
    for bad in ([], {"paradigm": 3}, {"model": {}}):
        with pytest.raises(IsynthError, match=r"^config\.json is not an isynth run config \(no paradigm\)$"):
            run_from_dict(bad)
    data = run.to_dict()
    del data["tokenizer"]
    with pytest.raises(IsynthError, match=r"^config is incomplete: no 'tokenizer'$"):
        run_from_dict(data)


@pytest.fixture(scope="module")
def ar():
    torch.manual_seed(0)
    return build(make_run("ar", "tiny", ["method.class_dropout=0"]), torch.device("cpu"))


def test_calling_a_paradigm_is_its_loss(ar):
    m = ar.model.train()
    tokens, labels = m.training_data(ar.dataset)
    torch.manual_seed(1)
    a = m(tokens[:4], labels[:4])
    torch.manual_seed(1)
    assert torch.equal(a, m.loss(tokens[:4], labels[:4]))


def test_the_training_data_is_the_tokenised_training_split(ar):
    m = ar.model
    tokens, labels = m.training_data(ar.dataset)
    assert tokens.shape == (len(ar.dataset.train_labels), m.seq_len)
    assert torch.equal(labels, torch.as_tensor(ar.dataset.train_labels))
    assert torch.equal(tokens[:5], m.tokenizer.encode(torch.as_tensor(ar.dataset.train_images[:5])))


def test_progress_counts_and_helpers():
    m = build(make_run("ar", "tiny"), torch.device("cpu")).model  # a fresh model: no progress told yet
    assert (m.train_step, m.total_steps) == (0, 1)
    m.set_progress(7, 30)
    assert (m.train_step, m.total_steps) == (7, 30)
    assert m.num_params() == sum(p.numel() for p in m.parameters()) > 0
    assert m.device == torch.device("cpu")
    assert m.num_classes == 10 and m.seq_len == 64
    assert m.nll_bits_per_token(torch.zeros(1, 64, dtype=torch.long), torch.zeros(1, dtype=torch.long)) is not None


def test_paradigms_without_an_exact_likelihood_say_so():
    m = build(make_run("maskgit", "tiny"), torch.device("cpu")).model
    assert m.nll_bits_per_token(torch.zeros(1, 64, dtype=torch.long), torch.zeros(1, dtype=torch.long)) is None


def test_the_base_contract_is_abstract(ar):
    base = Paradigm(ar.run, ar.model.tokenizer, ar.dataset.conditions)
    for call in (lambda: base.loss(None, None), lambda: base.train_flops_per_sample(), lambda: base.sample_flops(None),
                 lambda: base.num_network_evals(None), lambda: base.unconditional_passes(None),
                 lambda: Paradigm.sections(True)):
        with pytest.raises(NotImplementedError):
            call()
    base.validate_training(ar.dataset)  # nothing to check by default


def test_flow_paradigms_draw_noise_of_the_token_grid():
    setup = build(make_run("diffusion", "tiny"), torch.device("cpu"))
    m = setup.model.eval()
    assert isinstance(m, Diffusion) and m.token_dim == m.tokenizer.token_dim == 1
    a = m.sample(torch.tensor([0, 1]), m.run.sample, torch.Generator().manual_seed(0))
    noise = torch.randn(2, m.seq_len, m.token_dim, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, m.sample_from(noise, torch.tensor([0, 1]), m.run.sample))
    assert AR.per_token_head and not Diffusion.per_token_head

