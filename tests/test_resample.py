"""Resampling matrices (hartkit.loop.resample) against torch's F.interpolate and hand formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hartkit.loop.resample import area_matrix, bicubic_matrix, resample_2d

# HART-0.7B-1024px scales (spec §1.1): every one of them goes up to 64 (bicubic) and 64 comes down
# to every one of them (area).
PATCH_NUMS = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
LAST = 64
PAIRS = [(LAST, pn) for pn in PATCH_NUMS] + [(pn, LAST) for pn in PATCH_NUMS]
OTHER_PAIRS = [(5, 3), (3, 5), (7, 1), (1, 7), (10, 4), (17, 6), (6, 17), (13, 10), (2, 2)]


def _torch_resize(x: np.ndarray, out: int, mode: str) -> np.ndarray:
    kwargs = {"align_corners": False} if mode == "bicubic" else {}
    return F.interpolate(torch.from_numpy(x), size=(out, out), mode=mode, **kwargs).numpy()


@pytest.mark.parametrize("mode", ["bicubic", "area"])
def test_matrices_match_torch_fp64(mode):
    build = bicubic_matrix if mode == "bicubic" else area_matrix
    rng = np.random.default_rng(0)
    for out, inp in PAIRS + OTHER_PAIRS:
        x = rng.standard_normal((2, 3, inp, inp))
        got = resample_2d(x, build(out, inp))
        want = _torch_resize(x, out, mode)
        assert got.shape == want.shape == (2, 3, out, out)
        err = np.abs(got - want).max()
        assert err < 1e-12, (mode, out, inp, err)


@pytest.mark.parametrize("mode", ["bicubic", "area"])
def test_matrices_match_torch_fp32(mode):
    # torch computes source indices in float32 for float32 maps; only downsampling bicubic
    # (never used by HART) feels that beyond 1e-5.
    build = bicubic_matrix if mode == "bicubic" else area_matrix
    rng = np.random.default_rng(1)
    for out, inp in PAIRS:
        x = rng.standard_normal((1, 4, inp, inp)).astype(np.float32)
        got = resample_2d(x, build(out, inp))
        assert got.dtype == np.float32
        want = _torch_resize(x, out, mode)
        tol = 1e-5 if (mode == "area" or out >= inp) else 3e-5
        assert np.abs(got - want).max() < tol, (mode, out, inp)


@pytest.mark.parametrize("out,inp", PAIRS + OTHER_PAIRS)
def test_row_sums_are_one(out, inp):
    for m in (bicubic_matrix(out, inp), area_matrix(out, inp)):
        assert m.shape == (out, inp)
        np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=0, atol=1e-14)


def test_bicubic_one_pixel_is_constant_and_same_size_is_identity():
    np.testing.assert_array_equal(bicubic_matrix(64, 1), np.ones((64, 1)))
    for n in (1, 5, 64):
        np.testing.assert_array_equal(bicubic_matrix(n, n), np.eye(n))
        np.testing.assert_array_equal(area_matrix(n, n), np.eye(n))


def test_bicubic_weights_by_hand():
    # 2 -> 4: scale 0.5, src = 0.5*(i+0.5) - 0.5 = -0.25, 0.25, 0.75, 1.25. Keys' kernel, A = -0.75.
    a = -0.75

    def k(d: float) -> float:
        d = abs(d)
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        if d < 2:
            return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
        return 0.0

    want = np.zeros((4, 2))
    for i in range(4):
        src = 0.5 * (i + 0.5) - 0.5
        base = math.floor(src)
        for j in range(base - 1, base + 3):
            want[i, min(max(j, 0), 1)] += k(src - j)  # taps outside clamp onto the border
    np.testing.assert_allclose(bicubic_matrix(4, 2), want, rtol=0, atol=1e-15)


def test_area_weights_by_hand_overlapping_windows():
    # 64 -> 27: windows [floor(64i/27), ceil(64(i+1)/27)) overlap; average a 2-D map by explicit loops.
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 64))
    want = np.empty((27, 27))
    for i in range(27):
        r0, r1 = (64 * i) // 27, -((-64 * (i + 1)) // 27)
        for j in range(27):
            c0, c1 = (64 * j) // 27, -((-64 * (j + 1)) // 27)
            want[i, j] = x[r0:r1, c0:c1].mean()
    np.testing.assert_allclose(resample_2d(x, area_matrix(27, 64)), want, rtol=0, atol=1e-13)
    # overlap exists: some input column feeds two outputs
    assert ((area_matrix(27, 64) > 0).sum(axis=0) > 1).any()


def test_rectangular_maps_use_separate_width_matrix():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 3))
    got = resample_2d(x, bicubic_matrix(8, 5), bicubic_matrix(6, 3))
    want = F.interpolate(torch.from_numpy(x)[None], size=(8, 6), mode="bicubic", align_corners=False)
    np.testing.assert_allclose(got, want[0].numpy(), rtol=0, atol=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError):
        bicubic_matrix(0, 4)
    with pytest.raises(ValueError):
        area_matrix(4, -1)
    with pytest.raises(ValueError):
        resample_2d(np.zeros((3, 4)), bicubic_matrix(8, 3))


def test_module_is_torch_free():
    import ast
    import inspect

    import hartkit.loop.resample as mod

    tree = ast.parse(inspect.getsource(mod))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {
        n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
    }
    assert "torch" not in names
