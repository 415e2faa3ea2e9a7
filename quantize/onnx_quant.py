"""Quantize exported ONNX graphs with onnxruntime.quantization, layer by layer as a plan says.

Per graph file: (1) rewrite ``Gemm`` with a constant weight into ``MatMul`` (+ ``Add``) — a 2-D
``nn.Linear`` call (the diffusion head, the AdaLN projections) exports as Gemm, which
MatMulNBitsQuantizer skips, so without this the whole diffusion head would silently stay fp32;
(2) find each node's layer by its weight's *values* (the exporter renames and transposes weights:
``F.linear(x, W)`` becomes ``MatMul(x, W^T)`` with a folded ``W^T`` constant; the AR attention's qkv
weight is used without calling its module, so module name scopes miss it); (3) run the passes:

==============  ===============================================================================
w8a8_static     ``quantize_static`` (QDQ, per-channel 7-bit weights in int8, uint8 activations, MinMax
                calibration on recorded real inputs, MatMul/Conv outputs not quantized)
w8a8            ``quantize_dynamic`` (per-channel 7-bit weights in int8, DynamicQuantizeLinear inputs)
int4            ``MatMulNBitsQuantizer(bits=4, symmetric, block_size=group)``, one pass per group;
                embeddings (Gather) -> ``GatherBlockQuantized`` in the same pass
int8            ``MatMulNBitsQuantizer(bits=8, symmetric, block = see fakequant.int8_block)``
8da4w / 8da8w   the same with ``accuracy_level=4``: activations quantized to int8 per row and block at
                run time, integer dot products (MLAS CompInt8; about 2x the fp32 MatMul on AVX-512 VNNI)
fp16            weight initializer stored as float16 + a ``Cast`` to float32 (compute stays fp32)
==============  ===============================================================================

Weight algorithms of the 4-bit schemes (``int4-g64-gptq``, ``8da4w-g64-hqq``): ``gptq`` records each
MatMul's input over the calibration feeds with onnxruntime (the graph's own tensors, made outputs),
runs :func:`hartkit.quantize.algorithms.gptq` on the weight, and lets the ordinary int4 pass store the
result (it lies on that pass's grid, so the pass changes nothing); ``hqq`` is onnxruntime's
``HQQWeightOnlyQuantConfig`` (float zero points). Either way the weights the file computes with are
returned in :attr:`OnnxQuantReport.calibrated` (layer -> ``[out, in]`` float32): what an eager
reference of the file must use instead of rounding the original weights.

Both uint8-activation passes use ``reduce_range`` (weights in [-64, 64]): MLAS multiplies uint8 by
int8 with VPMADDUBSW on AVX2 and AVX-512 without VNNI, whose pairwise int16 sums saturate beyond
32767; 2 * 255 * 64 = 32640 cannot, so the same file computes the same on every CPU (see
``schemes.SUPPORT`` and ``fakequant.u8s8_dot``).

Static first (its calibration runs on the still-float model), the rest touch disjoint nodes.
Constants that are not layer weights (resampling matrices, RoPE-free tables) stay as exported.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from hartkit.errors import HartkitError
from hartkit.quantize.fakequant import ort_block_size
from hartkit.quantize.schemes import Scheme

WEIGHT_OPS = ("MatMul", "Conv", "Gather")
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass
class OnnxQuantReport:
    graph: str
    nodes: dict[str, tuple[str, str]] = field(default_factory=dict)  # node -> (layer, scheme label)
    gemm_rewritten: int = 0
    bytes_before: int = 0  # whole file (+ .data)
    bytes_after: int = 0
    tensor_bytes_before: int = 0  # initializers only: what the scheme changes
    tensor_bytes_after: int = 0
    ops: dict[str, int] = field(default_factory=dict)
    # layer -> the dequantized weight ([out, in], float32) the file holds, for layers whose weights an
    # algorithm other than round-to-nearest chose (not serialised: the eager reference reads it)
    calibrated: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    algorithms: dict[str, str] = field(default_factory=dict)  # layer -> algorithm (non-rtn only)

    def to_json(self) -> dict:
        return {"graph": self.graph, "gemm_rewritten": self.gemm_rewritten, "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after, "tensor_bytes_before": self.tensor_bytes_before,
                "tensor_bytes_after": self.tensor_bytes_after, "ops": self.ops,
                **({"algorithms": self.algorithms} if self.algorithms else {}),
                "nodes": {n: {"layer": l, "scheme": s} for n, (l, s) in self.nodes.items()}}


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs every node at INFO and warns about pre-processing."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


# ----------------------------------------------------------------------------- graph surgery


def _initializers(model) -> dict:
    return {init.name: init for init in model.graph.initializer}


def gemm_to_matmul(model) -> int:
    """Gemm(A, B const, C) -> MatMul(A, B or B^T) [+ Add C], in place. Returns how many."""
    from onnx import helper, numpy_helper

    inits = _initializers(model)
    nodes = list(model.graph.node)
    out_nodes = []
    count = 0
    for node in nodes:
        if node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in inits:
            out_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            out_nodes.append(node)
            continue
        b = numpy_helper.to_array(inits[node.input[1]])
        name = node.name or f"gemm_{count}"
        if attrs.get("transB", 0):
            b = np.ascontiguousarray(b.T)
            b_name = f"{node.input[1]}__T"
            if b_name not in inits:
                t = numpy_helper.from_array(b, b_name)
                model.graph.initializer.append(t)
                inits[b_name] = t
        else:
            b_name = node.input[1]
        has_c = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}__mm" if has_c else node.output[0]
        out_nodes.append(helper.make_node("MatMul", [node.input[0], b_name], [mm_out], name=f"{name}__MatMul"))
        if has_c:
            out_nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{name}__Add"))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(out_nodes)
    _drop_unused_initializers(model)
    return count


def _drop_unused_initializers(model) -> None:
    used = {i for n in model.graph.node for i in n.input}
    used |= {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _key(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return hashlib.sha1(a.tobytes()).hexdigest() + str(a.shape)


def weight_index(weights: Mapping[str, tuple[str, np.ndarray]]) -> dict[tuple[str, str], list[str]]:
    """(op type, value key) -> layer names, for matching ONNX weights back to layers.

    ``weights``: layer -> (kind, torch-layout weight). Linear W [out, in] appears as W^T in MatMul;
    Conv weights as they are; Embedding tables as Gather data.
    """
    index: dict[tuple[str, str], list[str]] = {}
    for name, (kind, w) in weights.items():
        if kind == "linear":
            index.setdefault(("MatMul", _key(w.T)), []).append(name)
        elif kind == "conv":
            index.setdefault(("Conv", _key(w)), []).append(name)
        elif kind == "embedding":
            index.setdefault(("Gather", _key(w)), []).append(name)
    return index


def map_nodes(model, weights: Mapping[str, tuple[str, np.ndarray]],
              scheme_of: Callable[[str], Scheme]) -> dict[str, tuple[str, int]]:
    """node name -> (layer, weight input position) for every node whose constant weight is a layer's."""
    from onnx import numpy_helper

    index = weight_index(weights)
    inits = _initializers(model)
    out: dict[str, tuple[str, int]] = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type not in WEIGHT_OPS:
            continue
        pos = 0 if node.op_type == "Gather" else 1
        if len(node.input) <= pos or node.input[pos] not in inits:
            continue
        if not node.name:
            node.name = f"{node.op_type}_{i}"
        arr = numpy_helper.to_array(inits[node.input[pos]])
        if arr.dtype != np.float32:
            continue
        names = index.get((node.op_type, _key(arr)))
        if not names:
            continue
        schemes = {scheme_of(n) for n in names}
        if len(schemes) > 1:
            raise HartkitError(f"ONNX node {node.name}: its weight equals that of layers {names}, which the plan "
                               "quantizes differently; give them the same scheme")
        out[node.name] = (names[0], pos)
    return out


def _fp16_weights(model, nodes: Iterable[tuple[str, int]]) -> None:
    """Store these nodes' weights as float16 initializers read through a Cast (compute stays fp32)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = _initializers(model)
    by_name = {n.name: n for n in model.graph.node}
    new_nodes = []
    done: dict[str, str] = {}
    for node_name, pos in nodes:
        node = by_name[node_name]
        src = node.input[pos]
        if src not in done:
            arr = numpy_helper.to_array(inits[src]).astype(np.float16)
            half = numpy_helper.from_array(arr, f"{src}__fp16")
            model.graph.initializer.append(half)
            cast_out = f"{src}__fp16_as_fp32"
            new_nodes.append(helper.make_node("Cast", [half.name], [cast_out], name=f"{src}__Cast",
                                              to=TensorProto.FLOAT))
            done[src] = cast_out
        node.input[pos] = done[src]
    # Casts go first: their inputs are initializers, so topological order holds.
    nodes_all = new_nodes + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes_all)
    _drop_unused_initializers(model)


def _unshare_activation_qdq(model, quantized: set[str]) -> int:
    """Give the float tensor back to the consumers that are not quantized layers.

    quantize_static puts Q->DQ on a *tensor*, and every consumer then reads the dequantized copy:
    in the residual graphs ``phi(h) = (1 - r) h + r conv(h)`` the ``(1 - r) h`` term would be
    computed from the int8-rounded ``h`` too. The scheme means int8 inputs of the quantized layers
    (what the eager reference does), so other consumers are rewired to the original tensor.
    """
    inits = _initializers(model)
    q_src = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"
             and n.input[0] not in inits}
    dq_src = {n.output[0]: q_src[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0] in q_src}
    count = 0
    for node in model.graph.node:
        if node.name in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            if name in dq_src:
                node.input[i] = dq_src[name]
                count += 1
    return count


class _Reader:
    """A CalibrationDataReader over recorded feeds (only the inputs the graph declares)."""

    def __init__(self, feeds: Iterable[Mapping[str, np.ndarray]], names: list[str]) -> None:
        self._it: Iterator = iter(feeds)
        self._names = names

    def get_next(self):
        item = next(self._it, None)
        if item is None:
            return None
        return {n: np.ascontiguousarray(item[n]) for n in self._names}

    def rewind(self):  # pragma: no cover - required by some ORT versions' interface
        pass


def _reader(feeds, names):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(_Reader, CalibrationDataReader):
        pass

    return Reader(feeds, names)


def _save(model, path: Path) -> None:
    import onnx

    size = sum(t.ByteSize() for t in model.graph.initializer)
    tmp = path.with_name(path.name + ".tmp")
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()  # onnx appends to an existing data file
    if size > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name)
    else:
        onnx.save_model(model, str(tmp))
    os.replace(tmp, path)


def _load(path: Path):
    import onnx

    return onnx.load(str(path))


def initializer_bytes(path: Path) -> int:
    """Bytes of the stored tensors (weights, scales): the file minus graph structure and metadata."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((e.value for e in t.external_data if e.key == "length"), 0))
        else:
            total += t.ByteSize()
    return total


def file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _matmul_input_hessians(model, nodes: Mapping[str, str], feeds: Iterable[Mapping[str, np.ndarray]],
                           work: Path, large: bool) -> dict[str, "Hessian"]:
    """initializer name -> Hessian of the inputs of every MatMul (in ``nodes``: node -> initializer)
    that reads it, over ``feeds``: the graph itself is run by onnxruntime with those inputs made outputs."""
    import onnx
    import onnxruntime as ort

    from hartkit.quantize.algorithms import Hessian

    by_name = {n.name: n for n in model.graph.node}
    tensors = {by_name[n].input[0] for n in nodes}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for t in sorted(tensors - have):
        probe.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    src = work / "probe.onnx"
    if large:
        onnx.save_model(probe, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=src.name + ".data")
    else:
        onnx.save_model(probe, str(src))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the tensors as exported
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    order = sorted(tensors)
    inits = _initializers(model)
    hs: dict[str, Hessian] = {}
    for node, init in nodes.items():
        if init not in hs:
            hs[init] = Hessian(int(inits[init].dims[0]))
    count = 0
    for item in feeds:
        outs = dict(zip(order, sess.run(order, {n: np.ascontiguousarray(item[n]) for n in names})))
        for node, init in nodes.items():
            hs[init].add(outs[by_name[node].input[0]])
        count += 1
    if not count:
        raise HartkitError("gptq: the calibration set has no call of this graph")
    return hs


def _gptq_weights(model, members: list[str], block: int, bits: int, feeds, work: Path, large: bool) -> dict[str, np.ndarray]:
    """GPTQ every member node's weight in place (same initializer: one Hessian over all its readers);
    -> initializer name -> new ``[K, N]`` weight."""
    import torch
    from onnx import numpy_helper

    from hartkit.quantize.algorithms import gptq

    by_name = {n.name: n for n in model.graph.node}
    nodes = {m: by_name[m].input[1] for m in members}
    hs = _matmul_input_hessians(model, nodes, feeds, work, large)
    inits = _initializers(model)
    out = {}
    for init, h in hs.items():
        b = numpy_helper.to_array(inits[init])  # [K, N] = W^T
        w_q = gptq(torch.from_numpy(np.ascontiguousarray(b.T)), h.matrix(), bits=bits, group=block).numpy()
        new = np.ascontiguousarray(w_q.T.astype(np.float32))
        inits[init].CopyFrom(numpy_helper.from_array(new, init))
        out[init] = new
    return out


def _dequantize_nbits(model, node) -> np.ndarray:
    """The ``[K, N]`` float32 weight a 4-bit MatMulNBits node computes with (uint8 or float zero points).
    Unpacked by hand: onnxruntime has no Python call that dequantizes a MatMulNBits blob."""
    from onnx import helper, numpy_helper

    inits = _initializers(model)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    if bits != 4:
        raise HartkitError(f"{node.name}: dequantizing {bits}-bit MatMulNBits is not supported")
    blob = numpy_helper.to_array(inits[node.input[1]]).reshape(n, -1, block // 2)
    q = np.stack([blob & 0x0F, blob >> 4], axis=-1).reshape(n, -1, block).astype(np.float32)
    scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(n, -1, 1)
    if len(node.input) > 3 and node.input[3]:
        zp = numpy_helper.to_array(inits[node.input[3]])
        if zp.dtype == np.uint8:
            zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, : q.shape[1]]
        zp = zp.astype(np.float32).reshape(n, -1, 1)
    else:
        zp = np.float32(8.0)
    w = ((q - zp) * scales).reshape(n, -1)[:, :k]
    return np.ascontiguousarray(w.T)


def quantize_onnx_graph(path: Path, graph: str, weights: Mapping[str, tuple[str, np.ndarray]],
                        scheme_of: Callable[[str], Scheme],
                        calibration: Callable[[], Iterable[Mapping[str, np.ndarray]]] | None = None,
                        calibrated: Mapping[str, np.ndarray] | None = None) -> OnnxQuantReport:
    """Quantize one exported graph file in place.

    ``weights``: the fp32 weights of the layers this graph uses (layer -> (kind, array));
    ``scheme_of``: the layer's scheme; ``calibration``: returns fresh feeds (w8a8_static, gptq);
    ``calibrated``: layer -> ``[out, in]`` weights a gptq layer takes as they are
    (:func:`hartkit.quantize.algorithms.calibrated_weights`, Hessians over every graph that uses the
    layer: an AR weight is then the same in ar_context and ar_stage). Without them, gptq uses this
    graph's calibration feeds alone.
    """
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig, HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer,
    )

    report = OnnxQuantReport(graph, bytes_before=file_bytes(path), tensor_bytes_before=initializer_bytes(path))
    model = _load(path)
    report.gemm_rewritten = gemm_to_matmul(model)
    nodes = map_nodes(model, weights, scheme_of)
    groups: dict[str, list[str]] = {}
    for node, (layer, _pos) in nodes.items():
        s = scheme_of(layer)
        report.nodes[node] = (layer, s.label)
        groups.setdefault(s.name, []).append(node)
    input_names = [i.name for i in model.graph.input]

    large = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD

    def save_tmp(m, dst: Path) -> None:  # protobuf cannot hold more than 2 GB: weights beside it then
        if large:
            onnx.save_model(m, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=dst.name + ".data")
        else:
            onnx.save_model(m, str(dst))

    with tempfile.TemporaryDirectory() as td, _quiet():
        work = Path(td)
        if groups.get("w8a8_static"):
            if calibration is None:
                raise HartkitError(f"graph {graph}: w8a8_static needs calibration inputs")
            src, dst = work / "in.onnx", work / "static.onnx"
            save_tmp(model, src)
            quantize_static(
                str(src), str(dst), _reader(calibration(), input_names), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul", "Conv"], per_channel=True, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, nodes_to_quantize=groups["w8a8_static"], reduce_range=True,
                extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Conv"], "QuantizeBias": False,
                               "ActivationSymmetric": False, "WeightSymmetric": True},
                use_external_data_format=large,
            )
            model = _load(dst)
            _unshare_activation_qdq(model, set(groups["w8a8_static"]))
        if groups.get("w8a8"):
            src, dst = work / "in2.onnx", work / "dynamic.onnx"
            save_tmp(model, src)
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Conv"], per_channel=True,
                             weight_type=QuantType.QInt8, nodes_to_quantize=groups["w8a8"], reduce_range=True,
                             use_external_data_format=large)
            model = _load(dst)
        gathers = {n.name for n in model.graph.node if n.op_type == "Gather"}
        nbits: dict[tuple[int, int, int, str], list[str]] = {}
        for name in ("int4", "int8", "8da4w", "8da8w"):
            for node in groups.get(name, []):
                layer = nodes[node][0]
                s = scheme_of(layer)
                k = weights[layer][1].shape[1]
                level = 4 if s.info.activations == "dynamic" else 0
                nbits.setdefault((s.bits, ort_block_size(k, s), level, s.algorithm), []).append(node)
        given = {m: calibrated[nodes[m][0]] for (_b, _k, _l, algo), ms in nbits.items() if algo == "gptq"
                 for m in ms if calibrated is not None and nodes[m][0] in calibrated}
        if given:
            inits = _initializers(model)
            by_name = {n.name: n for n in model.graph.node}
            for m, w in given.items():
                init = by_name[m].input[1]
                if tuple(inits[init].dims) != tuple(w.shape[::-1]):
                    raise HartkitError(f"graph {graph}: calibrated weight of {nodes[m][0]} has shape {tuple(w.shape)}, "
                                       f"the node's is {tuple(inits[init].dims[::-1])}")
                inits[init].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(np.asarray(w, np.float32).T), init))
                report.algorithms[nodes[m][0]] = "gptq"
                report.calibrated[nodes[m][0]] = np.asarray(w, np.float32)
        gptq_nodes = [m for (_b, _k, _l, algo), ms in nbits.items() if algo == "gptq" for m in ms if m not in given]
        if gptq_nodes:
            if calibration is None:
                raise HartkitError(f"graph {graph}: gptq weights need calibration inputs (recorded feeds of "
                                   f"this graph) for {', '.join(sorted({nodes[n][0] for n in gptq_nodes}))}")
            for (bits, block, _level, algo), members in sorted(nbits.items()):
                members = [m for m in members if m in gptq_nodes]
                if algo == "gptq" and members:
                    done = _gptq_weights(model, members, block, bits, calibration(), work, large)
                    for m in members:
                        layer = nodes[m][0]
                        report.algorithms[layer] = "gptq"
                        report.calibrated[layer] = np.ascontiguousarray(
                            done[next(n for n in model.graph.node if n.name == m).input[1]].T)
        by_out = {}
        for (bits, block, level, algo), members in sorted(nbits.items()):
            # int4 embeddings (Gather) become GatherBlockQuantized: rows stored in int4, blocks along
            # the hidden size, dequantized as they are looked up (the quantizer does Gather in 4 bits only).
            ops = ("MatMul", "Gather") if any(n in gathers for n in members) else ("MatMul",)
            if algo == "hqq":
                cfg = HQQWeightOnlyQuantConfig(block_size=block, bits=bits, op_types_to_quantize=("MatMul",))
            else:  # rtn, and gptq whose weights already lie on this grid
                cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=bits,
                                                   accuracy_level=level, op_types_to_quantize=ops)
            # nodes_to_include is OR-ed with op_types_to_quantize in onnxruntime 1.32 (it does not
            # restrict anything): exclude every other MatMul (and Gather) instead.
            others = [n.name for n in model.graph.node if n.op_type in ops and n.name not in members]
            if algo == "hqq":
                by_out = {n.output[0]: n.name for n in model.graph.node if n.name in members}
            q = MatMulNBitsQuantizer(model, nodes_to_exclude=others, algo_config=cfg)
            q.process()
            model = q.model.model
            if algo == "hqq":
                for n in model.graph.node:
                    if n.op_type == "MatMulNBits" and n.output[0] in by_out:
                        if level:  # HQQ's config takes no accuracy level: the int8-compute schemes set it
                            n.attribute.append(helper_attr("accuracy_level", level))
                        layer = nodes[by_out[n.output[0]]][0]
                        report.algorithms[layer] = "hqq"
                        report.calibrated[layer] = np.ascontiguousarray(_dequantize_nbits(model, n).T)
        fp16 = [(n, nodes[n][1]) for n in groups.get("fp16", [])]
        if fp16:
            _fp16_weights(model, fp16)
    _check_all_applied(model, groups, graph)
    _save(model, path)
    report.bytes_after = file_bytes(path)
    report.tensor_bytes_after = initializer_bytes(path)
    for n in model.graph.node:
        report.ops[n.op_type] = report.ops.get(n.op_type, 0) + 1
    return report


def helper_attr(name: str, value: int):
    from onnx import helper

    return helper.make_attribute(name, value)


def _check_all_applied(model, groups: Mapping[str, list[str]], graph: str) -> None:
    """Every node a quantized scheme was asked for must be gone from the float graph (no silent float)."""
    from onnx import numpy_helper

    inits = _initializers(model)
    left = {}
    for n in model.graph.node:
        pos = 0 if n.op_type == "Gather" else 1
        if n.op_type in WEIGHT_OPS and len(n.input) > pos and n.input[pos] in inits:
            if numpy_helper.to_array(inits[n.input[pos]]).dtype == np.float32:
                left[n.name] = n
    missed = [node for s, names in groups.items() if s not in ("fp32", "fp16") for node in names if node in left]
    if missed:
        raise HartkitError(f"graph {graph}: onnxruntime left nodes {missed} in float; refusing to write a "
                           "partly quantized file")
