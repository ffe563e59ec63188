"""`isynth claim`: the verdict rule against hand-made effects, every claim's runs buildable at its own
settings, and every claim's command at a tiny budget giving a well-formed verdict."""
from __future__ import annotations

import json

import numpy as np
import pytest
from clitools import assert_error, ok, run_cli, run_many

from isynth.claimlist import CLAIMS
from isynth.claimrun import plan
from isynth.claims import Arm, Claim, Test, compare, judge, overall, slope

VERDICT_KEYS = {"claim", "paper", "statement", "verdict", "tests", "seeds", "wall_s", "preset", "runs", "values"}


def test_compare_is_a_paired_t_interval_oriented_by_the_metric():
    a, b = {0: 10.0, 1: 11.0, 2: 12.0}, {0: 20.0, 1: 21.5, 2: 22.0}  # FD: lower is better, A better by ~10
    r = compare(a, b, "fd")
    d = np.array([10.0, 10.5, 10.0])
    half = 4.302653 * d.std(ddof=1) / np.sqrt(3)  # t(0.975, 2)
    assert r["effect"] == pytest.approx(d.mean()) and r["ci"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert r["verdict"] == "supported"
    assert compare(b, a, "fd")["verdict"] == "not supported"
    assert compare({0: 0.9, 1: 0.5}, {0: 0.6, 1: 0.7}, "class_accuracy")["verdict"] == "unresolved"
    assert compare({0: 1.0}, {0: 2.0}, "fd")["verdict"] == "unresolved"  # one seed: no interval


def test_non_inferiority_and_slope():
    every, interval = {0: 50.0, 1: 52.0, 2: 51.0}, {0: 51.0, 1: 53.5, 2: 52.0}  # 2% worse
    assert compare(interval, every, "fd", margin=0.1)["verdict"] == "supported"
    assert compare(interval, every, "fd")["verdict"] == "not supported"  # strictly better: no
    assert compare({0: 80.0, 1: 90.0, 2: 85.0}, every, "fd", margin=0.1)["verdict"] == "not supported"
    rng = np.random.default_rng(0)
    pts = [(x, 100 - 20 * np.log10(x / 1e12) + rng.normal(0, 1)) for x in (1e12, 3e12, 1e13) for _ in range(3)]
    assert slope(pts, "fd")["verdict"] == "supported"
    assert slope([(x, -y) for x, y in pts], "fd")["verdict"] == "not supported"
    assert overall(["supported", "unresolved"]) == "unresolved"
    assert overall(["supported", "not supported"]) == "not supported"
    assert overall(["supported", "supported"]) == "supported"


def test_judge_combines_the_tests():
    c = Claim("X", "paper", "a beats b and c", arms=(Arm("a", "ar"), Arm("b", "ar"), Arm("c", "ar")),
              tests=(Test("a", "b"), Test("a", "c")), budget=1e12)
    rows = lambda *fds: {s: {"fd": fd} for s, fd in enumerate(fds)}  # noqa: E731
    v = judge(c, {"a": rows(1, 2, 3), "b": rows(5, 6, 7.5), "c": rows(1.5, 1, 4)})
    assert [t["verdict"] for t in v["tests"]] == ["supported", "unresolved"] and v["verdict"] == "unresolved"


@pytest.mark.parametrize("claim_id", list(CLAIMS))
def test_every_claim_builds_at_its_own_settings(claim_id):
    c = CLAIMS[claim_id]
    p = plan(c)
    assert sum(len(r["arms"]) for r in p["runs"].values()) == len(c.arms)
    assert (p["teacher"] is not None) == any(a.paradigm == "get" for a in c.arms)
    for r in p["runs"].values():
        assert r["run"].train.train_flops > 0 and len(r["samplings"]) == len(r["arms"])


def test_get_pairing_claims_as_stated_and_as_isynth_trains():
    """C10: GET's setting (unconditional teacher and student, constant learning rate, no warm-up); C11:
    isynth's class-conditional recipe with the cosine schedule."""
    stated, ours = plan(CLAIMS["C10"]), plan(CLAIMS["C11"])
    assert not stated["teacher"].method.class_cond and stated["teacher"].sample.guidance.scale == 1
    for r in stated["runs"].values():
        t = r["run"].train
        assert not r["run"].method.class_cond and t.lr_schedule == "constant" and t.warmup_fraction == 0
    assert ours["teacher"].method.class_cond
    assert all(r["run"].method.class_cond and r["run"].train.lr_schedule == "cosine" for r in ours["runs"].values())


def test_rar_scan_claim_covers_table_3():
    arms = {r["run"].method.scan for r in plan(CLAIMS["C3"])["runs"].values()}
    assert arms == {"raster", "spiral-in", "spiral-out", "z-curve", "subsample", "alternate"}


@pytest.mark.slow
def test_every_claim_command_at_a_tiny_budget(tmp_path):
    """One seed (so every verdict is `unresolved`, by the rule) and a tiny model: the command runs every
    arm, evaluates it and writes a well-formed verdict; C5 at two seeds gives an interval."""
    flops = {"C9": "1e10"}  # its smallest arm has a quarter of the budget
    commands = [("claim", cid, "--preset", "tiny", "--flops", flops.get(cid, "2e9"),
                 "--seeds", "2" if cid == "C5" else "1", "--num-samples", "40", "--quiet", "--out", tmp_path / cid)
                for cid in CLAIMS]
    for cid, result in zip(CLAIMS, run_many(commands)):
        ok(result)
        v = json.loads((tmp_path / cid / "verdict.json").read_text())
        assert VERDICT_KEYS <= v.keys() and v["claim"] == cid
        assert (tmp_path / cid / "report.html").is_file() and (tmp_path / cid / "arms.png").is_file()
        assert len(v["tests"]) == len(CLAIMS[cid].tests)
        assert result.stdout.strip().splitlines()[-1].startswith("verdict: ")
        if cid != "C5":
            assert v["verdict"] == "unresolved" and v["seeds"] == [0]
    c5 = json.loads((tmp_path / "C5" / "verdict.json").read_text())
    flops = next(t for t in c5["tests"] if t["metric"] == "sample_flops_per_image")
    assert flops["verdict"] == "supported" and flops["ci"][0] == flops["ci"][1] > 0  # fewer passes: exact


def test_claim_bad_input(tmp_path):
    assert_error(run_cli("claim", "C9", "--preset", "tiny", "--flops", "2e9", "--out", tmp_path / "c9"),
                 "less than one step")
    assert not (tmp_path / "c9").exists()
    assert_error(run_cli("claim", "C99"), "unknown claim", "C1")
    assert_error(run_cli("claim"), "isynth claim --list")
    assert_error(run_cli("claim", "C1", "--seeds", "0"), "--seeds")
    assert_error(run_cli("claim", "C1", "--flops", "inf"), "--flops")
    assert "C10" in ok(run_cli("claim", "--list")).stdout
    assert_error(run_cli("claim", "C4", "--report", "--out", tmp_path / "none"), "no verdict.json", "isynth claim C4")
