"""hartkit.loop.prompt: torch-free tokenization must give the ids transformers gives."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hartkit.errors import CheckpointError, UsageError
from hartkit.loop.prompt import HART_SYSTEM_PROMPT, PromptTokenizer

transformers = pytest.importorskip("transformers")

PAD = "<|endoftext|>"
PROMPTS = [
    "a red cube on a blue sphere",
    "",  # all padding
    "  Crocodile in a sweater.\nSecond line, café ☕ 🚀 ",
    "a white cat " + PAD + " sleeping",  # the pad token typed inside a prompt
    "an astronaut sitting in a diner, eating fries, cinematic, analog film, " * 4,  # truncated
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from hartkit.model.text_encoder import make_tiny_text_model

    return make_tiny_text_model(tmp_path_factory.mktemp("tiny_text"), seed=0)


def _variant(src: Path, dst: Path, **config_changes) -> Path:
    """Copy a tokenizer folder and edit tokenizer_config.json (value None deletes the key)."""
    shutil.copytree(src, dst)
    path = dst / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    for key, value in config_changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))
    return dst


def _hf(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _check_against_hf(path: Path, prompts: list[str], max_length: int) -> None:
    ours = PromptTokenizer.from_dir(path)
    hf = _hf(path)
    batch = ours.encode(prompts, max_length)
    assert ours.pad_token_id == hf.pad_token_id
    assert ours.padding_side == hf.padding_side
    assert batch.ids.dtype == np.int64 and batch.ids.shape == (len(prompts), max_length)
    assert batch.mask.dtype == np.bool_ and batch.position_ids.dtype == np.int64
    for b, prompt in enumerate(prompts):
        # upstream tokenize_fn: one call per prompt
        ref = hf(prompt, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
        assert batch.ids[b].tolist() == ref
        full = hf(prompt)["input_ids"]
        assert batch.truncated[b] == (len(full) > max_length)
        # context_mask = ids != pad ; position ids = running count of real tokens - 1
        count = 0
        for t in range(max_length):
            real = ref[t] != hf.pad_token_id
            assert batch.mask[b, t] == real
            count += int(real)
            assert batch.position_ids[b, t] == count - 1
    sys_ref = hf(HART_SYSTEM_PROMPT, padding="longest", max_length=max_length, truncation=True)["input_ids"]
    assert batch.system_ids.dtype == np.int64
    assert batch.system_ids.tolist() == sys_ref


def test_system_prompt_is_upstream_text():
    # sha256 of hart/utils/constants.py:llm_system_prompt at e28a41f
    assert len(HART_SYSTEM_PROMPT) == 705
    assert HART_SYSTEM_PROMPT.endswith('"Enhanced Prompt:".\n\nUser Prompt:\n')
    digest = hashlib.sha256(HART_SYSTEM_PROMPT.encode("utf-8")).hexdigest()
    assert digest == "424f7aa7b1119f8ed1e329140e5941dfe308183bea0af59041dad5527a9b8f20"


@pytest.mark.parametrize("max_length", [12, 300])
def test_right_padding_matches_transformers(tok_dir, max_length):
    _check_against_hf(tok_dir, PROMPTS, max_length)


def test_right_padding_layout(tok_dir):
    batch = PromptTokenizer.from_dir(tok_dir).encode(PROMPTS, 40)
    assert PromptTokenizer.from_dir(tok_dir).padding_side == "right"
    n = int(batch.mask[0].sum())
    assert batch.mask[0, :n].all() and not batch.mask[0, n:].any()
    # HART quirk: pads repeat the last real position n-1
    assert batch.position_ids[0].tolist() == list(range(n)) + [n - 1] * (40 - n)
    assert batch.truncated == [False, False, False, False, True]
    assert not batch.mask[1].any() and (batch.position_ids[1] == -1).all()  # empty prompt


def test_pad_token_inside_prompt_is_masked(tok_dir):
    # upstream masks by id, so a typed <|endoftext|> is masked although the tokenizer attends to it
    ours = PromptTokenizer.from_dir(tok_dir)
    batch = ours.encode([PROMPTS[3]], 20)
    hf_mask = _hf(tok_dir)(PROMPTS[3], padding="max_length", max_length=20, truncation=True)["attention_mask"]
    inner = [t for t in range(20) if hf_mask[t] == 1 and batch.ids[0, t] == ours.pad_token_id]
    assert len(inner) == 1
    assert not batch.mask[0, inner[0]]
    assert batch.mask[0, inner[0] + 1]  # text continues after it


def test_left_padding_matches_transformers(tok_dir, tmp_path):
    path = _variant(tok_dir, tmp_path / "left", padding_side="left")
    assert PromptTokenizer.from_dir(path).padding_side == "left"
    _check_against_hf(path, PROMPTS, 24)
    batch = PromptTokenizer.from_dir(path).encode(["a red cube"], 10)
    n = int(batch.mask[0].sum())
    assert not batch.mask[0, : 10 - n].any() and batch.mask[0, 10 - n :].all()
    # leading pads get position -1, real tokens 0..n-1
    assert batch.position_ids[0].tolist() == [-1] * (10 - n) + list(range(n))


def test_left_truncation_matches_transformers(tok_dir, tmp_path):
    path = _variant(tok_dir, tmp_path / "ltrunc", truncation_side="left")
    _check_against_hf(path, PROMPTS, 12)


def test_qwen2_class_default_pad(tok_dir, tmp_path):
    # Qwen2TokenizerFast falls back to <|endoftext|> when no pad token is configured
    path = _variant(tok_dir, tmp_path / "qwen", tokenizer_class="Qwen2Tokenizer", pad_token=None)
    (path / "special_tokens_map.json").write_text(json.dumps({"eos_token": PAD}))
    assert PromptTokenizer.from_dir(path).pad_token == PAD
    _check_against_hf(path, PROMPTS[:3], 16)


def test_pad_from_special_tokens_map_and_missing_pad(tok_dir, tmp_path):
    # legacy config (no added_tokens_decoder): special_tokens_map.json supplies the pad token
    path = _variant(tok_dir, tmp_path / "map", pad_token=None, added_tokens_decoder=None)
    (path / "special_tokens_map.json").write_text(
        json.dumps({"pad_token": {"content": PAD, "lstrip": False, "rstrip": False}})
    )
    assert PromptTokenizer.from_dir(path).pad_token_id == _hf(path).pad_token_id == 511
    _check_against_hf(path, PROMPTS[:2], 10)
    (path / "special_tokens_map.json").unlink()
    with pytest.raises(CheckpointError, match="pad_token"):
        PromptTokenizer.from_dir(path)
    # modern config (with added_tokens_decoder): transformers ignores special_tokens_map.json
    path = _variant(tok_dir, tmp_path / "modern", pad_token=None)
    (path / "special_tokens_map.json").write_text(json.dumps({"pad_token": PAD}))
    assert _hf(path).pad_token is None
    with pytest.raises(CheckpointError, match="pad_token"):
        PromptTokenizer.from_dir(path)


def test_no_system_prompt(tok_dir):
    batch = PromptTokenizer.from_dir(tok_dir).encode(PROMPTS[:2], 8, use_system_prompt=False)
    assert batch.system_ids.shape == (0,) and batch.system_ids.dtype == np.int64
    ids, mask = batch.text_model_inputs()
    assert np.array_equal(ids, batch.ids) and np.array_equal(mask, batch.mask)


def test_text_model_inputs_layout(tok_dir):
    batch = PromptTokenizer.from_dir(tok_dir).encode(PROMPTS[:3], 8)
    s = batch.system_length
    assert s == 8  # the tiny tokenizer's ~270-token system prompt is cut at max_length, like upstream
    ids, mask = batch.text_model_inputs()
    assert ids.shape == (3, s + 8) and ids.dtype == np.int64 and mask.dtype == np.bool_
    for b in range(3):
        assert ids[b, :s].tolist() == batch.system_ids.tolist()
        assert ids[b, s:].tolist() == batch.ids[b].tolist()
        assert mask[b, :s].all() and mask[b, s:].tolist() == batch.mask[b].tolist()


def test_truncation_message(tok_dir):
    tok = PromptTokenizer.from_dir(tok_dir)
    assert tok.encode(PROMPTS[:2], 40).truncation_message() is None
    msg = tok.encode(PROMPTS, 40).truncation_message()
    assert msg is not None and "index 4" in msg and "40 tokens" in msg


def test_exact_length_is_not_truncated(tok_dir):
    tok = PromptTokenizer.from_dir(tok_dir)
    n = len(_hf(tok_dir)(PROMPTS[0])["input_ids"])
    assert tok.encode([PROMPTS[0]], n).truncated == [False]
    assert tok.encode([PROMPTS[0]], n - 1).truncated == [True]


@settings(max_examples=25, deadline=None)
@given(
    texts=st.lists(
        st.lists(st.sampled_from(list("abcdefg xyz,.!\n\té🚀") + ["red ", "cube ", PAD]), max_size=30).map("".join),
        min_size=1,
        max_size=3,
    ),
    max_length=st.integers(1, 20),
)
def test_random_text_matches_transformers(tok_dir, texts, max_length):
    ours = PromptTokenizer.from_dir(tok_dir).encode(texts, max_length)
    hf = _hf_cached(tok_dir)
    for b, text in enumerate(texts):
        ref = hf(text, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
        assert ours.ids[b].tolist() == ref
        assert ours.truncated[b] == (len(hf(text)["input_ids"]) > max_length)


_HF_CACHE: dict[Path, object] = {}


def _hf_cached(path: Path):
    if path not in _HF_CACHE:
        _HF_CACHE[path] = _hf(path)
    return _HF_CACHE[path]


def test_missing_files(tok_dir, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        PromptTokenizer.from_dir(tmp_path / "nowhere")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = tmp_path / name.replace(".", "_")
        shutil.copytree(tok_dir, path)
        (path / name).unlink()
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            PromptTokenizer.from_dir(path)
    bad = tmp_path / "bad_json"
    shutil.copytree(tok_dir, bad)
    (bad / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        PromptTokenizer.from_dir(bad)
    side = _variant(tok_dir, tmp_path / "side", padding_side="middle")
    with pytest.raises(CheckpointError, match="padding_side"):
        PromptTokenizer.from_dir(side)


def test_bad_arguments(tok_dir):
    tok = PromptTokenizer.from_dir(tok_dir)
    with pytest.raises(UsageError):
        tok.encode([], 10)
    with pytest.raises(UsageError):
        tok.encode("a string, not a list", 10)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        tok.encode(["a"], 0)


def test_module_is_torch_free():
    code = (
        "import sys, hartkit.loop.prompt; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
