"""`isynth claim ID`: run a claim's arms for each seed (ordinary run directories under --out; re-running
resumes), evaluate them with the same code as `isynth eval`, and write the verdict (isynth.claims) to
`verdict.json`, with a figure and an HTML report (isynth.claimreport).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from isynth.claimreport import write_claim_report
from isynth.claims import Claim, judge
from isynth.errors import IsynthError
from isynth.files import atomic_write_text
from isynth.overrides import apply, dataset_overrides
from isynth.presets import make_run
from isynth.sweep import sampling_variant, teacher_pairs, train_and_evaluate
from isynth.trainer import build, train

VERDICT, TEACHER, NUM_PAIRS = "verdict.json", "teacher", 2048


def plan(claim: Claim, preset: str | None = None, budget: float | None = None) -> dict:
    """The claim's distinct training runs (arms that differ only in sampling share one), named after their
    first arm, each with its config, arms and their samplers; and the `diffusion` teacher where a `get` arm
    needs pairs. `budget` rescales every arm's training FLOPs by budget / the claim's own."""
    preset = preset or claim.preset
    scale = (budget or claim.budget) / claim.budget
    data = dataset_overrides(claim.dataset)

    def config(paradigm: str, overrides: tuple[str, ...], flops: float):
        return make_run(paradigm, preset, [*data, *overrides, f"train.train_flops={flops}", "train.max_steps=none"])

    runs: dict[tuple, dict] = {}
    for arm in claim.arms:
        key = (arm.paradigm, arm.overrides, (arm.budget or claim.budget) * scale)
        runs.setdefault(key, {"name": arm.name, "arms": [], "run": config(*key)})["arms"].append(arm)
    for r in runs.values():  # unknown sampler fields fail here, before anything runs
        r["samplings"] = [sampling_variant(r["run"], " ".join(a.sampling)) for a in r["arms"]]
    needs_teacher = any(k[0] == "get" for k in runs)
    teacher = config("diffusion", claim.teacher, claim.budget * scale) if needs_teacher else None
    return {"runs": runs, "teacher": teacher}


def run_claim(claim: Claim, out: Path, seeds: list[int], preset: str | None = None, budget: float | None = None,
              progress: bool = True, num_samples: int | None = None) -> dict:
    if not seeds or any(not (isinstance(s, int) and 0 <= s < 2**31) for s in seeds):
        raise IsynthError(f"--seeds must be at least one integer in [0, 2^31), got {seeds}")
    if budget is not None and not (budget > 0 and budget < float("inf")):
        raise IsynthError(f"--flops must be a finite number > 0, got {budget}")
    if num_samples is not None and num_samples < 1:
        raise IsynthError(f"--num-samples must be >= 1, got {num_samples}")
    out = Path(out)
    p = plan(claim, preset, budget)
    for run in [r["run"] for r in p["runs"].values()] + ([p["teacher"]] if p["teacher"] is not None else []):
        with torch.device("meta"):  # shapes only: data and budgets (e.g. less than one step) fail before any run
            build(run, torch.device("meta"), check_data=run.paradigm != "get")
    values: dict[str, dict[int, dict]] = {a.name: {} for a in claim.arms}
    t0 = time.perf_counter()
    for seed in seeds:
        pairs_dir, cost = out / "pairs" / f"s{seed}", {}
        if p["teacher"] is not None:  # get's pairs come from a diffusion teacher of the same seed and budget
            teacher_dir = out / f"{TEACHER}-s{seed}"
            train(apply(p["teacher"], {"train.seed": seed}), teacher_dir, progress=False)
            cost = teacher_pairs(teacher_dir, pairs_dir, NUM_PAIRS, progress=False)
        for r in p["runs"].values():
            is_get = r["run"].paradigm == "get"
            run = apply(r["run"], {"train.seed": seed} | ({"method.pairs": str(pairs_dir.resolve())} if is_get else {}))
            rows = train_and_evaluate(run, out / f"{r['name']}-s{seed}", r["samplings"],
                                      num_samples or claim.num_samples, seed=seed, extra=cost if is_get else None)
            for arm, row in zip(r["arms"], rows):
                values[arm.name][seed] = row
                if progress:
                    click.echo(f"{claim.id} {arm.name} seed {seed}: FD {row['fd']:.2f}, class acc "
                               f"{row['class_accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)", err=True)
    dirs = {a.name: r["name"] for r in p["runs"].values() for a in r["arms"]}
    verdict = judge(claim, values) | {
        "seeds": seeds, "wall_s": time.perf_counter() - t0, "preset": preset or claim.preset,
        "budget_scale": (budget or claim.budget) / claim.budget,
        "runs": {a: [f"{dirs[a]}-s{s}" for s in seeds] for a in dirs},
        "values": {a: {str(s): {k: row.get(k) for k in ("fd", "class_accuracy", "sample_flops_per_image",
                                                          "train_flops", "step")} for s, row in v.items()}
                   for a, v in values.items()}}
    atomic_write_text(out / VERDICT, json.dumps(verdict, indent=2) + "\n")
    write_claim_report(claim, out)
    return verdict
