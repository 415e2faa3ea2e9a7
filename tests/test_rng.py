"""The portable RNG contract: a from-scratch Philox4x64-10 must reproduce the stream bit for bit."""

import math

import numpy as np
import pytest

from hartkit.loop.rng import PortableRNG, draw_plan, iter_draws

MASK = (1 << 64) - 1
M0, M1 = 0xD2E7470EE14C6C93, 0xCA5A826395121157
W0, W1 = 0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B


def philox4x64_10(counter, key):
    """Textbook Philox4x64 with 10 rounds, written from the paper's description."""
    c, k = list(counter), list(key)
    for _ in range(10):
        p0, p1 = M0 * c[0], M1 * c[2]
        c = [(p1 >> 64) ^ c[1] ^ k[0], p1 & MASK, (p0 >> 64) ^ c[3] ^ k[1], p0 & MASK]
        k = [(k[0] + W0) & MASK, (k[1] + W1) & MASK]
    return c


def reference_words(seed, count):
    words, block = [], 1
    while len(words) < count:
        words.extend(philox4x64_10([block, 0, 0, 0], [seed, 0]))
        block += 1
    return words[:count]


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**64 - 1])
def test_raw_stream_matches_textbook_philox(seed):
    rng = PortableRNG(seed)
    assert [int(w) for w in rng.raw(11)] == reference_words(seed, 11)


def test_uniform_exponential_normal_follow_the_documented_formulas():
    words = reference_words(3, 7)
    u = [(w >> 11) * 2.0**-53 for w in words]
    assert np.array_equal(PortableRNG(3).uniform((7,)), np.array(u))
    e = PortableRNG(3).exponential((7,))
    assert e.dtype == np.float32
    assert np.array_equal(e, np.array([-math.log1p(-x) for x in u], dtype=np.float32))
    n = PortableRNG(3).normal((5,))  # odd count: 3 pairs, last z1 dropped
    expected = []
    for i in range(3):
        r = math.sqrt(-2 * math.log1p(-u[2 * i]))
        expected += [r * math.cos(2 * math.pi * u[2 * i + 1]), r * math.sin(2 * math.pi * u[2 * i + 1])]
    assert np.allclose(n, np.array(expected[:5], dtype=np.float32), rtol=0, atol=1e-6)


def test_distributions_have_the_right_moments():
    rng = PortableRNG(0)
    e = rng.exponential((200_000,))
    z = rng.normal((200_000,))
    assert abs(e.mean() - 1) < 0.01 and e.min() >= 0
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01


def test_bad_seeds_are_refused():
    for bad in (-1, 2**64, 1.5, "3"):
        with pytest.raises(ValueError, match="seed"):
            PortableRNG(bad)


def test_draw_plan_order_and_shapes():
    plan = draw_plan(2, (1, 2, 4), vocab_size=16, latent_dim=3, num_diffusion_steps=2)
    assert [d.name for d in plan] == [
        "stage0.sample", "stage0.gumbel", "stage1.sample", "stage1.gumbel", "stage2.sample", "stage2.gumbel",
        "diffusion.init", "diffusion.step0", "diffusion.step1",
    ]
    assert plan[0].shape == (2, 1, 16) and plan[2].shape == (2, 4, 16) and plan[4].shape == (2, 16, 16)
    assert plan[-1].shape == (2, 16, 3) and plan[-1].kind == "normal"
    hard = draw_plan(1, (1, 2), 8, 2, 1, more_smooth=False)
    assert [d.name for d in hard] == ["stage0.sample", "stage1.sample", "diffusion.init", "diffusion.step0"]


def test_iter_draws_consumes_the_stream_in_plan_order():
    plan = draw_plan(1, (1, 2), vocab_size=4, latent_dim=2, num_diffusion_steps=1)
    drawn = [x for _, x in iter_draws(PortableRNG(9), plan)]
    rng = PortableRNG(9)
    for d, x in zip(plan, drawn):
        again = rng.exponential(d.shape) if d.kind == "exponential" else rng.normal(d.shape)
        assert np.array_equal(x, again)
