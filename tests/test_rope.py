"""hartkit.loop.rope against direct re-computations of the formulas of hart-reference.md §2/§3.3."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hartkit.errors import UsageError
from hartkit.loop import rope

OFFICIAL = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


def test_module_is_torch_free():
    src = open(rope.__file__).read()
    assert "import torch" not in src


def test_context_positions_cond_cumsum_uncond_zero():
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]], dtype=bool)
    pos = rope.context_positions(mask)
    assert pos.dtype == np.int64 and pos.shape == (6, 5)
    expected = [
        [0, 1, 2, 2, 2],  # right padding: pads repeat n-1
        [0, 1, 2, 3, 4],
        [-1, -1, 0, 1, 1],  # left padding: pads get -1
        [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0],
    ]
    np.testing.assert_array_equal(pos, expected)


def test_stage_positions_fractional_pn3_last64():
    pns = (1, 2, 3, 64)
    offsets = np.array([7, 0])  # cond row P = 7, uncond row P = 0
    coords = rope.stage_positions(pns, 2, offsets)
    assert coords.shape == (2, 9, 2) and coords.dtype == np.float32
    axis = [0.0, 64 / 3, 128 / 3]
    for n in range(9):
        i, j = divmod(n, 3)  # raster order, i = row
        for row, P in ((0, 7), (1, 0)):
            assert coords[row, n, 0] == pytest.approx(axis[i] + P, abs=1e-5)
            assert coords[row, n, 1] == pytest.approx(axis[j] + P, abs=1e-5)
    np.testing.assert_allclose(coords[1, :3, 1], [0.0, 21.333334, 42.666668], rtol=0, atol=1e-6)
    # float32 in upstream's order: (i / pn) * last
    assert coords[1, 1, 1] == np.float32(np.float32(1) / np.float32(3)) * np.float32(64)


def test_stage_positions_final_stage_is_integer_grid():
    coords = rope.stage_positions(OFFICIAL, len(OFFICIAL) - 1, np.array([12, 0]))
    assert coords.shape == (2, 64 * 64, 2)
    n = np.arange(64 * 64)
    np.testing.assert_array_equal(coords[0, :, 0], n // 64 + 12)
    np.testing.assert_array_equal(coords[0, :, 1], n % 64 + 12)
    np.testing.assert_array_equal(coords[1, :, 0], n // 64)


@pytest.mark.parametrize("si", [0, len(OFFICIAL)])
def test_stage_positions_rejects_bad_stage(si):
    with pytest.raises(UsageError):
        rope.stage_positions(OFFICIAL, si, np.zeros(2))


def _loop_1d(pos, d, theta=10000.0):
    N, L = pos.shape
    cos = np.zeros((N, L, d))
    sin = np.zeros((N, L, d))
    for b in range(N):
        for n in range(L):
            for k in range(d):
                w = theta ** (-2 * (k % (d // 2)) / d)
                a = float(pos[b, n]) * w
                cos[b, n, k], sin[b, n, k] = math.cos(a), math.sin(a)
    return cos, sin


def _loop_2d(coords, d, theta=10000.0):
    N, L, _ = coords.shape
    cos = np.zeros((N, L, d))
    sin = np.zeros((N, L, d))
    for b in range(N):
        for n in range(L):
            for k in range(d):
                c = k // (d // 2)  # 0: row coordinate, 1: column coordinate
                w = theta ** (-4 * (k % (d // 4)) / d)
                a = float(coords[b, n, c]) * w
                cos[b, n, k], sin[b, n, k] = math.cos(a), math.sin(a)
    return cos, sin


def test_rope_1d_against_loops():
    mask = np.zeros((2, 12), dtype=bool)
    mask[0, :5] = True
    mask[1, :] = True
    pos = rope.context_positions(mask)
    cos, sin = rope.rope_cos_sin_1d(pos, 16)
    assert cos.shape == (4, 12, 16) and cos.dtype == np.float32 and sin.dtype == np.float32
    rc, rs = _loop_1d(pos, 16)
    # the float32 angle rounding of upstream bounds the error by |angle| * 2**-24 (angles < 12 here)
    np.testing.assert_allclose(cos, rc, atol=2e-6)
    np.testing.assert_allclose(sin, rs, atol=2e-6)
    # the uncond rows sit at position 0: cos 1, sin 0 everywhere
    assert np.all(cos[2:] == 1) and np.all(sin[2:] == 0)


def test_rope_2d_against_loops_and_quirk_layout():
    pns = (1, 2, 3, 64)
    coords = rope.stage_positions(pns, 2, np.array([4, 0]))
    d = 16
    cos, sin = rope.rope_cos_sin_2d(coords, d)
    assert cos.shape == (2, 9, d)
    rc, rs = _loop_2d(coords, d)
    np.testing.assert_allclose(cos, rc, atol=1e-5)
    np.testing.assert_allclose(sin, rs, atol=1e-5)
    # layout [row, row, col, col] in blocks of d/4: channel k and k + d/2 mix row and column angles
    assert np.array_equal(cos[..., : d // 4], cos[..., d // 4 : d // 2])
    assert np.array_equal(cos[..., d // 2 : 3 * d // 4], cos[..., 3 * d // 4 :])
    # token n=1 is (row 0, col 1): row angles 0 (cos=1 on the uncond row), column angles not
    assert np.all(cos[1, 1, : d // 2] == 1) and not np.all(cos[1, 1, d // 2 :] == 1)


def test_rope_large_positions_match_loops():
    # official-size magnitudes: 1-D positions up to 299 and 2-D coordinates up to 63 + 299
    pos = np.array([[0, 1, 150, 299]])
    cos, sin = rope.rope_cos_sin_1d(pos, 64)
    rc, rs = _loop_1d(pos, 64)
    np.testing.assert_allclose(cos, rc, atol=5e-5)
    np.testing.assert_allclose(sin, rs, atol=5e-5)
    coords = rope.stage_positions(OFFICIAL, 10, np.array([299]))[:, ::97]
    cos, sin = rope.rope_cos_sin_2d(coords, 64)
    rc, rs = _loop_2d(coords, 64)
    np.testing.assert_allclose(cos, rc, atol=5e-5)
    np.testing.assert_allclose(sin, rs, atol=5e-5)


def test_inv_freq_values():
    np.testing.assert_allclose(rope.inv_freq(8, 2), [1, 10000 ** -0.25, 10000 ** -0.5, 10000 ** -0.75], rtol=1e-7)
    np.testing.assert_allclose(rope.inv_freq(8, 4), [1, 10000 ** -0.5], rtol=1e-7)
    with pytest.raises(UsageError):
        rope.rope_cos_sin_2d(np.zeros((1, 1, 2)), 6)


def test_tables_match_upstream_torch_ops():
    """Replay upstream's float32 torch expressions; within one float32 ulp of our tables."""
    torch = pytest.importorskip("torch")
    d = 32
    mask = np.zeros((1, 40), dtype=bool)
    mask[0, :23] = True
    pos = rope.context_positions(mask)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = (inv[None, :, None].expand(2, -1, 1) @ torch.from_numpy(pos)[:, None, :].float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = rope.rope_cos_sin_1d(pos, d)
    np.testing.assert_allclose(cos, emb.cos().numpy(), rtol=0, atol=1.2e-7)
    np.testing.assert_allclose(sin, emb.sin().numpy(), rtol=0, atol=1.2e-7)

    pns = (1, 2, 3, 5, 7)
    P = pos[:, -1]
    for si in range(1, len(pns)):
        pn = pns[si]
        ar = torch.arange(pn)
        cart = torch.stack(torch.meshgrid(ar, ar, indexing="ij"), dim=-1)
        ids = (cart / pn * pns[-1]).reshape(-1, 2)[None].repeat(2, 1, 1) + torch.from_numpy(P)[:, None, None]
        coords = rope.stage_positions(pns, si, P)
        np.testing.assert_array_equal(coords, ids.numpy())
        inv4 = 1.0 / (10000 ** (torch.arange(0, d, 4, dtype=torch.int64).float() / d))
        inv_e = inv4[None, :, None, None].expand(2, -1, 1, 1).repeat(1, 1, 1, 2).permute(0, 3, 1, 2)
        f = (inv_e @ ids[:, None].float().permute(0, 3, 1, 2)).transpose(2, 3)
        e = torch.cat((f, f), dim=-1).transpose(2, 1).reshape(2, pn * pn, d)
        c, s = rope.rope_cos_sin_2d(coords, d)
        np.testing.assert_allclose(c, e.cos().numpy(), rtol=0, atol=1.2e-7)
        np.testing.assert_allclose(s, e.sin().numpy(), rtol=0, atol=1.2e-7)
