"""hartkit.bundle owns the bundle format: it imports without torch and without the layers above it,
and nothing else reads a manifest."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABOVE = ("export", "runtime", "validate", "bench", "cli", "quantize")
# The verifier runs graphs on a backend and replays the loop in a Pipeline: these functions, and only
# these, import the runtime (inside the function, so importing the package never does).
RUNS_THE_RUNTIME = {("verify.py", "verify_loop"), ("verify.py", "verify_bundle"), ("selfcheck.py", "run_self_check")}


DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _sources(folder: Path):
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0].startswith(".") or rel.parts[0] in ("tests", "build") or "egg-info" in rel.parts[0]:
            continue
        yield rel, ast.parse(path.read_text(encoding="utf-8"), str(rel))


def _hartkit_imports(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hartkit"):
        return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("hartkit")]
    return []


def _layer(module: str) -> str:
    return (module.split(".") + [""])[1]


def test_the_package_imports_without_torch_and_without_the_layers_above_it(without_torch):
    code = f"""
import hartkit.bundle
above = sorted(m for m in sys.modules if m.startswith("hartkit.") and m.split(".")[1] in {ABOVE!r})
print("torch" in sys.modules, above)
"""
    res = without_torch(code, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "[]"], res.stdout


def test_only_a_few_verifying_functions_reach_up_into_the_runtime():
    for rel, tree in _sources(ROOT / "bundle"):
        for node in tree.body:  # module level (an `if TYPE_CHECKING:` block holds type names only)
            for name in _hartkit_imports(node):
                assert _layer(name) not in ABOVE, f"{rel}: imports {name} at import time"
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                for name in _hartkit_imports(node):
                    if _layer(name) in ABOVE:
                        assert name.startswith("hartkit.runtime") and (rel.name, fn.name) in RUNS_THE_RUNTIME, \
                            f"{rel}: {fn.name} imports {name}"


def test_nothing_outside_the_package_reads_a_manifest_or_spells_its_files():
    """No library module builds a manifest's path or parses one itself: hartkit.bundle.read_manifest
    (always schema-checked) is the reader, and the file names live in hartkit.bundle.format."""
    spelled = ("manifest.json", "constants.npz")
    for rel, tree in _sources(ROOT):
        if rel.parts[0] == "bundle":
            continue
        docstrings = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, DOCUMENTED) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                assert not any(name in node.value for name in spelled), f"{rel}:{node.lineno}: {node.value!r}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id == "json" and \
                    node.func.attr in ("load", "loads"):
                source = ast.unparse(node).lower()
                assert "manifest" not in source, f"{rel}:{node.lineno}: {source} (use hartkit.bundle.read_manifest)"
