"""`isynth claim`: the command line of the published claims (claimlist.py, claimrun.py)."""
from __future__ import annotations

from pathlib import Path

import click

from isynth.claimlist import CLAIMS
from isynth.claimreport import write_claim_report
from isynth.claimrun import run_claim
from isynth.errors import IsynthError


@click.command()
@click.argument("claim_id", required=False)
@click.option("--list", "list_", is_flag=True, help="Print the claims and exit.")
@click.option("--seeds", type=int, default=3, show_default=True, help="Seeds 0..N-1 per arm.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run directory (default runs/claims/ID).")
@click.option("--preset", default=None, help="Model preset instead of the claim's (e.g. tiny, for a smoke test).")
@click.option("--flops", type=float, default=None, help="Training FLOPs instead of the claim's (per-arm ratios kept).")
@click.option("--num-samples", type=int, default=None, help="Samples per evaluation (default: the claim's).")
@click.option("--report", "report_only", is_flag=True,
              help="Only redraw the figure and report.html from an existing verdict.json.")
@click.option("--quiet", is_flag=True)
def claim(claim_id, list_, seeds, out, preset, flops, num_samples, report_only, quiet):
    """Re-measure a published claim at small scale and print its verdict with the effect's 95% interval."""
    if list_:
        for c in CLAIMS.values():
            click.echo(f"{c.id:4s} {c.paper}: {c.statement} ({len(c.arms)} arms, {c.budget:.2g} FLOPs each)")
        return
    if claim_id is None:
        raise IsynthError("name a claim (isynth claim --list shows them)")
    if claim_id not in CLAIMS:
        raise IsynthError(f"unknown claim {claim_id!r}; choose one of {', '.join(CLAIMS)}")
    if not 1 <= seeds <= 100:
        raise IsynthError(f"--seeds must be between 1 and 100, got {seeds}")
    c = CLAIMS[claim_id]
    if report_only:
        click.echo(write_claim_report(c, out or Path("runs/claims") / claim_id))
        return
    v = run_claim(c, out or Path("runs/claims") / claim_id, list(range(seeds)), preset, flops, progress=not quiet,
                  num_samples=num_samples)
    click.echo(f"{c.id} ({c.paper}): {c.statement}")
    for t in v["tests"]:
        lo, hi = t["ci"]
        click.echo(f"  {t['verdict']:13s} {t['test']}: effect {t['effect']:+.4g} [{lo:+.4g}, {hi:+.4g}]"
                   + (f" (threshold {t['threshold']:+.4g})" if t["threshold"] else ""))
    click.echo(f"verdict: {v['verdict']} at seeds {v['seeds']}")
