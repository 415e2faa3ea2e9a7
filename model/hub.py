"""Weights by name: a checkpoint or a text model given as a folder or as a Hugging Face repo id.

Accepted for a checkpoint (``--checkpoint``, ``load_hart``, ``export_checkpoint``, ...):

* a folder in HART's official layout (``llm/`` + ``tokenizer/``);
* upstream's ``.../llm`` folder (what HART's own scripts take as ``--model_path``): its parent is the root;
* a repo id, ``org/name`` (optionally ``org/name@revision`` or ``org/name/llm``), looked up in the local
  Hugging Face cache through ``huggingface_hub.snapshot_download(..., local_files_only=True)``; the
  network is used only when the caller allows downloads (``--allow-download``). ``HF_HOME``,
  ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` are read by huggingface_hub itself.

A text model: a folder, a repo id, else ``<checkpoint>/text_model`` (ours), else upstream's default
``mit-han-lab/Qwen2-VL-1.5B-Instruct`` from the cache. A missing one is one line naming what to
download and the command that does it. Imports no torch (the runtime's ``from_pretrained`` uses it).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from hartkit.errors import CheckpointError, MissingDependencyError

HART_REPO_ID = "mit-han-lab/hart-0.7b-1024px"
# The text model upstream's sample.py / app.py load when none is given (``--text_model_path``).
DEFAULT_TEXT_MODEL_ID = "mit-han-lab/Qwen2-VL-1.5B-Instruct"
TEXT_MODEL_SUBDIR = "text_model"  # hartkit's own checkpoints carry their text model here

# ``models--org--name/snapshots/<revision>``: the cache layout huggingface_hub writes.
_SNAPSHOT = re.compile(r"^models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")


@dataclass(frozen=True)
class RepoSpec:
    repo_id: str
    revision: str | None = None
    subfolder: str | None = None

    def download_command(self) -> str:
        rev = f" --revision {self.revision}" if self.revision else ""
        return f"hf download {self.repo_id}{rev}"


def parse_repo_spec(text: str) -> RepoSpec | None:
    """``org/name[@revision]`` or ``org/name/llm[@revision]`` as a :class:`RepoSpec`; None when ``text``
    cannot be a repo id (checked by huggingface_hub's own validator where it is installed)."""
    body, _, revision = str(text).partition("@")
    parts = body.split("/")
    if len(parts) == 3 and parts[2] == "llm":
        parts, subfolder = parts[:2], "llm"
    else:
        subfolder = None
    if len(parts) != 2 or not all(parts) or (revision == "" and "@" in str(text)):
        return None
    repo_id = "/".join(parts)
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:  # without huggingface_hub the shape is all we can check; resolving says what to install
        return RepoSpec(repo_id, revision or None, subfolder) if re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id) else None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return RepoSpec(repo_id, revision or None, subfolder)


def hub_cache_dir() -> str:
    """Where huggingface_hub looks (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def snapshot(spec: RepoSpec, what: str, *, allow_download: bool = False, subject: str | None = None,
             hint: str = "") -> Path:
    """The local snapshot folder of ``spec`` (downloaded into the cache only when ``allow_download``).

    ``subject`` replaces "<what> <repo id>" at the start of the error, ``hint`` is added at its end."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                            OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise MissingDependencyError(
            f"{spec.repo_id}: resolving a {what} by repo id needs huggingface_hub "
            "(pip install 'hartkit[torch]' or pip install huggingface_hub), or pass a local folder") from None
    from huggingface_hub import constants

    offline = bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {
        "1", "true", "yes", "on"}
    try:
        path = snapshot_download(spec.repo_id, revision=spec.revision, local_files_only=not allow_download)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, FileNotFoundError) as exc:
        if allow_download and not offline:
            reason = f"could not download it ({_first_line(exc)})"
        else:
            reason = (f"not in the Hugging Face cache {hub_cache_dir()}"
                      + (" (HF_HUB_OFFLINE is set)" if offline and allow_download else ""))
        subject = subject or f"{what} {spec.repo_id}{'@' + spec.revision if spec.revision else ''}"
        raise CheckpointError(f"{subject}: {reason}; download it with `{spec.download_command()}` "
                              f"(or pass --allow-download){hint}") from None
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as exc:
        raise CheckpointError(f"{what} {spec.repo_id}: the Hub refused it ({type(exc).__name__}: "
                              f"{_first_line(exc)}); check the id, or log in with `hf auth login` for a gated "
                              "repo") from None
    except HfHubHTTPError as exc:
        raise CheckpointError(f"{what} {spec.repo_id}: download failed ({_first_line(exc)})") from None
    return Path(path) / spec.subfolder if spec.subfolder else Path(path)


def resolve_checkpoint(checkpoint: str | os.PathLike, *, allow_download: bool = False) -> Path:
    """The root folder (``llm/`` + ``tokenizer/``) of a checkpoint folder, ``.../llm`` folder or repo id."""
    path = Path(checkpoint)
    if path.exists():
        return _checkpoint_root(path)
    spec = parse_repo_spec(str(checkpoint))
    if spec is None:
        raise CheckpointError(f"{path}: checkpoint folder not found (give a folder with llm/ and tokenizer/, "
                              f"or a Hugging Face repo id such as {HART_REPO_ID})")
    root = snapshot(spec, "checkpoint", allow_download=allow_download)
    return _checkpoint_root(root) if root.exists() else root


def _checkpoint_root(path: Path) -> Path:
    """Upstream's scripts take the ``llm`` folder itself; its parent holds ``tokenizer/``."""
    if path.name == "llm" and path.is_dir() and (path / "config.json").is_file() and not (path / "llm").is_dir():
        return path.parent
    return path


def resolve_text_model(text_model: str | os.PathLike | None, checkpoint_root: str | os.PathLike, *,
                       allow_download: bool = False) -> Path:
    """The text model's folder: ``text_model`` (folder or repo id), else ``<checkpoint>/text_model``, else
    upstream's default text model from the cache."""
    if text_model is not None and str(text_model) != "":
        path = Path(text_model)
        if path.exists():
            return path
        spec = parse_repo_spec(str(text_model))
        if spec is None or spec.subfolder:
            raise CheckpointError(f"{path}: text model folder not found (give a Qwen2 model folder or a "
                                  f"Hugging Face repo id such as {DEFAULT_TEXT_MODEL_ID})")
        return snapshot(spec, "text model", allow_download=allow_download)
    own = Path(checkpoint_root) / TEXT_MODEL_SUBDIR
    if own.is_dir():
        return own
    return snapshot(RepoSpec(DEFAULT_TEXT_MODEL_ID), "text model", allow_download=allow_download,
                    subject=f"no text model: {checkpoint_root} has no {TEXT_MODEL_SUBDIR}/ folder, and upstream's "
                            f"default text model {DEFAULT_TEXT_MODEL_ID} is missing",
                    hint=", or pass --text-model DIR|REPO_ID")


def link_free_copy(folder: str | os.PathLike) -> Path:
    """A Hugging Face cache snapshot as plain files, for bundles: a bundle's reader refuses links (nothing
    outside a bundle is read) and the cache's snapshot files are links to its blobs. Made once, of hard
    links to the blobs (a copy across file systems), in ``<HF cache>/../hartkit/snapshots/org--name/<rev>``;
    a link that leaves its repo's ``blobs/`` is refused. Other folders are returned as they are."""
    import shutil

    from hartkit.fsutil import atomic_dir

    folder = Path(folder)
    spec = cache_source(folder)
    if spec is None:
        return folder
    repo_dir = Path(os.path.abspath(folder))
    while repo_dir.name != "snapshots":
        repo_dir = repo_dir.parent
    blobs = (repo_dir.parent / "blobs").resolve()
    out = (Path(hub_cache_dir()).parent / "hartkit" / "snapshots" / spec.repo_id.replace("/", "--")
           / str(spec.revision) / (spec.subfolder or ""))
    if out.is_dir():
        return out  # written whole or not at all (atomic_dir)
    with atomic_dir(out, error=CheckpointError) as tmp:
        for item in sorted(folder.rglob("*")):
            rel = item.relative_to(folder)
            if item.is_dir() and not item.is_symlink():
                (tmp / rel).mkdir(parents=True, exist_ok=True)
                continue
            source = item.resolve()
            if item.is_symlink() and source.parent != blobs:
                raise CheckpointError(f"{item}: a link out of its cache repo ({source}); refused")
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, tmp / rel)
            except OSError:  # another file system, or links not allowed: a copy
                shutil.copyfile(source, tmp / rel)
    return out


# ----------------------------------------------------------------------------- provenance


def cache_source(path: str | os.PathLike) -> RepoSpec | None:
    """The repo id and revision of a folder inside the Hugging Face cache (``models--org--name/snapshots/
    <revision>[/sub]``), else None."""
    parts = Path(os.path.abspath(path)).parts
    for i in range(len(parts) - 2):
        match = _SNAPSHOT.match(parts[i])
        if match and parts[i + 1] == "snapshots":
            sub = "/".join(parts[i + 3:]) or None
            return RepoSpec(f"{match['org']}/{match['name']}", parts[i + 2], sub)
    return None


def describe_source(path: str | os.PathLike, *, subfolders: tuple[str, ...] = ()) -> dict:
    """Where weights came from, without this machine's paths: a cached repo's id and revision, or a local
    folder's name and a content hash (sha256 over the sorted relative paths and sha256 of its files,
    limited to ``subfolders`` when given)."""
    spec = cache_source(path)
    if spec is not None:
        return {"repo_id": spec.repo_id, "revision": spec.revision,
                **({"subfolder": spec.subfolder} if spec.subfolder else {})}
    root = Path(path)
    return {"name": root.resolve().name, "sha256": tree_sha256(root, subfolders)}


def tree_sha256(root: Path, subfolders: tuple[str, ...] = ()) -> str:
    """One digest of a folder's files (links followed, hidden files skipped): ``relpath\\tsha256\\n`` lines."""
    tops = [root / s for s in subfolders] if subfolders else [root]
    files = sorted(p for top in tops if top.is_dir() for p in top.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.relative_to(root).as_posix()}\t{_file_sha256(f)}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
