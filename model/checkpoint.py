"""Reading and writing HART checkpoints in the official folder layout.

::

    <root>/llm/config.json         HARTForT2IConfig (model_type hart_transformer_t2i)
    <root>/llm/ema_model.bin       EMA weights, a plain pickled state_dict (preferred, as upstream)
    <root>/llm/model.safetensors   or pytorch_model.bin / sharded *.index.json
    <root>/tokenizer/config.json   HARTAutoEncoderWithDiscConfig; weights with the "vae." prefix
    <text model folder>            Qwen2 (config.json, weights, tokenizer files); ours: <root>/text_model

Loading is strict: every missing, unexpected or mis-shaped key is listed in one error. Keys that
upstream persists but inference never reads (``attn_bias_for_masking``, the discriminator ``disc.*``)
are dropped. Pickled weights are only ever read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from hartkit.errors import CheckpointError
from hartkit.loop.plan import HART_DEFAULT_CFG, MAX_CFG
from hartkit.model.config import HARTConfig, VAEConfig

LLM_WEIGHT_NAMES = ("ema_model.bin", "model.safetensors", "pytorch_model.bin")
VAE_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
GENERATION_CONFIG = "generation_config.json"  # llm/: the checkpoint's sampling defaults (optional)
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Persisted upstream, never read at inference. attn_bias_for_masking is 380 MB at 1024 px.
DROPPED_LLM_KEYS = ("attn_bias_for_masking",)
DROPPED_VAE_PREFIXES = ("disc.",)


# ----------------------------------------------------------------------------- weight files

def read_weight_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """One safetensors or pickle weight file as a state dict, with clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt"):  # validates the header and the data offsets
                pass
            return _mmap_safetensors(path)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    zipped = _is_zip(path)
    if not zipped and not _starts_like_a_pickle(path):
        raise CheckpointError(f"{path}: not a PyTorch weight file (neither a zip archive nor a pickle; "
                              "a text file or a download error page?)")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds objects other than tensors (it could run code); "
            f"convert it to safetensors with a trusted tool ({_first_line(exc)})"
        ) from exc
    except Exception as exc:  # the unpickler fails in many ways on damaged bytes (KeyError, IndexError, ...)
        raise CheckpointError(f"{path}: not a readable PyTorch weight file (truncated or corrupt?): "
                              f"{type(exc).__name__}: {_first_line(exc)}") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    return dict(state)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors that read the file through a private (copy-on-write) memory map instead of a copy.

    Why by hand: safetensors' ``load_file``/``get_tensor`` copy every tensor into anonymous memory.
    Mapped weights are page cache the kernel can drop and re-read, so a 0.7B model + its 1.5B text
    encoder (9 GB) no longer count against memory while an exporter holds quantized copies of them.
    The header was validated by ``safe_open`` first; sizes are checked again here."""
    import mmap

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
    base = 8 + n
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {name}: unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = [int(d) for d in info["shape"]]
        count = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != count * itemsize or base + end > size:
            raise ValueError(f"tensor {name}: data offsets {begin}..{end} do not fit shape {shape} in {size} bytes")
        if count == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        with warnings.catch_warnings():  # ACCESS_COPY buffers are writable; nothing to warn about
            warnings.simplefilter("ignore")
            out[name] = torch.frombuffer(mm, dtype=dtype, count=count, offset=base + begin).view(shape)
    return out


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def _starts_like_a_pickle(path: Path) -> bool:
    """Pickles of protocol 2 and later (every torch.save since 2017) start with the PROTO opcode."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def find_weights(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """The weight file(s) of a model folder, in upstream's order of preference."""
    for name in names:
        if (folder / name).is_file():
            return [folder / name]
    for index_name in INDEX_NAMES:
        index = folder / index_name
        if index.is_file():
            return shard_files(index)
    raise CheckpointError(f"{folder}: no weights found (looked for {', '.join(names + INDEX_NAMES)})")


def shard_files(index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names, each a relative path inside the index's folder
    (an absolute or ``../`` path would read a file outside the checkpoint)."""
    from pathlib import PurePosixPath, PureWindowsPath

    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError) as exc:
        raise CheckpointError(f"{index}: not a valid shard index ({_first_line(exc)})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object (tensor name -> shard file), "
                              f"found {type(weight_map).__name__}")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.strip():
            raise CheckpointError(f"{index}: weight_map[{key!r}] must be a shard file name, found {shard!r}")
        if (PurePosixPath(shard).is_absolute() or ".." in PurePosixPath(shard).parts or "\\" in shard
                or PureWindowsPath(shard).drive):
            raise CheckpointError(f"{index}: weight_map[{key!r}] = {shard!r} is outside the checkpoint folder "
                                  "(shard paths must be relative, inside it)")
    files = [index.parent / shard for shard in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index}: names shard file(s) that are missing: {_clip(missing)}")
    return files


def check_weights(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN (a corrupt or diverged checkpoint draws a black image), by name."""
    bad = [f"{k} ({int(torch.isnan(v).sum())} of {v.numel()} values)" for k, v in state.items()
           if v.is_floating_point() and v.numel() and bool(torch.isnan(v).any())]
    if bad:
        raise CheckpointError(f"{source}: weights hold NaN: {_clip(bad, 5)}; the checkpoint is corrupt")


def read_weights(folder: Path, names: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], str]:
    files = find_weights(folder, names)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(read_weight_file(f))
    return state, ", ".join(str(f) for f in files)


# ----------------------------------------------------------------------------- strict loading

def strict_load(module: nn.Module, state: Mapping[str, torch.Tensor], source: str, *, assign: bool = False) -> None:
    """``load_state_dict(strict=True)`` with one error that lists every problem by key and shape."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(expected[k].shape) != tuple(state[k].shape)
    ] + [
        f"{k}: expected a {_kind(expected[k])} tensor, found {state[k].dtype}"
        for k in sorted(set(expected) & set(state))
        if expected[k].is_floating_point() != state[k].is_floating_point()
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_clip(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_clip(unexpected)}")
        if mismatched:
            parts.append(f"shape or type mismatches ({len(mismatched)}): {_clip(mismatched)}")
        raise CheckpointError(f"{source}: weights do not match the config: " + "; ".join(parts))
    # Cast to each parameter's dtype (released weights may be fp16/bf16).
    cast = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(cast, strict=True, assign=assign)


def _kind(t: torch.Tensor) -> str:
    return "floating-point" if t.is_floating_point() else f"{t.dtype}"


def _clip(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# ----------------------------------------------------------------------------- the HART model


@dataclass
class HART:
    """The generation-side HART model: AR transformer (+ diffusion head) and the VAE parts.

    The text encoder lives in its own folder and is loaded separately (``TextEncoder``).
    """

    cfg: HARTConfig
    vae_cfg: VAEConfig
    transformer: "nn.Module"
    vae: "nn.Module"
    default_cfg: float = HART_DEFAULT_CFG  # guidance when a caller gives none (llm/generation_config.json)

    @property
    def vocab_size(self) -> int:
        return self.vae_cfg.vocab_size

    @property
    def latent_dim(self) -> int:
        return self.vae_cfg.z_channels

    def eval(self) -> "HART":
        self.transformer.eval()
        self.vae.eval()
        return self

    def to(self, dtype_or_device: torch.dtype | torch.device | str) -> "HART":
        """Both modules to a dtype or a device (as ``nn.Module.to``)."""
        self.transformer.to(dtype_or_device)
        self.vae.to(dtype_or_device)
        return self


def build_hart(cfg: HARTConfig, vae_cfg: VAEConfig, *, device: str | torch.device = "cpu") -> HART:
    """Construct the modules of a config (random init, or empty on ``device="meta"``)."""
    from hartkit.model.transformer import HARTTransformer
    from hartkit.model.vae import HARTVAE

    with torch.device(device):
        transformer = HARTTransformer(cfg, vocab_size=vae_cfg.vocab_size, latent_dim=vae_cfg.z_channels)
        vae = HARTVAE(vae_cfg)
    return HART(cfg, vae_cfg, transformer, vae).eval()


def _check_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: {what} folder not found")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a {what} folder, found a file")


def resolve_vae_dir(root_llm: Path, cfg: HARTConfig) -> Path:
    """Upstream: ``config.vae_path`` if set, else ``dirname(llm)/tokenizer``."""
    if cfg.vae_path and Path(cfg.vae_path).is_dir():
        return Path(cfg.vae_path)
    return root_llm.parent / "tokenizer"


def read_default_cfg(llm_dir: Path) -> float:
    """The guidance scale ``llm/generation_config.json`` recommends (``guidance_scale``, transformers'
    GenerationConfig name), else HART's 4.5. Official HART checkpoints carry no such file."""
    path = Path(llm_dir) / GENERATION_CONFIG
    if not path.exists():
        return HART_DEFAULT_CFG
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    value = data.get("guidance_scale", HART_DEFAULT_CFG)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= MAX_CFG):
        raise CheckpointError(f"{path}: 'guidance_scale' must be a number in [0, {MAX_CFG:g}], found {value!r}")
    return float(value)


def write_default_cfg(llm_dir: Path, cfg: float, note: str = "") -> None:
    """Record a recommended guidance scale in ``llm/generation_config.json`` (atomic; keeps other keys)."""
    path = Path(llm_dir) / GENERATION_CONFIG
    read_default_cfg(llm_dir)  # refuse to rewrite a malformed file (named in the error)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["guidance_scale"] = float(cfg)
    if note:
        data["hartkit_note"] = note
    write_json(path, data)


def load_hart(root: str | os.PathLike, *, prefer_ema: bool = True, dtype: torch.dtype = torch.float32,
              resolution: int | None = None) -> HART:
    """Load ``<root>/llm`` and ``<root>/tokenizer`` (the official layout) on the CPU.

    ``root`` may also be upstream's ``.../llm`` folder or a Hugging Face repo id in the local cache
    (:func:`hartkit.model.hub.resolve_checkpoint`). ``resolution`` (px) runs the model on fewer scales,
    see :func:`restrict_resolution`.
    """
    from hartkit.model.hub import resolve_checkpoint

    root = resolve_checkpoint(root)
    _check_dir(root, "checkpoint")
    llm_dir = root / "llm"
    _check_dir(llm_dir, "llm")
    cfg = HARTConfig.from_json_file(llm_dir / "config.json")
    vae_dir = resolve_vae_dir(llm_dir, cfg)
    _check_dir(vae_dir, "tokenizer (VAE)")
    vae_cfg = VAEConfig.from_json_file(vae_dir / "config.json")

    names = LLM_WEIGHT_NAMES if prefer_ema else LLM_WEIGHT_NAMES[1:] + LLM_WEIGHT_NAMES[:1]
    llm_state, llm_src = read_weights(llm_dir, names)
    for key in DROPPED_LLM_KEYS:
        llm_state.pop(key, None)
    vae_state, vae_src = read_weights(vae_dir, VAE_WEIGHT_NAMES)
    vae_state = _strip_vae_prefix(vae_state, vae_src)
    check_weights(llm_state, llm_src)
    check_weights(vae_state, vae_src)

    # Build on the meta device and assign the loaded tensors: no second copy of the weights.
    model = build_hart(cfg, vae_cfg, device="meta")
    strict_load(model.transformer, llm_state, llm_src, assign=True)
    strict_load(model.vae, vae_state, vae_src, assign=True)
    _materialize_buffers(model)
    model.default_cfg = read_default_cfg(llm_dir)
    if resolution is not None:
        model = restrict_resolution(model, resolution)
    if dtype != torch.float32:
        model.to(dtype)
    return model.eval()


def restrict_resolution(model: HART, resolution: int) -> HART:
    """The same weights run on fewer scales: ``patch_nums`` cut after the scale giving ``resolution`` px.

    For routine measurement (e.g. the 1024 px model at 256 px = scales up to 16). Only the level
    embedding rows of the kept scales are used; the 2-D RoPE then spans the smaller last scale (the
    model was not trained for that, so images are not meaningful — speed and memory are). The VAE is
    unchanged (it is convolutional).
    """
    import dataclasses

    down = model.vae_cfg.downsample
    pns = tuple(model.cfg.patch_nums)
    valid = [p * down for p in pns[1:]]
    if resolution % down or resolution // down not in pns[1:]:
        raise CheckpointError(f"resolution {resolution} px is not one of this model's scales: choose from {valid}")
    keep = pns[: pns.index(resolution // down) + 1]
    if keep == pns:
        return model
    cfg = dataclasses.replace(model.cfg, patch_nums=keep)
    state = model.transformer.state_dict()
    state["lvl_embed.weight"] = state["lvl_embed.weight"][: len(keep)]
    small = build_hart(cfg, model.vae_cfg, device="meta")
    expected = small.transformer.state_dict()
    state["lvl_1L"] = torch.zeros_like(expected["lvl_1L"], device="cpu")  # rebuilt below from the new scales
    for key in ("pos_1LC",):  # gpt2: absolute positions of the kept rows
        if key in state:
            state[key] = state[key][:, : expected[key].shape[1]]
    strict_load(small.transformer, state, "restrict_resolution", assign=True)
    levels = [torch.zeros(cfg.context_token, dtype=torch.int64)] + [
        torch.full((p * p,), i + 1, dtype=torch.int64) for i, p in enumerate(keep[1:])]
    small.transformer.lvl_1L = torch.cat(levels).view(1, -1)
    small.vae = model.vae
    small.default_cfg = model.default_cfg
    return small.eval()


def _strip_vae_prefix(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith(DROPPED_VAE_PREFIXES):
            continue
        if not key.startswith("vae."):
            raise CheckpointError(
                f"{source}: key {key!r} lacks the 'vae.' prefix of the official tokenizer layout"
            )
        out[key[len("vae."):]] = value
    return out


def _materialize_buffers(model: HART) -> None:
    """Non-persistent buffers (none hold data we load) must not stay on the meta device."""
    for module in (model.transformer, model.vae):
        for name, buf in list(module.named_buffers()):
            if buf.is_meta:
                raise CheckpointError(f"internal: buffer {name} was not loaded")  # pragma: no cover


# ----------------------------------------------------------------------------- writing


def _replaceable_checkpoint(out: Path) -> str | None:
    """``--force``/``overwrite`` replaces a checkpoint (``llm/config.json``), never an unrelated folder."""
    if (out / "llm" / "config.json").is_file():
        return None
    return "it holds no llm/config.json (not a checkpoint)"


@contextmanager
def atomic_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``out``; rename it to ``out`` only if the block succeeds.

    ``overwrite`` replaces an existing checkpoint only (see :func:`hartkit.fsutil.atomic_dir`)."""
    from hartkit import fsutil

    with fsutil.atomic_dir(out, overwrite=overwrite, replaceable=_replaceable_checkpoint,
                           what="a previous checkpoint", error=CheckpointError) as tmp:
        yield tmp


def write_json(path: Path, data: dict) -> None:
    from hartkit.fsutil import write_json as write

    write(path, data, indent=2, sort_keys=True)


def save_state_dict(state: Mapping[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    from hartkit.fsutil import atomic_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def save_hart(model: HART, root: Path) -> None:
    """Write ``root/llm`` and ``root/tokenizer`` in the official layout (safetensors)."""
    llm_dir, vae_dir = root / "llm", root / "tokenizer"
    llm_dir.mkdir(parents=True, exist_ok=True)
    vae_dir.mkdir(parents=True, exist_ok=True)
    write_json(llm_dir / "config.json", {**model.cfg.to_dict(), "architectures": ["HARTForT2I"]})
    save_state_dict(model.transformer.state_dict(), llm_dir / "model.safetensors")
    if model.default_cfg != HART_DEFAULT_CFG:
        write_default_cfg(llm_dir, model.default_cfg)
    write_json(vae_dir / "config.json", {**model.vae_cfg.to_dict(), "architectures": ["HARTAutoEncoderWithDisc"]})
    save_state_dict({f"vae.{k}": v for k, v in model.vae.state_dict().items()}, vae_dir / "model.safetensors")
