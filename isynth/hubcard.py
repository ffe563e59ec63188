"""The model card (`README.md`) of an exported folder: YAML front matter the Hugging Face Hub reads, then what
the model is, what it cost to train and costs to sample, how well it scored and the command that made it."""
from __future__ import annotations

import dataclasses
import json
import math

from isynth.conditions import Conditions
from isynth.paradigms.base import Paradigm

LICENSE = "mit"  # pyproject's license, which the weights are published under too
# The Hub has no class-conditional task; the closest pipeline tag is unconditional generation, and a tag
# says when the model takes a class.
PIPELINE_TAG = "unconditional-image-generation"
PAPERS = {
    "ar": "next-token prediction over a raster scan (LlamaGen; Kilian et al. 2024)",
    "rar": "randomized autoregression, random order annealed to a scan (RAR, Yu et al. 2024)",
    "maskgit": "masked generative transformer, parallel decoding by confidence (MaskGIT, Chang et al. 2022)",
    "mdm": "masked diffusion in eMIGM's design space (You et al. 2025)",
    "mar": "masked autoregression in random order (MAR, Li et al. 2024; Fluid)",
    "ar-cont": "raster autoregression on continuous tokens with a diffusion head (Fluid, Fan et al. 2024)",
    "diffusion": "flow matching / rectified flow (SD3, DiT; Kilian et al. 2024)",
    "get": "one-step Generative Equilibrium Transformer distilled from a flow teacher (GET, Geng et al. 2023)",
}
MAX_VALUES = 12  # attribute values listed on the card before "..."
MAX_HELDOUT = 3  # held-out classes described on the card


def _flops(x: float) -> str:
    return f"{x:.3g}" if x else "0"


def _value(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, (dict, list)):
        return f"`{json.dumps(v, sort_keys=True)}`"
    return f"`{v}`" if isinstance(v, str) else str(v)


def _front_matter(model: Paradigm, dataset_name: str) -> str:
    tags = ["isynth", "image-generation", model.run.paradigm, f"tokenizer-{model.run.tokenizer.kind}", dataset_name]
    if model.conditions.num_classes > 1:
        tags.append("class-conditional")
    return "\n".join(["---", "library_name: isynth", f"license: {LICENSE}", f"pipeline_tag: {PIPELINE_TAG}",
                      "tags:", *(f"- {t}" for t in tags), "---"])


def _conditions(c: Conditions) -> list[str]:
    lines = []
    for name, values in zip(c.names, c.values):
        shown = ", ".join(values[:MAX_VALUES]) + (f", ... ({len(values)} values)" if len(values) > MAX_VALUES else "")
        lines.append(f"- `{name}`: {shown}")
    if c.heldout:
        shown = "; ".join(c.describe(i) for i in c.heldout[:MAX_HELDOUT])
        lines.append(f"- {len(c.heldout)} classes held out of training (asking for them measures composition), "
                     f"e.g. {shown}; `config.json` lists them all")
    return lines


def _metrics(metrics: dict | None, step: int) -> list[str]:
    if metrics is None:
        return ["No metrics: the run had no `metrics.json` when it was exported (`isynth eval RUN` writes one)."]
    lines = []
    if metrics.get("step") != step:
        lines += [f"Measured at step {metrics.get('step')}; the exported weights are of step {step}.", ""]
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_value(v)} |" for k, v in metrics.items()]
    return lines


def model_card(model: Paradigm, meta: dict, dataset_name: str, metrics: dict | None, commands: list[str],
               folder_name: str) -> str:
    """The card's Markdown. `meta` is the checkpoint's (step, total_steps, train_flops, elapsed_s), `metrics`
    the run's metrics.json or None, `commands` the `isynth train` lines that made the run (none recorded
    for runs made before isynth recorded them)."""
    run, s, tok = model.run, model.run.sample, model.tokenizer
    m = run.model
    h, w, c = tok.image_shape
    tokens = f"{tok.vocab_size} ids" if tok.discrete else f"vectors of {tok.token_dim}"
    lines = [
        _front_matter(model, dataset_name), "",
        f"# isynth `{run.paradigm}` on {dataset_name} ({h}x{w}x{c})", "",
        f"`{run.paradigm}`: {PAPERS.get(run.paradigm, run.paradigm)}. Trained with isynth, which trains every "
        "paradigm on one shared transformer and compares them at equal training FLOPs; the weights are the "
        "training run's EMA weights.", "",
        "## Model", "",
        f"- paradigm: `{run.paradigm}`; backbone: {m.depth} blocks of width {m.width}, {m.num_heads} heads, "
        f"MLP ratio {m.mlp_ratio:g}{', adaLN' if m.adaln else ''}",
        f"- parameters: {model.num_params():,}",
        f"- tokenizer: `{run.tokenizer.kind}`, a {tok.grid[0]}x{tok.grid[1]} grid of {tokens}; "
        f"encode {_flops(tok.encode_flops())} / decode {_flops(tok.decode_flops())} FLOPs per image "
        "(not in the generator's counts)",
        f"- conditions ({model.conditions.num_classes} classes):", *(f"  {x}" for x in _conditions(model.conditions)),
        "", "## Training", "",
        f"- steps: {meta['step']} of {meta['total_steps']} (batch {run.train.batch_size}); "
        f"training FLOPs: {_flops(meta['train_flops'])}; time: {meta['elapsed_s']:.1f} s",
        f"- training FLOPs per sample: {_flops(model.train_flops_per_sample())} (matmul FLOPs of the forward "
        "and backward pass, analytic)",
        "", "## Sampling", "",
        f"- with the run's sampling settings: {_flops(model.sample_flops(s))} FLOPs per image, NFE "
        f"{model.num_network_evals(s)} ({model.unconditional_passes(s)} of them with the unconditional pass)",
        f"- settings: `{json.dumps(dataclasses.asdict(s), sort_keys=True)}`",
        "", "## Metrics", "", *_metrics(metrics, meta["step"]),
        "", "## How it was made", "",
    ]
    if commands:
        lines += ["```bash", *commands, "```"]
    else:
        lines += ["The command is unknown: the run was made before isynth recorded its training command "
                  "(or in-process, e.g. by `isynth compare` or `isynth sweep`, which record theirs in their own "
                  "directory)."]
    lines += [
        "", "The full configuration is in `config.json` (the `export` section holds the image shape, the "
        "conditions and the checkpoint the weights came from).", "",
        "## Use", "",
        "```python", "import torch", "import isynth", "",
        f'model = isynth.from_pretrained("{folder_name}")  # a folder, or a Hub repository id',
        "tokens = model.sample(torch.tensor([0, 1]), model.run.sample)",
        "images = model.tokenizer.decode(tokens)  # uint8 (B, H, W, C)", "```", "",
        "```bash", f"isynth sample {folder_name} --num-samples 100 --out samples.npz", "```", "",
    ]
    return "\n".join(lines)
