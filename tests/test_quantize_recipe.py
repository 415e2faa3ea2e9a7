"""Recipes, the support table, plan resolution and the eager quantization rules (no export here).

The rules of hartkit.quantize.fakequant are checked against the libraries themselves: a one-node
ONNX model quantized by onnxruntime is decoded and run, and must equal the torch re-computation.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from hartkit.errors import UsageError
from hartkit.quantize.recipe import PRESETS, Recipe, resolve
from hartkit.quantize.schemes import FORMATS, REFUSED, SCHEMES, SUPPORT, Scheme, support_table

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread (conftest.py)


@pytest.fixture(scope="module")
def tiny_layers(tiny_model, tiny_text_encoder, tiny_system_length):
    from hartkit.model.graphs import hart_graph_specs
    from hartkit.quantize.layers import discover

    return discover(tiny_model, tiny_text_encoder, hart_graph_specs(tiny_model, tiny_text_encoder, tiny_system_length))


# ----------------------------------------------------------------------------- schemes and the table


def test_every_cell_is_supported_or_refused_with_a_reason():
    for s in SCHEMES:
        assert any((s, f) in SUPPORT for f in FORMATS), s
        for f in FORMATS:
            assert ((s, f) in SUPPORT) != ((s, f) in REFUSED), (s, f)
    text = support_table()
    assert "int8" in text and "silently wrong" in text


@pytest.mark.parametrize("text,name,group", [("int4", "int4", 32), ("INT4-g64", "int4", 64), ("int4_g128", "int4", 128),
                                             ("8da4w", "8da4w", 32), ("w8a8_static", "w8a8_static", None),
                                             ({"scheme": "int4", "group_size": 64}, "int4", 64)])
def test_scheme_parsing(text, name, group):
    s = Scheme.parse(text)
    assert (s.name, s.group_size) == (name, group)


@pytest.mark.parametrize("text,match", [
    ("int5", r"unknown scheme 'int5' \(did you mean int8 or int4"),
    ("int4-g48", r"group size 48 is not one of 32, 64, 128"),
    ("int8-g32", r"int8 takes no group size"),
    ({"scheme": "int4", "groupsize": 32}, r"unknown key\(s\) \['groupsize'\]"),
    (4, r"a scheme is a name"),
])
def test_bad_schemes_are_explained(text, match):
    with pytest.raises(UsageError, match=match):
        Scheme.parse(text)


# ----------------------------------------------------------------------------- recipe files


def test_presets_load_and_round_trip(tmp_path):
    for name in PRESETS:
        r = Recipe.load(name)
        r.save(tmp_path / "r.json")
        again = Recipe.load(tmp_path / "r.json")
        assert again.to_dict() == r.to_dict()
    phone = Recipe.load("phone")
    assert phone.components["ar_transformer"] == Scheme("int4", 32)
    assert phone.components["diffusion_head"] == Scheme("int8")
    assert phone.components["vae"] == Scheme("fp16")
    laptop = Recipe.load("laptop")
    assert laptop.components["ar_transformer"] == Scheme("int8")  # weight-only where a format has no int8 compute
    assert laptop.for_format("onnx")[1].get("ar_transformer") == Scheme("w8a8")
    assert laptop.for_format("onnx")[1].get("text_encoder") == Scheme("8da8w")
    assert laptop.for_format("onnx")[0] == Scheme("fp16")
    assert laptop.for_format("coreml")[1].get("text_encoder") == Scheme("int8")
    assert laptop.for_format("executorch")[1]["ar_transformer"] == Scheme("8da8w")
    assert laptop.for_format("executorch")[0] == Scheme("fp32")


def test_presets_keep_executorch_off_fp16():
    """An fp16 layer in an ExecuTorch program stays outside XNNPACK (portable kernels: the 0.7B VAE took
    minutes per image in fp16): the shipped presets give every ExecuTorch component fp32 or an int scheme."""
    for name in PRESETS:
        if name == "fp16":
            continue  # the float16 preset is fp16 by definition (and says so in its description)
        default, components, layers = Recipe.load(name).for_format("executorch")
        for component in ("text_encoder", "ar_transformer", "diffusion_head", "vae"):
            assert components.get(component, default) != Scheme("fp16"), (name, component)
        assert all(scheme != Scheme("fp16") for _, scheme in layers), name


def test_yaml_recipe_with_layer_patterns(tmp_path, tiny_layers):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ncomponents:\n  ar_transformer: int4-g64\nlayers:\n"
                    "  'ar_transformer/head': int8\n  'ar_transformer/blocks.*.ffn.*': {scheme: int4, group_size: 32}\n")
    plan = resolve(Recipe.load(path), tiny_layers, "onnx")
    assert plan.scheme_of("ar_transformer/head") == Scheme("int8")
    assert plan.scheme_of("ar_transformer/blocks.0.ffn.up_proj") == Scheme("int4", 32)
    assert plan.scheme_of("ar_transformer/blocks.0.attn.qkv_proj") == Scheme("int4", 64)
    assert plan.scheme_of("vae/decoder.conv_in") == Scheme("fp32")  # default
    assert plan.assignments["ar_transformer/head"].source == "ar_transformer/head"


@pytest.mark.parametrize("data,match", [
    ({"componets": {"vae": "fp16"}}, r"r.json: unknown recipe key 'componets' \(did you mean components"),
    ({"components": {"ar_transfomer": "int8"}}, r"unknown component 'ar_transfomer' \(did you mean ar_transformer"),
    ({"components": {"vae": "fp61"}}, r"components.vae: unknown scheme 'fp61' \(did you mean fp16"),
    ({"formats": {"coreml2": {}}}, r"unknown format 'coreml2' \(did you mean coreml"),
    ({"formats": {"onnx": {"component": {}}}}, r"formats.onnx key 'component' \(did you mean components"),
    ({"layers": [{"pattern": "head", "scheme": "int8"}]}, r"must look like 'component/path-glob'"),
    ({"layers": [{"pattern": "transformer/head", "scheme": "int8"}]}, r"unknown component 'transformer'"),
    ({"layers": {"ar_transformer/head": "int9"}}, r"unknown scheme 'int9'"),
])
def test_recipe_typos_are_explained(data, match):
    with pytest.raises(UsageError, match=match):
        Recipe.from_dict(data, source="r.json")


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(UsageError, match=r"unknown recipe 'phnoe' \(did you mean phone\?\)"):
        Recipe.load("phnoe")
    with pytest.raises(UsageError, match="not found"):
        Recipe.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        Recipe.load(bad)


# ----------------------------------------------------------------------------- resolution


def test_phone_on_onnx_falls_back_where_it_must_and_says_so(tiny_layers):
    plan = resolve(Recipe.load("phone"), tiny_layers, "onnx")
    emb = plan.assignments["text_encoder/embed_tokens"]  # int4 rows (GatherBlockQuantized)
    assert emb.scheme == Scheme("int4", 32) and "not a multiple of 64" in emb.reason  # tiny: hidden size 32
    word = plan.assignments["ar_transformer/word_embed"]  # 8 input channels: no group size divides it
    assert word.scheme == Scheme("8da8w") and "8 input channels" in word.reason
    assert plan.scheme_of("ar_transformer/blocks.0.attn.qkv_proj") == Scheme("8da4w", 64)
    assert plan.scheme_of("diffusion_head/net.res_blocks.0.mlp.0") == Scheme("8da8w")
    assert plan.scheme_of("vae/decoder.conv_in") == Scheme("fp16")
    lines = plan.fallback_summary()
    assert any("ar_transformer/word_embed" in l for l in lines)
    for n, a in plan.assignments.items():  # tiny is 32 wide: groups of 64 fall back to 32, and say so
        if a.fell_back and n != "ar_transformer/word_embed":
            assert a.scheme.group_size == 32 and "not a multiple of 64" in a.reason, (n, a)
    coreml = resolve(Recipe.load("phone"), tiny_layers, "coreml")  # other formats keep their own defaults
    assert coreml.scheme_of("ar_transformer/blocks.0.attn.qkv_proj") == Scheme("int4", 32)


def test_group_size_fallbacks_name_the_layers(tiny_layers):
    plan = resolve(Recipe.from_dict({"components": {"ar_transformer": "int4-g128", "text_encoder": "int4-g128"}}),
                   tiny_layers, "onnx")
    # the tiny AR width is 64, the text encoder's 32: g128 divides neither
    assert plan.scheme_of("ar_transformer/blocks.0.attn.qkv_proj") == Scheme("int4", 64)
    assert plan.scheme_of("ar_transformer/blocks.0.ffn.down_proj") == Scheme("int4", 128)  # 256 inputs
    assert plan.scheme_of("text_encoder/layers.0.self_attn.q_proj") == Scheme("int4", 32)
    text = "\n".join(plan.fallback_summary())
    assert "from int4-g128 to int4-g64 (64 input channels are not a multiple of 128)" in text
    assert "ar_transformer/blocks.0.attn.qkv_proj" in text


@pytest.mark.parametrize("recipe,fmt,match", [
    ({"components": {"vae": "int4"}}, "onnx", r"int4 is not available on onnx for component vae \(conv layers\): "
                                              r"onnx quantizes only embedding/linear layers with int4.*fp16"),
    ({"components": {"ar_transformer": "int8"}}, "executorch", r"silently wrong.*use 8da8w"),
    ({"components": {"ar_transformer": "int4"}}, "executorch", r"use 8da4w"),
    ({"components": {"diffusion_head": "palettize4"}}, "onnx", r"palettization .* is a Core ML compression"),
    ({"default": "8da4w"}, "coreml", r"Core ML quantizes activations only statically"),
    ({"components": {"vae": "8da8w"}}, "executorch", r"executorch quantizes only linear layers with 8da8w"),
    ({"layers": {"ar_transformer/head": "w8a8"}}, "coreml", r"w8a8 is not available on coreml"),
])
def test_refused_cells_refuse_clearly(tiny_layers, recipe, fmt, match):
    with pytest.raises(UsageError, match=match):
        resolve(Recipe.from_dict(recipe, source="r"), tiny_layers, fmt)


def test_a_pattern_that_matches_nothing_suggests_names(tiny_layers):
    with pytest.raises(UsageError, match=r"matches no layer.*did you mean ar_transformer/head"):
        resolve(Recipe.from_dict({"layers": {"ar_transformer/haed": "int8"}}), tiny_layers, "onnx")


def test_layers_and_graphs_are_measured(tiny_layers):
    qkv = tiny_layers["ar_transformer/blocks.0.attn.qkv_proj"]  # used through F.linear, not its module
    assert qkv.graphs == ("ar_context", "ar_stage") and qkv.shape == (192, 64)
    assert set(tiny_layers["ar_transformer/word_embed"].graphs) >= {"residual_0", "diffusion_condition"}
    assert tiny_layers["diffusion_head/net.cond_embed"].graphs == ("diffusion_cond_embed",)
    assert not any(n.startswith("vae/encoder") for n in tiny_layers.names())  # not in any graph
    assert tiny_layers["text_encoder/embed_tokens"].kind == "embedding"


# ----------------------------------------------------------------------------- eager rules vs the libraries


def _one_matmul(w_kn: np.ndarray):
    from onnx import TensorProto, helper, numpy_helper

    k, n = w_kn.shape
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
                          [numpy_helper.from_array(w_kn, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("bits,k,block", [(4, 64, 32), (4, 96, 32), (8, 64, 64), (8, 96, 32), (8, 8, 16),
                                          (8, 1536, 256), (8, 1024, 256)])
def test_matmulnbits_rule_equals_onnxruntime(bits, k, block):
    import onnxruntime as ort
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from hartkit.quantize.fakequant import int8_block, nbits_ort

    if bits == 8:
        assert int8_block(k) == block  # 64 -> one per channel; 96 -> 3 blocks of 32; 8 -> padded to 16; 1536 -> 6 x 256
    rng = np.random.default_rng(k + bits)
    w = (rng.standard_normal((k, 24)) * 0.1).astype(np.float32)
    x = rng.standard_normal((3, k)).astype(np.float32)
    q = MatMulNBitsQuantizer(_one_matmul(w), algo_config=DefaultWeightOnlyQuantConfig(
        block_size=block, is_symmetric=True, bits=bits))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.process()
    sess = ort.InferenceSession(q.model.model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    want = x @ nbits_ort(torch.from_numpy(w.T.copy()), bits, block).numpy().T
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    assert np.abs(x @ w - want).max() > 1e-3  # it did quantize


@pytest.mark.parametrize("bits,k,block", [(4, 64, 32), (4, 96, 32), (4, 256, 128), (8, 64, 64), (8, 96, 32),
                                          (8, 8, 16), (8, 1536, 256)])
def test_int8_compute_rule_equals_onnxruntime(bits, k, block):
    """MatMulNBits accuracy_level=4 (onnx 8da8w / 8da4w) quantizes activations per row and block."""
    import onnxruntime as ort
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from hartkit.quantize.fakequant import blockwise_int8, nbits_ort

    rng = np.random.default_rng(k * bits)
    w = (rng.standard_normal((k, 24)) * 0.1).astype(np.float32)
    x = rng.standard_normal((3, k)).astype(np.float32)
    x[:, k // 3] *= 20  # an outlier channel: one block's scale differs from the others'
    q = MatMulNBitsQuantizer(_one_matmul(w), algo_config=DefaultWeightOnlyQuantConfig(
        block_size=block, is_symmetric=True, bits=bits, accuracy_level=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.process()
    sess = ort.InferenceSession(q.model.model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    wq = nbits_ort(torch.from_numpy(w.T.copy()), bits, block).numpy().T
    want = blockwise_int8(block)(torch.from_numpy(x)).numpy() @ wq
    weight_only = x @ wq
    err = np.abs(got - want).max()
    assert err < 1e-5 * np.abs(want).max(), err
    assert np.abs(weight_only - want).max() > 100 * err  # the activations were quantized, as emulated


@pytest.mark.parametrize("block", [32, 64])
def test_int4_embedding_rule_equals_onnxruntime(block):
    """onnx int4 on an embedding: GatherBlockQuantized rows, the same blockwise rule as MatMulNBits."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from hartkit.quantize.fakequant import nbits_ort

    w = (np.random.default_rng(block).standard_normal((50, 128)) * 0.1).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gather", ["w", "i"], ["y"], name="g")], "g",
                          [helper.make_tensor_value_info("i", TensorProto.INT64, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 128])],
                          [numpy_helper.from_array(w, "w")])
    q = MatMulNBitsQuantizer(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]),
                             algo_config=DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=4,
                                                                      op_types_to_quantize=("Gather",)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.process()
    assert [n.op_type for n in q.model.model.graph.node] == ["GatherBlockQuantized"]
    sess = ort.InferenceSession(q.model.model.SerializeToString(), providers=["CPUExecutionProvider"])
    idx = np.array([0, 3, 7, 49])
    got = sess.run(None, {"i": idx})[0]
    want = nbits_ort(torch.from_numpy(w), 4, block).numpy()[idx]
    assert np.array_equal(got, want)
    assert np.abs(w[idx] - want).max() > 1e-3


def test_dynamic_activation_rule_equals_onnxruntime():
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from hartkit.quantize.fakequant import dynamic_uint8

    g = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 50])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 50])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = (np.random.default_rng(0).standard_normal((4, 50)) * 3 + 1).astype(np.float32)
    got = sess.run(None, {"x": x})[0]
    want = dynamic_uint8(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() <= 1e-6 * np.abs(x).max()
    assert np.abs(x - want).max() > 1e-3


def test_torchao_8da_schemes_quantize_weights_to_the_stated_levels():
    import copy

    pytest.importorskip("torchao", reason="the ExecuTorch schemes need torchao: pip install 'hartkit[executorch]'")

    from torchao.quantization import quantize_

    from hartkit.quantize.apply import torchao_config

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)
    for label, levels, group in (("8da8w", 256, 64), ("8da4w-g32", 16, 32)):
        q = copy.deepcopy(lin)
        quantize_(q, torchao_config(Scheme.parse(label)))
        w = q.weight.dequantize() if hasattr(q.weight, "dequantize") else q.weight
        blocks = w.detach().reshape(48, -1, group)
        assert max(len(torch.unique(b)) for b in blocks.reshape(-1, group)) <= levels
        with torch.no_grad():
            err = (q(x) - lin(x)).abs().max().item()
        assert 1e-4 < err < (0.05 if levels == 256 else 0.5), (label, err)
