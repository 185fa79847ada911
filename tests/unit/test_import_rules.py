"""docs/ARCHITECTURE.md's import rules, read from the source: a stage imports the shared base and the model, never a
stage beside or above it (the trainer reads dumps only through the dump's format module); status and rerun import no
client code. Type-checking-only imports are not imports."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "dflashkit"
# Below every stage: files, formats, configs, shards, servers, prepared assets, templates.
BASE = {"dflashkit", "io", "config", "formats", "shards", "serve", "prepare", "templates"}
# What each stage (and the model) may import besides BASE and itself. "dump": the reader surface (dump/__init__,
# dump.format), the record format between dump and train.
MAY_IMPORT = {
    "model": set(),
    "generate": set(),
    "dump": {"model"},
    # The online source (train/online.py) makes a dump record the dump's own way: its reader of generate shards,
    # its tokenization and its HF backend, so online and offline features cannot drift apart.
    "train": {"model", "dump", "dump.format", "config", "dump.records", "dump.tokenize", "dump.hf_backend"},
    "export": {"model"},
    "eval": {"model", "export"},
}
# The run's orchestration (recipe, stage table, run dir, Slurm, status, submit, local, plan, demo, cli) sits above
# every stage; among it, what a login node runs for status/rerun must not pull in a stage's client.
LOGIN_NODE = ["dflashkit.status", "dflashkit.submit", "dflashkit.slurm", "dflashkit.stages", "dflashkit.rundir",
              "dflashkit.local"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """dflashkit modules imported by a file (relative imports resolved), outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
               for n in ast.walk(node)}
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            names = [name] if node.module or not node.level else [f"{name}.{a.name}" for a in node.names]
            out.update(n for n in names if n.split(".")[0] == "dflashkit")
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "dflashkit")
    return out


def owner(module: str) -> str:
    """'dflashkit.generate.run' -> 'generate', 'dflashkit.io' -> 'io'; the dump's modules keep their names (only its
    reader surface is open to the trainer)."""
    parts = module.split(".")[1:]
    return (".".join(parts[:2]) if parts[0] == "dump" else parts[0]) if parts else "dflashkit"


@pytest.mark.parametrize("stage", sorted(MAY_IMPORT))
def test_a_stage_imports_only_what_is_below_it(stage):
    allowed = BASE | MAY_IMPORT[stage] | {stage}
    files = sorted((PACKAGE / stage).rglob("*.py")) if (PACKAGE / stage).is_dir() else [PACKAGE / f"{stage}.py"]
    bad = {module_name(f): sorted(m for m in imports(f) if owner(m) not in allowed and m.split(".")[1:2] != [stage])
           for f in files}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_rules_see_real_imports():
    # The reader must resolve relative imports, or the test above passes on nothing.
    assert "dflashkit.model.layers" in imports(PACKAGE / "dump" / "run.py")
    assert "dflashkit.shards" in imports(PACKAGE / "generate" / "run.py")
    assert "dflashkit.stages" not in imports(PACKAGE / "rundir.py")  # TYPE_CHECKING only


@pytest.mark.parametrize("module", LOGIN_NODE)
def test_status_and_rerun_import_no_client_code(module):
    # generate.settings is the table of the generate stage's knobs (standard library only), which the recipe checks
    # its generate section against; nothing else of the generate stage may load on a login node.
    code = (f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('openai', 'httpx', 'vllm', 'sglang', 'torch') or m.startswith('dflashkit.generate.') "
            "and m != 'dflashkit.generate.settings'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{module} pulls in {out.strip()}"
