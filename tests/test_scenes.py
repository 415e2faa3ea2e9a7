"""The procedural scene generator and the pixel-level caption judge (torch-free)."""

from __future__ import annotations

import numpy as np
import pytest

from hartkit.validate import caption_score as cs
from hartkit.validate import scenes


def test_generator_is_deterministic():
    a_img, a_cap, a_attr = scenes.dataset(12, seed=3, split=None)
    b_img, b_cap, b_attr = scenes.dataset(12, seed=3, split=None)
    c_img, c_cap, _ = scenes.dataset(12, seed=4, split=None)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and a_attr == b_attr
    assert not np.array_equal(a_img, c_img) or a_cap != c_cap
    img1, cap1, _ = scenes.make_scene(7)
    img2, cap2, _ = scenes.make_scene(7)
    assert np.array_equal(img1, img2) and cap1 == cap2


def test_grammar_counts_and_round_trip():
    specs = scenes.all_specs()
    # 6 backgrounds x 5 colours x 3 shapes; 6 x 5 x 4 colour triples x 3 x 3 shapes x 4 relations
    assert sum(len(s.objects) == 1 for s in specs) == 6 * 5 * 3
    assert sum(len(s.objects) == 2 for s in specs) == 6 * 5 * 4 * 9 * 4
    for spec in specs[::37]:
        assert scenes.parse_caption(spec.caption()) == spec
    for bad in ("a red circle", "a red red circle on a blue background", "a red circle on a red background",
                "a red circle near a blue square on a white background"):
        with pytest.raises(ValueError):
            scenes.parse_caption(bad)


def test_rendering_puts_colours_where_the_attributes_say():
    img, caption, attrs = scenes.make_scene(11, spec="a red circle above a blue square on a yellow background")
    assert caption == "a red circle above a blue square on a yellow background"
    assert tuple(img[0, 0]) == scenes.PALETTE["yellow"] and tuple(img[-1, -1]) == scenes.PALETTE["yellow"]
    first, second = attrs["objects"]
    for obj in (first, second):
        x, y = (int(v) for v in obj["center"])
        assert tuple(img[y, x]) == scenes.PALETTE[obj["color"]]
    assert first["center"][1] + 10 < second["center"][1]  # above: smaller y
    # the square fills its box corners, the circle does not
    x, y = second["center"]
    h = second["size"] / 2 - 1.5
    assert tuple(img[int(y - h), int(x - h)]) == scenes.PALETTE["blue"]
    x, y = first["center"]
    h = first["size"] / 2 - 1.5
    assert tuple(img[int(y - h), int(x - h)]) == scenes.PALETTE["yellow"]


def test_held_out_split_is_disjoint_from_training():
    train = {s.caption() for s in scenes.specs_of_split("train")}
    test_layouts = {s.layout_key() for s in scenes.specs_of_split("test")}
    held = scenes.heldout_prompts(100)
    assert len(set(held)) == 100
    assert not train & set(held)
    # the mirrored wording of a held-out caption is held out too
    spec = scenes.parse_caption("a red circle above a blue square on a yellow background")
    mirror = scenes.SceneSpec(spec.background, spec.objects[::-1], "below")
    assert spec.layout_key() == mirror.layout_key() and spec.split == mirror.split
    _, caps, attrs = scenes.dataset(200, seed=0, split="train")
    assert all(scenes.parse_caption(c).layout_key() not in test_layouts for c in caps)
    assert all(a["split"] == "train" for a in attrs)
    assert 0.08 < len(test_layouts) / len({s.layout_key() for s in scenes.all_specs()}) < 0.18


def test_judge_is_right_on_ground_truth():
    images, captions, _ = scenes.dataset(80, seed=5, split=None)
    report = cs.evaluate(images, captions)
    assert report.accuracy == 1.0, [it for it in report.items if not it["caption"]][:3]
    assert set(report.per_attribute) == set(cs.ATTRIBUTES)


def test_judge_survives_blur_and_noise():
    images, captions, _ = scenes.dataset(40, seed=6, split=None)
    x = images.astype(np.float32)
    blurred = sum(np.roll(np.roll(x, dy, 1), dx, 2) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
    noisy = blurred + np.random.default_rng(0).normal(0, 8, x.shape)
    report = cs.evaluate(np.clip(noisy, 0, 255).astype(np.uint8), captions)
    assert report.accuracy >= 0.95


def test_judge_is_at_chance_on_mismatched_captions():
    images, captions, _ = scenes.dataset(240, seed=8, split=None)
    shuffled = captions[7:] + captions[:7]
    report = cs.evaluate(images, shuffled)
    chance = cs.chance_level()
    assert report.accuracy <= 0.03
    # background: 1/6 of random pairs agree; binomial sd at n=240 is 0.024
    assert abs(report.per_attribute["background"] - 1 / 6) < 0.08
    assert abs(report.per_attribute["background"] - chance["background"]) < 0.08
    assert abs(report.per_attribute["count"] - chance["count"]) < 0.12


def test_chance_level_is_sum_of_squared_layout_probabilities():
    # Independent count: one-shape captions (half the draws) have 90 equally likely layouts; the
    # 4320 two-shape captions pair up into 2160 layouts ("A above B" == "B below A").
    expected = 90 * (0.5 / 90) ** 2 + 2160 * (0.5 / 2160) ** 2
    assert cs.chance_level()["caption"] == pytest.approx(expected, rel=1e-9)
    assert cs.chance_level()["background"] == pytest.approx(1 / 6, abs=0.01)


def test_judge_catches_each_kind_of_mistake():
    img, _, _ = scenes.make_scene(21, spec="a red circle above a blue square on a yellow background")
    ok = cs.score(img, "a red circle above a blue square on a yellow background")
    assert ok["caption"]
    wrong = {
        "relation": "a red circle below a blue square on a yellow background",
        "shape": "a red triangle above a blue square on a yellow background",
        "background": "a red circle above a blue square on a white background",
        "color": "a red circle above a green square on a yellow background",
    }
    for attribute, caption in wrong.items():
        r = cs.score(img, caption)
        assert not r["caption"] and not r[attribute], (attribute, r)
    r = cs.score(img, "a red circle on a yellow background")  # an extra blue blob
    assert not r["count"] and r["shape"] and not r["caption"]


def test_shape_classifier_on_rendered_templates():
    for shape in scenes.SHAPES:
        for size in (14.0, 21.0, 30.0):
            mask = scenes.shape_mask(shape, (30.3, 33.1), size) >= 0.5
            assert cs.classify_shape(mask)[0] == shape


def test_relation_rule():
    assert cs.relation_holds("above", (30, 10), (32, 40))
    assert not cs.relation_holds("above", (30, 40), (32, 10))
    assert not cs.relation_holds("above", (5, 20), (50, 30))  # mostly sideways
    assert cs.relation_holds("to the left of", (10, 30), (50, 35))
    assert cs.relation_holds("to the right of", (50, 30), (10, 35))
    assert cs.relation_holds("below", (30, 50), (30, 12))
