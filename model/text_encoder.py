"""HART's text encoder: a Qwen2 decoder without LM head, re-implemented for export.

Upstream (`sample.py`, `app.py`, `hart/utils/tools.py: encode_prompts`) loads the text model with
``AutoModel.from_pretrained`` (a ``Qwen2Model``), calls it on ``[system prompt; prompt]`` with
``attention_mask = [ones(S); ids != pad]`` and ``output_hidden_states=True``, takes
``hidden_states[-1]`` and drops the first S positions.

- ``hidden_states[-1]`` is the output *after* the final RMSNorm, in transformers 4.42.2 (what upstream
  pinned) and in 4.57 (``check_model_inputs`` replaces the last entry with ``last_hidden_state``).
  :meth:`TextEncoder.forward` returns exactly that.
- Position ids are ``arange(S+T)``: Qwen2 ignores the attention mask for positions.
- The mask is causal AND "key is not padding". With the system prompt (the default) every query sees
  at least the S system keys. A query that sees no key at all (only without the system prompt: left
  padding, or an empty prompt) attends to *every* key, future ones included: that is what 4.42.2's
  SDPA path does on CUDA (``AttentionMaskConverter._unmask_unattended``), where upstream ran.
  Other paths differ on such rows (4.42.2 on CPU adds finfo.min to every score of the row; 4.57's
  eager and SDPA paths give yet other values), so tests compare them only where a key is visible.

The modules are our own (nanoGPT-style, state-dict keys identical to transformers' ``Qwen2Model``), so
the graph is plain: an explicit 4-D additive mask, RoPE computed from positions, eager attention with
a float32 softmax as in transformers' eager path. RoPE ignores ``rope_scaling`` as 4.42.2's Qwen2 did.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hartkit.errors import CheckpointError, UsageError
from hartkit.loop.prompt import DEFAULT_MAX_TOKEN_LENGTH, HART_SYSTEM_PROMPT, PromptTokenizer

# Keys that Qwen2Model checkpoints may carry and AutoModel drops without complaint.
_IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)
_IGNORED_KEY_PREFIXES = ("lm_head.",)


class Qwen2RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Qwen2 normalises in fp32, casts back, then scales (weight * x, in that order and dtype).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin ``[B, N, head_dim]`` for Qwen2's half-split RoPE, computed in fp32 then cast (as HF)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    freqs = position_ids.float()[..., None] * inv_freq  # [B, N, head_dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def build_attention_bias(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive attention bias ``[B, 1, N, N]`` from a key mask ``[B, N]`` (bool or 0/1).

    Query i may see key j iff j <= i and attention_mask[j]. Rows that may see nothing are fully
    unmasked (upstream's CUDA SDPA behaviour in transformers 4.42.2, see the module docstring).
    Static shapes only, so it exports.
    """
    n = attention_mask.shape[-1]
    pos = torch.arange(n, device=attention_mask.device)
    causal = pos[None, :] <= pos[:, None]  # [N, N]
    allowed = causal[None, :, :] & attention_mask.bool()[:, None, :]  # [B, N, N]
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, neg)[:, None, :, :]


class Qwen2Attention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden // num_heads
        # Qwen2: biases on q/k/v, none on o.
        self.q_proj = nn.Linear(hidden, num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor) -> Tensor:
        b, n, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(b, n, self.num_heads, d).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, d).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, d).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # grouped-query attention: KV head j serves query heads j*g .. j*g+g-1 (HF repeat_kv)
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d) + bias
        probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, self.num_heads * d)
        return self.o_proj(out)


class Qwen2MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, hidden: int, intermediate: int, num_heads: int, num_kv_heads: int, eps: float) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(hidden, num_heads, num_kv_heads)
        self.mlp = Qwen2MLP(hidden, intermediate)
        self.input_layernorm = Qwen2RMSNorm(hidden, eps)
        self.post_attention_layernorm = Qwen2RMSNorm(hidden, eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias)
        return x + self.mlp(self.post_attention_layernorm(x))


def _check_config(config) -> None:
    """Reject Qwen2 variants this re-implementation would compute differently."""
    if config.hidden_act != "silu":
        raise CheckpointError(f"text model hidden_act {config.hidden_act!r} is not supported (Qwen2 uses silu)")
    if config.hidden_size % config.num_attention_heads:
        raise CheckpointError("text model hidden_size is not a multiple of num_attention_heads")
    if config.num_attention_heads % config.num_key_value_heads:
        raise CheckpointError("text model num_attention_heads is not a multiple of num_key_value_heads")
    head_dim = config.hidden_size // config.num_attention_heads
    # transformers 4.42.2's Qwen2 always used hidden_size // num_heads; a different explicit head_dim
    # would not have loaded there.
    if getattr(config, "head_dim", None) not in (None, head_dim):
        raise CheckpointError(f"text model head_dim {config.head_dim} != hidden_size // num_attention_heads")
    if head_dim % 2:
        raise CheckpointError("text model head_dim must be even for RoPE")


class TextEncoder(nn.Module):
    """Qwen2 decoder (no LM head). Parameter names match ``transformers.Qwen2Model`` exactly."""

    def __init__(self, config, tokenizer: PromptTokenizer | None = None) -> None:
        super().__init__()
        _check_config(config)
        self.config = config
        self.tokenizer = tokenizer
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.rope_theta = float(config.rope_theta)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Qwen2DecoderLayer(
                config.hidden_size,
                config.intermediate_size,
                config.num_attention_heads,
                config.num_key_value_heads,
                config.rms_norm_eps,
            )
            for _ in range(config.num_hidden_layers)
        )
        self.norm = Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[B, N]`` ids and key mask -> hidden states after the final RMSNorm ``[B, N, H]``."""
        x = self.embed_tokens(input_ids)
        b, n = input_ids.shape
        # Qwen2's default position ids: arange, whatever the mask says.
        positions = torch.arange(n, device=input_ids.device)[None, :].expand(b, n)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, x.dtype)
        bias = build_attention_bias(attention_mask, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, bias)
        return self.norm(x)

    def encode(
        self,
        prompts: list[str],
        max_length: int = DEFAULT_MAX_TOKEN_LENGTH,
        *,
        use_system_prompt: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Upstream ``encode_prompts``: -> context fp32 ``[B, T, H]``, context_mask bool ``[B, T]``,
        context_position_ids int64 ``[B, T]`` (T = max_length). Warns when a prompt was truncated."""
        if self.tokenizer is None:
            raise UsageError("this TextEncoder has no tokenizer; load it with TextEncoder.from_pretrained")
        batch = self.tokenizer.encode(prompts, max_length, use_system_prompt=use_system_prompt)
        message = batch.truncation_message()
        if message is not None:
            warnings.warn(message, UserWarning, stacklevel=2)
        device = self.embed_tokens.weight.device
        ids_np, mask_np = batch.text_model_inputs()
        ids = torch.from_numpy(ids_np).to(device)
        attention_mask = torch.from_numpy(mask_np).to(device)
        with torch.no_grad():
            hidden = self.forward(ids, attention_mask)
        context = hidden[:, batch.system_length :].float()
        context_mask = torch.from_numpy(batch.mask).to(device)
        context_position_ids = torch.from_numpy(batch.position_ids).to(device)
        return context, context_mask, context_position_ids

    @classmethod
    def from_pretrained(cls, text_model_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> "TextEncoder":
        """Load a local Qwen2 folder (config.json, safetensors or .bin weights, tokenizer files).

        Like ``AutoModel.from_pretrained`` it accepts keys with or without the ``model.`` prefix and
        drops keys that are not part of the decoder (``lm_head.*``, a vision tower), but unlike it a
        missing or mis-shaped decoder weight is an error, not a random initialisation.
        """
        root = Path(text_model_dir)
        if not root.is_dir():
            raise CheckpointError(f"text model folder {root} does not exist")
        config = load_qwen2_config(root)
        tokenizer = PromptTokenizer.from_dir(root)
        with torch.device("meta"):
            model = cls(config, tokenizer)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        state = _read_decoder_weights(root, expected)
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        return model.eval()


def load_qwen2_config(root: Path):
    """config.json -> ``transformers.Qwen2Config`` (no hub access), checking it is a plain qwen2."""
    from transformers import Qwen2Config

    path = root / "config.json"
    if not path.is_file():
        raise CheckpointError(f"config.json is missing from text model folder {root}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    except RecursionError:
        raise CheckpointError(f"{path} is not valid JSON: nested too deeply") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    if raw.get("model_type") != "qwen2":
        raise CheckpointError(f"{path}: model_type is {raw.get('model_type')!r}, expected 'qwen2' (a Qwen2 text model)")
    _check_raw_config(raw, path)
    config = Qwen2Config.from_dict(raw)
    if getattr(config, "rope_scaling", None):
        warnings.warn(
            f"{path}: rope_scaling={config.rope_scaling} is ignored (upstream's transformers 4.42.2 Qwen2 ignored it)",
            UserWarning,
            stacklevel=2,
        )
    _check_config(config)
    return config


# The Qwen2 keys this re-implementation reads, with what they must be (wide bounds: any Qwen2 fits).
_QWEN2_INTS = {"vocab_size": 1 << 22, "hidden_size": 65536, "intermediate_size": 1 << 20,
               "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024}


def _check_raw_config(raw: dict, path: Path) -> None:
    """Wrong types or sizes in config.json as one error naming the key, not a traceback later."""
    problems = []
    for key, high in _QWEN2_INTS.items():
        value = raw.get(key)
        if key not in raw and key == "num_key_value_heads":
            continue  # Qwen2Config defaults it to num_attention_heads
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            problems.append(f"{key!r}: expected a whole number in [1, {high}], found {value!r}")
    for key in ("rms_norm_eps", "rope_theta"):
        value = raw.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            problems.append(f"{key!r}: expected a positive number, found {value!r}")
    if not isinstance(raw.get("hidden_act", "silu"), str):
        problems.append(f"'hidden_act': expected a string, found {raw['hidden_act']!r}")
    if problems:
        raise CheckpointError(f"{path}: invalid text model config: " + "; ".join(problems)[:600])


def _weight_files(root: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = root / index_name
        if index.is_file():
            from hartkit.model.checkpoint import shard_files  # validated, confined to the folder

            return shard_files(index)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (root / single).is_file():
            return [root / single]
    raise CheckpointError(
        f"no text model weights in {root}: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin"
    )


def _iter_tensors(path: Path):
    # safetensors memory-mapped and validated; pickles with weights_only, and a file that is neither
    # refused in one line
    from hartkit.model.checkpoint import read_weight_file

    yield from read_weight_file(path).items()


def _read_decoder_weights(root: Path, expected: dict[str, torch.Size]) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    dropped: list[str] = []
    for path in _weight_files(root):
        for key, tensor in _iter_tensors(path):
            name = key
            # checkpoints saved from Qwen2ForCausalLM (or a VL wrapper) prefix the decoder with "model."
            if name not in expected and name.startswith("model.") and name[len("model.") :] in expected:
                name = name[len("model.") :]
            if name not in expected:
                if not (name.startswith(_IGNORED_KEY_PREFIXES) or name.endswith(_IGNORED_KEY_SUFFIXES)):
                    dropped.append(key)
                continue
            if tensor.shape != expected[name]:
                raise CheckpointError(
                    f"{path.name}: {key} has shape {tuple(tensor.shape)}, config.json implies {tuple(expected[name])}"
                )
            if not tensor.is_floating_point():
                raise CheckpointError(f"{path}: {key}: expected a floating-point tensor, found {tensor.dtype}")
            state[name] = tensor
    from hartkit.model.checkpoint import check_weights

    check_weights(state, str(root))
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"text model weights in {root} lack {len(missing)} tensor(s): {shown}")
    if dropped:
        heads = sorted({k.split(".")[0] for k in dropped})
        warnings.warn(
            f"{root}: ignored {len(dropped)} tensor(s) that are not part of the Qwen2 decoder "
            f"(prefixes: {', '.join(heads)})",
            UserWarning,
            stacklevel=3,
        )
    return state


# --------------------------------------------------------------------------------------------------
# Configs and offline test models

def qwen2_1p5b_config():
    """The Qwen2-1.5B decoder shape HART's text encoder is expected to have (spec §1.3, [I]):
    28 layers, hidden 1536, 12 query / 2 KV heads, MLP 8960, vocab 151936, RMSNorm eps 1e-6,
    RoPE theta 1e6; about 1.54 B parameters. The released config.json is the authority."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=151643,
        eos_token_id=151645,
        architectures=["Qwen2Model"],
    )


# A small English corpus for the tiny tokenizer: enough words for prompts used in tests and demos.
_TINY_CORPUS_WORDS = (
    "red orange yellow green blue purple pink brown black white grey gray gold silver "
    "cube sphere cone cylinder pyramid ring star heart square circle triangle torus "
    "cat dog bird fox owl lemur horse fish crocodile ghost astronaut robot lady man woman child "
    "a an the of on in under over with and near behind beside wearing holding sitting standing "
    "small large tiny huge bright dark soft glowing shiny wooden metal glass stone "
    "city street forest mountain river lake sea sky sunset dusk night morning garden diner house "
    "painting photo photograph render cinematic lighting detailed realistic 4k 8k portrait landscape "
)
_TINY_CORPUS_CAPTIONS = (
    "a red cube on a blue sphere",
    "a small green cone beside a large yellow cylinder",
    "a white cat sleeping on a warm windowsill",
    "an astronaut sitting in a diner, eating fries, cinematic, analog film",
    "a lemur wearing a red magician hat and a blue coat",
    "a silhouette of a grand piano overlooking a dusky cityscape",
    "crocodile in a sweater",
    "bright scene, aerial view, ancient city, fantasy, gorgeous light",
    "a glowing ghost holding a heart shaped pumpkin",
    "a busy city street at dusk with glowing street lamps",
    "chinese architecture, mountain, bird, lotus, pond, big tree",
    "a purple torus floating over a grey stone plate, soft light",
)


def _tiny_tokenizer(vocab_size: int):
    """A byte-level BPE trained in memory: Qwen2-like (no BOS/EOS added, <|endoftext|> pad at the
    end of the vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # leave room for the special token
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [HART_SYSTEM_PROMPT, _TINY_CORPUS_WORDS, *_TINY_CORPUS_CAPTIONS]
    tok.train_from_iterator(corpus * 4, trainer)
    # Added after training so its id is the last one, like Qwen2's 151643.
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


def make_tiny_text_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    vocab_size: int = 512,
) -> Path:
    """Write an offline tiny Qwen2 text-model folder (config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json, special_tokens_map.json) that both transformers and
    :meth:`TextEncoder.from_pretrained` load. Deterministic for a seed.

    Weights are drawn at O(1) scale (norm gains and biases included) so that masking or RoPE
    mistakes change the output visibly, unlike transformers' 0.02-std init.
    """
    from safetensors.torch import save_file
    from transformers import PreTrainedTokenizerFast, Qwen2Config

    if vocab_size < 300:
        raise UsageError("vocab_size must be >= 300 (256 byte tokens + merges + <|endoftext|>)")
    num_heads, num_kv_heads = 4, 2
    if hidden_size % (2 * num_heads):
        raise UsageError(f"hidden_size must be a multiple of {2 * num_heads}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = _tiny_tokenizer(vocab_size)
    pad_id = tok.token_to_id("<|endoftext|>")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    ).save_pretrained(str(out))

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=pad_id,
        eos_token_id=pad_id,
        pad_token_id=pad_id,
        architectures=["Qwen2Model"],
    )
    config.save_pretrained(str(out))

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in TextEncoder(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        noise = torch.randn(shape, generator=gen)
        if name.endswith("layernorm.weight") or name == "norm.weight":
            state[name] = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            state[name] = 0.1 * noise
        elif name == "embed_tokens.weight":
            state[name] = noise
        else:  # Linear weight [out, in]
            state[name] = noise / math.sqrt(shape[1])
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
