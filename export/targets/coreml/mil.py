"""Check a Core ML package without Core ML: read its MIL program and weights back, re-compute it in numpy.

Core ML predictions need macOS. On Linux we can still read what the converter wrote: the package's
``model.mlmodel`` protobuf (through ``ct.models.MLModel(path, skip_model_load=True).get_spec()``) holds
the MIL program — functions, ops, their input bindings and immediate constants — and
``weights/weight.bin`` holds the large constants, which :func:`read_blob` decodes itself from the blob
storage layout (64-byte file header; per blob a 64-byte record: sentinel ``0xDEADBEEF``, dtype code,
byte size, data offset), cross-checked against the dtype and shape the program declares.

:class:`MILFunction.run` interprets the ops in program order with numpy, following the MIL op
definitions (``coremltools.converters.mil.mil.ops.defs``; iOS17 ``reshape``'s ``0``/``-1`` rules,
``gather``'s out-of-range indices are an error). Each op is computed in fp32 from its (possibly fp16)
inputs and its result is stored in the dtype the program declares for it, so fp16 programs round
after every op as Core ML stores fp16 tensors; ``fp16=False`` keeps fp32 throughout (weights stay as
stored) to separate structure errors from fp16 error. Result shapes are checked against the
program's declared output types at every op.

What a pass proves: the program that is on disk, with the weights that are on disk, computes the
same function as the torch graph on the given inputs, under the MIL op semantics as documented, in
fp16 storage precision; and the package's interface (names, dtypes, shape ranges) matches the spec.
What it does not prove: that Core ML's own kernels implement those semantics identically, the
accuracy of a given device (the ANE/GPU accumulate differently than fp32-then-round), that the
package compiles and loads on a device, and speed. Ops the interpreter lacks are reported by
:meth:`MILFunction.unsupported_ops`; such a program is not run at all (nothing is claimed for it).

No torch here; coremltools is needed only to parse the protobuf.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from hartkit.errors import HartkitError


class MILError(HartkitError):
    """A package could not be read, or its program disagrees with itself or with the interpreter."""


# MIL DataType enum names (coremltools.proto.MIL_pb2.DataType) -> numpy
NP_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_, "FLOAT16": np.float16, "FLOAT32": np.float32, "FLOAT64": np.float64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64, "STRING": object,
}
# dtype codes of the blob storage (weight.bin), byte-aligned ones only; sub-byte codes (int4, uint1-6)
# belong to compressed weights, which need constexpr ops the interpreter does not have.
BLOB_DTYPES: dict[int, Any] = {1: np.float16, 2: np.float32, 3: np.uint8, 4: np.int8, 6: np.int16, 7: np.uint16,
                               14: np.int32, 15: np.uint32}
BLOB_SENTINEL = 0xDEADBEEF
# `cast`'s dtype strings
CAST_DTYPES = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "int32": np.int32, "int64": np.int64,
               "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "bool": np.bool_}
VARIADIC = {"values"}  # inputs that take a list of values (concat, stack)


@dataclass(frozen=True)
class ValueInfo:
    name: str
    dtype: str  # MIL DataType name, e.g. "FLOAT16"
    shape: tuple[int | None, ...] | None  # None: unknown rank; None entries: unknown dimension


@dataclass
class MILOp:
    type: str
    name: str
    inputs: dict[str, list[str | np.ndarray]]  # variable names or immediate values
    outputs: list[ValueInfo]
    value: Any = None  # const ops: the value (numpy array or str)


@contextlib.contextmanager
def quiet_coremltools():
    """coremltools prints tqdm progress bars and warns about untested torch versions and the missing
    macOS-only native module; none of it is actionable here."""
    loggers = [logging.getLogger(n) for n in ("coremltools", "torch.export", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ----------------------------------------------------------------------------- reading a package


def _value_type(vt) -> tuple[str, tuple[int | None, ...] | None]:
    from coremltools.proto import MIL_pb2

    kind = vt.WhichOneof("type")
    if kind != "tensorType":
        raise MILError(f"value type {kind} is not supported by the MIL check")
    t = vt.tensorType
    dtype = MIL_pb2.DataType.Name(t.dataType)
    if t.rank < 0:
        return dtype, None
    dims = tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in t.dimensions)
    return dtype, dims


def _immediate(value, dtype: str, shape) -> Any:
    tensor = value.immediateValue.tensor
    kind = tensor.WhichOneof("value")
    if kind == "strings":
        vals = list(tensor.strings.values)
        return vals[0] if shape == () else np.array(vals, dtype=object)
    np_dtype = NP_DTYPES[dtype]
    if kind == "bytes":
        arr = np.frombuffer(tensor.bytes.values, dtype=np_dtype).copy()
    elif kind is None:
        arr = np.zeros(0, dtype=np_dtype)
    else:
        arr = np.array(list(getattr(tensor, kind).values)).astype(np_dtype)
    return arr.reshape(shape)


def read_blob(path: Path, offset: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """One constant from a weight file, checked against the program's declared dtype and shape."""
    with open(path, "rb") as f:
        f.seek(offset)
        record = f.read(32)
        if len(record) < 32:
            raise MILError(f"{path}: blob record at {offset} is past the end of the file")
        sentinel, code, size, data_offset = struct.unpack_from("<IIQQ", record)
        if sentinel != BLOB_SENTINEL:
            raise MILError(f"{path}: no blob at offset {offset} (sentinel {sentinel:#x})")
        if code not in BLOB_DTYPES:
            raise MILError(f"{path}: blob at {offset} has dtype code {code} (sub-byte/compressed), not supported")
        np_dtype = np.dtype(BLOB_DTYPES[code])
        if np_dtype != np.dtype(NP_DTYPES[dtype]):
            raise MILError(f"{path}: blob at {offset} holds {np_dtype}, the program declares {dtype}")
        count = math.prod(shape)
        if size != count * np_dtype.itemsize:
            raise MILError(f"{path}: blob at {offset} has {size} bytes, shape {shape} needs {count * np_dtype.itemsize}")
        f.seek(data_offset)
        data = f.read(size)
    if len(data) != size:
        raise MILError(f"{path}: blob at {offset} is truncated")
    return np.frombuffer(data, dtype=np_dtype).reshape(shape).copy()


def _const_value(op, out: ValueInfo, model_dir: Path) -> Any:
    val = op.attributes["val"]
    kind = val.WhichOneof("value")
    if kind == "immediateValue":
        return _immediate(val, out.dtype, out.shape)
    if kind == "blobFileValue":
        if out.shape is None or None in out.shape:
            raise MILError(f"const {out.name}: blob of unknown shape")
        name = val.blobFileValue.fileName
        if not name.startswith("@model_path/"):
            raise MILError(f"const {out.name}: unexpected blob file name {name}")
        return read_blob(model_dir / name[len("@model_path/"):], val.blobFileValue.offset, out.dtype, out.shape)
    raise MILError(f"const {out.name}: value kind {kind} not supported")


def _binding(b) -> str | np.ndarray:
    kind = b.WhichOneof("binding")
    if kind == "name":
        return b.name
    dtype, shape = _value_type(b.value.type)
    return np.asarray(_immediate(b.value, dtype, shape))


@dataclass
class MILFunction:
    name: str
    opset: str
    inputs: list[ValueInfo]
    outputs: list[str]
    ops: list[MILOp]
    description: Any  # the FunctionDescription / ModelDescription (input/output feature types)
    consts: dict[str, Any] = field(default_factory=dict)

    def op_types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.type] = counts.get(op.type, 0) + 1
        return counts

    def unsupported_ops(self) -> set[str]:
        return {op.type for op in self.ops if op.type != "const" and op.type not in OPS}

    def run(self, feeds: Mapping[str, np.ndarray], fp16: bool = True) -> dict[str, np.ndarray]:
        """Interpret the program on ``feeds`` (spec dtypes: float32, int64); outputs by name."""
        return _Interpreter(self, fp16).run(feeds)


@dataclass
class MILProgram:
    path: Path
    spec: Any
    functions: dict[str, MILFunction]
    default_function: str

    def function(self, name: str | None = None) -> MILFunction:
        name = name or self.default_function
        if name not in self.functions:
            raise MILError(f"{self.path}: no function {name!r} (has {sorted(self.functions)})")
        return self.functions[name]

    def consts(self) -> list[tuple[str, MILOp]]:
        """Every const op of every function (for inspection and tests)."""
        return [(f, op) for f, fn in self.functions.items() for op in fn.ops if op.type == "const"]


def load_package(path: str | Path) -> MILProgram:
    """Read a ``.mlpackage`` (single- or multifunction) back from disk."""
    path = Path(path)
    model_dir = path / "Data" / "com.apple.CoreML"
    if not (model_dir / "model.mlmodel").is_file():
        raise MILError(f"{path}: not an mlpackage (no Data/com.apple.CoreML/model.mlmodel)")

    with quiet_coremltools():
        import coremltools as ct

        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise MILError(f"{path}: not an ML program (model type {spec.WhichOneof('Type')})")
    descriptions = {f.name: f for f in spec.description.functions}
    functions = {}
    for fname, fproto in spec.mlProgram.functions.items():
        block = fproto.block_specializations[fproto.opset]
        inputs = [ValueInfo(i.name, *_value_type(i.type)) for i in fproto.inputs]
        ops: list[MILOp] = []
        consts: dict[str, Any] = {}
        for op in block.operations:
            if len(op.blocks):
                raise MILError(f"{path}: op {op.type} has nested blocks (control flow), not supported")
            outs = [ValueInfo(o.name, *_value_type(o.type)) for o in op.outputs]
            name_attr = op.attributes.get("name")
            name = name_attr.immediateValue.tensor.strings.values[0] if name_attr is not None else outs[0].name
            inputs_ = {k: [_binding(b) for b in arg.arguments] for k, arg in op.inputs.items()}
            mop = MILOp(op.type, name, inputs_, outs)
            if op.type == "const":
                mop.value = _const_value(op, outs[0], model_dir)
                consts[outs[0].name] = mop.value
            ops.append(mop)
        desc = descriptions.get(fname, spec.description)
        functions[fname] = MILFunction(fname, fproto.opset, inputs, list(block.outputs), ops, desc, consts)
    default = spec.description.defaultFunctionName or "main"
    return MILProgram(path, spec, functions, default)


# ----------------------------------------------------------------------------- interface check


def check_interface(fn: MILFunction, graph: Mapping[str, Any]) -> list[str]:
    """Problems of a function's interface against a graph spec (``GraphSpec.to_json()``); [] if none.

    Spec dtypes map as Core ML requires: float32 -> FLOAT32, int64 -> INT32 (no int64 multi-arrays).
    Bounded dims must be unknown in the program and carry the spec's (min, max) as the input's shape range.
    """
    from coremltools.proto import Model_pb2

    problems: list[str] = []
    want_in = [i["name"] for i in graph["inputs"]]
    have_in = [i.name for i in fn.inputs]
    if want_in != have_in:
        problems.append(f"inputs {have_in} != spec {want_in}")
    desc_in = {f.name: f for f in fn.description.input}
    by_name = {i.name: i for i in fn.inputs}
    for inp in graph["inputs"]:
        have = by_name.get(inp["name"])
        feat = desc_in.get(inp["name"])
        if have is None or feat is None:
            continue
        want_dtype = {"float32": "FLOAT32", "int64": "INT32", "int32": "INT32", "float16": "FLOAT16"}[inp["dtype"]]
        if have.dtype != want_dtype:
            problems.append(f"input {inp['name']}: dtype {have.dtype} != {want_dtype}")
        arr = feat.type.multiArrayType
        ranges = list(arr.shapeRange.sizeRanges)
        shape = inp["shape"]
        if have.shape is None or len(have.shape) != len(shape):
            problems.append(f"input {inp['name']}: rank {None if have.shape is None else len(have.shape)} != {len(shape)}")
            continue
        for axis, (want, got) in enumerate(zip(shape, have.shape)):
            if isinstance(want, int):
                bounds = (ranges[axis].lowerBound, ranges[axis].upperBound) if ranges else (want, want)
                if got != want or bounds != (want, want):
                    problems.append(f"input {inp['name']} axis {axis}: {got} (range {bounds}) != static {want}")
            else:
                bounds = (ranges[axis].lowerBound, ranges[axis].upperBound) if ranges else None
                if got is not None or bounds != (want["min"], want["max"]):
                    problems.append(f"input {inp['name']} axis {axis}: {got} (range {bounds}) != "
                                    f"{want['dim']} in [{want['min']}, {want['max']}]")
    want_out = [o["name"] for o in graph["outputs"]]
    if fn.outputs != want_out:
        problems.append(f"outputs {fn.outputs} != spec {want_out}")
    desc_out = {f.name: f for f in fn.description.output}
    declared = {o.name: o for op in fn.ops for o in op.outputs}
    for out in graph["outputs"]:
        feat, var = desc_out.get(out["name"]), declared.get(out["name"])
        if feat is None or var is None:
            problems.append(f"output {out['name']}: missing")
            continue
        fdtype = Model_pb2.ArrayFeatureType.ArrayDataType.Name(feat.type.multiArrayType.dataType)
        if fdtype != "FLOAT32" or var.dtype != "FLOAT32":
            problems.append(f"output {out['name']}: dtype {fdtype}/{var.dtype} != FLOAT32")
        if var.shape is not None:
            if len(var.shape) != len(out["shape"]):
                problems.append(f"output {out['name']}: rank {len(var.shape)} != {len(out['shape'])}")
            else:
                for axis, (want, got) in enumerate(zip(out["shape"], var.shape)):
                    if isinstance(want, int) and got != want:
                        problems.append(f"output {out['name']} axis {axis}: {got} != static {want}")
    return problems


# ----------------------------------------------------------------------------- the interpreter


def _f32(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype == np.float16 else x


def _axes(axes, rank: int) -> tuple[int, ...] | None:
    if axes is None:
        return None
    return tuple(int(a) % rank if rank else 0 for a in np.atleast_1d(axes))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (|err| < 1.5e-7): far below fp16 resolution
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * np.exp(-a * a)
    return (s * y).astype(x.dtype)


def _reshape(x, shape):
    shape = [int(s) for s in np.atleast_1d(shape)]
    # iOS17: each 0 copies the input dim at the same position counted from the right (1 if none)
    out = []
    for i, s in enumerate(shape):
        if s == 0:
            j = x.ndim - (len(shape) - i)
            out.append(x.shape[j] if j >= 0 else 1)
        else:
            out.append(s)
    return x.reshape(out)


def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    r = x.ndim
    stride = np.ones(r, int) if stride is None else np.atleast_1d(stride)
    bm = np.zeros(r, bool) if begin_mask is None else np.atleast_1d(begin_mask)
    em = np.zeros(r, bool) if end_mask is None else np.atleast_1d(end_mask)
    sm = np.zeros(r, bool) if squeeze_mask is None else np.atleast_1d(squeeze_mask)
    index: list[Any] = []
    for i in range(r):
        if sm[i]:
            index.append(int(begin[i]))
            continue
        b = None if bm[i] else int(begin[i])
        e = None if em[i] else int(end[i])
        index.append(slice(b, e, int(stride[i])))
    return x[tuple(index)]


def _slice_by_size(x, begin, size):
    index = []
    for i in range(x.ndim):
        b = int(begin[i]) % x.shape[i] if x.shape[i] else 0
        s = int(size[i])
        index.append(slice(b, None if s == -1 else b + s))
    return x[tuple(index)]


def _expand_dims(x, axes):
    out_rank = x.ndim + len(np.atleast_1d(axes))
    for a in sorted(int(a) % out_rank for a in np.atleast_1d(axes)):
        x = np.expand_dims(x, a)
    return x


def _squeeze(x, axes=None):
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=_axes(axes, x.ndim))


def _split(x, axis, num_splits=None, split_sizes=None):
    axis = int(axis)
    if split_sizes is not None:
        cuts = np.cumsum(np.atleast_1d(split_sizes))[:-1]
        return np.split(x, cuts, axis=axis)
    return np.split(x, int(num_splits), axis=axis)


def _concat(values, axis, interleave=False):
    if bool(interleave):
        parts = [np.asarray(v) for v in values]
        stacked = np.stack(parts, axis=int(axis) % parts[0].ndim + 1)
        shape = list(parts[0].shape)
        shape[int(axis) % parts[0].ndim] *= len(parts)
        return stacked.reshape(shape)
    return np.concatenate([np.asarray(v) for v in values], axis=int(axis))


def _gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    axis = int(axis) % x.ndim
    indices = np.asarray(indices).astype(np.int64)
    if int(batch_dims) != 0:
        raise MILError("gather with batch_dims != 0 is not supported by the MIL check")
    if indices.size and (indices.min() < 0 or indices.max() >= x.shape[axis]):
        # iOS17 gather: negative indices are out of bounds and out-of-bounds behaviour is undefined
        raise MILError(f"gather: indices outside [0, {x.shape[axis]}) (undefined on Core ML)")
    return np.take(x, indices, axis=axis)


def _matmul(x, y, transpose_x=False, transpose_y=False):
    x, y = _f32(x), _f32(y)
    if bool(transpose_x) and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if bool(transpose_y) and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _linear(x, weight, bias=None):
    out = np.matmul(_f32(x), _f32(weight).T)
    return out if bias is None else out + _f32(bias)


def _conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    """N-d convolution (NC[spatial] x O,C/g,[k]), one matmul per kernel tap (memory stays O(input))."""
    x, w = _f32(x), _f32(weight)
    nsp = x.ndim - 2
    strides = [1] * nsp if strides is None else [int(s) for s in np.atleast_1d(strides)]
    dil = [1] * nsp if dilations is None else [int(d) for d in np.atleast_1d(dilations)]
    k = list(w.shape[2:])
    eff = [(k[i] - 1) * dil[i] + 1 for i in range(nsp)]
    size = list(x.shape[2:])
    if pad_type == "valid":
        pads = [(0, 0)] * nsp
    elif pad_type == "custom":
        p = [int(v) for v in np.atleast_1d(pad)]
        pads = [(p[2 * i], p[2 * i + 1]) for i in range(nsp)]
    elif pad_type in ("same", "same_lower"):
        pads = []
        for i in range(nsp):
            out = -(-size[i] // strides[i])
            total = max((out - 1) * strides[i] + eff[i] - size[i], 0)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if pad_type == "same" else (big, small))
    else:
        raise MILError(f"conv pad_type {pad_type!r} not supported")
    xp = np.pad(x, [(0, 0), (0, 0)] + pads)
    out_size = [(xp.shape[2 + i] - eff[i]) // strides[i] + 1 for i in range(nsp)]
    n, c = x.shape[:2]
    groups = int(groups)
    o = w.shape[0]
    cg, og = c // groups, o // groups
    result = np.zeros((n, o, math.prod(out_size)), np.float32)
    for tap in np.ndindex(*k):
        index = tuple(slice(tap[i] * dil[i], tap[i] * dil[i] + (out_size[i] - 1) * strides[i] + 1, strides[i])
                      for i in range(nsp))
        xs = xp[(slice(None), slice(None)) + index].reshape(n, c, -1)
        for g in range(groups):
            wt = w[g * og:(g + 1) * og, :, *tap]  # [og, cg]
            result[:, g * og:(g + 1) * og] += np.matmul(wt, xs[:, g * cg:(g + 1) * cg])
    result = result.reshape((n, o, *out_size))
    if bias is not None:
        result = result + _f32(bias).reshape((1, o) + (1,) * nsp)
    return result


def _layer_norm(x, axes=None, gamma=None, beta=None, epsilon=1e-5):
    x = _f32(x)
    ax = _axes(axes, x.ndim) if axes is not None else tuple(range(x.ndim))
    mean = x.mean(axis=ax, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=ax, keepdims=True)
    y = (x - mean) / np.sqrt(var + _f32(epsilon))
    shape = [x.shape[i] if i in ax else 1 for i in range(x.ndim)]
    if gamma is not None:
        y = y * _f32(gamma).reshape(shape)
    if beta is not None:
        y = y + _f32(beta).reshape(shape)
    return y


def _reduce(fn: Callable) -> Callable:
    def op(x, axes=None, keep_dims=False):
        x = _f32(x)
        return fn(x, axis=_axes(axes, x.ndim), keepdims=bool(keep_dims))

    return op


def _softmax(x, axis=-1):
    x = _f32(x)
    e = np.exp(x - x.max(axis=int(axis), keepdims=True))
    return e / e.sum(axis=int(axis), keepdims=True)


def _upsample_nn(x, scale_factor_height=1, scale_factor_width=1):
    x = _f32(x) if x.dtype == np.float16 else x
    h, w = x.shape[-2:]
    oh, ow = int(math.floor(h * float(scale_factor_height))), int(math.floor(w * float(scale_factor_width)))
    rows = np.minimum(np.floor(np.arange(oh) / float(scale_factor_height)).astype(int), h - 1)
    cols = np.minimum(np.floor(np.arange(ow) / float(scale_factor_width)).astype(int), w - 1)
    return x[..., rows, :][..., cols]


def _gelu(x, mode="EXACT"):
    x = _f32(x)
    if mode == "EXACT":
        return 0.5 * x * (1.0 + _erf(x / np.float32(math.sqrt(2.0))))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(1.702 * x)
    raise MILError(f"gelu mode {mode!r} not supported")


def _sdpa(query, key, value, attn_mask=None):
    q, k, v = _f32(query), _f32(key), _f32(value)
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / np.float32(math.sqrt(q.shape[-1]))
    if attn_mask is not None:
        m = np.asarray(attn_mask)
        scores = np.where(m, scores, -np.inf) if m.dtype == np.bool_ else scores + _f32(m)
    return np.matmul(_softmax(scores, -1), v)


def _binary(fn: Callable) -> Callable:
    return lambda x, y: fn(_f32(x), _f32(y))


def _unary(fn: Callable) -> Callable:
    return lambda x: fn(_f32(x))


OPS: dict[str, Callable[..., Any]] = {
    # elementwise binary (numpy broadcasting = MIL broadcasting)
    "add": _binary(np.add), "sub": _binary(np.subtract), "mul": _binary(np.multiply),
    "real_div": _binary(np.divide), "pow": _binary(np.power), "maximum": _binary(np.maximum),
    "minimum": _binary(np.minimum), "floor_div": _binary(np.floor_divide), "mod": _binary(np.mod),
    "equal": _binary(np.equal), "not_equal": _binary(np.not_equal), "less": _binary(np.less),
    "less_equal": _binary(np.less_equal), "greater": _binary(np.greater), "greater_equal": _binary(np.greater_equal),
    "logical_and": _binary(np.logical_and), "logical_or": _binary(np.logical_or),
    "logical_xor": _binary(np.logical_xor), "logical_not": _unary(np.logical_not),
    # elementwise unary
    "abs": _unary(np.abs), "sqrt": _unary(np.sqrt), "square": _unary(np.square), "exp": _unary(np.exp),
    "sin": _unary(np.sin), "cos": _unary(np.cos), "tanh": _unary(np.tanh), "floor": _unary(np.floor),
    "ceil": _unary(np.ceil), "sign": _unary(np.sign), "round": _unary(np.round), "erf": _unary(_erf),
    "rsqrt": lambda x, epsilon=1e-12: 1.0 / np.sqrt(_f32(x) + _f32(epsilon)),
    "inverse": lambda x, epsilon=1e-4: 1.0 / (_f32(x) + _f32(epsilon)),
    "log": lambda x, epsilon=1e-45: np.log(_f32(x) + _f32(epsilon)),
    "clip": lambda x, alpha, beta: np.clip(_f32(x), _f32(alpha), _f32(beta)),
    "identity": lambda x: x,
    "cast": lambda x, dtype: np.asarray(x).astype(CAST_DTYPES[str(dtype)]),
    # activations
    "relu": _unary(lambda x: np.maximum(x, 0)), "sigmoid": _unary(_sigmoid),
    "silu": _unary(lambda x: x * _sigmoid(x)), "gelu": _gelu, "softmax": _softmax,
    # linear algebra and normalisation
    "linear": _linear, "matmul": _matmul, "conv": _conv, "layer_norm": _layer_norm,
    "scaled_dot_product_attention": _sdpa,
    # reductions
    "reduce_mean": _reduce(np.mean), "reduce_sum": _reduce(np.sum), "reduce_max": _reduce(np.max),
    "reduce_min": _reduce(np.min), "reduce_prod": _reduce(np.prod),
    "reduce_sum_square": _reduce(lambda x, axis, keepdims: np.sum(x * x, axis=axis, keepdims=keepdims)),
    # shapes and indexing
    "reshape": _reshape, "transpose": lambda x, perm: np.transpose(x, [int(p) for p in perm]),
    "expand_dims": _expand_dims, "squeeze": _squeeze, "tile": lambda x, reps: np.tile(x, [int(r) for r in reps]),
    "concat": _concat, "stack": lambda values, axis: np.stack([np.asarray(v) for v in values], axis=int(axis)),
    "split": _split, "slice_by_index": _slice_by_index, "slice_by_size": _slice_by_size, "gather": _gather,
    "gather_along_axis": lambda x, indices, axis=0, validate_indices=False: np.take_along_axis(
        x, np.asarray(indices).astype(np.int64), axis=int(axis)),
    "select": lambda cond, a, b: np.where(np.asarray(cond).astype(bool), a, b),
    "shape": lambda x: np.array(np.shape(x), np.int32),
    "fill": lambda shape, value=0.0: np.full([int(s) for s in shape], value),
    "range_1d": lambda start, end, step: np.arange(start, end, step),
    "upsample_nearest_neighbor": _upsample_nn,
}


class _Interpreter:
    def __init__(self, fn: MILFunction, fp16: bool) -> None:
        self.fn = fn
        self.fp16 = fp16
        # the last op index that reads each variable, to free intermediates early (big graphs)
        self.last_use: dict[str, int] = {}
        for i, op in enumerate(fn.ops):
            for args in op.inputs.values():
                for a in args:
                    if isinstance(a, str):
                        self.last_use[a] = i

    def _store(self, value: Any, info: ValueInfo, op: MILOp) -> Any:
        if isinstance(value, str):
            return value
        value = np.asarray(value)
        dtype = NP_DTYPES[info.dtype]
        if info.dtype == "FLOAT16" and not self.fp16:
            dtype = np.float32
        if info.dtype in ("FLOAT16", "FLOAT32") and value.dtype == np.float64:
            value = value.astype(np.float32)
        value = value.astype(dtype, copy=False)
        if info.shape is not None:
            ok = value.ndim == len(info.shape) and all(d is None or d == s for d, s in zip(info.shape, value.shape))
            if not ok:
                raise MILError(f"op {op.type} '{op.name}': result {info.name} has shape {value.shape}, "
                               f"the program declares {info.shape}")
        return value

    def _feed(self, inp: ValueInfo, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        dtype = NP_DTYPES[inp.dtype]
        if np.issubdtype(dtype, np.integer) and x.size and (x.min() < np.iinfo(dtype).min or x.max() > np.iinfo(dtype).max):
            raise MILError(f"input {inp.name}: values do not fit {inp.dtype}")
        x = x.astype(dtype)
        if inp.shape is not None and (x.ndim != len(inp.shape)
                                      or any(d is not None and d != s for d, s in zip(inp.shape, x.shape))):
            raise MILError(f"input {inp.name}: shape {x.shape} does not fit {inp.shape}")
        if self.fp16 is False and x.dtype == np.float16:
            x = x.astype(np.float32)
        return x

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        fn = self.fn
        missing = [i.name for i in fn.inputs if i.name not in feeds]
        if missing:
            raise MILError(f"function {fn.name}: missing inputs {missing}")
        env: dict[str, Any] = {i.name: self._feed(i, feeds[i.name]) for i in fn.inputs}
        keep = set(fn.outputs)
        for i, op in enumerate(fn.ops):
            if op.type == "const":
                env[op.outputs[0].name] = self._store(op.value, op.outputs[0], op)
                continue
            impl = OPS.get(op.type)
            if impl is None:
                raise MILError(f"op {op.type} ('{op.name}') is not supported by the MIL check")
            kwargs = {}
            for key, args in op.inputs.items():
                vals = [env[a] if isinstance(a, str) else a for a in args]
                kwargs[key] = vals if key in VARIADIC else vals[0]
            kwargs = {k: (str(v) if isinstance(v, np.ndarray) and v.dtype == object else v) for k, v in kwargs.items()}
            try:
                result = impl(**kwargs)
            except MILError:
                raise
            except Exception as exc:  # a program the interpreter cannot follow: say where
                raise MILError(f"op {op.type} '{op.name}': {type(exc).__name__}: {exc}") from exc
            results = result if isinstance(result, (list, tuple)) else [result]
            if len(results) != len(op.outputs):
                raise MILError(f"op {op.type} '{op.name}': {len(results)} results, program declares {len(op.outputs)}")
            for info, value in zip(op.outputs, results):
                env[info.name] = self._store(value, info, op)
            for args in op.inputs.values():
                for a in args:
                    if isinstance(a, str) and self.last_use.get(a) == i and a not in keep:
                        env.pop(a, None)
        return {name: np.asarray(env[name]) for name in fn.outputs}
