"""The JavaScript runtime (js/) against the Python runtime: same seed, same tokens, same image.

The Python side builds what the Node tests compare against: the demo model's fp32 ONNX bundle (and the
tiny checkpoint's), the Python runtime's tokens and images for several prompts, seeds and guidances,
the RNG's raw words and draws, RoPE tables, and tokenizer ids on many prompts (the bundle's tokenizer
and a Qwen2-shaped one). Then ``node --test`` runs js/test/ against them (HARTKIT_JS_FIXTURES).
Skips with the reason when node or js/node_modules (``npm ci`` in js/) is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
JS = ROOT / "js"
DEMO = ROOT / "assets" / "demo"

NODE = shutil.which("node")
needs_node = [
    pytest.mark.skipif(NODE is None, reason="node is not installed (the JS runtime's tests need Node >= 20)"),
    pytest.mark.skipif(not (JS / "node_modules" / "onnxruntime-node").is_dir(),
                       reason="js/node_modules is missing: run `npm ci` in js/ (.ci/run does when node is present)"),
]

# (prompt, seed, options): the JS runtime must give the Python runtime's tokens and image for each.
DEMO_CASES = [
    ("a red circle above a blue square on a yellow background", 0, {}),
    ("a red circle above a blue square on a yellow background", 1, {}),
    ("a green triangle to the left of a purple circle on a white background", 7, {}),
    ("a blue square on a black background", 123456789, {"cfg": 4.5}),
    ("a yellow triangle below a red square on a green background", 2**64 - 1, {"cfg": 1.25}),  # t == 1: unguided head
    ("a purple circle on an orange background", 5, {"cfg": 0.0}),
    ("a white square to the right of a blue triangle on a red background", 11, {"more_smooth": False}),
    ("a red triangle on a blue background", 3, {"top_p": 0.9}),
    ("a red circle " * 12 + "on a blue background", 2, {}),  # longer than max_tokens: truncated
]

TOKENIZER_PROMPTS = [
    "a red circle above a blue square", "", " ", "  leading and trailing  ", "Hello, World!! 123 4567",
    "it's they're we'll I'd you've", "IT'S CAPS'LL", "tabs\tand\nnewlines\r\n\n end", "émigré café naïve",
    "東京タワーの夜景", "emoji 🐱🚀 mixed", "a<|endoftext|>b", "<|im_start|>user hi<|im_end|>",
    "numbers 3.14159 and 1,000,000", "under_score snake_case CamelCase", "trailing spaces   ",
    "ｆｕｌｌｗｉｄｔｈ", "Ä\u0308 combining", "a " * 200,
]

# Upstream Qwen2's pre-tokenizer pattern (tokenizer.json of Qwen/Qwen2-1.5B-Instruct).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _export(checkpoint: Path, out: Path) -> Path:
    from hartkit.export.exporter import export_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_checkpoint(checkpoint, out, ["onnx"])
    return out


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory) -> Path:
    if not (DEMO / "llm" / "config.json").is_file():
        pytest.skip("assets/demo is not shipped")
    return _export(DEMO, tmp_path_factory.mktemp("js") / "demo-fp32")


def _qwen2_shaped_tokenizer(folder: Path) -> Path:
    """A small byte-level BPE with Qwen2's normalizer, pre-tokenizer regex and special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from hartkit.loop.prompt import HART_SYSTEM_PROMPT

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([HART_SYSTEM_PROMPT, *TOKENIZER_PROMPTS] * 3, trainer)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "pad_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "padding_side": "right", "truncation_side": "right", "model_max_length": 32768,
        "added_tokens_decoder": {str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False,
                                                              "rstrip": False, "normalized": False, "single_word": False}
                                 for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")},
    }))
    return folder


def _tokenizer_cases(folder: Path, max_tokens: int) -> dict:
    from hartkit.loop.prompt import HART_SYSTEM_PROMPT, PromptTokenizer

    tok = PromptTokenizer.from_dir(folder)
    cases = []
    for prompt in TOKENIZER_PROMPTS:
        batch = tok.encode([prompt], max_tokens)
        cases.append({"prompt": prompt, "ids": batch.ids[0].tolist(), "mask": batch.mask[0].astype(int).tolist(),
                      "truncated": batch.truncated[0]})
    section = {"system_prompt": HART_SYSTEM_PROMPT, "use_system_prompt": True, "max_tokens": max_tokens,
               "pad_token_id": tok.pad_token_id, "padding_side": tok.padding_side,
               "truncation_side": tok.truncation_side}
    return {"dir": str(folder), "section": section, "system_ids": batch.system_ids.tolist(), "cases": cases}


def _generations(bundle: Path, cases, arrays: dict, prefix: str) -> list[dict]:
    from hartkit.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle)
    out = []
    for i, (prompt, seed, options) in enumerate(cases):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the truncation warning of the long prompt
            image, trace = pipe.generate(prompt, seed=seed, **options)
        key = f"{prefix}{i}"
        arrays[f"{key}.image"] = image
        for si, tokens in enumerate(trace.tokens):
            arrays[f"{key}.tokens.{si}"] = np.asarray(tokens, np.int32).reshape(-1)
        out.append({"key": key, "prompt": prompt, "seed": str(seed), "options": options,
                    "stages": len(trace.tokens)})
    return out


def _rng_cases(arrays: dict) -> list[dict]:
    from hartkit.loop.rng import PortableRNG

    out = []
    for seed in (0, 1, 42, 2**32 + 5, 2**64 - 1):
        raw = PortableRNG(seed).raw(37)  # not a multiple of 4: the block boundary moves between draws
        rng = PortableRNG(seed)
        rng.raw(3)
        key = f"rng{len(out)}"
        arrays[f"{key}.exponential"] = rng.exponential((5, 7))
        arrays[f"{key}.normal"] = rng.normal((3, 3))  # odd count: the last z1 is dropped
        arrays[f"{key}.uniform"] = rng.uniform((9,))
        out.append({"key": key, "seed": str(seed), "raw": [format(int(w), "016x") for w in raw]})
    return out


def _rope_cases(arrays: dict) -> list[dict]:
    from hartkit.loop.rope import context_positions, rope_cos_sin_1d, rope_cos_sin_2d, stage_positions

    out = []
    for i, (mask, pns, head_dim) in enumerate([([1, 1, 1, 0, 0], (1, 2, 3, 4, 6, 8), 32),
                                               ([1] * 7 + [0] * 9, (1, 2, 3, 5, 8, 13, 64), 64)]):
        m = np.array([mask], bool)
        pos = context_positions(m)
        cos, sin = rope_cos_sin_1d(pos, head_dim)
        arrays[f"rope{i}.cos1d"], arrays[f"rope{i}.sin1d"] = cos, sin
        for si in range(1, len(pns)):
            cos, sin = rope_cos_sin_2d(stage_positions(pns, si, pos[:, -1]), head_dim)
            arrays[f"rope{i}.cos2d.{si}"], arrays[f"rope{i}.sin2d.{si}"] = cos, sin
        out.append({"key": f"rope{i}", "mask": mask, "patch_nums": list(pns), "head_dim": head_dim})
    return out


@pytest.fixture(scope="module")
def fixtures(demo_bundle, onnx_bundle, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("js-fixtures")
    tiny_bundle, _ = onnx_bundle
    arrays: dict[str, np.ndarray] = {}
    spec = {
        "demo_bundle": str(demo_bundle),
        "tiny_bundle": str(tiny_bundle),
        "demo": _generations(demo_bundle, DEMO_CASES, arrays, "demo"),
        "tiny": _generations(tiny_bundle, DEMO_CASES[:2], arrays, "tiny"),
        "rng": _rng_cases(arrays),
        "rope": _rope_cases(arrays),
        "tokenizers": [_tokenizer_cases(demo_bundle / "tokenizer", 16),
                       _tokenizer_cases(_qwen2_shaped_tokenizer(folder / "qwen2-shaped"), 24)],
    }
    np.savez(folder / "arrays.npz", **arrays)
    spec["arrays"] = str(folder / "arrays.npz")
    (folder / "fixtures.json").write_text(json.dumps(spec, indent=1))
    return folder


@needs_node[0]
@needs_node[1]
def test_node_runtime_matches_python(fixtures):
    """Every Node test (js/test/*.test.js) passes against the Python runtime's outputs."""
    env = {**os.environ, "HARTKIT_JS_FIXTURES": str(fixtures / "fixtures.json")}
    proc = subprocess.run([NODE, "--test", "--test-reporter=spec", "test/"], cwd=JS, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    # every fixture-driven test ran (none skipped for want of fixtures)
    assert "# skipped 0" in proc.stdout or "ℹ skipped 0" in proc.stdout, proc.stdout[-3000:]


GUIDE_KEY = re.compile(r"`((?:schema_version|files|onnx_weights|artifacts|constants|tokenizer|prompt|loop|rng|diffusion|graphs)"
                       r"(?:\.[a-z_0-9]+)*)`")
# What a port must follow, section by section: every key there must be named in the guide.
GUIDED_SECTIONS = ("loop.rules", "loop.rope", "rng", "diffusion")


def _lookup(manifest: dict, dotted: str):
    node = manifest
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"the porting guide names `{dotted}`, which a manifest lacks"
        node = node[part]
    return node


def test_porting_guide_matches_the_manifest_and_schema(onnx_bundle):
    """README's porting guide names only keys a fresh manifest has, and names every rule a port follows."""
    from hartkit.bundle import MANIFEST_SCHEMA, read_manifest

    readme = (ROOT / "README.md").read_text()
    guide = readme.split("### Porting guide", 1)[1].split("\n## ", 1)[0]
    named = set(GUIDE_KEY.findall(guide))
    manifest = read_manifest(onnx_bundle[0])
    for key in named:
        _lookup(manifest, key)
    for section in GUIDED_SECTIONS:
        for key in _lookup(manifest, section):
            assert f"{section}.{key}" in named, f"`{section}.{key}` is in the manifest but not in the porting guide"
    # the RoPE rule is schema-checked (a theta a port can trust) and refuses a bad one
    assert MANIFEST_SCHEMA["properties"]["loop"]["properties"]["rope"]["required"] == ["theta"]
    from hartkit.bundle import BundleError, parse_manifest

    bad = json.loads((onnx_bundle[0] / "manifest.json").read_text())
    bad["loop"]["rope"]["theta"] = -1
    with pytest.raises(BundleError, match="rope"):
        parse_manifest(json.dumps(bad))
