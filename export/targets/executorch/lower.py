"""ExecuTorch export of the graphs: one ``executorch/hart.pte``, one method per graph, XNNPACK delegate.

Every graph goes through ``torch.export.export(strict=False)`` with the bounded dynamic dimensions of
its :class:`~hartkit.model.graphs.GraphSpec`; all of them are then lowered together by
``to_edge_transform_and_lower({name: program, ...})`` into one program. Lowering them together is what
lets the graphs that read the same weights share them: ``condition``, ``ar_context``, ``ar_stage``,
``ar_head``, ``diffusion_condition`` and the ``residual_*`` graphs all read transformer parameters.
XNNPACK puts delegated weights in the program's named data store, keyed by a hash of their bytes, and
the emitter deduplicates the constant buffer (weights read outside the delegate) across methods, so
each tensor is stored once (``delegation.json`` records the bytes read per graph and stored).

``executorch/delegation.json`` lists, per method, the ops that stayed outside the XNNPACK delegate
(they run on ExecuTorch's portable CPU kernels) with their counts.

Fallback: should the single program fail to lower or serialise, the graphs are lowered per weight
group (``GraphSpec.weights``: text encoder, AR transformer, diffusion head, VAE; graphs of one group
still share their weights) and a group that fails again is split into one program per graph. The
reason is written to ``delegation.json`` and passed to ``progress``. The returned mapping always
names, per graph, the file that holds the method of the same name.

Lowering is the slow part (about 1.5 CPU-minutes for ``tiny``): the ops XNNPACK does not take (RMSNorm's
``mean``, squeeze/expand copies, group norm, ...) cut the graphs into ~120 delegate partitions, and each
goes through XNNPACK's own pass pipeline.
"""

from __future__ import annotations

import gc
import json
import operator
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from hartkit.errors import HartkitError, MissingDependencyError
from hartkit.model.graphs import GraphSpec, dynamic_shapes
from hartkit.model.qkv_bias import fold_qkv_bias, unfold_qkv_bias

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
    """``torch.export`` of one graph wrapper with its bounded dynamic dimensions, splits as slices."""
    with torch.no_grad():
        program = torch.export.export(module.eval(), spec.example_inputs(), dynamic_shapes=dynamic_shapes(spec),
                                      strict=False)
        # Only these two ops are rewritten here; to_edge decomposes the rest as usual.
        return program.run_decompositions(_SPLITS_AS_SLICES)


# Trap (executorch 1.5.1 / torch 2.13): a ``split_with_sizes`` (what ``chunk``/``split`` export to) on a
# tensor with a dynamic dimension makes ``to_edge`` silently specialise that dimension to its example
# size, even when the split runs along a static dimension — the denoiser's AdaLN ``chunk`` pinned the
# diffusion rows to 8 and the .pte refused 128 rows at run time. Slices keep the dimension symbolic.
# The split dimension itself must be static (it is in every graph; a dynamic one is refused).
def _split_with_sizes_as_slices(x: torch.Tensor, split_sizes: Sequence[int], dim: int = 0) -> list[torch.Tensor]:
    dim = dim % x.dim()
    out, start = [], 0
    for size in split_sizes:
        out.append(torch.ops.aten.slice.Tensor(x, dim, start, start + size))
        start += size
    return out


def _split_as_slices(x: torch.Tensor, split_size: int, dim: int = 0) -> list[torch.Tensor]:
    n = x.shape[dim % x.dim()]
    if not isinstance(n, int) or not isinstance(split_size, int):
        raise HartkitError("executorch export: a split along a dynamic dimension is not supported")
    return _split_with_sizes_as_slices(x, [min(split_size, n - i) for i in range(0, n, split_size)], dim)


_SPLITS_AS_SLICES = {
    torch.ops.aten.split_with_sizes.default: _split_with_sizes_as_slices,
    torch.ops.aten.split.Tensor: _split_as_slices,
}


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


# Above this many distinct weight bytes, the graphs are lowered per weight group from the start
# (text encoder, AR transformer, diffusion head, VAE) and each program is written and released
# before the next: XNNPACK's lowering holds another copy of every weight it delegates, so one
# program for the 0.7B model + the 1.5B text encoder (9 GB of fp32 weights) needed > 24 GB.
ONE_PROGRAM_MAX_WEIGHT_BYTES = 1_000_000_000


@dataclass
class Lowered:
    """One written program and what it holds."""

    file: str  # name inside executorch/
    methods: list[str]
    size: int  # bytes on disk
    delegation: dict[str, dict]
    stored: dict[str, int | None]  # weight bytes the program stores (named data + constant buffer)


def lower(file: str, programs: Mapping[str, torch.export.ExportedProgram], folder: Path) -> Lowered:
    """Lower a group of exported programs to XNNPACK as the methods of one ``.pte``, written to
    ``folder/file`` (streamed: ``write_to_file`` never builds the whole program in memory; temp + rename)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(dict(programs), partitioner=[XnnpackPartitioner()])
    # Read the delegation before to_executorch(): that pass rewrites the graphs in place (out variants,
    # memory planning), which would muddle the op names.
    delegation = {name: delegation_of(edge.exported_program(name).graph_module) for name in programs}
    program = edge.to_executorch()
    del edge
    path = folder / file
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            program.write_to_file(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return Lowered(file, list(programs), path.stat().st_size, delegation, stored_weight_bytes(program))


def stored_weight_bytes(program: Any) -> dict[str, int | None]:
    """How many weight bytes the program stores, to show that methods share them.

    XNNPACK puts delegated weights in the program's named data store (one entry per distinct tensor,
    keyed by a hash of its bytes); weights read outside the delegate go to the program-wide constant
    buffer, which the emitter also deduplicates. These are private attributes of
    ``ExecutorchProgramManager`` (executorch 1.5.1): ``None`` where they moved.
    """
    out: dict[str, int | None] = {"named_data_bytes": None, "named_data_entries": None, "constant_buffer_bytes": None}
    named = getattr(program, "_named_data", None)
    if named is not None and hasattr(named, "buffers"):
        out["named_data_entries"] = len(named.buffers)
        out["named_data_bytes"] = sum(_byte_len(b) for b in named.buffers)
    emitted = getattr(getattr(program, "_emitter_output", None), "program", None)
    if emitted is not None and hasattr(emitted, "constant_buffer"):
        out["constant_buffer_bytes"] = sum(len(b.storage) for b in emitted.constant_buffer)
    return out


def _byte_len(buf: Any) -> int:
    if isinstance(buf, (bytes, bytearray, memoryview)):
        return len(buf)
    return sum(len(part) for part in getattr(buf, "buffers", buf))  # a cord of byte chunks


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


def lower_with_fallback(specs: Sequence[GraphSpec], programs: dict[str, torch.export.ExportedProgram],
                        say: Callable[[str], None], folder: Path, weight_bytes: int = 0
                        ) -> tuple[list[Lowered], str | None]:
    """One program for every graph; failing that (or for a model too big to lower at once), one per
    weight group; failing that, one per graph. Lowered groups' exported programs are dropped from
    ``programs`` as they are written, to bound memory."""
    if weight_bytes > ONE_PROGRAM_MAX_WEIGHT_BYTES:
        reason = (f"{weight_bytes / 1e9:.1f} GB of weights: one program per weight group, each written before the "
                  "next is lowered (bounds the export's memory)")
    else:
        try:
            return [lower(PROGRAM, programs, folder)], None
        except Exception as exc:  # noqa: BLE001 - any failure of the multi-method path: try smaller programs
            first = str(exc).strip().splitlines()
            reason = f"one program for all graphs failed ({type(exc).__name__}: {first[0] if first else ''})"
    say(f"executorch: {reason}; lowering per weight group")
    groups: dict[str, list[str]] = {}
    for s in specs:
        groups.setdefault(s.weights or s.name, []).append(s.name)
    out: list[Lowered] = []
    for label, names in groups.items():
        say(f"executorch: lowering {label} ({len(names)} method(s))")
        out += _lower_group(label, names, programs, say, folder)
        for n in names:  # release what only this group's programs held
            programs.pop(n, None)
        gc.collect()
    return out, reason


def _lower_group(label: str, names: list[str], programs: Mapping[str, torch.export.ExportedProgram],
                 say: Callable[[str], None], folder: Path) -> list[Lowered]:
    try:
        return [lower(f"{label}.pte", {n: programs[n] for n in names}, folder)]
    except Exception as exc:  # noqa: BLE001
        if len(names) == 1:
            raise HartkitError(f"executorch: lowering graph '{names[0]}' to XNNPACK failed: {exc}") from exc
        say(f"executorch: group '{label}' failed ({type(exc).__name__}); one program per graph")
        return [part for n in names for part in _lower_group(n, [n], programs, say, folder)]


def check_planned_shapes(specs: Mapping[str, GraphSpec], path: Path, methods: Sequence[str]) -> None:
    """Every method's inputs, as the written program plans them, must be the declared shapes at their maxima.

    ExecuTorch plans each input at its upper bound; a dimension that lowering specialised shows up as a
    smaller static size, which would otherwise only fail at run time on the first larger input.
    """
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(path)
    problems = []
    for name in methods:
        spec, meta = specs[name], program.metadata(name)
        if meta.num_inputs() != len(spec.inputs):
            problems.append(f"{name}: {meta.num_inputs()} inputs, declared {len(spec.inputs)}")
            continue
        top = {d.name: d.max for d in spec.dims.values()}
        for i, inp in enumerate(spec.inputs):
            got, want = tuple(meta.input_tensor_meta(i).sizes()), inp.concrete(**top)
            if got != want:
                problems.append(f"{name}.{inp.name}: planned {list(got)}, declared at most {list(want)}")
    if problems:
        raise HartkitError(f"executorch: {path.name} does not accept the declared input shapes "
                           "(a dynamic dimension was specialised during lowering): " + "; ".join(problems))


# ----------------------------------------------------------------------------- the export


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
    by_name = {s.name: s for s in specs}
    folded = [m for module in modules.values() for m in fold_qkv_bias(module)]

    programs: dict[str, torch.export.ExportedProgram] = {}
    weights: dict[str, dict[tuple[int, int], int]] = {}
    try:
        for spec in specs:
            say(f"executorch: torch.export {spec.name}")
            try:
                programs[spec.name] = export_program(spec, modules[spec.name])
            except HartkitError:
                raise
            except Exception as exc:  # torch.export's errors are long; name the graph first
                raise HartkitError(f"executorch: torch.export of graph '{spec.name}' failed: {exc}") from exc
            weights[spec.name] = used_weights(programs[spec.name])
    finally:
        unfold_qkv_bias(folded)

    graph_order = list(programs)
    distinct: dict[tuple[int, int], int] = {}
    for w in weights.values():
        distinct.update(w)
    t0 = time.perf_counter()
    say(f"executorch: lowering {len(programs)} methods to XNNPACK (the slow part)")
    parts, fallback = lower_with_fallback(specs, programs, say, sub, sum(distinct.values()))
    seconds = time.perf_counter() - t0

    files: dict[str, str] = {}
    methods: dict[str, dict] = {}
    stored: dict[str, dict] = {}
    for part in parts:
        check_planned_shapes(by_name, sub / part.file, part.methods)
        stored[part.file] = {"bytes": part.size, **part.stored}
        for name in part.methods:
            files[name] = f"{SUBDIR}/{part.file}"
            methods[name] = {"file": files[name], "weight_bytes": sum(weights[name].values()),
                             **part.delegation[name]}
    summary = {
        "files": stored,
        "weight_bytes_summed_per_graph": sum(sum(w.values()) for w in weights.values()),
        "weight_bytes_distinct": sum(distinct.values()),
        "lowering_seconds": round(seconds, 1),
        "fallback": fallback,
        "methods": {name: methods[name] for name in graph_order},
    }
    tmp = sub / (DELEGATION + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, sub / DELEGATION)
    for line in summary_lines(summary):
        say(line)
    return files


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """A short human summary of delegation.json."""
    def mb(n: int | None) -> str:
        return "?" if n is None else f"{n / 1e6:.2f} MB"

    lines = []
    for fname, f in summary["files"].items():
        stored = None if f["named_data_bytes"] is None or f["constant_buffer_bytes"] is None else \
            f["named_data_bytes"] + f["constant_buffer_bytes"]
        lines.append(f"executorch: {fname} {mb(f['bytes'])}, of which weights {mb(stored)}")
    lines.append(f"executorch: weights read by the graphs: {mb(summary['weight_bytes_summed_per_graph'])} summed per "
                 f"graph, {mb(summary['weight_bytes_distinct'])} distinct; lowering took {summary['lowering_seconds']} s")
    if summary.get("fallback"):
        lines.append(f"executorch: fallback grouping: {summary['fallback']}")
    for name, m in summary["methods"].items():
        ops = m["ops_outside_delegate"]
        shown = ", ".join(f"{k} x{v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:5])
        more = "" if len(ops) <= 5 else f", +{len(ops) - 5} more"
        lines.append(f"  {name:22} {m['ops_in_delegate']:4d} ops in {m['delegate_subgraphs']:2d} delegate(s), "
                     f"{m['num_ops_outside_delegate']:3d} outside{': ' + shown + more if ops else ''}")
    return lines
