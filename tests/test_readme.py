"""The README's commands, run as written except for the budget (tiny preset, a few steps).

If the README changes, these tests follow it: the commands are parsed from its fenced blocks, so a
command that stops working (or a rewrite that no longer applies) fails here.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from clitools import ENV, TIMEOUT_S

from isynth.cli import cli
from isynth.paradigms import PARADIGMS
from isynth.sweepcommand import build_grid
from isynth.sweepgrid import parse_shard

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    """The text of README section `## title` up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", README, flags=re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def fenced(text: str, lang: str) -> str:
    blocks = re.findall(rf"^```{lang}\s*\n(.*?)^```", text, flags=re.M | re.S)
    assert len(blocks) == 1, f"want one ```{lang} block, found {len(blocks)}"
    return blocks[0]


def commands(block: str) -> list[str]:
    """Non-empty lines with trailing `# comments` removed."""
    out = []
    for line in block.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            out.append(line)
    return out


def isynth_executable() -> list[str]:
    """The `isynth` console script the README tells users to run (it lives beside the venv's python)."""
    script = Path(sys.executable).parent / "isynth"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "isynth"]


def run_line(exe: list[str], cmd: str, cwd) -> subprocess.CompletedProcess:
    """Run one README line (with `isynth` replaced by `exe`) and assert that it succeeded without a traceback."""
    result = subprocess.run([*exe, *shlex.split(cmd)[1:]], cwd=cwd, env=ENV, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, f"{cmd}\nexit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, f"{cmd}\n{result.stderr}"
    return result


def tiny(command: str) -> str:
    """The README command at a tiny budget."""
    words = shlex.split(command)
    sub = words[1]
    if sub == "train":
        assert "--flops" in words, f"README's train command has no --flops budget to shrink: {command}"
        command = re.sub(r"--flops\s+\S+", "--preset tiny --steps 4", command)
    elif sub == "compare":
        assert "--flops" not in words and "--preset" not in words, command
        command += " --preset tiny --flops 2e9 --num-pairs 64 --quiet"
    elif sub == "eval" and "--num-samples" not in words:
        command += " --num-samples 20"
    return command


# --- Quick start ------------------------------------------------------------------------------------

def test_quick_start_is_two_make_commands():
    assert commands(fenced(section("Quick start"), "bash")) == ["make compare", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in ("compare", "test", "setup"):
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"Makefile has no '{target}' target"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.strip().startswith("#")]
    assert "make test" in ci


# --- Command line -----------------------------------------------------------------------------------

def test_command_line_block_runs_at_tiny_budget(tmp_path):
    lines = [c for c in commands(fenced(section("Command line"), "bash")) if c.startswith("isynth ")]
    subcommands = [shlex.split(c)[1] for c in lines]
    assert subcommands == ["train", "sample", "eval", "flops", "train", "pairs", "train", "compare"], lines
    exe = isynth_executable()
    outputs = []
    for line in lines:
        cmd = tiny(line)
        result = run_line(exe, cmd, tmp_path)
        outputs.append(result.stdout)
        if shlex.split(cmd)[1] == "train":  # "re-running resumes": a finished run is left as it is
            ckpt = (tmp_path / "runs" / "rar" / "checkpoint.safetensors").read_bytes()
            again = subprocess.run([*exe, *shlex.split(cmd)[1:]], cwd=tmp_path, env=ENV, capture_output=True,
                                   text=True, timeout=TIMEOUT_S)
            assert again.returncode == 0, again.stderr
            assert (tmp_path / "runs" / "rar" / "checkpoint.safetensors").read_bytes() == ckpt

    rar = tmp_path / "runs" / "rar"
    assert json.loads((rar / "config.json").read_text())["train"]["max_steps"] == 4
    with np.load(rar / "grid.npz") as f:  # isynth sample ... --out runs/rar/grid.npz
        assert f["arr_0"].shape == (100, 8, 8, 1) and f["arr_0"].dtype == np.uint8
        assert f["labels"].tolist() == [i % 10 for i in range(100)]
    assert (rar / "grid.png").is_file()
    sample_info = json.loads(outputs[1])
    assert sample_info["sampling"]["kv_cache"] is False and sample_info["sampling"]["guidance"]["scale"] == 3.0
    metrics = json.loads((rar / "metrics.json").read_text())  # "writes runs/rar/metrics.json"
    assert metrics == json.loads(outputs[2])
    for name in ("metrics.json", "samples.npz", "samples.png", "log.jsonl"):  # the run directory, as described
        assert (rar / name).is_file(), name
    flops = json.loads(outputs[3])
    assert abs(flops["params"] - 261e6) / 261e6 < 0.02
    pairs = json.loads((tmp_path / "runs" / "pairs" / "pairs.json").read_text())  # the GET lines
    assert pairs["num_pairs"] == 2048 and pairs["teacher"]["paradigm"] == "diffusion"
    assert (tmp_path / "runs" / "get" / "checkpoint.safetensors").is_file()
    compare = tmp_path / "runs" / "compare"
    rows = json.loads((compare / "results.json").read_text())["rows"]
    # without, then with guidance (get has none: one row)
    assert [r["paradigm"] for r in rows] == [n for p in PARADIGMS for n in ((p,) if p == "get" else (p, p))]
    assert (compare / "results.md").is_file()
    for r in rows:
        assert (compare / r["paradigm"] / "samples.png").is_file()


def test_override_example_is_valid(tmp_path):
    """The README's override example (`isynth train rar --out runs/x model.width=64 ...`) at one step."""
    match = re.search(r"`(isynth train rar --out runs/x [^`]*)`", section("Command line"))
    assert match, "the override example moved"
    cmd = f"{match.group(1)} --preset tiny --steps 1 --quiet"
    result = subprocess.run([*isynth_executable(), *shlex.split(cmd)[1:]], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    cfg = json.loads((tmp_path / "runs" / "x" / "config.json").read_text())
    assert cfg["model"]["width"] == 64 and cfg["method"]["order"] == "random"
    assert cfg["sample"]["guidance"]["scale"] == 3


# --- Data and tokenizers ----------------------------------------------------------------------------

SMALL_SHAPES = "data.num_images=600"


def tiny_data(command: str) -> str:
    """A `## Data and tokenizers` command at a tiny budget on a small shapes set."""
    words = shlex.split(command)
    sub = words[1]
    if sub == "tokenizer":
        return command + " --preset tiny --quiet"
    if sub == "train":
        return re.sub(r"--flops\s+\S+", "--preset tiny --steps 2 --quiet", command) + (
            "" if "latents:" in command else f" {SMALL_SHAPES}")
    if sub == "eval":
        return command + " --num-samples 54"  # every (shape, colour) pair, the held-out ones too
    if sub == "tokenize":
        return command + f" --quiet {SMALL_SHAPES}"
    if sub == "compare":
        return command + (" --preset tiny --flops 2e9 --paradigms ar,mar --quiet train.eval_num_samples=54 "
                          + SMALL_SHAPES)
    return command


def test_data_and_tokenizers_block_runs_at_tiny_budget(tmp_path):
    lines = [c for c in commands(fenced(section("Data and tokenizers"), "bash")) if c.startswith("isynth ")]
    exe = isynth_executable()
    out = {}
    for line in lines:
        cmd = tiny_data(line)
        result = run_line(exe, cmd, tmp_path)
        out[shlex.split(cmd)[1]] = result.stdout
    runs = tmp_path / "runs"
    with np.load(runs / "shapes.npz") as f:
        assert f["arr_0"].shape == (2000, 32, 32, 3) and f["class_attrs"].shape == (540, 4)
    for kind in ("fsq", "kl"):
        assert (runs / f"tok-{kind}" / "tokenizer.json").is_file()
    metrics = json.loads((runs / "shapes-ar" / "metrics.json").read_text())
    assert metrics["heldout_class_accuracy"] is not None and "attr_accuracy_colour" in metrics
    with np.load(runs / "circles.npz") as f:
        assert set(f["labels"].tolist()) <= {i for i in range(540) if i // 108 == 0 and (i // 18) % 6 == 1}
    assert (runs / "shapes-mar" / "checkpoint.safetensors").is_file()
    rows = json.loads((runs / "compare-shapes" / "results.json").read_text())["rows"]
    assert [r["paradigm"] for r in rows] == ["ar", "ar", "mar", "mar"]


# --- Python API -------------------------------------------------------------------------------------

def test_python_api_block(tmp_path):
    code = fenced(section("Python API"), "python")
    assert "train.max_steps=50" in code
    code = code.replace("train.max_steps=50", "train.max_steps=3")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert result.stdout.strip(), "the block prints FLOPs and the image shape"
    assert "(20, 8, 8, 1)" in result.stdout
    assert (tmp_path / "runs" / "api-demo" / "checkpoint.safetensors").is_file()


def test_sweep_block_is_valid_command_lines():
    """Every line of the sweeps section parses with the real command (options, presets, shard specs and
    axes), without training: the sweep tests run the same commands at a tiny budget."""
    lines = [c.rstrip("&").strip() for c in commands(fenced(section("Sweeps, confidence and reports"), "bash"))]
    assert [shlex.split(c)[1] for c in lines] == ["compare", "sweep", "sweep", "sweep", "sweep", "report"]
    for line in lines:
        words = shlex.split(line)[1:]
        ctx = cli.make_context("isynth", list(words), resilient_parsing=False)
        sub = cli.get_command(ctx, words[0])
        sub_ctx = sub.make_context(words[0], words[1:])
        if words[0] == "sweep":
            p = dict(sub_ctx.params)
            options = {k: p[k] for k in ("paradigms", "sizes", "seeds", "axis", "variant", "num_samples",
                                         "num_pairs", "dataset")} | {"flops": p["flops"] or "1e12"}
            grid = build_grid(Path("/nonexistent"), p["preset"], p["file"], options, p["overrides"])
            assert grid.cells()
            parse_shard(p["shard"])
