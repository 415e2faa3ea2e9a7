"""The diffusers-style call beside the original one: ``Pipeline.from_pretrained(...)(prompts, ...)`` with
``.images``, per-image seeds ``seed + k``, guidance_scale, height/width, generators, callback_on_step_end
with previews; ``Pipeline.from_bundle(...)(prompt, seed)`` and ``generate(..., callback_on_stage_end)`` unchanged."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from hartkit.errors import HartkitError, UsageError

pytest.importorskip("onnxruntime")

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def bundle(onnx_bundle) -> Path:
    return onnx_bundle[0]


@pytest.fixture(scope="module")
def pipe(bundle):
    from hartkit.runtime.pipeline import Pipeline

    return Pipeline.from_pretrained(bundle, backend="onnxruntime")


@pytest.fixture(scope="module")
def plain(bundle):
    from hartkit.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(bundle, backend="onnxruntime")


def test_batch_of_prompts_and_images_per_prompt(pipe, plain):
    out = pipe(PROMPTS, num_images_per_prompt=2, seed=5, output_type="np")
    assert out.seeds == [5, 6, 7, 8] and out.prompts == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    size = pipe.image_size
    assert out.images.shape == (4, size, size, 3) and out.images.dtype == np.float32
    assert 0.0 <= out.images.min() and out.images.max() <= 1.0
    # Image k is exactly what the original call makes alone with seed + k.
    for k in (0, 3):
        alone = np.asarray(plain(out.prompts[k], seed=out.seeds[k]), dtype=np.float32) / 255
        np.testing.assert_array_equal(out.images[k], alone)
    assert not np.array_equal(out.images[0], out.images[1])  # two seeds, two samples
    again = pipe(PROMPTS, num_images_per_prompt=2, seed=5, output_type="np")
    np.testing.assert_array_equal(again.images, out.images)  # deterministic


def test_pil_output_return_dict_and_guidance(pipe, plain):
    from PIL import Image

    out = pipe("a red circle", guidance_scale=0.0, seed=1)
    assert len(out.images) == 1 and isinstance(out.images[0], Image.Image) and out[0] is out.images
    reference, _ = plain.generate("a red circle", seed=1, cfg=0.0)
    np.testing.assert_array_equal(np.asarray(out.images[0]), reference)
    default, _ = plain.generate("a red circle", seed=1)
    assert not np.array_equal(reference, default)  # the guidance reached the loop
    (images,) = pipe("a red circle", seed=1, guidance_scale=0.0, return_dict=False)
    np.testing.assert_array_equal(np.asarray(images[0]), reference)


def test_height_width_only_the_bundles_size(pipe):
    size = pipe.image_size
    assert size and pipe("x", height=size, width=size, seed=0).images
    with pytest.raises(UsageError, match=rf"height={2 * size}.*draws {size}x{size} px"):
        pipe("x", height=2 * size, width=size)
    with pytest.raises(UsageError, match="width=7"):
        pipe("x", width=7)


def test_generators_and_seed_errors(pipe):
    from hartkit.runtime.output import image_seeds

    class TorchLikeGenerator:  # a torch.Generator's seed is what is taken
        def initial_seed(self) -> int:
            return 42

    assert image_seeds(3, None, TorchLikeGenerator()) == [42, 43, 44]
    assert image_seeds(2, None, [9, 3]) == [9, 3]
    a = image_seeds(2, None, np.random.default_rng(0))
    assert a == image_seeds(2, None, np.random.default_rng(0)) and a[1] == a[0] + 1
    assert image_seeds(2, None, None) == [0, 1]
    out = pipe(PROMPTS, generator=[11, 4], output_type="np")
    assert out.seeds == [11, 4]
    for bad, match in [(dict(seed=1, generator=2), "not both"), (dict(generator=[1, 2]), "one per image"),
                       (dict(generator="x"), "generator must be"), (dict(seed=2**64 - 1, num_images_per_prompt=2), "2\\*\\*64"),
                       (dict(num_images_per_prompt=0), "positive integer"), (dict(output_type="latent"), "output_type")]:
        with pytest.raises(UsageError, match=match):
            pipe(PROMPTS[0], **bad)
    with pytest.raises(UsageError, match="list of strings"):
        pipe([])
    with pytest.raises(TypeError):
        pipe("x", negative_prompt="y")  # HART's unconditional branch is fixed: not accepted silently


def test_callback_on_step_end_and_previews(pipe):
    from PIL import Image

    calls = []
    previews = []

    def observe(p, step, timestep, kwargs):
        assert p is pipe
        calls.append((step, timestep, kwargs["image_index"], sorted(kwargs)))
        if step == len(pipe.loop.patch_nums) - 1:
            previews.append(p.decode_latents(kwargs["f_hat"]))
        return kwargs  # unchanged: must not alter the image

    out = pipe(PROMPTS[0], seed=3, callback_on_step_end=observe, callback_on_step_end_tensor_inputs=["f_hat", "tokens"],
               output_type="np")
    plain_out = pipe(PROMPTS[0], seed=3, output_type="np")
    np.testing.assert_array_equal(out.images, plain_out.images)
    pns = pipe.loop.patch_nums
    assert [(s, t) for s, t, _, _ in calls] == [(i, pns[i]) for i in range(len(pns))]
    assert calls[0][3] == ["f_hat", "image_index", "tokens"]
    assert isinstance(previews[0], Image.Image) and previews[0].size == (pipe.image_size, pipe.image_size)
    # A preview before the last stage's residual differs from the final image, but is an image of the scene.
    assert np.asarray(previews[0]).shape == (pipe.image_size, pipe.image_size, 3)

    # Replacing the tokens of a stage (teacher forcing) changes the rest of the image, as the stage callback does.
    def force(p, step, timestep, kwargs):
        if step == 1:
            kwargs["tokens"] = np.zeros_like(kwargs["tokens"])
        return kwargs

    forced = pipe(PROMPTS[0], seed=3, callback_on_step_end=force, callback_on_step_end_tensor_inputs=["tokens"],
                  output_type="np")
    assert not np.array_equal(forced.images, plain_out.images)
    expected, _ = pipe.generate(PROMPTS[0], seed=3, callback_on_stage_end=lambda si, st: (
        {"tokens": np.zeros_like(st["tokens"])} if si == 1 else None))
    np.testing.assert_array_equal(forced.images[0], expected.astype(np.float32) / 255)
    with pytest.raises(UsageError, match="not available"):
        pipe("x", callback_on_step_end=observe, callback_on_step_end_tensor_inputs=["noise"])


def test_original_api_unchanged(plain):
    from PIL import Image

    image = plain("a red circle", seed=0)
    assert isinstance(image, Image.Image)
    stages = []
    pixels, trace = plain.generate("a red circle", seed=0, callback_on_stage_end=lambda si, st: stages.append(si))
    np.testing.assert_array_equal(np.asarray(image), pixels)
    assert stages == list(range(len(plain.loop.patch_nums))) and len(trace.tokens) == len(stages)
    out = plain(["a red circle"], seed=0)  # a list (refused before) takes the diffusers-style path
    np.testing.assert_array_equal(np.asarray(out.images[0]), pixels)


def _cache_bundle(cache: Path, repo_id: str, rev: str, folder: Path) -> None:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for src in folder.rglob("*"):
        if not src.is_file():
            continue
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / rev / src.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(rev)


def test_from_pretrained_repo_id_and_checkpoints(bundle, tiny_checkpoint, tmp_path, monkeypatch, pipe):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    from hartkit.runtime.pipeline import Pipeline

    _cache_bundle(tmp_path / "hub", "someone/hart-tiny-onnx", "a" * 40, bundle)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    by_id = Pipeline.from_pretrained("someone/hart-tiny-onnx")
    np.testing.assert_array_equal(by_id("a red circle", seed=2, output_type="np").images,
                                  pipe("a red circle", seed=2, output_type="np").images)
    with pytest.raises(HartkitError) as err:
        Pipeline.from_pretrained("someone/not-here")
    assert "`hf download someone/not-here`" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UsageError, match="a checkpoint, not a bundle"):
        Pipeline.from_pretrained(tiny_checkpoint)
    torch_pipe = Pipeline.from_pretrained(tiny_checkpoint / "llm", backend="torch")  # the eager reference
    ref = torch_pipe("a red circle", seed=2, output_type="np").images
    assert ref.shape == (1, pipe.image_size, pipe.image_size, 3)


def test_from_pretrained_without_torch(bundle, without_torch):
    run = without_torch(f"""
from hartkit.runtime.pipeline import Pipeline
out = Pipeline.from_pretrained({str(bundle)!r})(["a red circle"], seed=0, output_type="np")
assert out.images.shape[0] == 1, out.images.shape
import sys
assert "torch" not in sys.modules
print("ok")
""")
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]
