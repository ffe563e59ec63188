"""The shape of the code base: the linter, one-way imports at the top of each module, and small files."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "isynth"
MAX_LINES = 400
# Third-party modules imported on first use, each because importing it costs about a second or more on
# these machines and most commands never need it: diffusers (DPM-Solver++, AutoencoderKL), scikit-learn (the
# digits), torchmetrics (FD), vector-quantize-pytorch (learned quantisers); and the tracking sinks, optional
# extras that most runs never use and that may not be installed: tensorboard (through torch.utils.tensorboard)
# and wandb. Everything else, and every isynth module, is imported at the top of the module.
DEFERRED = {"diffusers", "sklearn", "torchmetrics", "vector_quantize_pytorch", "tensorboard",
            "torch.utils.tensorboard", "wandb"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(node: ast.AST, module: str, modules: dict[str, Path]) -> list[str]:
    """The isynth modules an import statement names (`from isynth.x import y` names isynth.x.y if it is one)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "isynth"]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "isynth":
        return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]
    return []


def _top_level(tree: ast.Module) -> set[int]:
    return {id(n) for n in tree.body}


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_imports_are_at_the_top_of_each_module():
    misplaced = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        tree = ast.parse(path.read_text())
        top = _top_level(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(name.split(".")[0] not in DEFERRED and name not in DEFERRED for name in names):
                    misplaced.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert not misplaced, "imports inside functions or classes:\n" + "\n".join(misplaced)


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    graph = {m: sorted({d for node in ast.parse(p.read_text()).body for d in _imported(node, m, modules)} - {m})
             for m, p in modules.items()}
    unknown = {d for deps in graph.values() for d in deps if d not in modules}
    assert not unknown, unknown
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [m, d]))
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_no_file_is_longer_than_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py"),
                                                 *(ROOT / "benchmarks").glob("*.py")]
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_code_cites_papers_and_files_not_documents_outside_the_repository():
    """Comments cite papers and the authors' files; nothing refers to documents the repository lacks."""
    bad = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
                 ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md")]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if any(word in line for word in ("SPEC", "seed 00", "STYLE principle")) and path.name != "test_codebase.py":
                bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_package_hygiene_license_types_and_version():
    """A LICENSE matching pyproject's, the py.typed marker shipped as package data, and `isynth --version`."""
    import tomllib

    from click.testing import CliRunner

    import isynth
    from isynth.cli import cli
    root = ROOT
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    assert meta["project"]["license"]["text"] == "MIT"
    assert (root / "LICENSE").read_text().startswith("MIT License")
    assert (root / "isynth" / "py.typed").exists()
    assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["isynth"]
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"isynth {isynth.__version__}"
    assert meta["project"]["version"] == isynth.__version__
