"""The imports flow one way: model/loop -> quantize -> export -> bundle -> runtime -> validate/bench -> cli.

Every import of every module of the package is read from its source (ast, imports inside functions
included; ``if TYPE_CHECKING:`` blocks excluded: they never run). An import from a package of a
higher layer is an upward edge; the ones that remain are listed below with the modules that make
them, so a new one (and with it a new cycle) fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_PACKAGE = {"tests", "examples", "bench-runs", "assets"}

# Layer of each subpackage (and top-level module); a module may import its own layer and below.
LAYER = {
    "(root)": 0, "errors": 0, "fsutil": 0,
    "model": 1, "loop": 1,
    "quantize": 2,
    "export": 3,
    "bundle": 4,
    "runtime": 5,
    "validate": 6, "bench": 6,
    "cli": 7, "train": 7,  # train: the demo model's training and evaluation (validate's scenes, the runtime)
    "assets": 0,  # data files; ``import hartkit.assets`` only locates them
}

# (importing package, imported package) -> the modules that still import upward, and why.
UPWARD = {
    # Item 1 of issue 17 (a Target per format) removes these: quantization reaches into the exporters
    # (graph specs, the Core ML writer, the torch graph runner for calibration) and the runtime
    # backends for its parity checks, and the exporter runs the runtime backends for parity.
    ("quantize", "export"): {"quantize/apply.py", "quantize/calibration.py", "quantize/coreml_quant.py",
                             "quantize/sensitivity.py"},
    ("quantize", "runtime"): {"quantize/apply.py"},
    ("export", "runtime"): {"export/exporter.py"},
    # Calibration records with the loop section an export would write (bundle.write.loop_info).
    ("quantize", "bundle"): {"quantize/calibration.py"},
    # An export writes its bundle through the format's owner; the torch runner reads each graph's
    # I/O names from the same export info the manifest is made of.
    ("export", "bundle"): {"export/exporter.py", "export/torch_runner.py"},
    # Verification runs a bundle (golden vectors, loop replay, load-time self-check) on the runtime's
    # backends; imported inside the functions, so the format itself loads without them.
    ("bundle", "runtime"): {"bundle/selfcheck.py", "bundle/verify.py"},
}

# (importing module, imported module, name): private names still imported across modules.
PRIVATE = {
    ("bundle/archive.py", "hartkit.fsutil", "_umask"),
    # Item 1 (the Core ML target) folds these into one module.
    ("export/mil_check.py", "hartkit.export.coreml_export", "_quiet"),
    ("quantize/coreml_quant.py", "hartkit.export.coreml_export", "_quiet"),
    ("quantize/coreml_quant.py", "hartkit.export.coreml_export", "_export_multifunction"),
    ("quantize/coreml_quant.py", "hartkit.export.coreml_export", "_save"),
    ("quantize/sensitivity.py", "hartkit.quantize.recipe", "_fit"),
}


def package_modules() -> list[Path]:
    found = []
    for top in ROOT.iterdir():  # not ROOT.rglob: it would walk .venv
        if top.name.startswith(".") or top.name in NOT_PACKAGE:
            continue
        if top.is_dir() and (top / "__init__.py").is_file():
            found.extend(top.rglob("*.py"))
        elif top.suffix == ".py":
            found.append(top)
    return sorted(found)


def package_of(rel: Path) -> str:
    if len(rel.parts) > 1:
        return rel.parts[0]
    return "(root)" if rel.stem == "__init__" else rel.stem


def hartkit_imports(tree: ast.AST):
    """(module, names) of every ``hartkit`` import that can run (not under ``if TYPE_CHECKING:``)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "hartkit":
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hartkit":
                    yield alias.name, []
        stack.extend(ast.iter_child_nodes(node))


def target_package(module: str, names: list[str]) -> list[str]:
    parts = module.split(".")
    if len(parts) > 1:
        return [parts[1]]
    return [n if n in LAYER else "(root)" for n in names] or ["(root)"]  # from hartkit import x


def edges():
    upward: dict[tuple[str, str], set[str]] = {}
    private: set[tuple[str, str, str]] = set()
    for path in package_modules():
        rel = path.relative_to(ROOT)
        src = package_of(rel)
        for module, names in hartkit_imports(ast.parse(path.read_text(), str(path))):
            for dst in target_package(module, names):
                assert dst in LAYER, f"{rel}: imports {module}, a package this test has no layer for"
                if LAYER[dst] > LAYER[src]:
                    upward.setdefault((src, dst), set()).add(rel.as_posix())
            private |= {(rel.as_posix(), module, n) for n in names if n.startswith("_") and not n.startswith("__")}
    return upward, private


def test_every_package_has_a_layer():
    assert {package_of(p.relative_to(ROOT)) for p in package_modules()} <= set(LAYER)


def test_no_upward_import_outside_the_allow_list():
    upward, _ = edges()
    new = {f"{a} -> {b}: {sorted(mods - UPWARD.get((a, b), set()))}"
           for (a, b), mods in upward.items() if mods - UPWARD.get((a, b), set())}
    assert not new, "upward imports (a lower layer importing a higher one): " + "; ".join(sorted(new))


def test_the_allow_list_has_no_stale_entries():
    """An upward edge that is gone leaves the list too, so the list shows what remains."""
    upward, _ = edges()
    stale = {pair: mods - upward.get(pair, set()) for pair, mods in UPWARD.items() if mods - upward.get(pair, set())}
    assert not stale


def test_no_private_name_imported_across_modules():
    _, private = edges()
    assert private <= PRIVATE, sorted(private - PRIVATE)
    assert PRIVATE <= private, f"gone, drop from the list: {sorted(PRIVATE - private)}"


def test_the_loop_imports_no_higher_layer():
    """The one sampling loop sits at the bottom: it imports nothing above ``loop``."""
    upward, _ = edges()
    assert not any(src == "loop" for src, _ in upward)
