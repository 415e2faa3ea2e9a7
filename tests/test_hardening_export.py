"""Hardening of what hartkit writes and reads (issue 21): export --force, locks, outputs onto special
files, temp files after failures and kills, checkpoint validation, prompts that are not text, messages.

Each user mistake is exit 2 with one line naming the problem; nothing is lost; no temp is left.
No test here runs a new export: the target checks, the lock and the folder swap are tested directly.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hartkit import fsutil
from hartkit.cli import main
from hartkit.errors import CheckpointError, HartkitError, OutputError, UsageError
from hartkit.export.exporter import check_target, export_checkpoint, replaceable_export
from hartkit.runtime.images import save_png

IMAGE = np.zeros((4, 4, 3), dtype=np.uint8)


def _cli(capsys, *argv: str) -> tuple[int, str]:
    """(exit code, stderr) of an in-process ``hartkit`` run."""
    code = main(list(argv))
    return code, capsys.readouterr().err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- export --force (item 1)


def test_force_refuses_a_folder_that_is_not_an_export(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "f").write_text("x")
    code, err = _cli(capsys, "export", "--checkpoint", str(tmp_path / "nope"), "--bundle", str(d), "--force")
    assert code == 2 and "holds no manifest.json" in _error_line(err)
    assert (d / "f").read_text() == "x" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("force", [False, True])
def test_the_current_folder_and_its_parents_are_never_targets(tmp_path, monkeypatch, capsys, force):
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    (cwd / "keep").write_text("x")
    monkeypatch.chdir(cwd)
    for target in (".", "..", str(cwd), "/"):
        code, err = _cli(capsys, "export", "--checkpoint", "nope", "--bundle", target, *(["--force"] if force else []))
        line = _error_line(err)
        assert code == 2 and ("current folder" in line or "filesystem root" in line), line
    assert (cwd / "keep").read_text() == "x" and _leftovers(cwd) == [] and _leftovers(tmp_path / "a") == []


def test_home_symlinks_and_files_are_refused(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes").write_text("x")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(UsageError, match="home folder"):
        check_target(home, True)
    with pytest.raises(UsageError, match="a parent of your home folder"):
        check_target(tmp_path, True)
    (tmp_path / "other").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "other")
    with pytest.raises(UsageError, match="symbolic link"):
        check_target(tmp_path / "link", True)
    with pytest.raises(UsageError, match="not a folder"):
        check_target(home / "notes", True)
    check_target(tmp_path / "new", False)  # new or empty: fine
    (tmp_path / "empty").mkdir()
    check_target(tmp_path / "empty", False)


def test_force_replaces_only_a_whole_previous_export(onnx_bundle, tmp_path):
    src, _ = onnx_bundle
    old = tmp_path / "old"
    shutil.copytree(src, old)
    assert replaceable_export(old) is None
    with pytest.raises(UsageError, match="already holds an export"):
        check_target(old, False)
    check_target(old, True)

    (old / "notes.txt").write_text("mine")  # a file the export did not write: not ours to delete
    with pytest.raises(UsageError, match="files no export wrote.*notes.txt"):
        check_target(old, True)
    (old / "notes.txt").unlink()

    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    (broken / "manifest.json").write_text('{"schema_version": 1}')
    with pytest.raises(UsageError, match="not a hartkit manifest"):
        check_target(broken, True)
    assert (broken / "onnx").is_dir()

    with fsutil.atomic_dir(old, overwrite=True, replaceable=replaceable_export) as work:
        (work / "new").write_text("new")
    assert [p.name for p in old.iterdir()] == ["new"] and _leftovers(tmp_path) == []


def test_a_replacement_killed_between_its_renames_keeps_the_old_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    real = os.replace

    def interrupted(src, dst):
        if Path(dst) == out:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with fsutil.atomic_dir(out, overwrite=True, replaceable=lambda _p: None) as work:
            (work / "new").write_text("new")
    assert (out / "old").read_text() == "old" and _leftovers(tmp_path) == []


def test_init_checkpoint_force_replaces_only_a_checkpoint(tmp_path):
    from hartkit.model.presets import init_checkpoint

    d = tmp_path / "d"
    d.mkdir()
    (d / "f").write_text("x")
    with pytest.raises(CheckpointError, match="only for a previous checkpoint, and it holds no llm/config.json"):
        init_checkpoint("tiny", d, overwrite=True)
    assert (d / "f").read_text() == "x" and _leftovers(tmp_path) == []


def test_export_targets_with_bad_names_fail_before_the_work(tmp_path, tiny_checkpoint):
    with pytest.raises(UsageError, match="name too long"):
        export_checkpoint(tiny_checkpoint, tmp_path / ("n" * 300), ["onnx"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="exists and is not a folder"):
        export_checkpoint(tiny_checkpoint, tmp_path / "file", ["onnx"], overwrite=True)
    with pytest.raises(UsageError, match="output path is empty"):
        export_checkpoint(tiny_checkpoint, "", ["onnx"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("argv", [
    ["validate", "nope", "--out", "{file}"],
    ["bench", "--checkpoint", "nope", "--bundle", "nope", "--out", "{file}"],
    ["demo", "--out", "{file}"],
    ["demo", "--out", "{file}/sub"],
])
def test_report_folders_that_cannot_be_written_fail_before_the_work(tmp_path, capsys, argv):
    file = tmp_path / "file"
    file.write_text("x")
    code, err = _cli(capsys, *[a.format(file=file) for a in argv])
    assert code == 2 and "not a folder" in _error_line(err)
    assert file.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ----------------------------------------------------------------------------- locks (item 7)

HOLD = """
import sys, time
from hartkit import fsutil
with fsutil.target_lock(sys.argv[1], what="export"):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_a_second_export_of_one_path_fails_fast_naming_the_first(tmp_path, tiny_checkpoint):
    out = tmp_path / "bundle"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(UsageError, match=rf"another export of this path is in progress \(pid {holder.pid}"):
            export_checkpoint(tiny_checkpoint, out, ["onnx"])
        assert time.monotonic() - start < 5  # before any of the work
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0 and not out.exists() and _leftovers(tmp_path) == []  # lock file removed


def test_locks_within_one_process(tmp_path):
    out = tmp_path / "x"
    with fsutil.target_lock(out):
        with fsutil.target_lock(out):  # reentrant in one thread: atomic_dir inside export_checkpoint
            pass
        failed = []
        t = threading.Thread(target=lambda: _try_lock(out, failed))
        t.start()
        t.join()
        assert failed and "in progress" in failed[0]
    assert _leftovers(tmp_path) == []


def _try_lock(out, failed):
    try:
        with fsutil.target_lock(out):
            pass
    except UsageError as exc:
        failed.append(str(exc))


# ----------------------------------------------------------------------------- output files (items 2, 9)


def test_outputs_are_written_through_to_devices_and_fifos(tmp_path):
    save_png(IMAGE, "/dev/null")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    save_png(IMAGE, fifo)
    reader.join(30)
    assert got and got[0].startswith(b"\x89PNG") and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert _leftovers(tmp_path) == []


def test_sockets_and_block_devices_are_refused(tmp_path):
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s"))
    try:
        with pytest.raises(UsageError, match="is a socket"):
            save_png(IMAGE, tmp_path / "s")
    finally:
        sock.close()
    try:
        os.mknod(tmp_path / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    except OSError:
        return  # no permission to make a device node here
    with pytest.raises(UsageError, match="is a block device"):
        save_png(IMAGE, tmp_path / "blk")
    assert stat.S_ISBLK(os.lstat(tmp_path / "blk").st_mode)


def test_a_link_stays_a_link_and_a_file_keeps_its_mode(tmp_path):
    real = tmp_path / "real.png"
    real.write_bytes(b"old")
    os.chmod(real, 0o640)
    (tmp_path / "link.png").symlink_to(real)
    save_png(IMAGE, tmp_path / "link.png")
    assert (tmp_path / "link.png").is_symlink() and real.read_bytes().startswith(b"\x89PNG")
    assert stat.S_IMODE(real.stat().st_mode) == 0o640 and _leftovers(tmp_path) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "new" / "deeper" / "out.json"

    def disk_full(path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="No space left on device"):
        with fsutil.atomic_file(target) as tmp:
            disk_full(tmp)
    assert not (tmp_path / "new").exists()  # the folders it made are gone too
    old = tmp_path / "old.json"
    old.write_text("keep")
    with pytest.raises(OutputError):
        with fsutil.atomic_file(old) as tmp:
            disk_full(tmp)
    assert old.read_text() == "keep" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("out, message", [
    ("", "--out is empty"),
    ("{tmp}", "is a folder"),
    ("{tmp}/sub/", "is a folder"),
    ("{tmp}/" + "n" * 300 + ".png", "name too long"),
    ("{tmp}/file.txt/x.png", "is not a folder"),
])
def test_generate_refuses_bad_outputs_before_any_work(tmp_path, capsys, out, message):
    (tmp_path / "file.txt").write_text("x")
    code, err = _cli(capsys, "generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "x",
                     "--out", out.format(tmp=tmp_path))
    assert code == 2 and message in _error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_long_names_that_fit_are_written(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    name = "n" * (limit - 4) + ".png"  # the temp name beside it is shortened, not the output
    save_png(IMAGE, tmp_path / name)
    assert (tmp_path / name).is_file() and _leftovers(tmp_path) == []


def test_read_only_targets_fail_before_the_work(tmp_path, tiny_checkpoint, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open, real_access = os.open, os.access

    def read_only_open(path, flags, *a, **k):
        if str(path).startswith(str(ro)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", read_only_open)
    monkeypatch.setattr(os, "access", lambda p, m, **k: False if str(p).startswith(str(ro)) else real_access(p, m))
    start = time.monotonic()
    with pytest.raises(OutputError, match="Read-only file system"):
        export_checkpoint(tiny_checkpoint, ro / "bundle", ["onnx"])
    assert time.monotonic() - start < 5
    with pytest.raises(OutputError, match="read-only or no permission"):
        fsutil.check_output_file(ro / "x.png")
    with pytest.raises(OutputError, match="read-only or no permission"):
        fsutil.check_output_dir(ro / "report")
    assert list(ro.iterdir()) == []


@pytest.fixture()
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs (root with mount rights only): a real full disk."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount rights for a small tmpfs")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_a_real_full_disk_leaves_nothing(small_tmpfs):
    big = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)  # ~200 KB as PNG
    with pytest.raises(OutputError, match="No space left on device"):
        save_png(big, small_tmpfs / "sub" / "big.png")
    assert list(small_tmpfs.iterdir()) == []


def test_generate_on_a_full_disk_is_one_line_and_leaves_nothing(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from PIL import Image

    def full(self, fp, format=None, **params):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    code, err = _cli(capsys, "generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "x",
                     "--out", str(tmp_path / "img.png"))
    assert code == 2 and "No space left on device" in _error_line(err)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- stale temp folders (item 13)

KILLED = """
import os, signal, sys
from hartkit import fsutil
with fsutil.atomic_dir(sys.argv[1]) as work:
    (work / "half").write_text("x")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_temp_folders_of_a_killed_run_are_removed_by_the_next(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-c", KILLED, str(out)], capture_output=True, timeout=120)
    assert res.returncode == -9
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(stale) == 1
    # folders that only look like ours are never touched: no marker, another host, a live process
    mine = stale[0]
    lookalikes = {name: tmp_path / f".out.tmp-{name}" for name in ("nomarker", "otherhost", "alive")}
    for name, folder in lookalikes.items():
        folder.mkdir()
        (folder / "data").write_text("keep")
    info = json.loads((mine / fsutil.MARKER).read_text())
    (lookalikes["otherhost"] / fsutil.MARKER).write_text(json.dumps({**info, "host": "elsewhere"}))
    (lookalikes["alive"] / fsutil.MARKER).write_text(json.dumps({**info, "pid": os.getpid(), "start": None}))
    with fsutil.atomic_dir(out) as work:
        (work / "done").write_text("x")
    assert not mine.exists() and all((f / "data").is_file() for f in lookalikes.values())
    assert [p.name for p in out.iterdir()] == ["done"]


def test_an_old_folder_moved_aside_by_a_killed_replacement_is_put_back(tmp_path):
    out = tmp_path / "out"
    holder = tmp_path / ".out.tmp-killed"
    (holder / "old").mkdir(parents=True)
    (holder / "old" / "precious").write_text("x")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    marker = {"pid": dead.pid, "host": socket.gethostname(), "start": "1", "target": "out"}
    (holder / fsutil.MARKER).write_text(json.dumps(marker))
    other = tmp_path / ".out.tmp-b.tmp-x"  # another target's ("out.tmp-b"): its old folder is not ours to move
    (other / "old").mkdir(parents=True)
    (other / fsutil.MARKER).write_text(json.dumps({**marker, "target": "out.tmp-b"}))
    with pytest.raises(UsageError, match="already exists"):  # it is back, and not replaced without --force
        with fsutil.atomic_dir(out):
            pass
    assert (out / "precious").read_text() == "x" and not holder.exists() and (other / "old").is_dir()


# ----------------------------------------------------------------------------- checkpoints (item 10)


@pytest.fixture()
def ckpt(tiny_checkpoint, tmp_path):
    """A copy of the tiny checkpoint's llm/ (the rest linked: read only)."""
    out = tmp_path / "ck"
    out.mkdir()
    shutil.copytree(tiny_checkpoint / "llm", out / "llm")
    for part in ("tokenizer", "text_model"):
        (out / part).symlink_to(tiny_checkpoint / part)
    return out


def _edit_config(ckpt: Path, **changes) -> None:
    path = ckpt / "llm" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("key, value", [
    ("embed_dim", 1e9), ("embed_dim", 10**9), ("embed_dim", 0), ("depth", -1), ("num_heads", "8"),
    ("patch_nums", [1, 2, "x"]), ("patch_nums", []), ("mlp_ratio", True), ("norm_eps", None),
    ("context_token", 1.5), ("attn_type", 3), ("shared_aln", "no"), ("diff_depth", [6]),
])
def test_config_values_of_the_wrong_type_or_size_name_the_key(ckpt, key, value):
    from hartkit.model.checkpoint import load_hart

    _edit_config(ckpt, **{key: value})
    with pytest.raises(CheckpointError, match=rf"config\.json: invalid HARTConfig value.*'{key}': expected"):
        load_hart(ckpt)


def test_deeply_nested_json_is_one_error(ckpt):
    from hartkit.model.checkpoint import load_hart, read_default_cfg

    deep = "[" * 100_000 + "]" * 100_000
    (ckpt / "llm" / "config.json").write_text('{"embed_dim": ' + deep + "}")
    with pytest.raises(CheckpointError, match="config.json"):
        load_hart(ckpt)
    (ckpt / "llm" / "generation_config.json").write_text(deep)
    with pytest.raises(CheckpointError, match="generation_config.json: not valid JSON"):
        read_default_cfg(ckpt / "llm")


def _json_values():
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     st.text(max_size=8))
    return st.recursive(leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4),
                                                                                           inner, max_size=3),
                        max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fuzzed_configs_only_ever_raise_checkpoint_errors(data):
    import dataclasses

    from hartkit.model.config import HARTConfig, VAEConfig

    cls = data.draw(st.sampled_from([HARTConfig, VAEConfig]))
    base = cls().to_dict()
    keys = data.draw(st.lists(st.sampled_from(sorted(f.name for f in dataclasses.fields(cls))), max_size=3))
    for key in keys:
        base[key] = data.draw(_json_values())
    try:
        cfg = cls.from_dict(json.loads(json.dumps(base)), source="config.json")
    except CheckpointError as exc:
        assert "config.json" in str(exc) and "\n" not in str(exc)
        return
    cfg.to_dict()  # whatever passed is usable


def _rewrite_weights(ckpt: Path, change) -> None:
    from safetensors.torch import save_file

    from hartkit.model.checkpoint import read_weight_file

    path = ckpt / "llm" / "model.safetensors"
    state = {k: v.clone() for k, v in read_weight_file(path).items()}
    change(state)
    save_file(state, str(path))


def test_integer_and_bool_tensors_where_floats_belong_are_named(ckpt):
    from hartkit.model.checkpoint import load_hart

    _rewrite_weights(ckpt, lambda s: s.update({"head.weight": s["head.weight"].to(torch.int32)}))
    with pytest.raises(CheckpointError, match="head.weight: expected a floating-point tensor, found torch.int32"):
        load_hart(ckpt)
    _rewrite_weights(ckpt, lambda s: s.update({"head.weight": s["head.weight"].bool()}))
    with pytest.raises(CheckpointError, match="head.weight: expected a floating-point tensor, found torch.bool"):
        load_hart(ckpt)


def test_nan_weights_are_refused_by_name(ckpt):
    from hartkit.model.checkpoint import load_hart

    _rewrite_weights(ckpt, lambda s: s["head.weight"].fill_(float("nan")))
    with pytest.raises(CheckpointError, match=r"hold NaN: head.weight \((\d+) of \1 values\)"):
        load_hart(ckpt)


def test_a_text_file_as_ema_model_bin_is_one_error(ckpt):
    from hartkit.model.checkpoint import load_hart

    (ckpt / "llm" / "ema_model.bin").write_text("<html>404 Not Found</html>\n")
    with pytest.raises(CheckpointError, match="ema_model.bin: not a PyTorch weight file"):
        load_hart(ckpt)
    (ckpt / "llm" / "ema_model.bin").write_bytes(b"\x80\x02garbage")  # starts like a pickle, is not one
    with pytest.raises(CheckpointError, match="ema_model.bin: (not a readable PyTorch weight file|refused to load)"):
        load_hart(ckpt)


@pytest.mark.parametrize("weight_map, message", [
    ([], "'weight_map' must be a non-empty object"),
    ({}, "'weight_map' must be a non-empty object"),
    ({"head.weight": 3}, "must be a shard file name"),
    ({"head.weight": "missing.safetensors"}, "missing: missing.safetensors"),
    ({"head.weight": "{abs}"}, "is outside the checkpoint folder"),
    ({"head.weight": "../outside/model.safetensors"}, "is outside the checkpoint folder"),
])
def test_shard_indexes_are_checked_and_confined(ckpt, tmp_path, weight_map, message):
    from hartkit.model.checkpoint import load_hart

    outside = tmp_path / "outside"  # a valid weight file the index must not reach
    outside.mkdir()
    shutil.move(ckpt / "llm" / "model.safetensors", outside / "model.safetensors")
    text = json.dumps({"weight_map": weight_map}).replace("{abs}", str(outside / "model.safetensors"))
    (ckpt / "llm" / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        load_hart(ckpt)


def test_text_model_config_and_tensors_are_checked(tiny_checkpoint, tmp_path):
    from safetensors.torch import save_file

    from hartkit.model.checkpoint import read_weight_file
    from hartkit.model.text_encoder import TextEncoder

    text = tmp_path / "text"
    shutil.copytree(tiny_checkpoint / "text_model", text)
    config = json.loads((text / "config.json").read_text())
    for key, value in (("hidden_size", "64"), ("num_hidden_layers", -2), ("vocab_size", 1e9)):
        (text / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(CheckpointError, match=rf"invalid text model config: '{key}': expected"):
            TextEncoder.from_pretrained(text)
    (text / "config.json").write_text(json.dumps(config))
    state = {k: v.clone() for k, v in read_weight_file(text / "model.safetensors").items()}
    name = next(iter(state))
    save_file({**state, name: torch.full_like(state[name], float("nan"))}, str(text / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"hold NaN: {name}"):
        TextEncoder.from_pretrained(text)
    save_file({**state, name: state[name].to(torch.int64)}, str(text / "model.safetensors"))
    with pytest.raises(CheckpointError, match="expected a floating-point tensor, found torch.int64"):
        TextEncoder.from_pretrained(text)


# ----------------------------------------------------------------------------- prompts (item 11)


@pytest.fixture(scope="module")
def prompt_tokenizer(tiny_checkpoint):
    from hartkit.loop.prompt import PromptTokenizer

    return PromptTokenizer.from_dir(tiny_checkpoint / "text_model")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=40))
def test_any_prompt_encodes_or_is_one_usage_error(prompt_tokenizer, prompt):
    try:
        batch = prompt_tokenizer.encode([prompt], 16)
    except UsageError as exc:
        assert "not valid text" in str(exc) and "\n" not in str(exc)
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in prompt)
        str(exc).encode("utf-8")  # the message itself prints anywhere
        return
    assert batch.ids.shape == (1, 16)


def test_undecodable_prompt_bytes_are_named_by_the_cli(tmp_path, capsys):
    prompt = os.fsdecode(b"a red \xff circle")  # what Python makes of such argv bytes
    code, err = _cli(capsys, "generate", "--checkpoint", str(tmp_path), "--prompt", prompt)
    assert code == 2 and "the byte 0xff, which is not UTF-8" in _error_line(err)
    code, err = _cli(capsys, "demo", "--prompt", "\ud800", "--out", str(tmp_path / "demo"))
    assert code == 2 and "lone surrogate U+D800" in _error_line(err) and not (tmp_path / "demo").exists()


# ----------------------------------------------------------------------------- messages (item 15)


def test_messages(tmp_path, capsys):
    from hartkit.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["validate", "--help"])
    assert "3 when one misses a bar" in capsys.readouterr().out
    code, err = _cli(capsys, "generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x")
    assert code == 2 and "missing: checkpoint folder not found" in _error_line(err)


def test_third_party_noise_is_dropped_and_real_messages_kept():
    from hartkit.cli.options import quiet_third_party as _quiet_third_party

    _quiet_third_party()
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        loggers[0].warning("Failed to load /x/_C_mxfp8.so: Could not load this library")
        loggers[0].warning("a real torchao problem")
        loggers[1].warning("%s is an Enum subclass and is now natively supported by torch.compile", "E")
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert seen == ["a real torchao problem"]


def test_user_errors_are_hartkit_errors():
    assert issubclass(OutputError, HartkitError) and OutputError.exit_code == 2


def test_executorchs_native_cpuinfo_lines_are_dropped_and_other_native_lines_kept():
    """ExecuTorch's C++ threadpool writes its CPU probing to file descriptor 2 on the first method load;
    the backend drops exactly those lines and writes every other line back."""
    code = """
import os, sys
from hartkit.backends.executorch import CPUINFO_NOISE, _without_native_lines
with _without_native_lines(CPUINFO_NOISE):
    os.write(2, b"[cpuinfo_utils.cpp:87] Failed to open midr file /sys/devices/soc0/image_version\\n")
    os.write(2, b"a real native error\\n")
print("done", flush=True)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "done" in res.stdout, res.stderr
    assert "a real native error" in res.stderr and "cpuinfo_utils" not in res.stderr
