"""Euler / Heun solvers on analytic velocity fields and on a tiny FlowTransformer."""

from __future__ import annotations

import math

import pytest
import torch

from flowtok.errors import InvalidInputError
from flowtok.flow import FLOW_PRESETS, FlowTransformer
from flowtok.sampling import SAMPLERS, euler_sample, heun_sample, sample, time_grid


class Recorder:
    """Velocity field fn(x, t) that logs every call (batch size, times, indicators)."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, t, null):
        self.calls.append((x.shape[0], t.clone(), null.clone()))
        return self.fn(x, t)


def _x0(b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 8, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _tiny_model() -> FlowTransformer:
    torch.manual_seed(0)
    model = FlowTransformer(FLOW_PRESETS["tiny"]).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(std=0.1)
    return model.eval()


def test_time_grid():
    assert time_grid(4).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert time_grid(2, t_start=0.2, t_end=0.6).tolist() == pytest.approx([0.2, 0.4, 0.6])
    assert time_grid(timesteps=[0.0, 0.9, 1.0]).tolist() == pytest.approx([0.0, 0.9, 1.0])
    assert time_grid(timesteps=[1.0, 0.5, 0.0]).tolist() == [1.0, 0.5, 0.0]
    for bad in ([0.0, 0.5, 0.5], [0.0, 0.6, 0.4], [0.3]):
        with pytest.raises(InvalidInputError):
            time_grid(timesteps=bad)
    for n in (0, -1, 2.5):
        with pytest.raises(InvalidInputError):
            time_grid(n)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_constant_field_is_exact(method):
    v = torch.randn(8, 4, dtype=torch.float64)
    x0 = _x0()
    x1 = sample(lambda x, t, null: v.expand_as(x), x0, method=method, num_steps=7)
    torch.testing.assert_close(x1, x0 + v, rtol=0, atol=1e-12)
    half = sample(lambda x, t, null: v.expand_as(x), x0, method=method, num_steps=3, t_start=0.25, t_end=0.75)
    torch.testing.assert_close(half, x0 + 0.5 * v, rtol=0, atol=1e-12)


def test_euler_grid_is_left_endpoint_i_over_n():
    # v = 2t integrates to x0 + 1; Euler with left endpoints t_i = i/N gives x0 + (N - 1)/N exactly.
    model = Recorder(lambda x, t: 2 * t.view(-1, 1, 1).to(x.dtype).expand_as(x))
    x0 = _x0()
    n = 5
    x1 = euler_sample(model, x0, num_steps=n)
    torch.testing.assert_close(x1, x0 + (n - 1) / n, rtol=0, atol=1e-6)
    assert [c[1][0].item() for c in model.calls] == pytest.approx([i / n for i in range(n)])
    assert all(c[0] == 3 and not c[2].any() for c in model.calls)
    # Heun is exact on fields linear in t.
    torch.testing.assert_close(heun_sample(model, x0, num_steps=2), x0 + 1, rtol=0, atol=1e-6)


def test_custom_timesteps_are_used():
    model = Recorder(lambda x, t: torch.ones_like(x))
    x0 = _x0()
    x1 = euler_sample(model, x0, timesteps=[0.0, 0.5, 0.9, 1.0])
    assert [c[1][0].item() for c in model.calls] == pytest.approx([0.0, 0.5, 0.9])
    torch.testing.assert_close(x1, x0 + 1, rtol=0, atol=1e-6)


def test_heun_beats_euler_on_curved_field():
    x0 = _x0()
    exact = x0 * math.e  # dx/dt = x
    err = {}
    for name in ("euler", "heun"):
        x1 = sample(lambda x, t, null: x, x0, method=name, num_steps=10)
        err[name] = (x1 - exact).abs().max().item()
    euler_closed_form = x0 * (1 + 1 / 10) ** 10
    torch.testing.assert_close(sample(lambda x, t, null: x, x0, num_steps=10), euler_closed_form)
    assert err["heun"] < err["euler"] / 10, err


def test_trajectory():
    x0 = _x0()
    x1, traj = euler_sample(lambda x, t, null: torch.ones_like(x), x0, num_steps=4, return_trajectory=True)
    assert traj.shape == (5, *x0.shape)
    assert torch.equal(traj[0], x0) and torch.equal(traj[-1], x1)
    x1h, traj_h = heun_sample(lambda x, t, null: torch.ones_like(x), x0, num_steps=4, return_trajectory=True)
    assert traj_h.shape == (5, *x0.shape) and torch.equal(traj_h[-1], x1h)


@pytest.mark.parametrize("method", sorted(SAMPLERS))
def test_deterministic_on_model(method):
    model = _tiny_model()
    x0 = _x0()
    a = sample(model, x0, method=method, num_steps=4, guidance_scale=2.0)
    b = sample(model, x0.clone(), method=method, num_steps=4, guidance_scale=2.0)
    assert torch.equal(a, b)
    assert not torch.allclose(a, x0)


def test_guidance_scale_one_is_conditional_only():
    model = _tiny_model()
    rec = Recorder(lambda x, t: model(x, t, torch.zeros(x.shape[0], dtype=torch.bool)))
    x0 = _x0()
    out = euler_sample(rec, x0, num_steps=3, guidance_scale=1.0)
    assert [c[0] for c in rec.calls] == [3, 3, 3]
    assert not any(c[2].any() for c in rec.calls)
    # the same as a hand-written loop of conditional predictions
    grid, x = time_grid(3), x0
    for i in range(3):
        x = x + (grid[i + 1] - grid[i]) * model(x, grid[i].expand(3), torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)


def test_batched_cfg_equals_separate_calls():
    model = _tiny_model()
    calls = []

    def counted(x, t, null):
        calls.append((x.shape[0], null.tolist()))
        return model(x, t, null)

    x0, s, n = _x0(), 3.0, 4
    out = euler_sample(counted, x0, num_steps=n, guidance_scale=s)
    assert calls == [(6, [False] * 3 + [True] * 3)] * n  # one fused forward per step
    grid = time_grid(n)
    x = x0
    for i in range(n):
        t = grid[i].expand(3)
        v_cond = model(x, t, torch.zeros(3, dtype=torch.bool))
        v_null = model(x, t, torch.ones(3, dtype=torch.bool))
        x = x + (grid[i + 1] - grid[i]) * (v_null + s * (v_cond - v_null))
    torch.testing.assert_close(out, x, rtol=1e-10, atol=1e-10)


def test_sampler_errors():
    x0 = _x0()
    with pytest.raises(InvalidInputError, match="unknown sampling method"):
        sample(lambda x, t, null: x, x0, method="rk4")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        euler_sample(lambda x, t, null: x, x0, guidance_scale=torch.tensor(2.0))  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        euler_sample(lambda x, t, null: x, torch.zeros(3))
