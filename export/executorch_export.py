"""ExecuTorch export of the graphs: one ``executorch/hart.pte``, one method per graph, XNNPACK delegate.

Every graph goes through ``torch.export.export(strict=False)`` with the bounded dynamic dimensions of
its :class:`~hartkit.export.graphs.GraphSpec`; all of them are then lowered together by
``to_edge_transform_and_lower({name: program, ...})`` into one program. Lowering them together is what
lets the graphs that hold the same weights share them: ``condition``, ``ar_context``, ``ar_stage``,
``ar_head``, ``diffusion_condition`` and the ``residual_*`` graphs all read the transformer's
parameters, and the XNNPACK delegate stores constants in the program's named data store keyed by a
hash of their bytes, so one copy serves every method (the summary prints the .pte size next to the
weights each graph reads, summed per graph and deduplicated).

``executorch/delegation.json`` lists, per method, the ops that stayed outside the XNNPACK delegate
(they run on ExecuTorch's portable CPU kernels) with their counts.

Fallback: should the single program fail to lower or serialise, the graphs are lowered per weight
group (``GraphSpec.weights``: text encoder, AR transformer, diffusion head, VAE; graphs of one group
still share their weights) and a group that fails again is split into one program per graph. The
reason is written to ``delegation.json`` and passed to ``progress``. The returned mapping always
names, per graph, the file that holds the method of the same name.
"""

from __future__ import annotations

import json
import operator
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from hartkit.errors import HartkitError, MissingDependencyError
from hartkit.export.graphs import GraphSpec
from hartkit.export.onnx_export import dynamic_shapes

SUBDIR = "executorch"
PROGRAM = "hart.pte"
DELEGATION = "delegation.json"


def _require() -> None:
    try:
        import executorch.exir  # noqa: F401
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("ExecuTorch export needs executorch: pip install 'hartkit[executorch]'") from exc


# ----------------------------------------------------------------------------- torch.export


def export_program(spec: GraphSpec, module: nn.Module) -> torch.export.ExportedProgram:
    """``torch.export`` of one graph wrapper with its bounded dynamic dimensions."""
    with torch.no_grad():
        return torch.export.export(module.eval(), spec.example_inputs(), dynamic_shapes=dynamic_shapes(spec),
                                   strict=False)


def used_weights(program: torch.export.ExportedProgram) -> dict[tuple[int, int], int]:
    """Bytes of the parameters/buffers/constants the graph reads, keyed by storage identity.

    The wrappers hold whole sub-models (e.g. a residual graph holds the VAE and the transformer but
    reads only one phi conv and the word embedding), so only placeholders with users count.
    """
    sig = program.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    tensors = {**program.state_dict, **program.constants}
    out: dict[tuple[int, int], int] = {}
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in names or not node.users:
            continue
        t = tensors.get(names[node.name])
        if isinstance(t, torch.Tensor):
            out[(t.untyped_storage().data_ptr(), t.storage_offset())] = t.numel() * t.element_size()
    return out


# ----------------------------------------------------------------------------- lowering


def _lower(programs: Mapping[str, torch.export.ExportedProgram]):
    """-> (delegation report per method, serialised .pte bytes) for a group of methods."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(dict(programs), partitioner=[XnnpackPartitioner()])
    # Read the delegation before to_executorch(): that pass rewrites the graphs in place (out variants,
    # memory planning), which would muddle the op names.
    report = {name: delegation_of(edge.exported_program(name).graph_module) for name in programs}
    return report, edge.to_executorch().buffer


def _op_name(target: Any) -> str:
    """``aten.mean.dim`` for torch/edge op overloads, ``operator.mul`` for python scalar ops."""
    name = getattr(target, "_name", None)  # OpOverload and EdgeOpOverload: "aten::mean.dim"
    if isinstance(name, str):
        return name.replace("::", ".")
    module = (getattr(target, "__module__", "") or "").lstrip("_")
    return f"{module}.{getattr(target, '__name__', str(target))}"


def delegation_of(gm: torch.fx.GraphModule) -> dict:
    """Ops outside the XNNPACK delegate (name -> count) and the size of the delegated part."""
    outside: Counter[str] = Counter()
    delegates = 0
    inside = 0
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.name.startswith("lowered_module"):
            lowered = getattr(gm, node.target)
            delegates += 1
            inside += sum(1 for n in lowered.original_module.graph.nodes if n.op == "call_function")
        elif node.op == "call_function":
            name = _op_name(node.target)
            # getitem unpacks a delegate's outputs; it is plumbing, not compute.
            if node.target is not operator.getitem and "executorch_call_delegate" not in name:
                outside[name] += 1
    return {"delegate_subgraphs": delegates, "ops_in_delegate": inside,
            "ops_outside_delegate": dict(sorted(outside.items())), "num_ops_outside_delegate": sum(outside.values())}


def _groups(specs: Sequence[GraphSpec]) -> dict[str, list[str]]:
    """Graphs by the weights they hold (the fallback's programs)."""
    groups: dict[str, list[str]] = {}
    for s in specs:
        groups.setdefault(s.weights or s.name, []).append(s.name)
    return groups


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def export_executorch(specs: list[GraphSpec], modules: Mapping[str, nn.Module], out_dir: Path,
                      progress: Callable[[str], None] | None = None) -> dict[str, str]:
    """All graphs to ``out_dir/executorch/hart.pte`` (method name == graph name).

    Returns graph -> .pte path relative to ``out_dir`` and writes ``executorch/delegation.json``.
    """
    _require()
    say = progress or (lambda _m: None)
    out_dir = Path(out_dir)
    sub = out_dir / SUBDIR
    sub.mkdir(parents=True, exist_ok=True)

    programs: dict[str, torch.export.ExportedProgram] = {}
    weights: dict[str, dict[tuple[int, int], int]] = {}
    for spec in specs:
        say(f"executorch: torch.export {spec.name}")
        try:
            programs[spec.name] = export_program(spec, modules[spec.name])
        except Exception as exc:  # torch.export's errors are long; name the graph first
            raise HartkitError(f"executorch: torch.export of graph '{spec.name}' failed: {exc}") from exc
        weights[spec.name] = used_weights(programs[spec.name])

    t0 = time.perf_counter()
    say(f"executorch: lowering {len(programs)} methods to XNNPACK in one program (slow: ~1-2 min for tiny)")
    plan: list[tuple[str, list[str]]]
    fallback: str | None = None
    delegation: dict[str, dict] = {}
    files: dict[str, str] = {}
    file_sizes: dict[str, int] = {}
    try:
        report, buffer = _lower(programs)
        plan = [(PROGRAM, list(programs))]
        blobs = {PROGRAM: buffer}
    except Exception as exc:  # any failure of the multi-method path: try smaller programs
        fallback = f"one program for all graphs failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        say(f"executorch: {fallback}; lowering per weight group")
        report, blobs, plan = {}, {}, []
        for label, group in _groups(specs).items():
            plan += _lower_group(label, group, programs, report, blobs, say)
    for fname, names in plan:
        for n in names:
            files[n] = f"{SUBDIR}/{fname}"
    for fname, data in blobs.items():
        _write_atomic(sub / fname, data)
        file_sizes[fname] = len(data)
    seconds = time.perf_counter() - t0

    per_graph = {n: sum(w.values()) for n, w in weights.items()}
    unique: dict[tuple[int, int], int] = {}
    for w in weights.values():
        unique.update(w)
    for name in programs:
        delegation[name] = {"file": files[name], "weight_bytes": per_graph[name], **report[name]}
    summary = {
        "files": file_sizes,
        "pte_bytes": sum(file_sizes.values()),
        "weight_bytes_summed_per_graph": sum(per_graph.values()),
        "weight_bytes_unique": sum(unique.values()),
        "lowering_seconds": round(seconds, 1),
        "fallback": fallback,
        "methods": delegation,
    }
    tmp = sub / (DELEGATION + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, sub / DELEGATION)
    for line in summary_lines(summary):
        say(line)
    return files


def _lower_group(label: str, group: list[str], programs, report: dict, blobs: dict,
                 say) -> list[tuple[str, list[str]]]:
    """Lower one weight group into ``<label>.pte``; on failure one program per graph."""
    fname = f"{label}.pte"
    try:
        rep, buf = _lower({n: programs[n] for n in group})
    except Exception as exc:
        if len(group) == 1:
            raise HartkitError(f"executorch: lowering graph '{group[0]}' to XNNPACK failed: {exc}") from exc
        say(f"executorch: group '{label}' failed ({type(exc).__name__}); one program per graph")
        out: list[tuple[str, list[str]]] = []
        for n in group:
            out += _lower_group(n, [n], programs, report, blobs, say)
        return out
    report.update(rep)
    blobs[fname] = buf
    return [(fname, group)]


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """A short human summary of delegation.json."""
    mb = 1 / 1e6
    lines = [f"executorch: {', '.join(f'{f} {b * mb:.2f} MB' for f, b in summary['files'].items())} "
             f"(weights read by the graphs: {summary['weight_bytes_summed_per_graph'] * mb:.2f} MB summed per graph, "
             f"{summary['weight_bytes_unique'] * mb:.2f} MB distinct); lowering {summary['lowering_seconds']} s"]
    if summary.get("fallback"):
        lines.append(f"executorch: fallback grouping: {summary['fallback']}")
    for name, m in summary["methods"].items():
        ops = m["ops_outside_delegate"]
        shown = ", ".join(f"{k} x{v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:6])
        more = "" if len(ops) <= 6 else f", +{len(ops) - 6} more"
        lines.append(f"  {name:22} {m['ops_in_delegate']:4d} ops in {m['delegate_subgraphs']:2d} delegate(s); "
                     f"{m['num_ops_outside_delegate']:3d} outside{': ' + shown + more if ops else ''}")
    return lines
