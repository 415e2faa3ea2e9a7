"""hartkit.bundle: the bundle format, owned in one place. Imports without torch.

A bundle is what ``hartkit export`` writes: a folder made self-describing by ``manifest.json``
(``schema_version``; the loop's constants, every graph's I/O and files per format, the sha256 and
size of every file, the RNG contract, the recipe, the exporting CPU), with the tokenizer files,
``constants.npz`` (the VQ codebook) and golden vectors (``golden/``: each graph's recorded inputs
and outputs, and the sampled tokens and image of one whole generation). ``NAME.hartkit`` is a
bundle packed into one file.

Modules, in the order they depend on each other:

- ``format``: file names, ``SCHEMA_VERSION``, ``LOOP_KEYS`` (the manifest keys of :class:`LoopInfo`, which
  lives in :mod:`hartkit.loop.plan`: the loop below the bundle runs on it), :class:`BundleError`
- ``cpu``: the CPU's integer-kernel class (``exported_on``, the self-check's messages)
- ``schema``: the manifest's JSON Schema and the bounds on every number that sizes an allocation
- ``read``: :func:`read_manifest` (the only manifest reader; always schema-checked), :func:`bundle_path`,
  :func:`load_npz`, the codebook and the tokenizer folder
- ``verify``: files against their sha256, golden vectors, the loop replay (:func:`verify_bundle`)
- ``selfcheck``: a bundle's integer graphs rerun on this CPU at load
- ``archive``: :func:`pack` / :func:`unpack`
- ``write``: the manifest, constants and golden vectors an export writes
"""

from hartkit.bundle.archive import default_archive, pack, unpack
from hartkit.bundle.cpu import cpu_description, cpu_isa
from hartkit.bundle.format import (ARCHIVE_SUFFIX, CONSTANTS, GOLDEN_DIR, GOLDEN_LOOP, LOOP_KEYS, MANIFEST,
                                   SCHEMA_VERSION, TOKENIZER_DIR, BundleError, sha256_file)
from hartkit.bundle.read import (bundle_path, load_codebook, load_golden, load_npz, parse_manifest,
                                 peek_manifest, read_manifest, tokenizer_dir)
from hartkit.bundle.schema import (MANIFEST_SCHEMA, MAX_CONTEXT, MAX_INFLATION, MAX_MANIFEST_BYTES, MAX_PATCH,
                                   MAX_SCALES, MAX_STAGE_ELEMENTS)
from hartkit.bundle.selfcheck import SelfCheckError, check_or_raise, run_self_check, self_check_graphs
from hartkit.bundle.verify import (FORMAT_BACKEND, VerifyReport, verify_bundle, verify_files, verify_golden,
                                   verify_loop)
from hartkit.bundle.write import (QUANTIZED_GOLDEN_TOL, artifacts, build_export_info, build_manifest,
                                  library_versions, write_constants, write_golden, write_loop_golden,
                                  write_manifest)
from hartkit.loop.plan import LoopInfo, past_shape  # re-exported: the manifest's `loop` section is this dataclass

__all__ = [
    "ARCHIVE_SUFFIX", "CONSTANTS", "GOLDEN_DIR", "GOLDEN_LOOP", "LOOP_KEYS", "MANIFEST", "SCHEMA_VERSION",
    "TOKENIZER_DIR", "BundleError", "LoopInfo", "sha256_file",
    "cpu_description", "cpu_isa",
    "MANIFEST_SCHEMA", "MAX_CONTEXT", "MAX_INFLATION", "MAX_MANIFEST_BYTES", "MAX_PATCH", "MAX_SCALES",
    "MAX_STAGE_ELEMENTS",
    "bundle_path", "load_codebook", "load_golden", "load_npz", "parse_manifest", "past_shape", "peek_manifest",
    "read_manifest", "tokenizer_dir",
    "FORMAT_BACKEND", "VerifyReport", "verify_bundle", "verify_files", "verify_golden", "verify_loop",
    "SelfCheckError", "check_or_raise", "run_self_check", "self_check_graphs",
    "default_archive", "pack", "unpack",
    "QUANTIZED_GOLDEN_TOL", "artifacts", "build_export_info", "build_manifest", "library_versions",
    "write_constants", "write_golden", "write_loop_golden", "write_manifest",
]
