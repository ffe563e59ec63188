"""The figure and HTML report of an `isynth claim` run, rendered from its `verdict.json` and run directories
(so `isynth claim ID --report` can redraw them without training anything)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from isynth.claims import Claim
from isynth.errors import IsynthError
from isynth.figures import claim_arms
from isynth.files import read_json
from isynth.report import ReportData, environment, write_report

VERDICT, REPORT, FIGURE = "verdict.json", "report.html", "arms"
METRICS = ("fd", "class_accuracy")


def _spread(xs: list[float]) -> str:
    a = np.array([x for x in xs if x is not None], dtype=float)
    if not len(a):
        return "-"
    return f"{a.mean():.4g} ± {a.std(ddof=1):.2g}" if len(a) > 1 else f"{a.mean():.4g}"


def write_claim_report(claim: Claim, out: Path) -> Path:
    """`out/arms.png|svg` (each arm per seed) and `out/report.html` from `out/verdict.json`."""
    out = Path(out)
    if not (out / VERDICT).is_file():
        raise IsynthError(f"{out} has no {VERDICT}: run `isynth claim {claim.id}` first")
    v = read_json(out / VERDICT, "claim verdict")
    if not isinstance(v, dict) or v.get("claim") != claim.id:
        raise IsynthError(f"{out / VERDICT} is not the verdict of claim {claim.id}")
    figures = claim_arms(v["values"], METRICS, out / FIGURE)
    tests = [[t["test"], f"{t['effect']:+.4g}", f"[{t['ci'][0]:+.4g}, {t['ci'][1]:+.4g}]", t["verdict"]]
             for t in v["tests"]]
    arms = [[arm, *(_spread([r.get(m) for r in rows.values()]) for m in (*METRICS, "sample_flops_per_image")),
             ", ".join(v["runs"][arm])] for arm, rows in v["values"].items()]
    seed0 = {d[0] for d in v["runs"].values()}
    grids = [(d, out / d / "samples.png") for d in sorted(seed0) if (out / d / "samples.png").is_file()]
    configs = {d: json.loads((out / d / "config.json").read_text()) for d in sorted(seed0)
               if (out / d / "config.json").is_file()}
    seeds = v["seeds"]
    command = f"isynth claim {claim.id} --seeds {len(seeds)} --out {out}"
    if v.get("preset") != claim.preset:
        command += f" --preset {v['preset']}"
    if v.get("budget_scale", 1.0) != 1.0:
        command += f" --flops {claim.budget * v['budget_scale']:.3g}"
    data = ReportData(
        title=f"{claim.id}: {claim.paper}",
        summary=[f"Claim: {claim.statement}.",
                 f"Verdict: {v['verdict']} at seeds {', '.join(map(str, seeds))} (each test: the paired difference "
                 "over seeds with its 95% Student-t interval; positive means the first arm is better).",
                 f"Each arm: {v['preset']} preset, {claim.budget * v.get('budget_scale', 1.0):.3g} training FLOPs "
                 f"unless its name says otherwise, {claim.num_samples} samples; {v['wall_s'] / 60:.1f} min in all."],
        tables=[("Tests", ["test", "effect", "95% CI", "verdict"], tests),
                ("Arms (mean ± sample s.d. over seeds)", ["arm", "FD", "class accuracy", "sampling FLOPs/img",
                                                          "runs"], arms)],
        figures=[("Each arm at every seed (dots) and their mean (bar)", figures[0])],
        grids=grids, commands=[command], configs=configs, environment=environment())
    return write_report(out / REPORT, data)
