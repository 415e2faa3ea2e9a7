"""``hartkit bundle verify|inspect|pack|unpack``: a bundle's checks, summary and one-file archive."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hartkit.cli.options import BACKENDS
from hartkit.errors import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bundle", help="verify, inspect, pack or unpack a bundle",
        description="verify: recompute every sha256, check the manifest against its schema and the files against "
                    "the manifest, and run the golden vectors on a backend. inspect: summary. pack/unpack: one-file "
                    "archive (unpack refuses paths that escape the target).")
    p.add_argument("action", choices=["verify", "inspect", "pack", "unpack"])
    p.add_argument("path", help="bundle folder (verify, inspect, pack) or archive file (unpack)")
    p.add_argument("--backend", default="onnxruntime", choices=[*BACKENDS, "none"],
                   help="verify: backend for the golden vectors, or none (default: onnxruntime)")
    p.add_argument("--archive", help="pack: archive path (default: PATH.hartkit)")
    p.add_argument("--out", help="unpack: target folder")
    p.set_defaults(func=cmd_bundle)


def cmd_bundle(args: argparse.Namespace) -> int:
    import json

    from hartkit import bundle as B

    if args.action == "verify":
        report = B.verify_bundle(args.path, backend=None if args.backend == "none" else args.backend)
        print(f"{args.path}: {report.checked_files} files match their sha256")
        for g in report.golden:
            if g["graph"] == "loop":
                print(f"  golden loop: tokens {'identical at every stage' if g['first_divergent_stage'] is None else 'differ from stage %d' % g['first_divergent_stage']}, "
                      f"image PSNR {g['psnr_db']:.1f} dB  {'ok' if g['ok'] else 'FAILED'}")
                continue
            print(f"  golden {g['graph']:24} max abs err {g['max_abs_err']:.2e}  {'ok' if g['ok'] else 'FAILED'}")
        for problem in report.problems:
            print(f"  problem: {problem}", file=sys.stderr)
        print("bundle OK" if report.ok else "bundle FAILED verification")
        return 0 if report.ok else 3
    if args.action == "inspect":
        manifest = B.read_manifest(Path(args.path))
        loop = manifest["loop"]
        print(f"model      {manifest['model'].get('name', '?')}  (schema {manifest['schema_version']}, "
              f"hartkit {manifest.get('hartkit_version', '?')})")
        print(f"scales     {loop['patch_nums']}  image {loop.get('image_size', '?')} px  vocab {loop['vocab_size']}")
        print(f"formats    {', '.join(manifest['files'])}")
        print(f"graphs     {', '.join(g['name'] for g in manifest['graphs'])}")
        size = sum(a['size'] for a in manifest['artifacts'])
        print(f"files      {len(manifest['artifacts'])} ({size / 1e6:.1f} MB)")
        print(f"recipe     {json.dumps(manifest.get('recipe')) if manifest.get('recipe') else 'fp32 (none)'}")
        return 0
    if args.action == "pack":
        out = B.pack(args.path, args.archive)  # no --archive: NAME.hartkit beside the folder (also for `pack .`)
        print(f"wrote {out}")
        return 0
    if args.action == "unpack":
        if not args.out:
            raise UsageError("unpack needs --out DIR")
        print(f"unpacked and verified {B.unpack(args.path, args.out)}")
        return 0
    raise UsageError(f"unknown bundle action {args.action}")  # pragma: no cover
