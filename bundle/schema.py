"""The manifest's JSON Schema and the bounds it sets on every number that sizes an allocation or a loop."""

from __future__ import annotations

from typing import Any

from hartkit.bundle.format import LOOP_KEYS
from hartkit.loop.plan import MAX_CFG
from hartkit.loop.schedule import NUM_TRAIN_STEPS

# Bounds of every manifest number that sizes an allocation or a loop. The largest real model, HART
# 0.7B at 1024 px (model/presets.py), has 14 scales up to 64x64 tokens, a 4096-entry codebook, 300
# context tokens, latent 32 and head dim 64; the bounds leave 10x or more headroom over it, so only a
# broken or hostile manifest meets them, and it is refused before anything is allocated.
MAX_MANIFEST_BYTES = 64 << 20  # the 0.7B manifest is well under 1 MB
MAX_SCALES = 64
MAX_PATCH = 1024  # side of a stage's token map
MAX_CONTEXT = 4096  # context tokens, system-prompt tokens
MAX_VOCAB = 1 << 16
MAX_LATENT = 1024
MAX_HEAD_DIM = 1024
MAX_PHIS = 64
MAX_IMAGE = 1 << 15  # pixels per side
MAX_STAGE_ELEMENTS = 1 << 28  # last stage's tokens x max(vocab, latent): one RNG draw (0.7B: 2**24)
MAX_DIFFUSION_ELEMENTS = 1 << 28  # last stage's tokens x latent x sampler steps, drawn up front (0.7B: 2**20)
MAX_TENSOR_DIM = 1 << 24  # one dimension of a graph's declared input or output
MAX_TENSOR_RANK = 8
MAX_GRAPHS = 1024
MAX_ARTIFACTS = 100_000
MAX_ARTIFACT_BYTES = 1 << 40
MAX_PATH_CHARS = 1024
MAX_TEXT_VOCAB = 1 << 24  # the text model's token ids (Qwen2: 151k)
MAX_TOLERANCE = 1e6
MAX_INFLATION = 100  # uncompressed / stored bytes of one npz or archive member; weights and golden vectors stay near 1
NAME_PATTERN = "^[a-z][a-z0-9_]*$"

_int = lambda lo, hi: {"type": "integer", "minimum": lo, "maximum": hi}  # noqa: E731
_path = {"type": "string", "minLength": 1, "maxLength": MAX_PATH_CHARS}

# JSON Schema (draft 2020-12) of the manifest: checked with the jsonschema library. Sections the
# runtime does not read (parity, notes, recipe, ...) stay open; their size is bounded by the file's.
MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema_version", "model", "loop", "graphs", "files", "artifacts", "rng", "prompt", "diffusion"],
    "properties": {
        "schema_version": _int(1, 1 << 31),
        "hartkit_version": {"type": "string", "maxLength": 64},
        "model": {"type": "object", "required": ["hart", "vae"]},
        "loop": {
            "type": "object",
            "required": list(LOOP_KEYS),
            "properties": {
                "patch_nums": {"type": "array", "items": _int(1, MAX_PATCH), "minItems": 2, "maxItems": MAX_SCALES},
                "context_token": _int(1, MAX_CONTEXT),
                "vocab_size": _int(1, MAX_VOCAB),
                "latent_dim": _int(1, MAX_LATENT),
                "head_dim": _int(2, MAX_HEAD_DIM),
                "attn_type": {"enum": ["llama", "gpt2"]},
                "num_phis": _int(1, MAX_PHIS),
                # upstream's respacing: "8", "10,15,20", "ddim25" or "" (no respacing)
                "num_sampling_steps": {"type": "string", "maxLength": 64,
                                       "pattern": "^(|ddim[0-9]{1,4}|[0-9]{1,4}(,[0-9]{1,4})*)$"},
                "system_length": _int(0, MAX_CONTEXT),
                "image_size": _int(1, MAX_IMAGE),
                "default_cfg": {"type": "number", "minimum": 0, "maximum": MAX_CFG},
                "stages_at_default_cfg": {"type": "array", "maxItems": MAX_SCALES},
                # llama attention's rotary tables (loop/rope.py); older bundles lack it (theta was 10000)
                "rope": {"type": "object", "required": ["theta"],
                         "properties": {"theta": {"type": "number", "exclusiveMinimum": 0, "maximum": 1e12}},
                         "additionalProperties": {"type": "string", "maxLength": 4096}},
            },
        },
        "graphs": {
            "type": "array",
            "maxItems": MAX_GRAPHS,
            "items": {
                "type": "object",
                "required": ["name", "inputs", "outputs"],
                "properties": {
                    "name": {"type": "string", "pattern": NAME_PATTERN, "maxLength": 64},
                    "inputs": {"type": "array", "items": {"$ref": "#/$defs/tensor"}, "maxItems": 64},
                    "outputs": {"type": "array", "items": {"$ref": "#/$defs/tensor"}, "maxItems": 64},
                },
            },
        },
        "files": {
            "type": "object",
            "maxProperties": 16,
            "propertyNames": {"pattern": NAME_PATTERN, "maxLength": 64},
            "additionalProperties": {"type": "object", "maxProperties": MAX_GRAPHS,
                                     "propertyNames": {"pattern": NAME_PATTERN, "maxLength": 64},
                                     "additionalProperties": _path},
        },
        "constants": _path,
        "tokenizer": _path,
        "artifacts": {
            "type": "array",
            "maxItems": MAX_ARTIFACTS,
            "items": {
                "type": "object",
                "required": ["path", "sha256", "size"],
                "properties": {
                    "path": _path,
                    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    "size": _int(0, MAX_ARTIFACT_BYTES),
                },
            },
        },
        "golden": {
            "type": "object",
            "properties": {
                "graphs": {
                    "type": "object",
                    "maxProperties": MAX_GRAPHS,
                    "propertyNames": {"pattern": NAME_PATTERN, "maxLength": 64},
                    "properties": {"by_format": {
                        "type": "object",
                        "maxProperties": 16,
                        "additionalProperties": {"type": "object", "maxProperties": MAX_GRAPHS,
                                                 "additionalProperties": {"$ref": "#/$defs/golden_graph"}},
                    }},
                    "additionalProperties": {"$ref": "#/$defs/golden_graph"},
                },
                "loop": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/golden_loop"}]},
            },
        },
        "rng": {"type": "object"},
        "prompt": {
            "type": "object",
            "required": ["max_tokens", "system_prompt"],
            "properties": {
                "max_tokens": _int(1, MAX_CONTEXT),
                "system_prompt": {"type": "string", "maxLength": 1 << 20},
                "system_length": _int(0, MAX_CONTEXT),
                "pad_token_id": _int(0, MAX_TEXT_VOCAB),
                "padding_side": {"enum": ["left", "right"]},
                "truncation_side": {"enum": ["left", "right"]},
            },
        },
        "diffusion": {
            "type": "object",
            "required": ["timesteps", "vae_scale"],
            "properties": {
                "timesteps": {"type": "array", "items": _int(0, NUM_TRAIN_STEPS - 1), "maxItems": NUM_TRAIN_STEPS},
                "vae_scale": {"type": "number", "minimum": -1e6, "maximum": 1e6},
                "tables": {"type": "object", "maxProperties": 64,
                           "additionalProperties": {"type": "array", "maxItems": NUM_TRAIN_STEPS}},
            },
        },
    },
    "$defs": {
        "tensor": {
            "type": "object",
            "required": ["name", "dtype", "shape"],
            "properties": {
                "name": {"type": "string", "maxLength": 256},
                "dtype": {"enum": ["float32", "float16", "int64", "int32"]},
                "shape": {"type": "array", "maxItems": MAX_TENSOR_RANK, "items": {"oneOf": [
                    _int(0, MAX_TENSOR_DIM),
                    {"type": "object", "required": ["dim", "min", "max"],
                     "properties": {"dim": {"type": "string", "maxLength": 64}, "min": _int(0, MAX_TENSOR_DIM),
                                    "max": _int(0, MAX_TENSOR_DIM)}},
                ]}},
            },
        },
        "golden_graph": {
            "type": "object",
            "required": ["file"],
            "properties": {"file": _path, "atol": {"type": "number", "minimum": 0, "maximum": MAX_TOLERANCE},
                           "rtol": {"type": "number", "minimum": 0, "maximum": MAX_TOLERANCE}},
        },
        "golden_loop": {
            "type": "object",
            "required": ["file", "prompt", "seed", "cfg"],
            "properties": {"file": _path, "prompt": {"type": "string", "maxLength": 1 << 16},
                           "seed": _int(0, (1 << 64) - 1), "cfg": {"type": "number", "minimum": 0, "maximum": MAX_CFG},
                           "more_smooth": {"type": "boolean"}},
        },
    },
}


_VALIDATOR = None


def validator():
    """The schema's jsonschema validator, built on first use (jsonschema is imported only then)."""
    global _VALIDATOR
    if _VALIDATOR is None:
        import jsonschema

        _VALIDATOR = jsonschema.Draft202012Validator(MANIFEST_SCHEMA)
    return _VALIDATOR
