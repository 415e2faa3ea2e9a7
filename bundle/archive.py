"""One file per bundle: ``pack`` zips a verified bundle, ``unpack`` extracts and verifies one.

Both are atomic (a temp file or folder beside the target, renamed at the end) and leave nothing
behind on failure; ``unpack`` reads the whole archive before it writes anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath

from hartkit.bundle.format import ARCHIVE_SUFFIX, MANIFEST, BundleError, one_line
from hartkit.bundle.read import bundle_path, manifest_bytes, parse_manifest, safe_relpath
from hartkit.bundle.schema import MAX_ARTIFACTS, MAX_INFLATION, MAX_MANIFEST_BYTES
from hartkit.bundle.verify import verify_bundle
from hartkit.errors import HartkitError, UsageError
from hartkit.fsutil import current_umask  # read without changing it: unpack may run beside other threads


def default_archive(folder: str | Path) -> Path:
    """``NAME.hartkit`` beside the bundle folder ``NAME`` (also for ``.``, which has no name of its own)."""
    folder = Path(folder).resolve()
    if not folder.name:
        raise UsageError(f"{folder}: has no name to derive the archive's from; give --archive FILE")
    return folder.with_name(folder.name + ARCHIVE_SUFFIX)


def pack(folder: str | Path, archive: str | Path | None = None) -> Path:
    """Zip a verified bundle into one file, atomically: a temp file beside the archive, renamed at the end.

    What is packed is what the manifest lists, read without following links and hashed again on the
    way in: a file changed or swapped for a link after verification fails the pack. Nothing is left
    behind on failure (disk full included)."""
    folder = Path(folder)
    archive = default_archive(folder) if archive is None else Path(archive)
    _check_archive_target(folder, archive)
    report = verify_bundle(folder)
    if not report.ok:
        raise BundleError(f"{folder}: refusing to pack a bundle that does not verify: {report.problems[0]}")
    raw = manifest_bytes(folder)
    manifest = parse_manifest(raw, str(folder / MANIFEST))
    made = _make_parents(archive.parent)
    tmp = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{archive.name[:64]}.tmp-", dir=archive.parent)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
            info = zipfile.ZipInfo(MANIFEST, date_time=time.localtime()[:6])
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            zf.writestr(info, raw)
            for art in manifest["artifacts"]:
                _pack_file(zf, folder, art)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; the archive should look like any new file
        os.replace(tmp, archive)
    except OSError as exc:
        _remove(tmp, made)
        raise HartkitError(f"{archive}: cannot write the archive ({exc.strerror or one_line(exc)})") from None
    except BaseException:
        _remove(tmp, made)
        raise
    return archive


def _check_archive_target(folder: Path, archive: Path) -> None:
    if not archive.name or archive.name in (".", ".."):
        raise UsageError(f"{str(archive)!r}: not a file name for the archive")
    _check_stat(archive)
    if archive.is_dir():
        raise UsageError(f"{archive}: is a folder; give the archive's file name, e.g. "
                         f"{archive / default_archive(folder).name}")
    if archive.exists() and not archive.is_file():
        raise UsageError(f"{archive}: exists and is not a regular file; refused")
    root = folder.resolve()
    where = archive.parent.resolve() / archive.name
    if where.is_relative_to(root):
        raise UsageError(f"{archive}: is inside the bundle it packs; write it beside the bundle, e.g. "
                         f"{default_archive(folder)}")


def _pack_file(zf: zipfile.ZipFile, folder: Path, art: dict) -> None:
    rel = art["path"]
    path = bundle_path(folder, rel, rel)
    try:  # O_NOFOLLOW: a link swapped in after verification is refused, never followed
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise BundleError(f"{rel}: cannot read ({exc.strerror or one_line(exc)}); nothing packed") from None
    with os.fdopen(fd, "rb") as src:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size != art["size"]:
            raise BundleError(f"{rel}: changed since it was verified; nothing packed")
        info = zipfile.ZipInfo(rel, date_time=time.localtime(max(st.st_mtime, _ZIP_EPOCH))[:6])
        info.external_attr = (stat.S_IFREG | 0o644) << 16
        info.file_size = st.st_size
        digest = hashlib.sha256()
        with zf.open(info, "w", force_zip64=st.st_size >= zipfile.ZIP64_LIMIT) as dst:
            while block := src.read(1 << 20):
                digest.update(block)
                dst.write(block)
    if digest.hexdigest() != art["sha256"]:
        raise BundleError(f"{rel}: changed since it was verified; nothing packed")


_ZIP_EPOCH = 315_619_200  # 1980-01-02: ZIP dates start in 1980
DISK_MARGIN = 16 << 20  # left free after an unpack


def unpack(archive: str | Path, out: str | Path) -> Path:
    """Extract an archive into a new folder, then verify it; the folder appears only if it verifies.

    Before anything is written the archive is read in full: it must hold ``manifest.json`` and exactly
    the artifacts it lists (no other entry, no name twice, no link or special file, no path leaving
    the folder), each of the size listed, none inflating more than :data:`MAX_INFLATION` times, and the
    total must fit the free disk space. The result has the modes of any new folder (0755 folders and
    0644 files under the usual umask 022; the umask is respected). Nothing is left behind on failure."""
    archive, out = Path(archive), Path(out)
    if not out.name or out.name in (".", ".."):
        raise UsageError(f"{str(out)!r}: give the name of a new folder to unpack into")
    _check_stat(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out}: exists and is not empty")
    if not archive.is_file():
        raise BundleError(f"{archive}: not a hartkit bundle archive (no such file)")
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise BundleError(f"{archive}: not a hartkit bundle archive ({one_line(exc)})") from None
    with zf:
        entries, total = _plan_unpack(zf, archive)
        where = _existing_ancestor(out.parent)
        free = shutil.disk_usage(where).free
        if total + DISK_MARGIN > free:
            raise BundleError(f"{archive}: unpacking needs {total / 1e6:.1f} MB, {where} has {free / 1e6:.1f} MB free")
        made = _make_parents(out.parent)
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name[:64]}.tmp-", dir=out.parent))
            for rel, info in entries:
                target = tmp.joinpath(*PurePosixPath(rel).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                _extract(zf, info, target, archive)
            umask = current_umask()
            for path in [tmp, *tmp.rglob("*")]:  # mkdtemp makes 0700: apps and other users must read it
                os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
            report = verify_bundle(tmp)
            if not report.ok:
                raise BundleError(f"{archive}: unpacked bundle does not verify: {'; '.join(report.problems[:3])}")
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        except OSError as exc:
            _remove(tmp, made)
            raise HartkitError(f"{out}: cannot unpack here ({exc.strerror or one_line(exc)})") from None
        except BaseException:
            _remove(tmp, made)
            raise
    return out


def _plan_unpack(zf: zipfile.ZipFile, archive: Path) -> tuple[list[tuple[str, zipfile.ZipInfo]], int]:
    """The (path, entry) pairs to extract, manifest first, and their total size; refusals as BundleError."""
    infos = zf.infolist()
    if len(infos) > MAX_ARTIFACTS + 1:
        raise BundleError(f"{archive}: {len(infos)} entries, more than a bundle may hold ({MAX_ARTIFACTS + 1})")
    # Entries that share their bytes (overlapping ZIP records) would inflate without a high ratio.
    if sum(i.compress_size for i in infos) > archive.stat().st_size:
        raise BundleError(f"{archive}: entries overlap (a ZIP bomb?); refused")
    seen: dict[str, str] = {}
    files: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        is_dir = name.endswith("/")
        rel = str(safe_relpath(name[:-1] if is_dir else name, f"{archive}: entry"))
        if rel.casefold() in seen:
            raise BundleError(f"{archive}: entry {one_line(rel)!r} appears twice (as {seen[rel.casefold()]!r}); "
                              "refused")
        seen[rel.casefold()] = rel
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind == stat.S_IFLNK:
            raise BundleError(f"{archive}: entry {one_line(name)!r} is a symlink; refused")
        if info.flag_bits & 0x1:
            raise BundleError(f"{archive}: entry {one_line(name)!r} is encrypted; refused")
        if is_dir:
            continue  # folders are made for the files in them
        if kind not in (0, stat.S_IFREG):
            raise BundleError(f"{archive}: entry {one_line(name)!r} is not a regular file; refused")
        if info.file_size > (1 << 20) and info.file_size > MAX_INFLATION * max(info.compress_size, 1):
            raise BundleError(f"{archive}: entry {one_line(rel)!r} inflates {info.compress_size} bytes to "
                              f"{info.file_size} (a ZIP bomb?); refused")
        files[rel] = info
    if MANIFEST not in files:
        raise BundleError(f"{archive}: no {MANIFEST} inside; not a hartkit bundle archive")
    head = files.pop(MANIFEST)
    if head.file_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{archive}: its {MANIFEST} is over the {MAX_MANIFEST_BYTES >> 20} MiB a manifest may have")
    try:
        raw = zf.read(head)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
        raise BundleError(f"{archive}: cannot read its {MANIFEST} ({one_line(exc)})") from None
    manifest = parse_manifest(raw, f"{archive}: {MANIFEST}")
    listed = {a["path"]: a["size"] for a in manifest["artifacts"]}
    for rel, info in files.items():
        if rel not in listed:
            raise BundleError(f"{archive}: entry {one_line(rel)!r} is not listed in its manifest; refused")
        if info.file_size != listed[rel]:
            raise BundleError(f"{archive}: entry {one_line(rel)!r} holds {info.file_size} bytes, its manifest "
                              f"lists {listed[rel]}; refused")
    missing = [rel for rel in listed if rel not in files]
    if missing:
        raise BundleError(f"{archive}: {one_line(missing[0])!r}, listed in its manifest, is not in the archive")
    total = head.file_size + sum(i.file_size for i in files.values())
    return [(MANIFEST, head), *sorted(files.items())], total


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, archive: Path) -> None:
    """One entry to a new file, never more bytes than its header declares (checked against the manifest)."""
    import zlib

    left = info.file_size
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as dst:
        try:
            with zf.open(info) as src:
                while block := src.read(min(1 << 20, left + 1)):
                    left -= len(block)
                    if left < 0:
                        break
                    dst.write(block)
        except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError, ValueError) as exc:
            raise BundleError(f"{archive}: entry {one_line(info.filename)!r} is corrupt ({one_line(exc)})") from None
    if left != 0:
        raise BundleError(f"{archive}: entry {one_line(info.filename)!r} does not hold the {info.file_size} bytes "
                          "its header declares; refused")


def _check_stat(path: Path) -> None:
    """Refuse, as a usage error, a path the OS cannot even look up (a name too long, a file as a folder)."""
    try:
        path.lstat()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise UsageError(f"{one_line(path, 80)}: {exc.strerror or one_line(exc)}") from None


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the ones made, deepest first (to undo)."""
    missing = []
    path = folder
    while not path.exists() and not path.is_symlink() and path != path.parent:
        missing.append(path)
        path = path.parent
    made: list[Path] = []
    try:
        for path in reversed(missing):
            path.mkdir()
            made.insert(0, path)
    except OSError as exc:
        _remove(None, made)
        raise UsageError(f"{folder}: cannot create this folder ({exc.strerror or one_line(exc)})") from None
    return made


def _remove(tmp: Path | None, made: list[Path]) -> None:
    """Undo a failed write: the temp file or folder, then the folders made for it (if still empty)."""
    if tmp is not None:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
    for path in made:
        with contextlib.suppress(OSError):
            path.rmdir()
