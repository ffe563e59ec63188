"""The registry of paradigms, and the configs and models built from a name. Adding a paradigm = one file with
a `Paradigm` subclass + one line here."""
from __future__ import annotations

from isynth.conditions import Conditions
from isynth.config import ModelConfig, RunConfig, TokenizerConfig
from isynth.errors import IsynthError
from isynth.overrides import merge
from isynth.paradigms.ar import AR, ARCont
from isynth.paradigms.base import Paradigm
from isynth.paradigms.diffusion import Diffusion
from isynth.paradigms.get import GET
from isynth.paradigms.mar import MAR
from isynth.paradigms.maskgit import MaskGIT
from isynth.paradigms.mdm import MDM
from isynth.paradigms.rar import RAR
from isynth.tokenizers.base import Tokenizer

PARADIGMS: dict[str, type[Paradigm]] = {cls.name: cls for cls in (AR, RAR, MaskGIT, MDM, MAR, ARCont, Diffusion, GET)}


def paradigm_class(name: str) -> type[Paradigm]:
    if name not in PARADIGMS:
        raise IsynthError(f"unknown paradigm {name!r}; choose one of {', '.join(PARADIGMS)}")
    return PARADIGMS[name]


def default_run(name: str, tokenizer: TokenizerConfig | None = None) -> RunConfig:
    """The run of paradigm `name` with every section at its default, for `tokenizer` (default: the
    paradigm's own), whose family (discrete or continuous) decides the token head's sections."""
    cls = paradigm_class(name)
    tokenizer = tokenizer or cls.default_tokenizer
    cls.check_tokens(tokenizer.discrete)
    method, sample = cls.sections(tokenizer.discrete)
    return RunConfig(paradigm=name, method=method, sample=sample, model=ModelConfig(**cls.model_defaults),
                     tokenizer=tokenizer)


def run_from_dict(data: object) -> RunConfig:
    """The RunConfig saved in a run's config.json, every value checked against the paradigm's sections."""
    if not isinstance(data, dict) or not isinstance(data.get("paradigm"), str):
        raise IsynthError("config.json is not an isynth run config (no paradigm)")
    if "tokenizer" not in data:
        raise IsynthError("config is incomplete: no 'tokenizer'")
    tokenizer = merge(TokenizerConfig(), data["tokenizer"], "tokenizer.")
    return merge(default_run(data["paradigm"], tokenizer), data)


def build_paradigm(run: RunConfig, tokenizer: Tokenizer, conditions: Conditions) -> Paradigm:
    cls = paradigm_class(run.paradigm)
    cls.check_tokens(tokenizer.discrete)
    return cls(run, tokenizer, conditions)
