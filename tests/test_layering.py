"""The imports flow one way, and no two modules or packages import each other.

Layers, lowest first: errors/fsutil -> model, loop -> backends -> quantize -> bundle -> export -> runtime
-> validate, bench -> cli, train. The data flows export -> bundle -> runtime; the bundle *format* (names,
schema, reader, writer, verifier) is the contract both ends import, so it sits below the exporter, and
the graph runners (backends) that both the exporter's parity checks and the runtime use sit below both.

Every import of every module of the package is read from its source (ast, imports inside functions
included; ``if TYPE_CHECKING:`` blocks excluded: they never run).
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
    "backends": 2,  # the torch-free graph runners: the exporter's parity checks, the bundle's verifier, the runtime
    "quantize": 3,
    "bundle": 4,  # the format: names, schema, reader, writer, verifier, archive
    "export": 5,  # the targets (one per format) and export_checkpoint, which writes through the bundle
    "runtime": 6,
    "validate": 7, "bench": 7,
    "cli": 8, "train": 8,  # train: the demo model's training and evaluation (validate's scenes, the runtime)
    "assets": 0,  # data files; ``import hartkit.assets`` only locates them
}

# (importing package, imported package) -> modules allowed to import upward: none.
UPWARD: dict[tuple[str, str], set[str]] = {}

# (importing module, imported module, name): private names imported across modules (none may be).
PRIVATE: set[tuple[str, str, str]] = set()


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


def module_name(rel: Path) -> str:
    parts = ["hartkit", *rel.with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


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


def parsed():
    for path in package_modules():
        rel = path.relative_to(ROOT)
        yield rel, list(hartkit_imports(ast.parse(path.read_text(), str(path))))


def edges():
    upward: dict[tuple[str, str], set[str]] = {}
    private: set[tuple[str, str, str]] = set()
    for rel, imports in parsed():
        src = package_of(rel)
        for module, names in imports:
            for dst in target_package(module, names):
                assert dst in LAYER, f"{rel}: imports {module}, a package this test has no layer for"
                if LAYER[dst] > LAYER[src]:
                    upward.setdefault((src, dst), set()).add(rel.as_posix())
            private |= {(rel.as_posix(), module, n) for n in names if n.startswith("_") and not n.startswith("__")}
    return upward, private


def module_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from a.b import c`` imports ``a.b.c`` when that is a module)."""
    rels = {module_name(rel): rel for rel in (p.relative_to(ROOT) for p in package_modules())}
    graph: dict[str, set[str]] = {m: set() for m in rels}
    for rel, imports in parsed():
        src = module_name(rel)
        for module, names in imports:
            targets = {f"{module}.{n}" for n in names if f"{module}.{n}" in rels} or {module}
            graph[src] |= {t for t in targets if t in rels and t != src}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


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


def test_no_import_cycle_between_modules():
    assert not cycles(module_graph())


def test_no_import_cycle_between_packages():
    """(The upward edges of the allow-list aside: they are listed, and each closes a cycle.)"""
    files = {module_name(p.relative_to(ROOT)): p.relative_to(ROOT).as_posix() for p in package_modules()}
    packages: dict[str, set[str]] = {}
    for src, dsts in module_graph().items():
        top = src.split(".")[1] if "." in src else "(root)"
        for d in dsts:
            dst = d.split(".")[1] if "." in d else "(root)"
            if files[src] not in UPWARD.get((top, dst), set()):
                packages.setdefault(top, set()).add(dst)
    for top, dsts in packages.items():
        dsts.discard(top)
    assert not cycles(packages)


def test_the_cycle_finder_finds_cycles():
    """The two tests above are only as good as this search."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_loop_imports_no_higher_layer():
    """The one sampling loop sits at the bottom: it imports nothing above ``loop``."""
    upward, _ = edges()
    assert not any(src == "loop" for src, _ in upward)


# A format is asked about only by its target: comparing a value with a format name elsewhere is a
# ladder that a fourth format would have to find. The quantize layer's per-format arithmetic (the
# fake-quant formulas, byte counts, torchao for ExecuTorch's sensitivity) and the quantize verb's
# per-format default schemes, the int4 algorithms' per-format support and the benchmark's ONNX size
# column and macOS-only Core ML backend still compare; they are listed here until they become target data.
FORMAT_NAMES = {"onnx", "executorch", "coreml"}
COMPARES_FORMATS = {"quantize/fakequant.py", "quantize/sizes.py", "quantize/sensitivity.py", "quantize/algorithms.py",
                    "cli/quantize.py", "bench/run.py"}


def format_comparisons(tree: ast.AST) -> list[int]:
    """Lines where a format name is compared (==, !=, in a literal tuple/list/set)."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for operand in [node.left, *node.comparators]:
            names = [operand] if isinstance(operand, ast.Constant) else \
                list(operand.elts) if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else []
            if any(isinstance(n, ast.Constant) and n.value in FORMAT_NAMES for n in names):
                lines.append(node.lineno)
                break
    return lines


def test_no_format_name_compared_outside_the_targets():
    found = {}
    for path in package_modules():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("export/targets/") or rel in COMPARES_FORMATS:
            continue
        lines = format_comparisons(ast.parse(path.read_text(), rel))
        if lines:
            found[rel] = lines
    assert not found, f"format names compared outside export/targets: {found}"
    assert format_comparisons(ast.parse('fmt == "onnx"\nif f in ("coreml", "x"): pass')) == [1, 2]


def test_the_registry_is_the_support_table_s_columns():
    from hartkit.export.targets import TARGETS
    from hartkit.quantize.schemes import FORMATS

    assert set(TARGETS) == set(FORMATS)
    assert all(t.name == name for name, t in TARGETS.items())
