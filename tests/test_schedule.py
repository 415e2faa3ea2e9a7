"""IDDPMSchedule: the respaced cosine table and one sampler step, against the spec and the formulas."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hartkit.errors import UsageError
from hartkit.loop.schedule import IDDPMSchedule, space_timesteps

# Spec §3.7, as printed: j, orig t, beta', alpha-bar', sqrt(1/ab'), sqrt(1/ab'-1), log var_min (clipped
# posterior), log beta', coef1, coef2.
SPEC_TABLE = """
0 0   4.1284e-5  0.999959  1.0000206 0.0064254 -10.09574 -10.09503 1.0      0.0
1 143 0.054878   0.945083  1.0286439 0.2410568 -10.09574 -2.90264  0.999269 0.000731
2 285 0.148746   0.804506  1.1148987 0.4929495 -3.17522  -1.90552  0.739683 0.259182
3 428 0.249546   0.603745  1.2869844 0.8101413 -2.09464  -1.38811  0.564859 0.427387
4 571 0.366072   0.382731  1.6164166 1.2699617 -1.44817  -1.00493  0.460806 0.511117
5 714 0.517566   0.184642  2.3272029 2.1013980 -0.93694  -0.65862  0.392703 0.525830
6 856 0.735439   0.048849  4.5245065 4.4126136 -0.46133  -0.30729  0.332248 0.440922
7 999 0.99999995 2.4288e-9 20291.17  20291.17  -0.05008  -4.97e-8  0.221019 0.000212
"""
SPEC_COLUMNS = (
    "betas",
    "alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_log_variance_clipped",
    "log_betas",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def _last_digit_unit(text: str) -> float:
    """One unit in the last printed digit of a number such as '4.1284e-5' or '-10.09574'."""
    mantissa, _, exponent = text.lower().partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return 10.0 ** (-decimals + (int(exponent) if exponent else 0))


def test_spec_table_all_columns() -> None:
    sched = IDDPMSchedule.create("8")
    rows = [line.split() for line in SPEC_TABLE.strip().splitlines()]
    assert sched.timesteps.dtype == np.int64
    assert sched.timesteps.tolist() == [int(r[1]) for r in rows] == [0, 143, 285, 428, 571, 714, 856, 999]
    for row in rows:
        j = int(row[0])
        for name, printed in zip(SPEC_COLUMNS, row[2:]):
            got = getattr(sched, name)[j]
            # The spec rounds to its last printed digit; allow one unit of it.
            assert abs(got - float(printed)) <= _last_digit_unit(printed), (name, j, got, printed)


def _cosine_alpha_bar_table(num_train: int = 1000) -> list[float]:
    """Cumulative product of the capped cosine betas, written out as a plain loop."""
    def f(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    out, prod = [], 1.0
    for i in range(num_train):
        beta = min(1.0 - f((i + 1) / num_train) / f(i / num_train), 0.999)
        prod *= 1.0 - beta
        out.append(prod)
    return out


@pytest.mark.parametrize(
    "steps, expected_t",
    [
        ("4", [0, 333, 666, 999]),  # stride 999/3 = 333 exactly
        ("ddim4", [0, 250, 500, 750]),  # first integer stride with exactly 4 steps in range(0, 1000, s)
        (5, [0, 250, 500, 749, 999]),  # int = one section; stride 249.75, round(749.25) = 749
    ],
)
def test_other_step_counts_against_formulas(steps: str | int, expected_t: list[int]) -> None:
    sched = IDDPMSchedule.create(steps)
    assert sched.timesteps.tolist() == expected_t
    abar = _cosine_alpha_bar_table()
    prev_abar = 1.0
    for j, t in enumerate(expected_t):
        ab = abar[t]
        beta = 1.0 - ab / prev_abar
        # The respaced alpha-bar telescopes back to the original one at t. (rel 1e-8: near t = 999,
        # 1 - beta' ~ 2e-9 is a cancellation, so the two roundings differ beyond 1e-10.)
        assert sched.alphas_cumprod[j] == pytest.approx(ab, rel=1e-8)
        assert sched.betas[j] == pytest.approx(beta, rel=1e-8)
        assert sched.log_betas[j] == pytest.approx(math.log(beta), rel=1e-8)
        assert sched.sqrt_recip_alphas_cumprod[j] == pytest.approx(math.sqrt(1.0 / ab), rel=1e-8)
        assert sched.sqrt_recipm1_alphas_cumprod[j] == pytest.approx(math.sqrt(1.0 / ab - 1.0), rel=1e-8)
        assert sched.posterior_mean_coef1[j] == pytest.approx(beta * math.sqrt(prev_abar) / (1.0 - ab), rel=1e-8)
        assert sched.posterior_mean_coef2[j] == pytest.approx(
            (1.0 - prev_abar) * math.sqrt(1.0 - beta) / (1.0 - ab), rel=1e-8, abs=1e-15
        )
        prev_abar = ab
    # Clipped posterior log-variance: j >= 1 is log(beta_j (1 - ab_{j-1}) / (1 - ab_j)); j = 0 repeats j = 1.
    for j in range(1, len(expected_t)):
        ab, ab_prev = abar[expected_t[j]], abar[expected_t[j - 1]]
        var = (1.0 - ab / ab_prev) * (1.0 - ab_prev) / (1.0 - ab)
        assert sched.posterior_log_variance_clipped[j] == pytest.approx(math.log(var), rel=1e-8)
    assert sched.posterior_log_variance_clipped[0] == sched.posterior_log_variance_clipped[1]


def test_space_timesteps_rounds_half_to_even() -> None:
    # "7": stride 166.5; the running index hits 166.5, 499.5 and 832.5, and Python's round() gives
    # 166, 500, 832 (half to even), where floor(x + 0.5) would give 167, 500, 833.
    assert space_timesteps(1000, "7") == [0, 166, 333, 500, 666, 832, 999]
    # Several sections: 1000 = 334 + 333 + 333 steps, strided separately.
    assert space_timesteps(1000, "2,1,3") == [0, 333, 334, 667, 833, 999]
    assert space_timesteps(1000, "") == list(range(1000))


@pytest.mark.parametrize("bad", ["1", "ddim1", "ddim999", "eight", "0", "2,x", "1001"])
def test_bad_step_counts_raise(bad: str) -> None:
    with pytest.raises(UsageError):
        IDDPMSchedule.create(bad)


def test_step_against_hand_formula() -> None:
    sched = IDDPMSchedule.create("8")
    rng = np.random.default_rng(0)
    shape = (6, 5)
    x = rng.standard_normal(shape).astype(np.float32) * 2
    eps = rng.standard_normal(shape).astype(np.float32)
    v = rng.uniform(-1, 1, shape).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    temperature = 0.7
    for j in range(sched.num_steps):
        # Written from the IDDPM equations in float64.
        ab = sched.alphas_cumprod[j]
        ab_prev = sched.alphas_cumprod[j - 1] if j > 0 else 1.0
        beta = sched.betas[j]
        x64, eps64 = x.astype(np.float64), eps.astype(np.float64)
        x0 = np.clip(x64 / math.sqrt(ab) - math.sqrt(1.0 / ab - 1.0) * eps64, -1.0, 1.0)
        mean = beta * math.sqrt(ab_prev) / (1 - ab) * x0 + (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab) * x64
        log_min = sched.posterior_log_variance_clipped[j]
        log_var = (v + 1) / 2 * math.log(beta) + (1 - (v + 1) / 2) * log_min
        expected = mean + (j != 0) * np.exp(0.5 * log_var) * noise * temperature
        got = sched.step(j, x, eps, v, noise, temperature=temperature)
        assert got.dtype == np.float32 and got.shape == shape
        # float32 arithmetic; at j = 7 the terms are ~2e4 before clamping, hence the tolerance.
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5, err_msg=f"j={j}")


def test_step_clamps_x0_and_skips_noise_at_zero() -> None:
    sched = IDDPMSchedule.create("8")
    x = np.array([[0.5, -0.5, 0.0]], dtype=np.float32)
    huge = np.array([[-1e4, 1e4, 3.0]], dtype=np.float32)  # eps so large that x0 leaves [-1, 1]
    v = np.zeros_like(x)
    noise = np.full_like(x, 123.0)
    # j = 0: coef1 = 1, coef2 = 0, so the result is the clamped x0 itself, with no noise.
    out0 = sched.step(0, x, huge, v, noise)
    np.testing.assert_array_equal(out0, np.clip(sched.sqrt_recip_alphas_cumprod[0] * x
                                                - sched.sqrt_recipm1_alphas_cumprod[0] * huge, -1, 1)
                                  .astype(np.float32))
    assert out0[0, 0] == 1.0 and out0[0, 1] == -1.0
    # j = 3 with temperature 0: the mean only, built from the clamped x0.
    c1, c2 = sched.posterior_mean_coef1[3], sched.posterior_mean_coef2[3]
    out3 = sched.step(3, x, huge, v, noise, temperature=0.0)
    np.testing.assert_allclose(out3[0, :2], [c1 * 1.0 + c2 * 0.5, c1 * -1.0 + c2 * -0.5], rtol=1e-6)
    # Temperature scales only the noise term.
    a = sched.step(3, x, huge, v, noise, temperature=1.0) - out3
    b = sched.step(3, x, huge, v, noise, temperature=0.5) - out3
    np.testing.assert_allclose(b, a / 2, rtol=1e-4)


def test_as_table_is_json_and_immutable() -> None:
    sched = IDDPMSchedule.create("8")
    table = json.loads(json.dumps(sched.as_table()))
    assert table["timesteps"] == [0, 143, 285, 428, 571, 714, 856, 999]
    assert set(table) == {"timesteps", *SPEC_COLUMNS}
    for name in SPEC_COLUMNS:
        np.testing.assert_array_equal(np.array(table[name]), getattr(sched, name))
    with pytest.raises(ValueError):
        sched.betas[0] = 0.5
    with pytest.raises(AttributeError):
        sched.betas = np.zeros(8)  # type: ignore[misc]
