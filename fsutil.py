"""Writing outputs so that nothing is lost and nothing half-written is left behind.

- :func:`atomic_file`: a file is written beside its target and renamed over it only when complete.
  Special files are never renamed over: character devices and FIFOs (``/dev/null``, a pipe) are
  written through; block devices and sockets are refused.
- :func:`atomic_dir`: a folder is built beside its target and swapped in when complete. An existing
  folder is replaced only when empty or when the caller's test accepts it (``replaceable``); never
  ``/``, the home folder, the current folder or one of its parents.
- :func:`target_lock`: an advisory lock (``.NAME.hartkit-lock`` beside the target) so that two writers of one
  target do not both succeed; it is taken first, so it also proves the parent writable before any
  slow work.
- Temp folders carry a marker naming the process that made them (pid, host, start time); a later
  run removes the ones a killed run left behind, and nothing else.

Every filesystem failure is an :class:`~hartkit.errors.OutputError` (exit 2, one line) naming the path.
No heavy imports: the torch-free runtime uses this module too.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from hartkit.errors import BundleError, HartkitError, OutputError, UsageError

MARKER = ".hartkit-tmp"  # inside every temp folder: who made it (JSON), so stale ones can be told apart
TMP_INFIX = ".tmp-"
_WORK, _OLD = "work", "old"  # inside a temp folder: the folder being built, the one it replaces
LOCK_SUFFIX = ".hartkit-lock"  # a name no one else uses: the file is truncated and removed
_DEFAULT_NAME_MAX = 255
MAX_PATH_CHARS = 1024  # longest path a manifest or an archive may name (the schema bounds it too)


# ----------------------------------------------------------------------------- paths


def one_line(text: object, limit: int = 200) -> str:
    """One line of at most ``limit`` characters: hostile values (a manifest's, an archive's) must not flood a message."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def safe_relpath(rel: str, source: str) -> PurePosixPath:
    """A path a manifest or an archive names: relative, in canonical POSIX form, inside its folder."""
    if not isinstance(rel, str):
        raise BundleError(f"{source}: path {rel!r} is not a string")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts or "\\" in rel:
        raise BundleError(f"{source}: artifact path {one_line(repr(rel))} escapes the bundle")
    # one spelling per file ("a//b", "./a", "a/" are refused), no control characters, no over-long names
    if str(p) != rel or any(ord(c) < 32 or c == "\x7f" for c in rel) or len(rel) > MAX_PATH_CHARS \
            or any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in p.parts):
        raise BundleError(f"{source}: path {one_line(repr(rel))} is not a plain relative path")
    return p


def confined_path(folder: str | os.PathLike, rel: str, what: str, contents: bool = False) -> Path:
    """``folder / rel`` for a path a manifest names, refused (:class:`~hartkit.errors.BundleError`) unless it
    stays inside the folder: relative, no ``..``, no backslash, and no symbolic link anywhere on the way (a
    link could point anywhere, and a bundle is meant to be copied whole). The file need not exist.
    ``contents``: a folder (the tokenizer's) must hold no link either."""
    folder = Path(folder)
    parts = safe_relpath(rel, what).parts
    path = folder
    try:
        for part in parts:
            path = path / part
            if path.is_symlink():
                raise BundleError(f"{what}: {one_line(rel)} is or passes through a symbolic link "
                                  f"({path.relative_to(folder).as_posix()}); refused")
        inside = path.resolve().is_relative_to(folder.resolve())
        if contents and path.is_dir():
            for root, dirs, files in os.walk(path):
                link = next((n for n in dirs + files if os.path.islink(os.path.join(root, n))), None)
                if link is not None:
                    raise BundleError(f"{what}: {one_line(rel)} holds a symbolic link ({one_line(link)}); refused")
    except (OSError, RuntimeError, ValueError) as exc:  # over-long names, symlink loops around the folder
        raise BundleError(f"{what}: cannot resolve {one_line(rel)} ({one_line(exc)})") from None
    if not inside:
        raise BundleError(f"{what}: {one_line(rel)} resolves outside the bundle {folder}")
    return path



def absolute(path: str | os.PathLike) -> Path:
    """``path`` made absolute and normalised (``.``/``..`` folded) without resolving links."""
    text = os.fspath(path)
    if not text:
        raise UsageError("the output path is empty")
    return Path(os.path.abspath(text))


def _name_max(folder: Path) -> int:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return _DEFAULT_NAME_MAX


def _fit(name: str, room: int) -> str:
    """``name`` cut so that it takes at most ``room`` bytes (temp and lock names add a few)."""
    while len(os.fsencode(name)) > room and name:
        name = name[:-1]
    return name


def _check_name_lengths(path: Path) -> None:
    limit = _name_max(path.parent)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > limit:
            shown = part[:40] + "..."
            raise UsageError(f"{shown}: name too long ({size} bytes; the filesystem allows {limit})")


def _existing_ancestor(folder: Path) -> Path:
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def _special_kind(path: Path) -> str | None:
    """What ``path`` is when it exists and is neither a regular file nor a folder (links followed)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return None


# Failures of the output side (disk full, quota, read-only, permission, names): a user's problem, one line.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG,
                 errno.EFBIG, errno.EIO}
WRITE_THROUGH = ("character device", "FIFO")  # written into as a stream; renaming over them would replace them


def protected_reason(out: Path) -> str | None:
    """Why ``out`` (absolute) may never be replaced or removed, or None."""
    real = Path(os.path.realpath(out))
    if real == Path(real.anchor):
        return "the filesystem root"
    try:
        home = Path(os.path.realpath(Path.home()))
        if real == home:
            return "your home folder"
        if real in home.parents:
            return "a parent of your home folder"
    except (KeyError, RuntimeError):  # no home folder known
        pass
    try:
        cwd = Path(os.path.realpath(os.getcwd()))
    except OSError:  # the current folder was removed
        return None
    if real == cwd:
        return "the current folder"
    if real in cwd.parents:
        return "a parent of the current folder"
    return None


def check_output_file(path: str | os.PathLike) -> Path:
    """Refuse, before any work, an output file path that cannot be written: empty, a folder, a name
    too long, a block device or socket, a parent that is not a folder or not writable."""
    text = os.fspath(path)
    if not text:
        raise UsageError("the output path is empty")
    p = Path(text)
    _check_name_lengths(absolute(p))
    if text.endswith(("/", os.sep)) or os.path.isdir(p):
        raise UsageError(f"{p}: is a folder; give a file path (e.g. {p / 'image.png'})")
    kind = _special_kind(p)
    if kind is not None:
        if kind not in WRITE_THROUGH:
            raise UsageError(f"{p}: is a {kind}; refusing to write a file onto it")
        return p
    ancestor = _existing_ancestor(absolute(p).parent)
    if not os.path.isdir(ancestor):
        raise UsageError(f"{p}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{p}: cannot write into {ancestor} (read-only or no permission)")
    return p


def _oserror(path: Path | str, exc: OSError, doing: str = "write") -> OutputError:
    return OutputError(f"{path}: cannot {doing}: {exc.strerror or exc}")


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; returns those created, deepest last."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            _remove_empty(created)
            raise _oserror(d, exc, "create the folder") from None
        created.append(d)
    return created


def _remove_empty(created: list[Path]) -> None:
    for d in reversed(created):  # only folders this call made, and only while empty
        try:
            d.rmdir()
        except OSError:
            break


_umask_guard = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the system tells it (Linux): setting it,
    even for an instant, would change the mode of files other threads create meanwhile."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_guard:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- files


def _tmp_name_parts(target: Path) -> tuple[str, str]:
    """(prefix, suffix) of a temp file beside ``target``; the suffix keeps the extension, which some
    writers read (matplotlib, numpy), and the whole fits the filesystem's name limit."""
    suffix = target.suffix if len(target.suffix) <= 16 else ""
    room = _name_max(target.parent) - len(os.fsencode(suffix)) - len(TMP_INFIX) - 10  # '.', mkstemp's 8 chars
    return "." + _fit(target.stem if suffix else target.name, room) + TMP_INFIX, suffix


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write the whole file to; on success it becomes ``path``.

    A link to a file keeps being a link (the file it names is replaced). A character device or FIFO
    gets the bytes written into it. On any failure the temp file and any folders this call created
    are removed and an OSError becomes an :class:`OutputError`; the target is untouched."""
    p = check_output_file(path)
    if _special_kind(p) is not None:
        with tempfile.TemporaryDirectory(prefix="hartkit-out-") as scratch:
            tmp = Path(scratch) / ("out" + p.suffix)
            try:
                yield tmp
                with open(tmp, "rb") as src, open(p, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except OSError as exc:
                raise _oserror(p, exc) from None
        return
    target = Path(os.path.realpath(p)) if os.path.islink(p) else p
    created = _make_parents(absolute(target).parent)
    prefix, suffix = _tmp_name_parts(target)
    try:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=absolute(target).parent)
        os.close(fd)
    except OSError as exc:
        _remove_empty(created)
        raise _oserror(p, exc) from None
    tmp = Path(name)
    try:
        yield tmp
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)  # replacing a file keeps its permissions
        except OSError:
            mode = 0o666 & ~current_umask()  # mkstemp made it 0600; a new output should look like any new file
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        _remove_empty(created)
        if isinstance(exc, OSError) and not isinstance(exc, HartkitError):
            raise _oserror(p, exc) from None
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data, **dumps) -> Path:
    return write_text(path, json.dumps(data, **dumps) + "\n")


def make_dir(path: str | os.PathLike) -> Path:
    """``mkdir -p`` with a one-line error (the path is a file, read-only, a name too long...)."""
    p = Path(os.fspath(path)) if os.fspath(path) else absolute(path)
    _check_name_lengths(absolute(p))
    if os.path.lexists(p) and not os.path.isdir(p):
        raise UsageError(f"{p}: exists and is not a folder")
    _make_parents(absolute(p))
    return p


def check_output_dir(path: str | os.PathLike) -> Path:
    """Refuse, before any work, an output folder that cannot be written (see :func:`check_output_file`)."""
    text = os.fspath(path)
    if not text:
        raise UsageError("the output folder is empty")
    p = Path(text)
    _check_name_lengths(absolute(p))
    if os.path.lexists(p) and not os.path.isdir(p):
        raise UsageError(f"{p}: exists and is not a folder")
    ancestor = _existing_ancestor(absolute(p))
    if not os.path.isdir(ancestor):
        raise UsageError(f"{p}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{p}: cannot write into {ancestor} (read-only or no permission)")
    return p


# ----------------------------------------------------------------------------- who made a temp folder


def _start_time(pid: int) -> str | None:
    """The process' start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _owner(target: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
            "target": target, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _alive(pid: int, start: str | None) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    except OSError:
        return True
    now = _start_time(pid)
    return start is None or now is None or now == start  # another start time: the pid was reused


def _is_stale(folder: Path, target: str) -> bool:
    """True only for a temp folder of ours (marker) for ``target`` whose process, on this host, is gone."""
    try:
        info = json.loads((folder / MARKER).read_text())
        pid, host = int(info["pid"]), info["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # no marker, or not ours: never touched
    if info.get("target") != target:  # another target whose name starts like this one's
        return False
    return host == socket.gethostname() and not _alive(pid, info.get("start"))


def _tmp_prefix(out: Path) -> str:
    room = _name_max(out.parent) - len(TMP_INFIX) - 16  # '.', mkdtemp's 8 chars, "old" and a pid
    return "." + _fit(out.name, room) + TMP_INFIX


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove the temp folders of ``out`` (``.NAME.tmp-*`` beside it) that a killed hartkit left:
    those with our marker whose process is gone. An old ``out`` it had moved aside to replace it
    goes back first when ``out`` is missing. Returns what was removed."""
    out = absolute(out)
    prefix = _tmp_prefix(out)
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.is_dir() and not entry.is_symlink()
                and _is_stale(entry, out.name)):
            continue
        old = entry / _OLD
        if os.path.isdir(old) and not os.path.lexists(out):
            try:
                os.rename(old, out)  # killed between the two renames of a replacement: keep the old one
            except OSError:
                continue  # never delete a folder we could not put back
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _mark(folder: Path, target: str) -> None:
    (folder / MARKER).write_text(json.dumps(_owner(target)))


# ----------------------------------------------------------------------------- locking


_held: dict[str, tuple[int, int]] = {}  # lock path -> (thread id, depth): flock would refuse our own second take
_held_guard = threading.Lock()


def _lock_path(out: Path) -> Path:
    room = _name_max(out.parent) - len(LOCK_SUFFIX) - 1
    return out.parent / ("." + _fit(out.name, room) + LOCK_SUFFIX)


def _holder(lock: Path) -> str:
    try:
        text = lock.read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text or "a process that has not said who it is"


def _acquire(lock: Path, out: Path, what: str) -> int:
    try:
        import fcntl
    except ImportError:  # not a POSIX system: the lock file still proves the folder writable
        fcntl = None
    for _ in range(20):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise OutputError(f"{out}: cannot write into {lock.parent}: {exc.strerror or exc}") from None
        try:
            if fcntl is None:
                return fd
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"{out}: another {what} of this path is in progress ({_holder(lock)}); "
                             "wait for it or choose another path") from None
        except OSError:  # a filesystem without locks: carry on unlocked rather than refuse to work
            return fd
        # The previous holder removes the file as it leaves: if ours is no longer the one at that
        # path, a third process could lock a new file; start again on the current one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            argv = " ".join(sys.argv[:6])
            who = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}: {argv}"
            os.ftruncate(fd, 0)
            os.write(fd, who.encode("utf-8", "backslashreplace")[:400])
            return fd
        os.close(fd)
    raise OutputError(f"{out}: could not take the lock {lock}")  # pragma: no cover - a lock storm


@contextmanager
def target_lock(out: str | os.PathLike, what: str = "write") -> Iterator[None]:
    """Hold ``.NAME.hartkit-lock`` beside ``out`` (``flock``) for the block: a second process writing the same
    target fails at once naming the first. Reentrant in one thread. The lock file is removed after;
    one left by a killed process is unlocked (the kernel drops it) and reused."""
    out = absolute(out)
    reason = protected_reason(out)
    if reason:  # every lock is taken to replace its target: refuse before making a file beside it
        raise UsageError(f"{out}: is {reason}; refusing to replace it (choose a new folder)")
    lock = _lock_path(out)
    key = str(lock)
    me = threading.get_ident()
    with _held_guard:
        owner = _held.get(key)
        if owner is not None and owner[0] == me:
            _held[key] = (me, owner[1] + 1)
    if owner is not None:
        if owner[0] != me:
            raise UsageError(f"{out}: another {what} of this path is in progress in this process")
        try:
            yield
        finally:
            with _held_guard:
                tid, depth = _held[key]
                _held[key] = (tid, depth - 1)
        return
    _check_name_lengths(out)
    created = _make_parents(out.parent)
    try:
        fd = _acquire(lock, out, what)
    except BaseException:
        _remove_empty(created)
        raise
    with _held_guard:
        _held[key] = (me, 1)
    try:
        yield
    finally:
        with _held_guard:
            _held.pop(key, None)
        try:
            os.unlink(lock)  # while still locked, so nobody holds a lock on a file we then remove
        except OSError:
            pass
        os.close(fd)
        if not os.path.lexists(out):
            _remove_empty(created)


# ----------------------------------------------------------------------------- folders


def check_dir_target(out: Path, overwrite: bool, replaceable: Callable[[Path], str | None] | None = None,
                     *, what: str = "a previous output", error: type[HartkitError] = UsageError,
                     shown: str | os.PathLike | None = None) -> None:
    """Refuse a folder target that must not be replaced. ``replaceable(out)`` returns None when a
    non-empty ``out`` may be replaced with ``overwrite``, else why not; without it only an empty
    folder may be."""
    name = shown if shown is not None else out
    out = absolute(out)
    reason = protected_reason(out)
    if reason:
        raise error(f"{name}: is {reason}; refusing to replace it (choose a new folder)")
    if os.path.islink(out):
        raise error(f"{name}: is a symbolic link; give the folder itself")
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise error(f"{name}: exists and is not a folder")
    try:
        empty = not any(out.iterdir())
    except OSError as exc:
        raise _oserror(name, exc, "read the folder") from None
    if empty:
        return
    if not overwrite:
        raise error(f"{name}: already exists and is not empty (choose another path or remove it)")
    why = replaceable(out) if replaceable is not None else "it is not empty"
    if why:
        raise error(f"{name}: replacing it is allowed only for {what}, and {why}; nothing was changed")


def _swap_in(work: Path, holder: Path, out: Path) -> None:
    """Put ``work`` at ``out``. An old ``out`` is first moved into ``holder`` (marked as ours) and
    removed only once the new one is in place: a process killed at any point leaves the old or the
    new folder whole, and the next run puts a moved-aside old one back (:func:`remove_stale_temps`)."""
    if not os.path.lexists(out) or not any(out.iterdir()):
        os.replace(work, out)  # a rename over an empty folder is atomic
        return
    os.rename(out, holder / _OLD)
    try:
        os.replace(work, out)
    except BaseException:
        os.rename(holder / _OLD, out)
        raise


@contextmanager
def atomic_dir(out: str | os.PathLike, *, overwrite: bool = False,
               replaceable: Callable[[Path], str | None] | None = None, what: str = "a previous output",
               error: type[HartkitError] = UsageError) -> Iterator[Path]:
    """Yield a temp folder beside ``out``; it becomes ``out`` only if the block succeeds.

    Holds :func:`target_lock` throughout; checks the target (:func:`check_dir_target`) before and
    again at the end (it may have changed meanwhile); removes stale temp folders of ``out`` first."""
    shown = out
    out = absolute(out)
    with target_lock(out):
        remove_stale_temps(out)  # first: it may put back an old folder, which is then checked
        check_dir_target(out, overwrite, replaceable, what=what, error=error, shown=shown)
        # The marker sits beside the work folder, not in it: the caller's folder holds only its files.
        try:
            holder = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out), dir=out.parent))
        except OSError as exc:
            raise _oserror(shown, exc) from None
        try:
            _mark(holder, out.name)
            work = holder / _WORK
            work.mkdir()
        except OSError as exc:
            shutil.rmtree(holder, ignore_errors=True)
            raise _oserror(shown, exc) from None
        umask = current_umask()
        try:
            yield work
            check_dir_target(out, overwrite, replaceable, what=what, error=error, shown=shown)
            for path in work.rglob("*"):  # some writers (safetensors, mkstemp) create 0600 files
                if not path.is_symlink():
                    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
            _swap_in(work, holder, out)
        except BaseException as exc:
            shutil.rmtree(holder, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
                raise OutputError(f"{shown}: cannot write it: {exc.strerror or exc}"
                                  + (f" ({exc.filename})" if exc.filename else "")) from None
            raise
        shutil.rmtree(holder, ignore_errors=True)  # the old folder, if one was replaced
