"""The names a bundle is made of: its files, its version, the ``loop`` section's keys, and its errors."""

from __future__ import annotations

import hashlib
from dataclasses import MISSING, fields
from pathlib import Path

from hartkit.errors import BundleError  # noqa: F401 - re-exported: the format's error
from hartkit.fsutil import one_line  # noqa: F401 - re-exported: the bundle modules' message helper
from hartkit.loop.plan import LoopInfo

MANIFEST = "manifest.json"
CONSTANTS = "constants.npz"  # the VQ codebook the host loop samples latents from
TOKENIZER_DIR = "tokenizer"
GOLDEN_DIR = "golden"  # recorded inputs/outputs per graph, per format for quantized bundles
GOLDEN_LOOP = f"{GOLDEN_DIR}/loop.npz"  # the sampled tokens and image of one whole generation
ARCHIVE_SUFFIX = ".hartkit"

# The one version of the format, recorded as the manifest's ``schema_version``: a reader refuses
# manifests newer than it and reads every older one.
SCHEMA_VERSION = 1


# The keys every manifest's ``loop`` section has (``default_cfg`` came later and may be absent).
LOOP_KEYS = tuple(f.name for f in fields(LoopInfo) if f.default is MISSING)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
