"""Issue 21, the bundle side: nothing read from outside a bundle, unpack bounded and exact, manifest
numbers bounded, extra files and links reported, readable unpacked modes, a pipeline shared by threads,
one-line errors (exit 2 or 3) leaving nothing behind, and a verify that always runs something (#16)."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import shutil
import stat
import tempfile
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hartkit.cli import main
from hartkit.errors import HartkitError, UsageError
from hartkit import bundle as B
from hartkit.bundle import BundleError, bundle_path, pack, parse_manifest, unpack, verify_bundle
from hartkit.bundle import archive as bundle_archive  # pack/unpack's module: the tests patch its names
from hartkit.runtime.pipeline import Pipeline

PROMPT = "a red circle above a blue square"


# ----------------------------------------------------------------------------- helpers


@pytest.fixture()
def bundle(onnx_bundle, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(onnx_bundle[0], dst)
    return dst


@pytest.fixture(scope="module")
def real_manifest(onnx_bundle) -> dict:
    return json.loads((onnx_bundle[0] / "manifest.json").read_text())


def edit(folder: Path, change) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def art(path: str, data: bytes) -> dict:
    return {"path": path, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def mini_files(real_manifest: dict, extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """A small bundle that verifies without a backend: the real manifest's sections, no graph files."""
    files = {"constants.npz": npz_bytes(codebook=np.zeros((4, 2), np.float32)),
             "tokenizer/tokenizer.json": b'{"version": "1.0"}', **(extra or {})}
    manifest = dict(real_manifest, files={}, golden={"graphs": {}, "loop": None},
                    artifacts=[art(p, d) for p, d in sorted(files.items())])
    return {"manifest.json": json.dumps(manifest).encode(), **files}


def write_zip(path: Path, entries: list[tuple[str, bytes]], symlinks: set[str] = frozenset(),
              compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": on purpose
        for name, data in entries:
            info = zipfile.ZipInfo(name)
            info.compress_type = compression
            info.external_attr = ((stat.S_IFLNK | 0o777) if name in symlinks else (stat.S_IFREG | 0o644)) << 16
            zf.writestr(info, data)
    return path


# ----------------------------------------------------------------------------- 3: nothing read from outside


@pytest.mark.parametrize("key,value", [
    ("constants", "/etc/evil.npz"), ("constants", "../evil.npz"), ("constants", "a/../../evil.npz"),
    ("tokenizer", "/usr/share"), ("tokenizer", "..\\tokenizer"), ("constants", "./constants.npz"),
    ("constants", ""), ("tokenizer", "tok\x00en"),
])
def test_constants_and_tokenizer_paths_are_confined(bundle, key, value):
    edit(bundle, lambda m: m.__setitem__(key, value))
    with pytest.raises(BundleError, match="escapes the bundle|not a plain relative path|invalid manifest"):
        Pipeline.from_exported(bundle)
    with pytest.raises(BundleError):
        Pipeline.from_bundle(bundle)


@pytest.mark.parametrize("value", ["/tmp/ar_head.onnx", "../onnx/ar_head.onnx", "onnx/../../x.onnx", "onnx//ar_head.onnx"])
def test_graph_file_paths_are_confined(bundle, value):
    edit(bundle, lambda m: m["files"]["onnx"].__setitem__("ar_head", value))
    with pytest.raises(BundleError, match="files.onnx.ar_head"):
        Pipeline.from_exported(bundle)


def test_backends_refuse_paths_outside_even_without_a_manifest_check(bundle, tmp_path):
    """The backends join paths with bundle_path themselves: an info dict that skipped parse_manifest."""
    from hartkit.backends import OnnxRuntimeBackend

    outside = tmp_path / "outside.onnx"
    shutil.copy(bundle / "onnx" / "ar_head.onnx", outside)
    info = json.loads((bundle / "manifest.json").read_text())
    info["files"]["onnx"]["ar_head"] = str(outside)
    with pytest.raises(BundleError, match="escapes the bundle"):
        OnnxRuntimeBackend(bundle, info).run("ar_head", {})
    info["files"]["onnx"]["ar_head"] = "onnx/link.onnx"
    (bundle / "onnx" / "link.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="symbolic link"):
        OnnxRuntimeBackend(bundle, info).run("ar_head", {})


def test_a_constants_file_swapped_for_a_link_is_refused(bundle, tmp_path):
    evil = tmp_path / "evil.npz"
    np.savez(evil, codebook=np.ones((1024, 8), np.float32))
    (bundle / "constants.npz").unlink()
    (bundle / "constants.npz").symlink_to(evil)
    with pytest.raises(BundleError, match="constants.*symbolic link"):
        Pipeline.from_exported(bundle)
    problems = verify_bundle(bundle).problems
    assert any("constants.npz" in p and "symbolic link" in p for p in problems)


def test_a_link_inside_the_tokenizer_folder_is_refused(bundle, tmp_path):
    outside = tmp_path / "tokenizer_config.json"
    shutil.copy(bundle / "tokenizer" / "tokenizer_config.json", outside)
    (bundle / "tokenizer" / "tokenizer_config.json").unlink()
    (bundle / "tokenizer" / "tokenizer_config.json").symlink_to(outside)
    with pytest.raises(BundleError, match="tokenizer.*symbolic link"):
        Pipeline.from_exported(bundle)


def test_verify_covers_constants_and_the_tokenizer(bundle):
    """A constants file or tokenizer folder the manifest does not list would be read unchecked."""
    def unlist(prefix):
        return lambda m: m.__setitem__("artifacts", [a for a in m["artifacts"] if not a["path"].startswith(prefix)])

    edit(bundle, unlist("constants.npz"))
    assert any(p.startswith("constants constants.npz: not among") for p in verify_bundle(bundle).problems)
    edit(bundle, unlist("tokenizer/"))
    problems = verify_bundle(bundle).problems
    assert any(p.startswith("tokenizer tokenizer: not a folder") for p in problems)
    assert any(p.startswith("tokenizer/tokenizer.json: not listed") for p in problems)


def test_a_changed_codebook_is_named(bundle):
    np.savez(bundle / "constants.npz", codebook=np.zeros((3, 3), np.float32))
    with pytest.raises(HartkitError, match=r"codebook of shape \[1024, 8\]"):
        Pipeline.from_exported(bundle)
    with pytest.raises(BundleError, match="constants.npz: size|constants.npz: sha256"):
        Pipeline.from_bundle(bundle)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rel=st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(["..", ".", "", "a", "b", "onnx", "/", "\\", "~", "link", "c:"]), max_size=6).map("/".join),
))
def test_bundle_path_never_leaves_the_folder(tmp_path, rel):
    root = tmp_path / "b"
    (root / "a").mkdir(parents=True, exist_ok=True)
    if not (root / "link").is_symlink():
        (root / "link").symlink_to(tmp_path)
    try:
        path = bundle_path(root, rel, "test")
    except BundleError:
        return
    assert path.resolve().is_relative_to(root.resolve())
    assert not any((root / Path(*Path(rel).parts[: i + 1])).is_symlink() for i in range(len(Path(rel).parts)))


def test_onnxruntime_errors_are_one_line_errors(bundle):
    """A corrupt graph in an unverified folder: onnxruntime's exception becomes a HartkitError naming it."""
    (bundle / "onnx" / "ar_head.onnx").write_bytes(b"not an onnx file")
    pipe = Pipeline.from_exported(bundle)
    with pytest.raises(HartkitError, match="onnxruntime cannot load the graph 'ar_head'") as err:
        pipe.generate(PROMPT, seed=0)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- 6: bounded numbers


def _set(path: str, value):
    def change(m):
        *keys, last = path.split(".")
        node = m
        for k in keys:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return change


HOSTILE = [
    ("loop.context_token", 1e12), ("loop.context_token", 2**70), ("loop.vocab_size", 2**40),
    ("loop.patch_nums", [1, 10**6]), ("loop.patch_nums", list(range(1, 1000))), ("loop.patch_nums", [1, 4, 2]),
    ("loop.patch_nums", [1, 2, 3, 4, 1000]),  # each within bounds, tokens x vocab not
    ("loop.latent_dim", 0), ("loop.head_dim", -1), ("loop.num_phis", 10**9), ("loop.system_length", 1e12),
    ("loop.num_sampling_steps", "99999"), ("loop.num_sampling_steps", "1" * 10_000),
    ("loop.default_cfg", float("nan")), ("loop.image_size", 10**9),
    ("artifacts.0.size", 2**62), ("graphs.0.inputs.0.shape", [1, 2**40]), ("graphs.0.inputs.0.shape", [-1]),
    ("graphs.0.inputs.0.shape", [1] * 100), ("graphs.3.inputs.0.shape.1", {"dim": "t", "min": 0, "max": 2**50}),
    ("golden.loop.seed", -1), ("golden.loop.seed", 2**70), ("golden.loop.cfg", float("inf")),
    ("golden.graphs.denoise.atol", float("nan")), ("prompt.max_tokens", 10**7), ("diffusion.timesteps", [5000]),
]


@pytest.mark.parametrize("path,value", HOSTILE, ids=[f"{p}={str(v)[:20]}" for p, v in HOSTILE])
def test_hostile_numbers_are_refused_with_one_line(bundle, capsys, path, value):
    edit(bundle, _set(path, value))
    with pytest.raises(BundleError):
        B.read_manifest(bundle)
    with pytest.raises(BundleError):  # the runtime reads the manifest through the same checks
        Pipeline.from_exported(bundle)
    rc, _, err = cli(capsys, "bundle", "verify", str(bundle))
    assert rc == 3
    assert "manifest.json" in one_line_error(err)


def test_huge_literals_and_deep_nesting_are_refused(bundle, capsys):
    text = (bundle / "manifest.json").read_text()
    (bundle / "manifest.json").write_text(text.replace('"context_token": 64', '"context_token": 1' + "0" * 5000))
    rc, _, err = cli(capsys, "bundle", "verify", str(bundle))
    assert rc == 3 and "not valid JSON" in one_line_error(err)
    for bad in ("[" * 100_000 + "]" * 100_000, b"\xff\xfe{}", b" " * (B.MAX_MANIFEST_BYTES + 1)):
        (bundle / "manifest.json").write_bytes(bad.encode() if isinstance(bad, str) else bad)
        rc, _, err = cli(capsys, "bundle", "verify", str(bundle))
        assert rc == 3, err
        one_line_error(err)


def test_the_real_models_fit_the_bounds():
    """HART 0.7B at 1024 px with 16x its vocabulary, and a 2048 px model with vocab 16384, stay valid."""
    from hartkit.model.presets import OFFICIAL_PATCH_NUMS

    assert OFFICIAL_PATCH_NUMS[-1] ** 2 * 4096 * 16 <= B.MAX_STAGE_ELEMENTS
    assert 128 ** 2 * 16384 <= B.MAX_STAGE_ELEMENTS and 300 * 10 <= B.MAX_CONTEXT and 64 * 10 <= B.MAX_PATCH


loop_numbers = st.one_of(st.integers(-2**70, 2**70), st.floats(), st.integers(0, 70_000),
                         st.lists(st.integers(-5, 2000), max_size=80), st.text(max_size=12), st.none())


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_fuzzed_loop_numbers_are_bounded_or_refused(real_manifest, data):
    manifest = json.loads(json.dumps(real_manifest))
    keys = data.draw(st.lists(st.sampled_from(["patch_nums", "context_token", "vocab_size", "latent_dim", "head_dim",
                                               "num_phis", "system_length", "image_size", "default_cfg"]),
                              min_size=1, max_size=4, unique=True))
    for key in keys:
        manifest["loop"][key] = data.draw(loop_numbers)
    try:
        loop = parse_manifest(json.dumps(manifest))["loop"]
    except BundleError:
        return
    pns = loop["patch_nums"]
    assert 2 <= len(pns) <= B.MAX_SCALES and all(1 <= p <= B.MAX_PATCH for p in pns)
    assert pns[-1] ** 2 * max(loop["vocab_size"], loop["latent_dim"]) <= B.MAX_STAGE_ELEMENTS
    assert 1 <= loop["context_token"] <= B.MAX_CONTEXT and 0 <= loop["system_length"] <= B.MAX_CONTEXT
    assert math.isfinite(loop.get("default_cfg", 0.0))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.fixed_dictionaries({}, optional={
    "vocab_size": st.sampled_from([1, 7, 4096, 65536]), "context_token": st.sampled_from([1, 65, 4096]),
    "patch_nums": st.sampled_from([[1, 2], [1, 2, 3, 4, 6, 9], [1, 3, 5, 7, 9, 11, 13]]),
    "latent_dim": st.sampled_from([1, 9]), "system_length": st.sampled_from([0, 63, 4096])}))
def test_verify_with_a_backend_fails_but_never_crashes_on_in_bounds_lies(bundle, changes):
    """Numbers within bounds that disagree with the graphs: the golden replay fails, as a report."""
    original = (bundle / "manifest.json").read_text()
    changed = any(json.loads(original)["loop"][k] != v for k, v in changes.items())
    try:
        edit(bundle, lambda m: m["loop"].update(changes))
        try:
            report = verify_bundle(bundle, backend="onnxruntime")
        except HartkitError:  # refused up front (e.g. over a bound once multiplied)
            assert changed
            return
        assert report.ok != changed, report.problems
    finally:
        (bundle / "manifest.json").write_text(original)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
    | st.sampled_from(["onnx/ar_head.onnx", "../x", "/etc/passwd", "constants.npz", "golden/loop.npz", "tokenizer"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _paths(node, prefix=(), depth=0):
    """Every (nested key or index) path of a manifest, to depth 5."""
    yield prefix
    if depth >= 5:
        return
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _paths(child, (*prefix, key), depth + 1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bundle_verify_never_crashes_on_a_mutated_manifest(bundle, capsys, data):
    """Any subtree of a real manifest replaced by any JSON: `bundle verify` (golden vectors and loop
    replay included) exits 0, 2 or 3 with its own messages, never a traceback."""
    original = (bundle / "manifest.json").read_text()
    manifest = json.loads(original)
    paths = [p for p in _paths(manifest) if p and p[0] not in ("parity", "notes", "libraries", "onnx_weights")]
    where = data.draw(st.sampled_from(paths))
    node = manifest
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = data.draw(json_values)
    try:
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        rc, _, err = cli(capsys, "bundle", "verify", str(bundle))
        assert rc in (0, 2, 3)
        assert "Traceback" not in err
        if rc != 0:
            assert err.strip(), "a failure says why"
    finally:
        (bundle / "manifest.json").write_text(original)


# ----------------------------------------------------------------------------- 12: extra files, links


def test_extra_files_and_links_are_reported(bundle, tmp_path, capsys):
    (bundle / "notes.txt").write_text("hello")
    (bundle / "onnx" / "vocab.json").write_text("{}")
    (bundle / "elsewhere").symlink_to(tmp_path)
    problems = verify_bundle(bundle).problems
    for rel in ("notes.txt", "onnx/vocab.json", "elsewhere"):
        assert f"{rel}: not listed in the manifest (an extra file or link: remove it, or re-export)" in problems
    with pytest.raises(BundleError, match="not listed"):
        Pipeline.from_bundle(bundle)
    rc, _, err = cli(capsys, "bundle", "verify", str(bundle), "--backend", "none")
    assert rc == 3 and "notes.txt" in err


def test_a_listed_artifact_that_is_a_link_is_refused_and_never_packed(bundle, tmp_path, monkeypatch):
    outside = tmp_path / "ar_head.onnx"
    shutil.copy(bundle / "onnx" / "ar_head.onnx", outside)  # the same bytes: the hash alone would pass
    (bundle / "onnx" / "ar_head.onnx").unlink()
    (bundle / "onnx" / "ar_head.onnx").symlink_to(outside)
    assert any("onnx/ar_head.onnx" in p and "symbolic link" in p for p in verify_bundle(bundle).problems)
    archive = tmp_path / "b.hartkit"
    with pytest.raises(BundleError, match="does not verify"):
        pack(bundle, archive)
    # Even if verification were fooled (a link swapped in after it ran), the link is not followed.
    monkeypatch.setattr(bundle_archive, "verify_bundle", lambda folder, backend=None: B.VerifyReport())
    monkeypatch.setattr(bundle_archive, "bundle_path", lambda folder, rel, what, contents=False: Path(folder) / rel)
    with pytest.raises(BundleError, match="ar_head.onnx: cannot read"):
        pack(bundle, archive)
    assert not archive.exists() and leftovers(tmp_path) == []


def test_an_artifact_under_a_linked_folder_is_refused(bundle, tmp_path):
    shutil.move(bundle / "tokenizer", tmp_path / "tokenizer")
    (bundle / "tokenizer").symlink_to(tmp_path / "tokenizer")
    problems = verify_bundle(bundle).problems
    assert any("tokenizer/tokenizer.json" in p and "symbolic link" in p for p in problems)
    with pytest.raises(BundleError, match="symbolic link"):
        Pipeline.from_exported(bundle)


def test_a_linked_manifest_is_refused(bundle, tmp_path):
    shutil.move(bundle / "manifest.json", tmp_path / "manifest.json")
    (bundle / "manifest.json").symlink_to(tmp_path / "manifest.json")
    with pytest.raises(BundleError, match="symbolic link"):
        verify_bundle(bundle)


# ----------------------------------------------------------------------------- 4 and 14: unpack


def test_unpack_refuses_what_the_manifest_does_not_list(real_manifest, tmp_path):
    files = mini_files(real_manifest)
    entries = list(files.items())
    cases = {
        "unlisted": entries + [("big.bin", b"\0" * 1000)],
        "duplicate manifest": entries + [("manifest.json", b'{"schema_version": 1}')],
        "duplicate file": entries + [("constants.npz", files["constants.npz"])],
        "case duplicate": entries + [("Constants.npz", files["constants.npz"])],
        "wrong size": [(n, d + b"x" if n == "constants.npz" else d) for n, d in entries],
        "missing": [(n, d) for n, d in entries if n != "constants.npz"],
        "no manifest": [(n, d) for n, d in entries if n != "manifest.json"],
    }
    messages = {"unlisted": "not listed in its manifest", "duplicate manifest": "appears twice",
                "duplicate file": "appears twice", "case duplicate": "appears twice", "wrong size": "its manifest lists",
                "missing": "is not in the archive", "no manifest": "no manifest.json"}
    for name, case in cases.items():
        archive = write_zip(tmp_path / f"{name}.hartkit", case)
        with pytest.raises(BundleError, match=messages[name]):
            unpack(archive, tmp_path / "out")
        assert not (tmp_path / "out").exists() and leftovers(tmp_path) == [], name
    unpack(write_zip(tmp_path / "ok.hartkit", entries), tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()) \
        == sorted(files)


def test_unpack_refuses_a_zip_bomb_and_checks_free_space(real_manifest, tmp_path, monkeypatch):
    zeros = b"\0" * (8 << 20)
    files = mini_files(real_manifest, {"golden/zeros.bin": zeros})
    archive = write_zip(tmp_path / "bomb.hartkit", list(files.items()), compression=zipfile.ZIP_DEFLATED)
    assert archive.stat().st_size < 100_000
    with pytest.raises(BundleError, match="inflates"):
        unpack(archive, tmp_path / "out")
    archive = write_zip(tmp_path / "big.hartkit", list(files.items()))
    monkeypatch.setattr(bundle_archive.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1 << 20))
    with pytest.raises(BundleError, match=r"unpacking needs 8\.\d MB, .* has 1\.0 MB free"):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_disk_full_during_unpack_leaves_nothing(real_manifest, tmp_path, monkeypatch):
    archive = write_zip(tmp_path / "b.hartkit", list(mini_files(real_manifest).items()))

    def full(zf, info, target, archive):
        target.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(bundle_archive, "_extract", full)
    with pytest.raises(HartkitError, match="No space left on device") as err:
        unpack(archive, tmp_path / "new" / "deeper" / "out")
    assert err.value.exit_code == 2
    assert sorted(os.listdir(tmp_path)) == ["b.hartkit"]  # the folders made for it are gone too


def test_unpacked_bundles_are_readable_by_everyone(onnx_bundle, tmp_path):
    """0755 folders and 0644 files under umask 022 (the umask is respected, as for a new export)."""
    old = os.umask(0o022)
    try:
        archive = pack(onnx_bundle[0], tmp_path / "b.hartkit")
        out = unpack(archive, tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for path in out.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
    assert stat.S_IMODE(archive.stat().st_mode) == 0o644


MUTATIONS = ("extra", "dup_manifest", "dup_file", "escape", "absolute", "symlink", "tamper", "truncate", "drop",
             "case_dup", "dir_escape")


@settings(max_examples=60, deadline=None)
@given(mutations=st.lists(st.sampled_from(MUTATIONS), max_size=3, unique=True), shuffle=st.randoms())
def test_fuzzed_archives_unpack_exactly_or_leave_nothing(real_manifest, mutations, shuffle):
    files = mini_files(real_manifest)
    entries = list(files.items())
    symlinks = set()
    for m in mutations:
        if m == "extra":
            entries.append(("extra.bin", b"x" * 100))
        elif m == "dup_manifest":
            entries.append(("manifest.json", entries[0][1]))
        elif m == "dup_file":
            entries.append(("tokenizer/tokenizer.json", files["tokenizer/tokenizer.json"]))
        elif m == "escape":
            entries.append(("tokenizer/../../escaped", b"x"))
        elif m == "absolute":
            entries.append(("/tmp/escaped", b"x"))
        elif m == "dir_escape":
            entries.append(("../up/", b""))
        elif m == "symlink":
            symlinks.add("tokenizer/tokenizer.json")
        elif m == "tamper":
            entries = [(n, b'{"version": "2.0"}' if n == "tokenizer/tokenizer.json" else d) for n, d in entries]
        elif m == "truncate":
            entries = [(n, d[:-1] if n == "constants.npz" else d) for n, d in entries]
        elif m == "drop":
            entries = [(n, d) for n, d in entries if n != "constants.npz"]
        elif m == "case_dup":
            entries.append(("TOKENIZER/tokenizer.json", b"x"))
    shuffle.shuffle(entries)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        archive = write_zip(tmp / "a.hartkit", entries, symlinks)
        if not mutations:
            out = unpack(archive, tmp / "out")
            assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
            return
        with pytest.raises((BundleError, UsageError)):
            unpack(archive, tmp / "out")
        assert sorted(os.listdir(tmp)) == ["a.hartkit"]
        assert not Path("/tmp/escaped").exists()


# ----------------------------------------------------------------------------- 9: pack/unpack targets


def test_pack_and_unpack_targets_exit_with_one_line_and_leave_nothing(bundle, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    rc, _, err = cli(capsys, "bundle", "pack", str(bundle), "--archive", str(folder))
    assert rc == 2 and "is a folder" in one_line_error(err) and list(folder.iterdir()) == []
    rc, _, err = cli(capsys, "bundle", "pack", str(bundle), "--archive", str(bundle / "inside.hartkit"))
    assert rc == 2 and "inside the bundle it packs" in one_line_error(err)
    rc, _, err = cli(capsys, "bundle", "pack", str(bundle), "--archive", str(tmp_path / ("n" * 300 + ".hartkit")))
    assert rc == 2 and "too long" in one_line_error(err)
    monkeypatch.chdir(bundle)
    rc, _, err = cli(capsys, "bundle", "pack", ".", "--archive", "here.hartkit")
    assert rc == 2 and "inside the bundle" in one_line_error(err)
    rc, out, err = cli(capsys, "bundle", "pack", ".")  # NAME.hartkit beside the folder
    assert rc == 0 and (tmp_path / "bundle.hartkit").is_file(), err
    assert verify_bundle(bundle).ok and leftovers(bundle) == [] and leftovers(tmp_path) == []

    existing = tmp_path / "file.txt"
    existing.write_text("keep me")
    rc, _, err = cli(capsys, "bundle", "unpack", str(tmp_path / "bundle.hartkit"), "--out", str(existing))
    assert rc == 2 and "not a folder" in one_line_error(err) and existing.read_text() == "keep me"
    rc, _, err = cli(capsys, "bundle", "unpack", str(tmp_path / "bundle.hartkit"), "--out", str(folder.parent))
    assert rc == 2 and "not empty" in one_line_error(err)
    rc, _, err = cli(capsys, "bundle", "unpack", str(tmp_path / "bundle.hartkit"), "--out", str(tmp_path / ("n" * 300)))
    assert rc == 2 and "too long" in one_line_error(err)
    rc, _, err = cli(capsys, "bundle", "unpack", str(existing), "--out", str(tmp_path / "x"))
    assert rc == 3 and "not a hartkit bundle archive" in one_line_error(err)
    assert leftovers(tmp_path) == [] and not (tmp_path / "x").exists()


def test_a_disk_full_during_pack_leaves_no_temp_file(bundle, tmp_path, capsys, monkeypatch):
    real = bundle_archive._pack_file
    calls = []

    def fill_up(zf, folder, art):
        calls.append(art["path"])
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(zf, folder, art)

    monkeypatch.setattr(bundle_archive, "_pack_file", fill_up)
    rc, _, err = cli(capsys, "bundle", "pack", str(bundle), "--archive", str(tmp_path / "new" / "b.hartkit"))
    assert rc == 2 and "No space left on device" in one_line_error(err)
    assert sorted(os.listdir(tmp_path)) == ["bundle"]  # no archive, no .b.hartkit.tmp-*, no new/


# ----------------------------------------------------------------------------- #16: a verify that runs something


def test_verify_refuses_a_backend_the_bundle_has_no_files_for(bundle, capsys):
    edit(bundle, lambda m: m["files"].__setitem__("executorch", m["files"].pop("onnx")))
    with pytest.raises(UsageError, match=r"no golden vectors for backend onnxruntime: the bundle has formats "
                                         r"\['executorch'\] and no onnx files"):
        verify_bundle(bundle, backend="onnxruntime")
    rc, _, err = cli(capsys, "bundle", "verify", str(bundle))
    assert rc == 2 and "backends that can verify it: executorch" in one_line_error(err)


def test_verify_fails_when_no_golden_vector_ran_for_the_backend(bundle, capsys):
    """A quantized bundle keeps goldens per format: one without onnx goldens verified on onnxruntime."""
    def only_executorch(m):
        graphs = {g: e for g, e in m["golden"]["graphs"].items()}
        m["golden"]["graphs"] = {"by_format": {"executorch": graphs}, **graphs}
        m["golden"]["loop"] = None

    edit(bundle, only_executorch)
    report = verify_bundle(bundle, backend="onnxruntime")
    assert not report.ok and report.golden == []
    assert report.problems == ["no golden vectors for backend onnxruntime: the bundle has formats ['onnx'], "
                               "golden vectors for ['executorch']"]
    rc, _, err = cli(capsys, "bundle", "verify", str(bundle))
    assert rc == 3 and "no golden vectors for backend onnxruntime" in err


# ----------------------------------------------------------------------------- 5: threads


def _load_serve():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "serve.py"
    spec = importlib.util.spec_from_file_location("hartkit_example_serve", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_shared_pipeline_serves_concurrent_requests(onnx_bundle):
    """examples/serve.py: four requests at once on one pipeline; each PNG is the single-threaded image."""
    import urllib.error
    import urllib.request

    from PIL import Image

    serve = _load_serve()
    pipe = Pipeline.from_exported(onnx_bundle[0])
    seeds = [0, 1, 2, 3]
    expected = {seed: pipe.generate(PROMPT, seed=seed)[0] for seed in seeds}
    server = serve.make_server(pipe, port=0)
    host, port = server.server_address
    assert host == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/generate"

    def post(body: bytes):
        req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    results: dict[int, tuple[int, bytes]] = {}
    barrier = threading.Barrier(len(seeds))

    def client(seed: int) -> None:
        barrier.wait(timeout=30)
        results[seed] = post(json.dumps({"prompt": PROMPT, "seed": seed}).encode())

    try:
        clients = [threading.Thread(target=client, args=(s,)) for s in seeds]
        for c in clients:
            c.start()
        for c in clients:
            c.join(timeout=180)
        assert sorted(results) == seeds
        for seed, (status, body) in results.items():
            assert status == 200, body[:200]
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(body)).convert("RGB")), expected[seed])
        status, body = post(b'{"prompt": 3}')
        assert status == 400 and body.count(b"\n") == 1
        status, body = post(json.dumps({"prompt": PROMPT, "seed": -1}).encode())
        assert status == 400 and b"seed" in body
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_threads_sharing_a_pipeline_get_the_single_threaded_images(onnx_bundle):
    pipe = Pipeline.from_exported(onnx_bundle[0])
    expected = {seed: pipe.generate(PROMPT, seed=seed)[0] for seed in range(4)}
    got: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            got[seed] = pipe.generate(PROMPT, seed=seed)[0]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert all(np.array_equal(got[s], expected[s]) for s in range(4))
