"""The residual diffusion head: the MLP against a hand-written re-computation, and the torch sampler
against a numpy loop over IDDPMSchedule.step that carries both CFG halves the way upstream does."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hartkit.loop.schedule import IDDPMSchedule
from hartkit.model.diffusion import DiffLoss, SimpleMLPAdaLN, p_sample_step

CVAE, CZ, WIDTH, DEPTH = 4, 12, 16, 2


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    """Non-trivial values everywhere (LayerNorm affine included) so every term shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _tiny_diffloss(seed: int = 0, steps: str = "8") -> DiffLoss:
    model = DiffLoss(target_channels=CVAE, z_channels=CZ, width=WIDTH, depth=DEPTH, num_sampling_steps=steps)
    _randomize(model, seed)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# The net


def _manual_net(sd: dict[str, np.ndarray], x: np.ndarray, t: np.ndarray, c: np.ndarray, depth: int) -> np.ndarray:
    """SimpleMLPAdaLN from the upstream description, float64, explicit loops where it helps."""
    def linear(prefix: str, a: np.ndarray) -> np.ndarray:
        return a @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]

    def silu(a: np.ndarray) -> np.ndarray:
        return a / (1.0 + np.exp(-a))

    def layer_norm(a: np.ndarray) -> np.ndarray:
        mu = a.mean(-1, keepdims=True)
        var = ((a - mu) ** 2).mean(-1, keepdims=True)  # biased, as LayerNorm
        return (a - mu) / np.sqrt(var + 1e-6)

    # 256 sinusoidal features: cos(t w_k) for k < 128, then sin(t w_k); w_k = 10000^(-k/128).
    feats = np.zeros((len(t), 256))
    for n, tn in enumerate(t):
        for k in range(128):
            w = math.exp(-math.log(10000.0) * k / 128)
            feats[n, k] = math.cos(tn * w)
            feats[n, 128 + k] = math.sin(tn * w)
    temb = linear("time_embed.mlp.2", silu(linear("time_embed.mlp.0", feats)))
    y = temb + linear("cond_embed", c)
    h = linear("input_proj", x)
    w = h.shape[1]
    for k in range(depth):
        p = f"res_blocks.{k}"
        mod = linear(p + ".adaLN_modulation.1", silu(y))
        shift, scale, gate = mod[:, :w], mod[:, w:2 * w], mod[:, 2 * w:]
        u = layer_norm(h) * sd[p + ".in_ln.weight"] + sd[p + ".in_ln.bias"]
        u = u * (1 + scale) + shift
        h = h + gate * linear(p + ".mlp.2", silu(linear(p + ".mlp.0", u)))
    mod = linear("final_layer.adaLN_modulation.1", silu(y))
    shift, scale = mod[:, :w], mod[:, w:]
    return linear("final_layer.linear", layer_norm(h) * (1 + scale) + shift)


def test_net_matches_manual_recomputation() -> None:
    net = SimpleMLPAdaLN(in_channels=CVAE, model_channels=WIDTH, out_channels=2 * CVAE, z_channels=CZ,
                         num_res_blocks=DEPTH)
    _randomize(net, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, CVAE, generator=g)
    c = torch.randn(5, CZ, generator=g)
    t = torch.tensor([0, 143, 571, 856, 999])  # integer timesteps, as upstream feeds them
    with torch.no_grad():
        got = net(x, t, c)
    sd = {k: v.double().numpy() for k, v in net.state_dict().items()}
    expected = _manual_net(sd, x.double().numpy(), t.numpy().astype(np.float64), c.double().numpy(), DEPTH)
    assert got.shape == (5, 2 * CVAE)
    # float32 sin/cos of t up to 999 lose ~1e-4 absolute; the rest is float32 rounding.
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-3, atol=1e-3)
    assert np.abs(expected).max() > 0.1  # the comparison is not trivially between zeros


def test_embed_split_and_timestep_broadcast() -> None:
    net = _tiny_diffloss(seed=3).net
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, CVAE, generator=g)
    c = torch.randn(6, CZ, generator=g)
    with torch.no_grad():
        full = net(x, torch.full((6,), 428), c)
        split = net.forward_embedded(x, net.embed(torch.tensor([428.0]), c))  # t as [1], broadcast
        other_t = net(x, torch.full((6,), 429), c)
    # A 1-row matmul may take another BLAS path than a 6-row one: equal up to float32 rounding.
    torch.testing.assert_close(split, full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other_t, full)  # t actually matters


def _expected_state_dict_shapes(c: int, w: int, cvae: int, depth: int) -> dict[str, tuple[int, ...]]:
    """Spec §5.1's diffloss.net.* table, written out."""
    shapes = {
        "time_embed.mlp.0.weight": (w, 256), "time_embed.mlp.0.bias": (w,),
        "time_embed.mlp.2.weight": (w, w), "time_embed.mlp.2.bias": (w,),
        "cond_embed.weight": (w, c), "cond_embed.bias": (w,),
        "input_proj.weight": (w, cvae), "input_proj.bias": (w,),
        "final_layer.adaLN_modulation.1.weight": (2 * w, w), "final_layer.adaLN_modulation.1.bias": (2 * w,),
        "final_layer.linear.weight": (2 * cvae, w), "final_layer.linear.bias": (2 * cvae,),
    }
    for k in range(depth):
        p = f"res_blocks.{k}."
        shapes.update({
            p + "in_ln.weight": (w,), p + "in_ln.bias": (w,),
            p + "mlp.0.weight": (w, w), p + "mlp.0.bias": (w,),
            p + "mlp.2.weight": (w, w), p + "mlp.2.bias": (w,),
            p + "adaLN_modulation.1.weight": (3 * w, w), p + "adaLN_modulation.1.bias": (3 * w,),
        })
    return {"net." + k: v for k, v in shapes.items()}


def test_full_size_keys_shapes_and_param_count() -> None:
    with torch.device("meta"):
        model = DiffLoss(target_channels=32, z_channels=1536, width=1024, depth=6, num_sampling_steps="8")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _expected_state_dict_shapes(1536, 1024, 32, 6)  # no buffers, nothing extra
    total = sum(p.numel() for p in model.parameters())
    assert total == sum(math.prod(s) for s in got.values()) == 36_585_536
    assert round(total / 1e6, 2) == 36.59  # spec §5.1 / the paper's "37M"


# ----------------------------------------------------------------------------------------------
# The sampler


def _numpy_reference_sample(
    model: DiffLoss, z: torch.Tensor, cfg: float, noise_init: np.ndarray, step_noise: np.ndarray,
    uncond_noise: np.ndarray, temperature: float = 1.0, force_guidance: bool = False,
) -> np.ndarray:
    """Upstream's p_sample_loop, step by step: 2N rows x = [n; n], the net on [x_cond; x_cond] with
    per-row integer t (forward_with_cfg), the update from IDDPMSchedule.step on all 2N rows with
    independent noise for the uncond half; then x * 0.6, cond half."""
    sched: IDDPMSchedule = model.schedule
    n = noise_init.shape[0]
    guided = force_guidance or cfg != 1.0
    x = np.concatenate([noise_init, noise_init]) if guided else np.concatenate([noise_init, uncond_noise[-1]])
    for i, j in enumerate(reversed(range(sched.num_steps))):
        t = torch.full((2 * n,), int(sched.timesteps[j]), dtype=torch.int64)
        with torch.no_grad():
            if guided:
                half = torch.from_numpy(x[:n])
                out = model.net(torch.cat([half, half]), t, z).numpy()
                eps_c, eps_u = out[:n, :CVAE], out[n:, :CVAE]
                half_eps = eps_c * np.float32(1 + cfg) - np.float32(cfg) * eps_u
                eps = np.concatenate([half_eps, half_eps])
            else:
                out = model.net(torch.from_numpy(x), t, z).numpy()
                eps = out[:, :CVAE]
        v = out[:, CVAE:]
        noise = np.concatenate([step_noise[i], uncond_noise[i]])
        x = sched.step(j, x, eps, v, noise, temperature=temperature)
    return (x * np.float32(0.6))[:n]


def _draws(n: int, steps: int = 8, seed: int = 5):
    rng = np.random.default_rng(seed)
    z = torch.from_numpy(rng.standard_normal((2 * n, CZ)).astype(np.float32))
    noise_init = rng.standard_normal((n, CVAE)).astype(np.float32)
    step_noise = rng.standard_normal((steps, n, CVAE)).astype(np.float32)
    uncond_noise = rng.standard_normal((steps, n, CVAE)).astype(np.float32)
    return z, noise_init, step_noise, uncond_noise


@pytest.mark.parametrize("cfg, temperature", [(4.5 * 12 / 13, 1.0), (0.3, 0.8)])
def test_sample_matches_numpy_loop(cfg: float, temperature: float) -> None:
    model = _tiny_diffloss(seed=6)
    n = 7
    z, noise_init, step_noise, uncond_noise = _draws(n)
    with torch.no_grad():
        got = model.sample(z, cfg, torch.from_numpy(noise_init), torch.from_numpy(step_noise), temperature)
    expected = _numpy_reference_sample(model, z, cfg, noise_init, step_noise, uncond_noise, temperature)
    assert got.dtype == torch.float32 and got.shape == (n, CVAE)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-5)
    # The clamp and the 0.6 scale bound the residual; a random head saturates some of it.
    assert np.abs(expected).max() <= 0.6 + 1e-6
    assert 0.0 < np.abs(got.numpy()).std()


def test_cfg_exactly_one_skips_guidance() -> None:
    model = _tiny_diffloss(seed=7)
    n = 5
    z, noise_init, step_noise, uncond_noise = _draws(n, seed=8)
    args = (torch.from_numpy(noise_init), torch.from_numpy(step_noise))
    with torch.no_grad():
        got = model.sample(z, 1.0, *args)
        got_cond_rows_only = model.sample(z[:n], 1.0, *args)  # the uncond rows are never needed
    unguided = _numpy_reference_sample(model, z, 1.0, noise_init, step_noise, uncond_noise)
    formula_at_one = _numpy_reference_sample(model, z, 1.0, noise_init, step_noise, uncond_noise,
                                             force_guidance=True)
    np.testing.assert_allclose(got.numpy(), unguided, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_cond_rows_only, got)
    # Upstream's quirk: cfg == 1.0 is not "(1 + 1) eps_c - eps_u"; it switches guidance off.
    assert np.abs(got.numpy() - formula_at_one).max() > 1e-2


def test_temperature_zero_ignores_step_noise_and_last_noise_unused() -> None:
    model = _tiny_diffloss(seed=9)
    n = 3
    z, noise_init, step_noise, _ = _draws(n, seed=10)
    other = step_noise.copy()
    other[:-1] += 1.0
    last_changed = step_noise.copy()
    last_changed[-1] += 5.0  # step_noise[S-1] is the draw for j = 0, multiplied by zero upstream
    with torch.no_grad():
        def run(noise: np.ndarray, temperature: float) -> torch.Tensor:
            return model.sample(z, 2.0, torch.from_numpy(noise_init), torch.from_numpy(noise), temperature)
        torch.testing.assert_close(run(step_noise, 0.0), run(other, 0.0))
        torch.testing.assert_close(run(step_noise, 1.0), run(last_changed, 1.0))
        assert not torch.allclose(run(step_noise, 1.0), run(other, 1.0))


def test_clamping_bounds_the_output() -> None:
    model = _tiny_diffloss(seed=11)
    with torch.no_grad():  # eps enormous: x0 = sqrt(1/ab) x - sqrt(1/ab - 1) eps is far outside [-1, 1]
        model.net.final_layer.linear.bias[:CVAE] = torch.tensor([1e3, -1e3, 1e3, -1e3])
    n = 4
    z, noise_init, step_noise, _ = _draws(n, seed=12)
    with torch.no_grad():
        got = model.sample(z, 2.0, torch.from_numpy(noise_init), torch.from_numpy(step_noise))
    # Last step: coef1 = 1, coef2 = 0 and no noise, so the output is the clamped x0 times 0.6.
    assert torch.equal(got, torch.full_like(got, 0.6) * torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    # And the torch step alone agrees with clamping at j = 0 directly.
    x = torch.tensor([[0.2, -0.3]])
    out = p_sample_step(model.schedule, 0, x, torch.tensor([[-500.0, 500.0]]), torch.zeros(1, 2), torch.zeros(1, 2))
    assert torch.equal(out, torch.tensor([[1.0, -1.0]]))


def test_other_step_count_and_shape_errors() -> None:
    model = _tiny_diffloss(seed=13, steps="4")
    assert model.schedule.timesteps.tolist() == [0, 333, 666, 999]
    n = 2
    z, noise_init, step_noise, uncond_noise = _draws(n, steps=4, seed=14)
    with torch.no_grad():
        got = model.sample(z, 1.5, torch.from_numpy(noise_init), torch.from_numpy(step_noise))
        expected = _numpy_reference_sample(model, z, 1.5, noise_init, step_noise, uncond_noise)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="step_noise"):
            model.sample(z, 1.5, torch.from_numpy(noise_init), torch.from_numpy(step_noise[:3]))
        with pytest.raises(ValueError, match="2N"):
            model.sample(z[:n], 1.5, torch.from_numpy(noise_init), torch.from_numpy(step_noise))
