"""Core ML export of the graphs (mlprogram ``.mlpackage``, fp16 compute) and its check without a Mac.

**Conversion.** Every graph goes ``torch.export`` (non-strict, bounded dynamic dims from the
:class:`~hartkit.model.graphs.Dim` s) -> ``coremltools.convert`` -> ``coreml/<graph>.mlpackage``,
``minimum_deployment_target=iOS17``, ``compute_precision=FLOAT16``, inputs and outputs named as in the
spec. Bounded dims become ``ct.RangeDim(min, max, default=example size)``; RangeDim converted every
graph we have, so no EnumeratedShapes are used. (Core ML runs RangeDim models on CPU/GPU; the Neural
Engine wants fixed or enumerated shapes — a later optimisation, not a correctness matter.)
Spec-level deviations, both forced by Core ML: int64 inputs are int32 in the package (Core ML has no
int64 multi-arrays; token ids and masks fit easily), and float outputs are declared fp32 (cast from
the fp16 compute inside the program) so that they match the spec.

The text encoder's boolean ``&``/``|`` (attention mask) reach the converter as ``aten.__and__`` and
``aten.__or__``, which coremltools 9.0 does not map; we decompose them to ``logical_and``/``logical_or``
(bool-only, the only use in our graphs) before conversion.

**iOS18 variant.** Graphs that hold the same weights (``GraphSpec.weights``: the AR transformer's
condition/ar_context/ar_stage/ar_head/diffusion_condition, the VAE's residual_*/vae_decode) are also
saved as one multifunction package per weight group, ``coreml/ios18/<group>.mlpackage`` (one function
per graph, ``save_multifunction`` deduplicates identical weight blobs), described by
``coreml/multifunction.json`` with its size next to the separate packages' (ar_context and ar_stage
hold the same block weights, so the transformer's package is about half; the diffusion head's two
graphs share nothing, its package only bundles them). The per-graph iOS17 packages stay the primary files (``files["coreml"]``).
No stateful (``StateType``) KV cache: the graphs return only the new keys/values (see graphs.py).

**Verification** (:func:`verify_coreml`): predictions cannot run on Linux, so every package is read
back from disk and re-computed by the numpy MIL interpreter of :mod:`hartkit.export.targets.coreml.mil` on the
inputs recorded from the reference loop; see that module for exactly what this does and does not prove.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from hartkit.errors import HartkitError, MissingDependencyError
from hartkit.export.targets.coreml.mil import quiet_coremltools
from hartkit.export.parity import GraphParity, OutputParity, compare_outputs

COREML_DIR = "coreml"
IOS18_DIR = "coreml/ios18"
MULTIFUNCTION_INFO = "coreml/multifunction.json"
MINIMUM_TARGET = "iOS17"
# Core ML specification versions of the deployment targets (coremltools' _SPECIFICATION_VERSION_IOS_*)
SPEC_VERSIONS = {"iOS17": 8, "iOS18": 9}

# fp16 bar for the MIL re-computation (fp16 storage after every op, as the program declares) against
# the fp32 torch outputs: SNR >= 35 dB (fp16 has an 11-bit mantissa, ~66 dB per rounding; the tiny
# graphs land at 57-70 dB, deeper real graphs accumulate more) and |err| <= 2e-3 + 3e-2 * max|ref|.
FP16_ATOL, FP16_RTOL, FP16_MIN_SNR_DB = 2e-3, 3e-2, 35.0


def _require():
    try:
        with quiet_coremltools():
            import coremltools as ct
    except ImportError as exc:
        raise MissingDependencyError("Core ML export needs coremltools: pip install 'hartkit[coreml]'") from exc
    return ct


# ----------------------------------------------------------------------------- conversion


def coreml_io(spec, ct) -> tuple[list, list]:
    """``ct.TensorType`` inputs/outputs of a graph: RangeDims for bounded dims, int64 -> int32."""
    # one RangeDim per Dim, shared by every input that has it (a symbol may be declared only once)
    ranges = {name: ct.RangeDim(lower_bound=d.min, upper_bound=d.max, default=spec.example_sizes[name], symbol=name)
              for name, d in spec.dims.items()}
    inputs = []
    for inp in spec.inputs:
        shape = tuple(d if isinstance(d, int) else ranges[d.name] for d in inp.shape)
        dtype = np.int32 if inp.dtype == "int64" else np.float32
        inputs.append(ct.TensorType(name=inp.name, shape=shape, dtype=dtype))
    outputs = [ct.TensorType(name=o.name, dtype=np.float32) for o in spec.outputs]
    return inputs, outputs


def _bool_logic_decompositions() -> dict:
    import torch

    # Only bool masks use & and | in our graphs; logical_* equals bitwise_* on bool tensors.
    return {torch.ops.aten.__and__.Tensor: torch.logical_and, torch.ops.aten.__or__.Tensor: torch.logical_or}


def exported_program(spec, module):
    import torch

    from hartkit.model.graphs import dynamic_shapes

    with torch.no_grad():
        ep = torch.export.export(module.eval(), spec.example_inputs(), dynamic_shapes=dynamic_shapes(spec),
                                 strict=False)
    return ep.run_decompositions(_bool_logic_decompositions())


def convert_graph(spec, module, target: str = MINIMUM_TARGET):
    """One graph -> an in-memory ``ct.models.MLModel`` (mlprogram, fp16 compute)."""
    ct = _require()
    inputs, outputs = coreml_io(spec, ct)
    ep = exported_program(spec, module)
    with quiet_coremltools():
        return ct.convert(ep, inputs=inputs, outputs=outputs, convert_to="mlprogram",
                          minimum_deployment_target=getattr(ct.target, target),
                          compute_precision=ct.precision.FLOAT16, skip_model_load=True)


def _atomic_package(path: Path, write: Callable[[Path], None]) -> None:
    """Write a package folder beside ``path`` under a temp name, then rename it into place."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_package(mlmodel, path: Path) -> None:
    with quiet_coremltools():
        _atomic_package(path, lambda tmp: mlmodel.save(str(tmp)))


def package_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def save_multifunction_package(packages: Mapping[str, Path], dest: Path) -> None:
    """Several single-function packages -> one iOS18 multifunction package (function = graph name)."""
    _require()
    from coremltools.models.utils import MultiFunctionDescriptor, save_multifunction

    desc = MultiFunctionDescriptor()
    for graph, path in packages.items():
        desc.add_function(str(path), src_function_name="main", target_function_name=graph)
    desc.default_function_name = next(iter(packages))
    with quiet_coremltools():
        _atomic_package(dest, lambda tmp: save_multifunction(desc, str(tmp)))


def export_coreml(specs: Sequence, modules: Mapping, out_dir: Path, progress: Callable[[str], None] | None = None,
                  multifunction: bool = True, target: str = MINIMUM_TARGET,
                  transform: Callable | None = None, converted: dict | None = None) -> dict[str, str]:
    """All graphs to ``out_dir/coreml/<graph>.mlpackage``; returns graph -> path relative to ``out_dir``.
    With ``multifunction``, also the iOS18 weight-sharing packages (module docstring).

    ``target``: the deployment target; ``transform(spec, mlmodel) -> mlmodel``: applied to each converted
    graph before it is saved (weight compression); ``converted``: (graph, target) -> converted model,
    reused across calls if given (the conversion is the slow part)."""
    _require()
    out_dir = Path(out_dir)
    (out_dir / COREML_DIR).mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _m: None)
    files: dict[str, str] = {}
    timings: dict[str, float] = {}
    for spec in specs:
        say(f"coreml: {spec.name}" + (f" ({target})" if target != MINIMUM_TARGET else ""))
        start = time.perf_counter()
        key = (spec.name, target)
        if converted is not None and key in converted:
            mlmodel = converted[key]
        else:
            try:
                mlmodel = convert_graph(spec, modules[spec.name], target)
            except Exception as exc:  # the converter raises bare NotImplementedError/ValueError etc.
                raise HartkitError(f"Core ML conversion of graph '{spec.name}' failed: {type(exc).__name__}: {exc}") from exc
            if converted is not None:
                converted[key] = mlmodel
        if transform is not None:
            mlmodel = transform(spec, mlmodel)
        rel = f"{COREML_DIR}/{spec.name}.mlpackage"
        save_package(mlmodel, out_dir / rel)
        files[spec.name] = rel
        timings[spec.name] = round(time.perf_counter() - start, 2)
    if multifunction:
        export_multifunction(specs, files, out_dir, say, timings)
    return files


def export_multifunction(specs, files: dict[str, str], out_dir: Path, say,
                          timings: Mapping[str, float] | None = None) -> None:
    """The iOS18 multifunction packages of the weight groups, and ``coreml/multifunction.json``
    (functions, sizes next to the separate packages', conversion seconds per graph)."""
    groups: dict[str, list[str]] = {}
    for spec in specs:
        if spec.weights:
            groups.setdefault(spec.weights, []).append(spec.name)
    packages = {}
    for group, graphs in groups.items():
        if len(graphs) < 2:
            continue  # nothing to share
        say(f"coreml: iOS18 multifunction {group} ({', '.join(graphs)})")
        rel = f"{IOS18_DIR}/{group}.mlpackage"
        (out_dir / IOS18_DIR).mkdir(parents=True, exist_ok=True)
        save_multifunction_package({g: out_dir / files[g] for g in graphs}, out_dir / rel)
        separate = sum(package_size(out_dir / files[g]) for g in graphs)
        packages[rel] = {"functions": graphs, "default_function": graphs[0], "bytes": package_size(out_dir / rel),
                         "separate_bytes": separate}
    info = {"minimum_deployment_target": "iOS18", "packages": packages,
            "note": "one function per graph (function name = graph name); identical weights stored once",
            "convert_seconds": dict(timings or {})}
    tmp = out_dir / (MULTIFUNCTION_INFO + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / MULTIFUNCTION_INFO)


# ----------------------------------------------------------------------------- verification


def verify_coreml(folder: Path, info: dict, recorded: Mapping[str, list[tuple[dict, list[np.ndarray]]]],
                  output_names: Mapping[str, list[str]], *, atol: float = FP16_ATOL, rtol: float = FP16_RTOL,
                  min_snr_db: float = FP16_MIN_SNR_DB) -> tuple[list[GraphParity], list[str]]:
    """Check every Core ML package of an export without running Core ML (Linux has no predictions).

    Per graph: the package's interface (names, dtypes, shape ranges) against the spec, then the MIL
    program re-computed in numpy with fp16 rounding after every op (the program's own dtypes) on every
    recorded input, compared with the recorded torch outputs (bar: module constants). Also every
    function of the iOS18 multifunction packages. A graph whose program holds an op the interpreter
    lacks, or that has no recorded inputs, gets no GraphParity (nothing is claimed) and a note saying
    precisely what was not verified. Interface mismatches fail the graph.
    """
    from hartkit.export.targets.coreml import mil as mil_check

    folder = Path(folder)
    files = info.get("files", {}).get("coreml", {})
    graphs = {g["name"]: g for g in info["graphs"]}
    results: list[GraphParity] = []
    notes: list[str] = []
    targets: list[tuple[str, str, Path, str | None]] = [(g, "coreml", folder / rel, None) for g, rel in files.items()]
    mf_path = folder / MULTIFUNCTION_INFO
    if mf_path.is_file():
        for rel, entry in json.loads(mf_path.read_text())["packages"].items():
            targets += [(g, "coreml-ios18", folder / rel, g) for g in entry["functions"]]
    for graph in graphs:
        if graph not in files:
            notes.append(f"coreml {graph}: no package in the export")
            results.append(GraphParity(graph, "coreml", 0, [OutputParity("package missing", [], math.inf, 0.0,
                                                                          -math.inf, False)]))
    for graph, fmt, path, function in targets:
        if graph not in graphs:
            raise HartkitError(f"{path}: Core ML package for unknown graph '{graph}'")
        where = f"{fmt} {graph}" + (f" ({path.name}:{function})" if function else "")
        program = mil_check.load_package(path)
        fn = program.function(function)
        problems = mil_check.check_interface(fn, graphs[graph])
        want_version = SPEC_VERSIONS["iOS18" if function else MINIMUM_TARGET]
        if program.spec.specificationVersion != want_version:
            problems.append(f"specification version {program.spec.specificationVersion} != {want_version}")
        if not any(o.dtype == "FLOAT16" for op in fn.ops if op.type != "const" for o in op.outputs):
            problems.append("the program computes nothing in fp16 (compute_precision FLOAT16 expected)")
        gp = GraphParity(graph, fmt)
        if problems:
            notes += [f"{where}: interface: {p}" for p in problems]
            gp.outputs.append(OutputParity("interface: " + "; ".join(problems), [], math.inf, 0.0, -math.inf, False))
            results.append(gp)
            continue
        missing = fn.unsupported_ops()
        if missing:
            notes.append(f"{where}: NOT numerically verified: the MIL interpreter lacks op(s) "
                         f"{', '.join(sorted(missing))}; only its interface was checked")
            continue
        calls = recorded.get(graph, [])
        if not calls:
            notes.append(f"{where}: NOT numerically verified: no recorded inputs; only its interface was checked")
            continue
        for feeds, ref in calls:
            got = fn.run(feeds)
            gp.outputs.extend(compare_outputs(output_names[graph], ref, [got[n] for n in output_names[graph]],
                                              atol=atol, rtol=rtol, min_snr_db=min_snr_db))
            gp.calls += 1
        results.append(gp)
    notes.append(f"coreml: verified by re-computing each package's MIL program in numpy (fp16 after every op, "
                 f"weights read from the package) on recorded inputs; bar SNR >= {min_snr_db:g} dB and "
                 f"|err| <= {atol:g} + {rtol:g}*max|ref|. Not verified: Core ML's own kernels, device "
                 f"precision (ANE/GPU), on-device compilation and loading (need macOS).")
    return results, notes
