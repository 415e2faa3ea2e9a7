"""The CLI package: every verb's help works, importing it stays light, and quantize never imports it back."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import hartkit

VERBS = ["demo", "init-checkpoint", "generate", "export", "quantize", "sensitivity", "bench", "bundle", "validate"]
HEAVY = ["torch", "onnx", "onnxruntime", "executorch", "coremltools", "hartkit.model", "hartkit.export"]


def test_help_of_every_verb_exits_0_without_heavy_imports():
    # One subprocess: a fresh sys.modules shows what `hartkit --help` and each `hartkit VERB --help` import.
    code = f"""
import json, sys
from hartkit.cli import main
codes = {{}}
for argv in [["--help"]] + [[verb, "--help"] for verb in {VERBS!r}]:
    try:
        main(argv)
    except SystemExit as exc:
        codes[" ".join(argv)] = exc.code
print(json.dumps({{"codes": codes, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    assert seen["codes"] == {"--help": 0, **{f"{verb} --help": 0 for verb in VERBS}}
    assert seen["heavy"] == []
    listed = subprocess.run([sys.executable, "-m", "hartkit.cli", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0 and all(verb in listed.stdout for verb in VERBS)


def test_quantize_never_imports_the_cli():
    top = Path(hartkit.__file__).resolve().parent
    offenders = []
    for path in sorted((top / "quantize").rglob("*.py")):
        package = ["hartkit", *path.parent.relative_to(top).parts]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                anchor = package[:len(package) - node.level + 1] if node.level else []
                base = ".".join(anchor + ([node.module] if node.module else []))
                # `from hartkit import cli` names the module in the alias
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            if any(n == "hartkit.cli" or n.startswith("hartkit.cli.") for n in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_quantize_export_without_resolution_is_a_user_error(tmp_path, capsys):
    # `quantize` reaches export's command with a namespace that has no --resolution: one line, exit 2.
    from hartkit.cli import main

    code = main(["quantize", "--checkpoint", str(tmp_path / "none"), "--recipe", "laptop", "--out",
                 str(tmp_path / "out")])
    assert code == 2 and "error:" in capsys.readouterr().err and not (tmp_path / "out").exists()
