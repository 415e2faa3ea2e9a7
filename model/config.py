"""Configuration dataclasses for HART's two checkpoint folders (``llm/`` and ``tokenizer/``).

Field names and defaults mirror the public HART code (``HARTForT2IConfig`` and
``HARTAutoEncoderConfig``), so a released ``config.json`` reads as-is. As upstream does, keys a
config class does not know are dropped (upstream's ``super().__init__()`` discards them); we warn
instead of failing. Training-only fields are kept so that a config written back is the same.

This module imports no torch: the runtime reads configs too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from hartkit.errors import CheckpointError

HART_MODEL_TYPES = ("hart_transformer_t2i",)
VAE_MODEL_TYPES = ("hart_autoencoder_with_disc", "hart_autoencoder")


def _coerce(value: Any, default: Any) -> Any:
    """JSON has lists where upstream has tuples; keep the dataclass' tuple type."""
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({type(value).__name__})"


def _type_problem(value: Any, annotation: str, bounds: tuple[float, float] | None) -> str | None:
    """What the value should be, when it is not that (None when it is). JSON gives int, float, bool,
    str, None, list and dict; a bool is never a number here, a number never a bool."""
    def number(v: Any, integer: bool) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        return isinstance(v, int) if integer else math.isfinite(v)

    low, high = bounds if bounds else (None, None)
    span = f" in [{low:g}, {high:g}]" if bounds else ""
    if annotation == "int":
        ok = number(value, True) and (not bounds or low <= value <= high)
        return None if ok else f"a whole number{span}"
    if annotation == "float":
        ok = number(value, False) and (not bounds or low <= value <= high)
        return None if ok else f"a finite number{span}"
    if annotation == "bool":
        return None if isinstance(value, bool) else "true or false"
    if annotation == "str":
        return None if isinstance(value, str) else "a string"
    if annotation == "str | None":
        return None if value is None or isinstance(value, str) else "a string or null"
    if annotation == "tuple[int, ...]":
        ok = (isinstance(value, (list, tuple)) and 1 <= len(value) <= 32
              and all(number(v, True) and (not bounds or low <= v <= high) for v in value))
        return None if ok else f"a list of 1 to 32 whole numbers{span}"
    return None  # pragma: no cover - every field's annotation is one of the above


class _JsonConfig:
    """Shared reading/writing of a config dataclass from/to config.json."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ()
    # Bounds of numeric fields (a list field: of each element). Wide enough for any released HART and
    # its variants; they keep a hostile or mistyped value (0, -1, 1e9) from reaching the model code.
    BOUNDS: ClassVar[dict[str, tuple[float, float]]] = {}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "<dict>") -> "_JsonConfig":
        model_type = data.get("model_type")
        if model_type is not None and model_type not in cls.MODEL_TYPES:
            raise CheckpointError(
                f"{source}: model_type {model_type!r} is not supported by {cls.__name__}; "
                f"expected one of {list(cls.MODEL_TYPES)}"
            )
        known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        kwargs: dict[str, Any] = {}
        dropped = []
        wrong = []
        for key, value in data.items():
            if key in known:
                expected = _type_problem(value, str(known[key].type), cls.BOUNDS.get(key))
                if expected:
                    wrong.append(f"{key!r}: expected {expected}, found {_describe(value)}")
                    continue
                default = known[key].default
                kwargs[key] = _coerce(value, default)
            elif not key.startswith("_") and key not in _HF_BOOKKEEPING:
                dropped.append(key)
        if wrong:
            raise CheckpointError(f"{source}: invalid {cls.__name__} value(s): " + "; ".join(wrong))
        if dropped:
            warnings.warn(
                f"{source}: ignoring keys unknown to {cls.__name__} (as upstream does): {sorted(dropped)}",
                stacklevel=2,
            )
        if model_type is None:
            kwargs["model_type"] = cls.MODEL_TYPES[0]
        try:
            cfg = cls(**kwargs)  # type: ignore[call-arg]
        except TypeError as exc:  # pragma: no cover - dataclass field errors
            raise CheckpointError(f"{source}: {exc}") from exc
        cfg.validate(source)  # type: ignore[attr-defined]
        return cfg

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "_JsonConfig":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: config file not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
        except RecursionError:
            raise CheckpointError(f"{path}: not valid JSON (nested too deeply)") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


# Keys transformers' PretrainedConfig writes into every config.json; never a reason to warn.
_HF_BOOKKEEPING = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "auto_map", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "pruned_heads",
    "tie_word_embeddings", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "max_length",
    "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "finetuning_task", "id2label", "label2id", "tokenizer_class",
    "prefix", "bos_token_id", "pad_token_id", "eos_token_id", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "problem_type", "name_or_path",
}


@dataclass
class HARTConfig(_JsonConfig):
    """``llm/config.json``: the AR transformer and its residual diffusion head."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = HART_MODEL_TYPES
    BOUNDS: ClassVar[dict[str, tuple[float, float]]] = {
        "context_token": (1, 4096), "context_dim": (1, 65536), "depth": (1, 512), "embed_dim": (4, 65536),
        "num_heads": (1, 1024), "mlp_ratio": (0.01, 64), "norm_eps": (0, 1), "patch_nums": (1, 256),
        "diff_width": (1, 65536), "diff_depth": (1, 512), "context_norm_scale": (-1e6, 1e6),
        "diffusion_head_repeats": (1, 64), "drop_rate": (0, 1), "attn_drop_rate": (0, 1),
        "drop_path_rate": (0, 1), "cond_drop_rate": (0, 1), "diffusion_batch_mul": (0, 1024),
    }

    model_type: str = "hart_transformer_t2i"
    vae_path: str | None = None
    context_token: int = 77
    context_dim: int = 768
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = False
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    mlp_type: str = "gpt2"
    attn_type: str = "gpt2"
    disable_aln: bool = False
    use_timestep_embed: bool = False
    sep_aln_pooling_mode: str = "max"
    use_cross_attn: bool = False
    diff_width: int = 1024
    diff_depth: int = 6
    num_sampling_steps: str = "8"
    sampler: str = "iddpm"
    use_context_norm: bool = False
    context_norm_scale: float = 1.0
    diffusion_head_repeats: int = 1
    # Training-only; kept so a config round-trips unchanged.
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    cond_drop_rate: float = 0.1
    diffusion_batch_mul: int = 4
    flash_if_available: bool = True
    fused_if_available: bool = True

    def validate(self, source: str = "config") -> None:
        problems = []
        if self.attn_type not in ("llama", "gpt2"):
            problems.append(f"attn_type {self.attn_type!r} (expected 'llama' or 'gpt2')")
        if self.mlp_type not in ("llama", "gpt2"):
            problems.append(f"mlp_type {self.mlp_type!r} (expected 'llama' or 'gpt2')")
        if self.sep_aln_pooling_mode not in ("max", "avg"):
            problems.append(f"sep_aln_pooling_mode {self.sep_aln_pooling_mode!r} (expected 'max' or 'avg')")
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        elif (self.embed_dim // self.num_heads) % 4:
            problems.append(f"head dim {self.embed_dim // self.num_heads} must be a multiple of 4 (2-D RoPE)")
        if len(self.patch_nums) < 2 or self.patch_nums[0] != 1 or list(self.patch_nums) != sorted(set(self.patch_nums)):
            problems.append(f"patch_nums {list(self.patch_nums)} must start at 1 and strictly increase")
        if self.sampler != "iddpm":
            problems.append(f"sampler {self.sampler!r} (only 'iddpm' exists upstream)")
        for flag in ("shared_aln", "disable_aln", "use_timestep_embed", "use_cross_attn"):
            if getattr(self, flag):
                problems.append(f"{flag}=True is not supported (no released HART checkpoint uses it)")
        from hartkit.loop.schedule import IDDPMSchedule

        try:
            IDDPMSchedule.create(self.num_sampling_steps)
        except Exception as exc:  # the schedule names what is wrong with the string
            problems.append(f"num_sampling_steps {self.num_sampling_steps!r}: {exc}")
        if problems:
            raise CheckpointError(f"{source}: invalid HART config: " + "; ".join(problems))

    # Derived quantities (upstream names in comments).
    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_stages(self) -> int:
        """Number of AR stages including the final one (= len(patch_nums))."""
        return len(self.patch_nums)

    @property
    def seq_len(self) -> int:
        """Total positions per CFG branch: context + all scales but the 1x1 (upstream L + ctx - 1)."""
        return self.context_token + sum(pn * pn for pn in self.patch_nums) - 1

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of the block MLP, computed as upstream does for each variant."""
        if self.mlp_type == "llama":
            return int((self.embed_dim * self.mlp_ratio * 2) / 3 + 255) // 256 * 256
        return round(self.embed_dim * self.mlp_ratio)

    @property
    def max_position_embeddings(self) -> int:
        return 2 ** int(math.ceil(math.log2(self.seq_len)))


@dataclass
class VAEConfig(_JsonConfig):
    """``tokenizer/config.json``: HART's hybrid VQ autoencoder."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = VAE_MODEL_TYPES
    BOUNDS: ClassVar[dict[str, tuple[float, float]]] = {
        "vocab_size": (1, 1 << 20), "z_channels": (1, 4096), "ch": (32, 4096), "dropout": (0, 1),
        "beta": (-1e6, 1e6), "quant_conv_ks": (1, 15), "quant_resi": (-1e6, 1e6), "share_quant_resi": (0, 64),
        "default_qresi_counts": (0, 1024), "v_patch_nums": (1, 256), "ch_mult": (1, 64), "levels": (1, 1024),
    }

    model_type: str = "hart_autoencoder_with_disc"
    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    dropout: float = 0.0
    beta: float = 0.25
    using_znorm: bool = False
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    default_qresi_counts: int = 0
    v_patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    test_mode: bool = False
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    levels: tuple[int, ...] = (8, 8, 8, 6, 5)
    quantizer_type: str = "var"
    hybrid: bool = False
    disable_quant_resi: bool = False
    freeze_codebook_for_hybrid: bool = True
    double_decoder: bool = False
    # Not a config key upstream (hard-coded to 2 in hart_autoencoder.py); kept fixed here too.
    NUM_RES_BLOCKS: ClassVar[int] = 2

    def validate(self, source: str = "config") -> None:
        problems = []
        if self.quantizer_type not in ("var", "var_hybrid"):
            problems.append(f"quantizer_type {self.quantizer_type!r} (expected 'var' or 'var_hybrid')")
        if self.share_quant_resi < 0:
            problems.append(f"share_quant_resi {self.share_quant_resi} (expected >= 0)")
        if self.ch % 32:
            problems.append(f"ch {self.ch} must be a multiple of 32 (GroupNorm(32))")
        if self.double_decoder:
            problems.append("double_decoder=True is not supported")
        if problems:
            raise CheckpointError(f"{source}: invalid tokenizer config: " + "; ".join(problems))

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


__all__ = ["HARTConfig", "VAEConfig", "HART_MODEL_TYPES", "VAE_MODEL_TYPES", "field"]
