"""Bundles carry a model card (README.md) and the weights' licence, and record where the weights came
from without the exporting machine's paths; bundles that recorded paths (older versions) still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hartkit.bundle.write import MODEL_CARD, card_licence, find_licence, write_model_card

INFO = {"hartkit_version": "0", "loop": {"image_size": 64, "patch_nums": [1, 2, 4], "default_cfg": 1.5},
        "files": {"onnx": {}}, "parity": [{"graph": "vae_decode", "format": "onnx", "calls": 1, "ok": True,
                                           "max_abs_err": 2.5e-06, "min_snr_db": 120.0}]}


def test_card_with_licence_file_declared_and_unknown(tmp_path):
    ck, text, out = tmp_path / "ck", tmp_path / "text", tmp_path / "bundle"
    for d in (ck, text, out):
        d.mkdir()
    (ck / "LICENSE.txt").write_text("Apache License 2.0 (test)\n")
    (text / "README.md").write_text("---\nlicense: apache-2.0\ntags: [qwen2]\n---\n# a card\n")
    sources = {"checkpoint": {"repo_id": "org/hart", "revision": "abc123"},
               "text_model": {"name": "text", "sha256": "f" * 64}}
    written = write_model_card(out, INFO, "org/hart", sources, {"name": "laptop"}, {"checkpoint": ck, "text_model": text})
    assert written == [MODEL_CARD, "LICENSE"]
    assert (out / "LICENSE").read_text() == "Apache License 2.0 (test)\n"
    card = (out / MODEL_CARD).read_text()
    assert card.startswith("# org/hart")
    assert "`org/hart`, revision `abc123`" in card and "`text`" in card and "f" * 64 in card
    assert "`laptop`" in card and "| onnx | vae_decode | 1 | 2.5e-06 | 120 | pass |" in card
    assert "64 px" in card and "from_pretrained" in card and "## Limitations" in card
    assert "text_model: `apache-2.0` as declared" in card
    assert str(tmp_path) not in card

    bare = tmp_path / "bare"
    bare.mkdir()
    write_model_card(bare, {**INFO, "parity": []}, "x", {"checkpoint": {"repo_id": "org/x", "revision": "r"}},
                     None, {"checkpoint": tmp_path / "nothing-here"})
    card = (bare / MODEL_CARD).read_text()
    assert not (bare / "LICENSE").exists()
    assert "checkpoint: unknown" in card and "https://huggingface.co/org/x" in card and "fp32" in card


def test_licence_helpers(tmp_path):
    assert find_licence(tmp_path) is None and card_licence(tmp_path) is None and find_licence(None) is None
    (tmp_path / "README.md").write_text("no front matter\nlicense: mit\n")
    assert card_licence(tmp_path) is None
    (tmp_path / "README.md").write_text("---\n: [unbalanced\n---\n")
    assert card_licence(tmp_path) is None  # a malformed card is no licence, not a crash
    (tmp_path / "COPYING").write_text("x")
    assert find_licence(tmp_path) == tmp_path / "COPYING"


def test_export_carries_card_and_no_machine_path(onnx_bundle, tiny_checkpoint):
    from hartkit.bundle import verify_bundle

    bundle = onnx_bundle[0]
    manifest = json.loads((bundle / "manifest.json").read_text())
    model = manifest["model"]
    assert "checkpoint_path" not in model and "text_model_path" not in model
    assert model["source"]["checkpoint"]["name"] == tiny_checkpoint.name
    assert len(model["source"]["checkpoint"]["sha256"]) == 64
    text = (bundle / "manifest.json").read_text()
    assert str(tiny_checkpoint) not in text and str(tiny_checkpoint.resolve()) not in text
    assert MODEL_CARD in {a["path"] for a in manifest["artifacts"]}  # hashed and verified like every file
    assert "## Parity" in (bundle / MODEL_CARD).read_text()
    assert verify_bundle(bundle).ok


def test_old_manifest_with_paths_still_loads(onnx_bundle, tiny_checkpoint, tmp_path):
    from hartkit.runtime.pipeline import Pipeline
    from hartkit.validate.core import checkpoint_from_manifests

    old = tmp_path / "old"
    shutil.copytree(onnx_bundle[0], old)
    path = old / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["model"]["source"]
    manifest["model"]["checkpoint_path"] = str(tiny_checkpoint.resolve())
    manifest["model"]["text_model_path"] = str((tiny_checkpoint / "text_model").resolve())
    path.write_text(json.dumps(manifest))
    pipe = Pipeline.from_bundle(old)
    assert pipe("a red circle", seed=0).size[0] == manifest["loop"]["image_size"]
    ck, text = checkpoint_from_manifests([old], None)
    assert ck == tiny_checkpoint.resolve() and text == (tiny_checkpoint / "text_model").resolve()
    # A new manifest names no path: validate needs --checkpoint for a local folder, and says so.
    from hartkit.errors import UsageError

    with pytest.raises(UsageError, match="--checkpoint DIR"):
        checkpoint_from_manifests([onnx_bundle[0]], None)
