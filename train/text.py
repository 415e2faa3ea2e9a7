"""The text side of training: a tiny Qwen2 whose BPE is trained on the scene captions, and the
context features of the training captions (frozen or trained with the transformer)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from hartkit.loop.prompt import HART_SYSTEM_PROMPT
from hartkit.model.checkpoint import write_json
from hartkit.model.presets import Preset
from hartkit.model.text_encoder import TextEncoder, make_tiny_text_model
from hartkit.validate import scenes


def write_text_model(out: Path, spec: Preset, seed: int) -> Path:
    """A frozen random tiny Qwen2 (``make_tiny_text_model``) whose tokenizer is re-trained on the
    scene captions, so every caption word is one token. config.json's special ids follow."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    make_tiny_text_model(out, seed=seed, **spec.text)
    vocab_size = spec.text.get("vocab_size", 512)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    captions = [s.caption() for s in scenes.specs_of_split("train")]
    tok.train_from_iterator([HART_SYSTEM_PROMPT] * 4 + captions, trainer)
    tok.add_special_tokens(["<|endoftext|>"])
    for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / stale).unlink(missing_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(str(out))
    pad_id = tok.token_to_id("<|endoftext|>")
    config = json.loads((out / "config.json").read_text())
    config.update(bos_token_id=pad_id, eos_token_id=pad_id, pad_token_id=pad_id)
    write_json(out / "config.json", config)
    return out


class TextFeatures:
    """Context features of the distinct training captions, laid out as ``TextEncoder.encode`` does
    ([system prompt; caption] in, the caption's positions out). Frozen: computed once; trainable:
    recomputed (with gradients) for every batch. The tensors live where the encoder's weights do."""

    def __init__(self, encoder: TextEncoder, captions: list[str], max_length: int, trainable: bool) -> None:
        batch = encoder.tokenizer.encode(captions, max_length)
        if batch.truncation_message():
            raise ValueError(batch.truncation_message())
        ids, attention = batch.text_model_inputs()
        device = next(encoder.parameters()).device
        self.ids, self.attention = torch.from_numpy(ids).to(device), torch.from_numpy(attention).to(device)
        self.mask = torch.from_numpy(batch.mask).to(device)
        self.system_length = batch.system_length
        self.encoder, self.trainable = encoder, trainable
        encoder.requires_grad_(trainable)
        if not trainable:
            with torch.no_grad():
                self.context = torch.cat([self._run(torch.arange(i, min(i + 512, len(captions)), device=device))
                                          for i in range(0, len(captions), 512)])

    def _run(self, rows: Tensor) -> Tensor:
        return self.encoder(self.ids[rows], self.attention[rows])[:, self.system_length :].float()

    def __call__(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``(context [n, T, D], context_mask [n, T])`` of caption ids ``rows``."""
        rows = rows.to(self.ids.device)
        return (self._run(rows) if self.trainable else self.context[rows]), self.mask[rows]
