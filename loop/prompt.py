"""Prompt tokenization for HART's text encoder, torch-free.

Upstream (`hart/utils/tools.py: tokenize_fn, encode_prompts`) calls a Hugging Face fast tokenizer on
each prompt with ``padding="max_length", max_length=300, truncation=True`` and the LLM system
prompt with ``padding="longest"`` (i.e. no padding for one string). A fast tokenizer is a thin
wrapper around a ``tokenizers.Tokenizer`` built from ``tokenizer.json``: for those calls it
configures the backend's truncation and padding and encodes with special tokens added. We configure
the same backend the same way, so the runtime tokenizes without torch or transformers and gives the
ids transformers gives (tests/test_prompt.py checks this against ``AutoTokenizer``).

What we read, as transformers does:
- ``tokenizer.json``: the whole tokenization pipeline (normalizer, pre-tokenizer, BPE, post-processor).
- ``tokenizer_config.json``: ``pad_token``, ``padding_side`` (default "right"), ``truncation_side``
  (default "right"), ``tokenizer_class``.
- ``special_tokens_map.json`` (optional, legacy): its ``pad_token`` overrides the one in
  tokenizer_config.json, but only when that file has no ``added_tokens_decoder`` (transformers'
  rule; a modern tokenizer_config.json has one, and then the map is not read).

Qwen2 tokenizers add no BOS/EOS, and ``Qwen2TokenizerFast`` falls back to ``<|endoftext|>`` as the
pad token when the config names none; we do the same for that class.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from hartkit.errors import CheckpointError, UsageError

# Upstream `hart/utils/constants.py: llm_system_prompt`, verbatim (705 characters, ends with a real
# newline). The text-encoder features the AR transformer was trained on were computed with this
# prefix, so it is data, not wording we may improve.
HART_SYSTEM_PROMPT: str = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions '
    "suitable for image generation.\n"
    "\n"
    "Examples:\n"
    "- User Prompt: A cat sleeping -> A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.\n"
    "- User Prompt: A busy city street -> A bustling city street scene at dusk, featuring glowing "
    "street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by "
    "towering glass skyscrapers.\n"
    "\n"
    "Please generate only the enhanced description for the prompt below and DO NOT include any "
    'additional sentences. Start your response with "Enhanced Prompt:".\n'
    "\n"
    "User Prompt:\n"
)

# upstream sample.py / app.py: --max_token_length 300 (= HARTForT2IConfig.context_token)
DEFAULT_MAX_TOKEN_LENGTH: int = 300

# Classes whose transformers wrapper leaves the tokenizer.json pipeline untouched (checked by hand
# for transformers 4.42-4.57). Others may rewrite the backend (e.g. Llama's add_bos_token).
_KNOWN_TOKENIZER_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast", "PreTrainedTokenizerFast")
_QWEN2_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")
_QWEN2_DEFAULT_PAD = "<|endoftext|>"


@dataclass(frozen=True)
class PromptBatch:
    """Token ids for B prompts, laid out the way upstream's ``encode_prompts`` builds them."""

    system_ids: np.ndarray  # int64 [S]; empty when the system prompt is off
    ids: np.ndarray  # int64 [B, T], T = max_length, padded / truncated like HF
    mask: np.ndarray  # bool [B, T] = ids != pad_token_id (upstream's context_mask)
    position_ids: np.ndarray  # int64 [B, T] = cumsum(mask) - 1 (upstream's context_position_ids)
    truncated: list[bool]  # which prompts lost tokens to truncation

    @property
    def system_length(self) -> int:
        return int(self.system_ids.shape[0])

    def text_model_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """The text model's inputs: ids ``[B, S+T]`` = [system; prompt] and attention mask ``[B, S+T]``
        (bool) = [ones(S); mask]. Upstream feeds exactly these, then keeps hidden[:, S:]."""
        batch = self.ids.shape[0]
        system = np.broadcast_to(self.system_ids[None, :], (batch, self.system_length))
        input_ids = np.concatenate([system, self.ids], axis=1).astype(np.int64)
        attention_mask = np.concatenate(
            [np.ones((batch, self.system_length), dtype=bool), self.mask], axis=1
        )
        return input_ids, attention_mask

    def truncation_message(self) -> str | None:
        """A warning text when any prompt was cut (upstream truncates silently), else None."""
        cut = [i for i, t in enumerate(self.truncated) if t]
        if not cut:
            return None
        return (
            f"{len(cut)} of {len(self.truncated)} prompt(s) (index {', '.join(map(str, cut))}) are "
            f"longer than {self.ids.shape[1]} tokens and were truncated; the rest is ignored"
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """Special tokens are stored either as a string or as an AddedToken dict with "content"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointError(f"cannot read special token {value!r}")


def check_prompts(prompts: list[str]) -> None:
    """Refuse text the tokenizer cannot encode: lone surrogates, which is what Python makes of bytes
    that are not UTF-8 (a prompt from a Latin-1 file or terminal arrives as ``"\\udcff"``)."""
    for i, prompt in enumerate(prompts):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            char = ord(prompt[exc.start])
            what = (f"the byte 0x{char - 0xDC00:02x}, which is not UTF-8" if 0xDC80 <= char <= 0xDCFF
                    else f"a lone surrogate U+{char:04X}")
            raise UsageError(f"prompt {i} is not valid text: character {exc.start} is {what}; "
                             "give prompts as UTF-8 (check the terminal's or file's encoding)") from None


class PromptTokenizer:
    """Tokenizes prompts exactly like ``AutoTokenizer.from_pretrained(dir)(prompt, padding="max_length",
    max_length=T, truncation=True)``, from the tokenizer files alone."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        pad_token: str,
        *,
        padding_side: str = "right",
        truncation_side: str = "right",
    ) -> None:
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise CheckpointError(f"{name} must be 'left' or 'right', got {side!r}")
        pad_token_id = tokenizer.token_to_id(pad_token)
        if pad_token_id is None:
            # transformers would append an unknown pad token to the vocabulary, beyond the
            # embedding table of the text model; a real checkpoint never does that.
            raise CheckpointError(f"pad token {pad_token!r} is not in the tokenizer vocabulary")
        self._tokenizer = tokenizer
        self.pad_token = pad_token
        self.pad_token_id: int = int(pad_token_id)
        self.padding_side = padding_side
        self.truncation_side = truncation_side

    @classmethod
    def from_dir(cls, text_model_dir: str | Path) -> "PromptTokenizer":
        root = Path(text_model_dir)
        if not root.is_dir():
            raise CheckpointError(f"text model folder {root} does not exist")
        tok_file = root / "tokenizer.json"
        cfg_file = root / "tokenizer_config.json"
        for required in (tok_file, cfg_file):
            if not required.is_file():
                raise CheckpointError(
                    f"{required.name} is missing from {root} (a fast-tokenizer folder needs "
                    "tokenizer.json and tokenizer_config.json)"
                )
        config = _read_json(cfg_file)
        try:
            tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust error type is not exported
            raise CheckpointError(f"cannot read {tok_file}: {e}") from e

        tokenizer_class = config.get("tokenizer_class")
        if tokenizer_class is not None and tokenizer_class not in _KNOWN_TOKENIZER_CLASSES:
            warnings.warn(
                f"tokenizer_class {tokenizer_class!r} is not one hartkit checked; ids may differ "
                "from transformers if that class rewrites tokenizer.json",
                stacklevel=2,
            )

        # Same precedence as transformers (4.34+): special_tokens_map.json is a legacy file, read
        # only when tokenizer_config.json has no "added_tokens_decoder", and then it overrides.
        has_pad, pad_value = "pad_token" in config, config.get("pad_token")
        map_file = root / "special_tokens_map.json"
        if "added_tokens_decoder" not in config and map_file.is_file():
            special = _read_json(map_file)
            if "pad_token" in special:
                has_pad, pad_value = True, special["pad_token"]
        pad_token = _token_content(pad_value)
        if not has_pad and tokenizer_class in _QWEN2_CLASSES:
            pad_token = _QWEN2_DEFAULT_PAD  # Qwen2TokenizerFast's constructor default
        if pad_token is None:
            raise CheckpointError(
                f"{cfg_file} defines no pad_token; prompts are padded to a fixed length, so one is needed"
            )
        return cls(
            tokenizer,
            pad_token,
            padding_side=config.get("padding_side") or "right",
            truncation_side=config.get("truncation_side") or "right",
        )

    def _encode(self, texts: list[str], max_length: int, pad: bool) -> list[Any]:
        # Mirrors PreTrainedTokenizerFast.set_truncation_and_padding for truncation=True and
        # padding="max_length" (pad=True) or padding="longest" on a single text (pad=False).
        tok = self._tokenizer
        tok.enable_truncation(
            max_length, stride=0, strategy="longest_first", direction=self.truncation_side
        )
        if pad:
            tok.enable_padding(
                length=max_length,
                direction=self.padding_side,
                pad_id=self.pad_token_id,
                pad_token=self.pad_token,
                pad_type_id=0,
            )
        else:
            tok.no_padding()
        return tok.encode_batch(texts, add_special_tokens=True)

    def encode(
        self, prompts: list[str], max_length: int, use_system_prompt: bool = True
    ) -> PromptBatch:
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise UsageError("prompts must be a non-empty list of strings")
        check_prompts(prompts)
        if max_length < 1:
            raise UsageError(f"max_length must be >= 1, got {max_length}")

        encodings = self._encode(list(prompts), max_length, pad=True)
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(prompts), max_length)
        # with stride 0 the tokens cut off land in `overflowing`
        truncated = [len(e.overflowing) > 0 for e in encodings]

        if use_system_prompt:
            # Upstream passes max_length (and truncation=True) here too: a system prompt longer
            # than max_length would be cut as well. HART's is ~150 tokens, well under 300.
            (system,) = self._encode([HART_SYSTEM_PROMPT], max_length, pad=False)
            system_ids = np.array(system.ids, dtype=np.int64)
        else:
            system_ids = np.zeros((0,), dtype=np.int64)

        # HART quirk: the mask is "not the pad id", not the tokenizer's attention mask, so a pad
        # token typed inside a prompt is masked too.
        mask = ids != self.pad_token_id
        # HART quirk: right padding gives pads the position of the last real token (n-1); left
        # padding gives leading pads -1.
        position_ids = np.cumsum(mask, axis=1, dtype=np.int64) - 1
        return PromptBatch(
            system_ids=system_ids,
            ids=ids,
            mask=mask,
            position_ids=position_ids,
            truncated=truncated,
        )
