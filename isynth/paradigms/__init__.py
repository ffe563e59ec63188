"""Registry of paradigms. Adding one = one file with a `Paradigm` subclass + one line here."""
from __future__ import annotations

from isynth.config import RunConfig
from isynth.errors import IsynthError
from isynth.paradigms.ar import AR, ARCont
from isynth.paradigms.base import Paradigm
from isynth.paradigms.diffusion import Diffusion
from isynth.paradigms.get import GET
from isynth.paradigms.mar import MAR
from isynth.paradigms.maskgit import MaskGIT
from isynth.paradigms.mdm import MDM
from isynth.paradigms.rar import RAR
from isynth.tokenizers import Tokenizer

PARADIGMS: dict[str, type[Paradigm]] = {cls.name: cls for cls in (AR, RAR, MaskGIT, MDM, MAR, ARCont, Diffusion, GET)}


def paradigm_class(name: str) -> type[Paradigm]:
    if name not in PARADIGMS:
        raise IsynthError(f"unknown paradigm {name!r}; choose one of {', '.join(PARADIGMS)}")
    return PARADIGMS[name]


def build_paradigm(run: RunConfig, tokenizer: Tokenizer, num_classes: int) -> Paradigm:
    cls = paradigm_class(run.paradigm)
    if cls.discrete is not None and cls.discrete != tokenizer.discrete:
        want = "a discrete tokenizer (tokenizer.kind=grey)" if cls.discrete else "a continuous tokenizer (tokenizer.kind=patch)"
        raise IsynthError(f"paradigm {run.paradigm!r} needs {want}")
    return cls(run, tokenizer, num_classes)
