"""`isynth flops`: parameters and FLOPs of a paradigm at a preset, built on the meta device (no memory)."""
from __future__ import annotations

import dataclasses

import torch

from isynth.backbone import Transformer
from isynth.conditions import Conditions
from isynth.data import load_dataset
from isynth.errors import IsynthError
from isynth.overrides import apply
from isynth.paradigms import build_paradigm, paradigm_class
from isynth.paradigms.ar import ARSampling
from isynth.presets import make_run
from isynth.tokenizers.build import build_tokenizer
from isynth.tokenizers.fixed import ShapeOnly


def flops_report(paradigm: str, preset: str, overrides: list[str], seq_len: int | None = None,
                 vocab_size: int | None = None, num_classes: int | None = None, token_dim: int | None = None) -> dict:
    run = make_run(paradigm, preset, overrides)
    if seq_len is not None:
        if (seq_len <= 0 or (vocab_size is not None and vocab_size < 2) or (num_classes is not None and num_classes < 1)
                or (token_dim is not None and token_dim < 1)):
            raise IsynthError("--seq-len must be > 0, --vocab-size >= 2, --num-classes >= 1 and --token-dim >= 1")
        if run.tokenizer.kind == "grey":
            if token_dim is not None:
                raise IsynthError("--token-dim is for continuous tokens (tokenizer.kind=patch)")
            tokenizer = ShapeOnly(seq_len, vocab_size or run.tokenizer.levels)
        else:
            if vocab_size is not None:
                raise IsynthError("--vocab-size is for discrete tokens (tokenizer.kind=grey)")
            tokenizer = ShapeOnly(seq_len, 0, token_dim or 16, discrete=False)
        classes = Conditions.classes(num_classes or 1000)
    else:
        if vocab_size is not None or num_classes is not None or token_dim is not None:
            raise IsynthError("--vocab-size, --num-classes and --token-dim go with --seq-len")
        dataset = load_dataset(run.data)
        tokenizer, classes = build_tokenizer(run.tokenizer, dataset.image_shape), dataset.conditions
    with torch.device("meta"):
        model = build_paradigm(run, tokenizer, classes)
    s = run.sample
    variants = {"as_configured": model.sample_flops(s)}
    changes = {}
    if paradigm_class(paradigm).guided:
        changes["no_cfg"] = {"guidance.scale": 1.0}
    if isinstance(s, ARSampling):
        changes["no_kv_cache"] = {"kv_cache": False}
        changes["no_kv_cache_no_cfg"] = {"kv_cache": False, "guidance.scale": 1.0}
    for name, change in changes.items():
        variants[name] = model.sample_flops(apply(s, change, "sample."))
    return {
        "paradigm": paradigm,
        "preset": preset,
        "params": model.num_params(),
        "backbone_params": sum(m.param_count() for m in model.modules() if isinstance(m, Transformer)),
        "width": run.model.width,
        "depth": run.model.depth,
        "num_heads": run.model.num_heads,
        "seq_len": tokenizer.seq_len,
        "vocab_size": tokenizer.vocab_size,
        "token_dim": tokenizer.token_dim,
        "train_flops_per_sample": model.train_flops_per_sample(),
        # the tokenizer's own compute, apart from the generator's: encoding once per training image (cached
        # with `isynth tokenize`), decoding once per sample
        "tokenizer": {"kind": run.tokenizer.kind, "encode_flops_per_image": tokenizer.encode_flops(),
                      "decode_flops_per_image": tokenizer.decode_flops()},
        "sample_flops_per_image": variants["as_configured"],
        "sample_flops_per_image_variants": variants,
        "nfe": model.num_network_evals(s),
        "sampling": dataclasses.asdict(s),
    }
