"""Kill-point fault injection in the suite: each command that writes results, killed (os._exit, no cleanup)
just before and just after a commit in the middle of its work and at its last one, then run again, reaches
the results of an uninterrupted run with nothing left over (every kill point: `python tests/faultinjection.py`,
figures in BENCHMARKS.md)."""
from __future__ import annotations

import os

import pytest
from faultinjection import check_scenario, prepare_shared, scenarios

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setting(tmp_path_factory, cache):
    base = tmp_path_factory.mktemp("faults")
    env = dict(os.environ, ISYNTH_CACHE=str(cache), OMP_NUM_THREADS="1")
    prepare_shared(env, base / "shared")
    return env, base, {sc.name: sc for sc in scenarios(base / "shared")}


@pytest.mark.parametrize("name", ["train", "sample", "pairs", "tokenize", "eval"])
def test_a_killed_command_run_again_gives_the_uninterrupted_results(setting, name):
    env, base, by_name = setting
    result = check_scenario(env, base, by_name[name], points=[(2, "before"), (-1, "before"), (-1, "after")])
    assert result["commits"] >= 3, result["commits"]
    for o in result["outcomes"]:
        where = f"{name} killed {o['when']} commit {o['k']} of {result['commits']}"
        assert o["killed"], f"{where}: the kill point was never reached"
        assert not o["torn"], f"{where}: left {o['torn']}"
        assert o["rerun_ok"], f"{where}: the rerun failed: {o['stderr']}"
        assert o["same"], f"{where}: the rerun's results differ from an uninterrupted run's"
