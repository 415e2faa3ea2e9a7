"""Weights by name, offline: repo ids resolved from a Hugging Face cache this test builds in the real
layout (``models--org--name/{blobs,refs/main,snapshots/<rev>}``), upstream's ``.../llm`` folder, and
upstream's default text model; a missing one is one line naming the download command."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hartkit.errors import CheckpointError
from hartkit.model import hub

pytest.importorskip("huggingface_hub")

REV_HART = "0123456789abcdef0123456789abcdef01234567"
REV_QWEN = "89abcdef0123456789abcdef0123456789abcdef"


def add_to_cache(cache: Path, repo_id: str, revision: str, files: dict[str, Path]) -> Path:
    """Store ``files`` (repo path -> source file) the way huggingface_hub does: content-addressed blobs,
    a snapshot folder of relative links to them, and ``refs/main`` naming the revision."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for rel, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / revision / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return repo / "snapshots" / revision


def files_of(folder: Path, prefix: str = "") -> dict[str, Path]:
    return {f"{prefix}{p.relative_to(folder).as_posix()}": p for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def hf_home(tiny_checkpoint, tmp_path_factory) -> Path:
    """HF_HOME with the tiny checkpoint as mit-han-lab/hart-0.7b-1024px (llm/ + tokenizer/ only, as the
    official snapshot) and its text model as upstream's default text model id."""
    home = tmp_path_factory.mktemp("hf_home")
    cache = home / "hub"
    add_to_cache(cache, hub.HART_REPO_ID, REV_HART,
                 {**files_of(tiny_checkpoint / "llm", "llm/"), **files_of(tiny_checkpoint / "tokenizer", "tokenizer/"),
                  "LICENSE": _licence_file(home)})
    add_to_cache(cache, hub.DEFAULT_TEXT_MODEL_ID, REV_QWEN, files_of(tiny_checkpoint / "text_model"))
    return home


def _licence_file(home: Path) -> Path:
    path = home / "licence-source.txt"
    path.write_text("MIT License\n\nCopyright (c) the test\n")
    return path


@pytest.fixture
def use_cache(hf_home, monkeypatch) -> Path:
    """Point huggingface_hub (already imported: its constants were read) at the test's cache, offline."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home / "hub"


def test_repo_id_resolves_to_the_cached_snapshot(use_cache):
    root = hub.resolve_checkpoint(hub.HART_REPO_ID)
    assert root == use_cache / f"models--mit-han-lab--hart-0.7b-1024px/snapshots/{REV_HART}"
    assert (root / "llm" / "config.json").is_file()
    assert hub.resolve_checkpoint(f"{hub.HART_REPO_ID}@{REV_HART}") == root  # a pinned revision
    assert hub.resolve_checkpoint(f"{hub.HART_REPO_ID}/llm") == root  # upstream's llm path, by id
    # No text_model/ in the official layout: upstream's default text model, from the cache.
    text = hub.resolve_text_model(None, root)
    assert text.parent.name == "snapshots" and text.name == REV_QWEN
    assert hub.resolve_text_model(hub.DEFAULT_TEXT_MODEL_ID, root) == text


def test_upstream_llm_folder_is_its_checkpoint(tiny_checkpoint):
    from hartkit.model.checkpoint import load_hart

    assert hub.resolve_checkpoint(tiny_checkpoint / "llm") == tiny_checkpoint
    assert hub.resolve_checkpoint(tiny_checkpoint) == tiny_checkpoint
    model = load_hart(tiny_checkpoint / "llm")  # was ".../llm/llm: llm folder not found"
    assert model.cfg.depth > 0


def test_load_hart_by_repo_id_matches_the_folder(use_cache, tiny_checkpoint):
    import torch

    from hartkit.model.checkpoint import load_hart

    by_id = load_hart(hub.HART_REPO_ID).transformer.state_dict()
    by_dir = load_hart(tiny_checkpoint).transformer.state_dict()
    assert by_id.keys() == by_dir.keys()
    assert all(torch.equal(by_id[k], by_dir[k]) for k in by_dir)


def test_missing_repo_is_one_line_with_the_command(use_cache, tmp_path):
    with pytest.raises(CheckpointError) as err:
        hub.resolve_checkpoint("someone/not-downloaded")
    msg = str(err.value)
    assert "\n" not in msg
    assert "`hf download someone/not-downloaded`" in msg and str(use_cache) in msg and "--allow-download" in msg
    with pytest.raises(CheckpointError) as err:
        hub.resolve_checkpoint(f"{hub.HART_REPO_ID}@fedcba9876543210fedcba9876543210fedcba98")
    assert "--revision fedcba9876543210fedcba9876543210fedcba98" in str(err.value)
    # Downloads allowed but HF_HUB_OFFLINE set: still one line, saying why.
    with pytest.raises(CheckpointError) as err:
        hub.resolve_checkpoint("someone/not-downloaded", allow_download=True)
    assert "HF_HUB_OFFLINE" in str(err.value) and "\n" not in str(err.value)
    # Not a folder and not a repo id.
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        hub.resolve_checkpoint(tmp_path / "a" / "b" / "c")


def test_missing_default_text_model_names_it(tiny_checkpoint, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    bare = tmp_path / "official"
    for part in ("llm", "tokenizer"):
        shutil.copytree(tiny_checkpoint / part, bare / part)
    with pytest.raises(CheckpointError) as err:
        hub.resolve_text_model(None, bare)
    msg = str(err.value)
    assert "\n" not in msg and "no text_model/" in msg
    assert f"`hf download {hub.DEFAULT_TEXT_MODEL_ID}`" in msg and "--text-model" in msg


def test_describe_source_records_no_machine_path(use_cache, tiny_checkpoint, tmp_path):
    root = hub.resolve_checkpoint(hub.HART_REPO_ID)
    assert hub.describe_source(root) == {"repo_id": hub.HART_REPO_ID, "revision": REV_HART}
    assert hub.describe_source(root / "llm")["subfolder"] == "llm"
    copy = tmp_path / "mine"
    shutil.copytree(tiny_checkpoint, copy)
    before = hub.describe_source(copy, subfolders=("llm", "tokenizer"))
    assert before["name"] == "mine" and len(before["sha256"]) == 64
    assert str(tmp_path) not in json.dumps(before)
    (copy / "text_model" / "extra.txt").write_text("outside llm/ and tokenizer/")
    assert hub.describe_source(copy, subfolders=("llm", "tokenizer")) == before
    config = copy / "llm" / "config.json"
    config.write_text(config.read_text() + "\n")
    assert hub.describe_source(copy, subfolders=("llm", "tokenizer"))["sha256"] != before["sha256"]


def test_parse_repo_spec():
    assert hub.parse_repo_spec("org/name") == hub.RepoSpec("org/name")
    assert hub.parse_repo_spec("org/name@v1") == hub.RepoSpec("org/name", "v1")
    assert hub.parse_repo_spec("org/name/llm") == hub.RepoSpec("org/name", None, "llm")
    for bad in ("name", "a/b/c", "org/name@", "/abs/path", "org//x", "../x"):
        assert hub.parse_repo_spec(bad) is None, bad


def test_cli_export_by_repo_id_offline(hf_home, tmp_path):
    """Export the cached official folders by id in a fresh process (HF_HOME and HF_HUB_OFFLINE reach
    huggingface_hub there); the bundle records id and revision, no path, and carries card and licence."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    bundle = tmp_path / "bundle"
    run = subprocess.run([sys.executable, "-m", "hartkit.cli", "export", "--checkpoint", hub.HART_REPO_ID,
                          "--out", str(bundle)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    manifest = json.loads((bundle / "manifest.json").read_text())
    source = manifest["model"]["source"]
    assert source["checkpoint"] == {"repo_id": hub.HART_REPO_ID, "revision": REV_HART}
    assert source["text_model"] == {"repo_id": hub.DEFAULT_TEXT_MODEL_ID, "revision": REV_QWEN}
    assert manifest["model"]["name"] == hub.HART_REPO_ID
    text = (bundle / "manifest.json").read_text()
    assert str(hf_home) not in text and "checkpoint_path" not in text
    card = (bundle / "README.md").read_text()
    assert hub.HART_REPO_ID in card and REV_HART in card and "MIT License" in (bundle / "LICENSE").read_text()
    # validate finds the reference again by id and revision (no path recorded)
    from hartkit.validate.core import checkpoint_from_manifests

    from huggingface_hub import constants

    saved = constants.HF_HUB_CACHE
    try:
        constants.HF_HUB_CACHE = str(hf_home / "hub")
        ck, text_model = checkpoint_from_manifests([bundle], None)
    finally:
        constants.HF_HUB_CACHE = saved
    assert ck.name == REV_HART and text_model is not None and text_model.name == REV_QWEN


def test_cli_missing_repo_exits_2_with_one_line(hf_home, tmp_path):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run([sys.executable, "-m", "hartkit.cli", "generate", "--checkpoint", "mit-han-lab/hart-0.7b-512px",
                          "--prompt", "x", "--out", str(tmp_path / "x.png")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert "`hf download mit-han-lab/hart-0.7b-512px`" in lines[0] and str(hf_home / "hub") in lines[0]
