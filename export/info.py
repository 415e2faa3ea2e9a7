"""The export section of ``manifest.json``: what an export folder holds, read by the runtime.

The ``loop`` section carries everything the torch-free host loop needs (scales, vocabulary, RoPE head
dim, phi count, diffusion steps, system-prompt length); ``graphs`` the declared inputs/outputs of every
graph (from :mod:`hartkit.export.graphs`); ``files`` the file of each graph per format.
"""

from __future__ import annotations

from typing import Sequence

from hartkit import __version__
from hartkit.export.graphs import GraphSpec
from hartkit.loop.rng import describe_contract
from hartkit.model.checkpoint import HART

EXPORT_FORMAT_VERSION = 1


def loop_info(model: HART, system_length: int) -> dict:
    cfg = model.cfg
    return {
        "patch_nums": list(cfg.patch_nums),
        "context_token": cfg.context_token,
        "vocab_size": model.vocab_size,
        "latent_dim": model.latent_dim,
        "head_dim": cfg.head_dim,
        "attn_type": cfg.attn_type,
        "num_phis": int(model.vae.num_phis),
        "num_sampling_steps": str(cfg.num_sampling_steps),
        "system_length": int(system_length),
        "image_size": cfg.patch_nums[-1] * model.vae_cfg.downsample,
        "default_cfg": float(model.default_cfg),  # the checkpoint's recommended guidance (else HART's 4.5)
    }


def build_export_info(model: HART, system_length: int, specs: Sequence[GraphSpec],
                      files: dict[str, dict[str, str]] | None = None) -> dict:
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "hartkit_version": __version__,
        "model": {"hart": model.cfg.to_dict(), "vae": model.vae_cfg.to_dict()},
        "loop": loop_info(model, system_length),
        "graphs": [s.to_json() for s in specs],
        "files": files or {},
        "constants": "constants.npz",
        "tokenizer": "tokenizer",
        "rng": describe_contract(),
    }
