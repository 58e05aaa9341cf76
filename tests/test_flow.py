"""FlowTransformer, its size registry and the flow-matching objective, on tiny configs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flowtok.config import from_dict, preset
from flowtok.errors import ConfigError, InvalidInputError
from flowtok.flow import (
    FLOW_PRESETS,
    FlowConfig,
    FlowObjective,
    FlowTransformer,
    binned_losses,
    flop_count,
)
from flowtok.text.projector import PROJECTOR_PRESETS, TextProjector

TINY = FLOW_PRESETS["tiny"]


def _perturbed(config: FlowConfig = TINY, seed: int = 0) -> FlowTransformer:
    """A tiny model whose zero-initialised layers are given random values, so outputs are non-trivial."""
    torch.manual_seed(seed)
    model = FlowTransformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(std=0.05)
    return model


def _batch(b: int = 3, config: FlowConfig = TINY, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, config.num_tokens, config.in_channels, generator=g)
    t = torch.rand(b, generator=g)
    null = torch.tensor([0, 1, 0][:b] + [0] * max(0, b - 3), dtype=torch.long)
    return x, t, null


def test_forward_shape_and_zero_init():
    model = FlowTransformer(TINY)
    x, t, null = _batch()
    v = model(x, t, null)
    assert v.shape == x.shape
    assert torch.count_nonzero(v) == 0  # adaLN-Zero final layer: v = 0 at init
    assert torch.equal(model(x, t, null.bool()), v)  # bool and long indicators are the same thing


def test_condition_changes_output():
    model = _perturbed()
    x, t, _ = _batch()
    zeros = torch.zeros(3, dtype=torch.long)
    v_cond, v_null = model(x, t, zeros), model(x, t, torch.ones(3, dtype=torch.long))
    v_later = model(x, (t + 0.3) % 1, zeros)
    assert not torch.allclose(v_cond, v_null)
    assert not torch.allclose(v_cond, v_later)


def test_positions_are_fixed_sincos_and_time_is_unscaled():
    cfg = from_dict(FlowConfig, {"num_tokens": 5, "in_channels": 2, "width": 8, "depth": 1, "num_heads": 2})
    model = FlowTransformer(cfg)
    pe = model.pos_embed[0]
    assert pe.shape == (5, 8)
    assert torch.equal(pe[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    # position p, channel i < D/2: sin(p / 10000^(2i/D)); channel D/2 + i: the cos of the same.
    for p, i in [(3, 0), (4, 1), (2, 3)]:
        angle = p / 10000 ** (2 * i / 8)
        assert pe[p, i].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert pe[p, 4 + i].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert not any(n == "pos_embed" for n, _ in model.named_parameters())
    assert "pos_embed" in model.state_dict()
    assert model.t_embedder.scale == 1.0  # upstream feeds t in [0, 1] straight into the sinusoid


def test_upstream_layout_names():
    model = FlowTransformer(TINY)
    keys = set(model.state_dict())
    for key in ["x_embedder.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias", "null_embedder.weight",
                "blocks.1.attn.qkv.bias", "blocks.1.attn.proj.weight", "blocks.1.mlp.fc1.weight",
                "blocks.1.mlp.fc2.bias", "blocks.1.adaLN_modulation.1.weight", "final_layer.linear.weight",
                "final_layer.adaLN_modulation.1.bias", "pos_embed"]:
        assert key in keys, key
    d = TINY.width
    assert model.blocks[0].adaLN_modulation[1].weight.shape == (6 * d, d)
    assert model.final_layer.adaLN_modulation[1].weight.shape == (2 * d, d)
    assert model.null_embedder.weight.shape == (2, d)
    assert all(not m.elementwise_affine and m.eps == 1e-6
               for m in model.modules() if isinstance(m, torch.nn.LayerNorm))


def test_config_errors():
    with pytest.raises(ConfigError, match="divisible"):
        FlowConfig(width=30, num_heads=4)
    with pytest.raises(ConfigError, match="unknown config key 'depht'"):
        from_dict(FlowConfig, {"depht": 3})
    with pytest.raises(ConfigError, match="unknown flow preset"):
        preset(FLOW_PRESETS, "FlowTok-XXL")
    assert preset(FLOW_PRESETS, "tiny", depth=3).depth == 3


def test_save_and_load_roundtrip(tmp_path):
    model = _perturbed()
    model.save_pretrained(tmp_path)
    loaded = FlowTransformer.from_pretrained(tmp_path)
    x, t, null = _batch()
    assert loaded.config == model.config
    assert torch.equal(loaded(x, t, null), model.eval()(x, t, null))


def test_gradient_checkpointing_same_gradients():
    x, t, null = _batch()
    grads = []
    for ckpt in (False, True):
        model = _perturbed(seed=3)
        model.set_grad_checkpointing(ckpt)
        model(x, t, null).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_flop_count_matches_torch_counter():
    cfg = preset(FLOW_PRESETS, "tiny", num_tokens=16, width=64, num_heads=4)
    model = _perturbed(cfg)
    x, t, null = _batch(b=2, config=cfg)
    # The math backend spells attention as bmm, which the counter sees (the fused CPU kernel it does not).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, null)
    measured = counter.get_total_flops()
    assert flop_count(cfg, batch=2) == measured
    assert model.forward_flops(2) == flop_count(cfg, 2)


def _projector_params() -> int:
    """Parameters of the paper's text projector (24.3M), which the paper's counts include."""
    with torch.device("meta"):
        return TextProjector(PROJECTOR_PRESETS["paper"]).num_params()


@pytest.mark.parametrize("name,paper", [("FlowTok-B", 153e6), ("FlowTok-XL", 698e6), ("FlowTok-H", 1.1e9)])
def test_paper_parameter_counts(name, paper):
    with torch.device("meta"):
        model = FlowTransformer(FLOW_PRESETS[name])
    total = model.num_params() + _projector_params()
    assert abs(total - paper) / paper < 0.03, (name, total)


def test_shapes_preset_is_small():
    with torch.device("meta"):
        model = FlowTransformer(FLOW_PRESETS["shapes"])
    assert model.config.num_tokens == 32 and model.config.in_channels == 16
    assert model.num_params() <= 10_500_000


# ---- objective ------------------------------------------------------------------------------------------


def test_path_endpoints_and_velocity():
    obj = FlowObjective(sigma_min=1e-2)
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(4, 8, 4, generator=g), torch.randn(4, 8, 4, generator=g)
    torch.testing.assert_close(obj.interpolate(x0, x1, torch.zeros(4)), x0)
    torch.testing.assert_close(obj.interpolate(x0, x1, torch.ones(4)), x1 + 1e-2 * x0)
    t, h = torch.full((4,), 0.3, dtype=torch.float64), 1e-6
    x0d, x1d = x0.double(), x1.double()
    fd = (obj.interpolate(x0d, x1d, t + h) - obj.interpolate(x0d, x1d, t)) / h
    torch.testing.assert_close(fd, obj.target_velocity(x0d, x1d), rtol=1e-6, atol=1e-6)


def test_time_samplers():
    g = torch.Generator().manual_seed(0)
    t = FlowObjective(t_sampler="logit_normal").sample_t(20000, generator=g)
    assert t.min() > 0 and t.max() < 1
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)
    assert ((t > 0.25) & (t < 0.75)).float().mean() > 0.6  # mass concentrated in the middle
    u = FlowObjective(t_sampler="uniform").sample_t(20000, generator=g)
    assert ((u > 0.25) & (u < 0.75)).float().mean().item() == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ConfigError):
        FlowObjective(t_sampler="cosine")  # type: ignore[arg-type]


def test_null_indicator_fraction():
    null = FlowObjective(null_prob=0.1).make_null_indicator(20000, torch.Generator().manual_seed(0))
    assert null.dtype == torch.bool
    assert null.float().mean().item() == pytest.approx(0.1, abs=0.01)
    # One flagged sample cannot be rolled onto another: then none is flagged (as upstream).
    assert not FlowObjective(null_prob=1.0).make_null_indicator(1).any()
    assert FlowObjective(null_prob=1.0).make_null_indicator(2).all()
    assert not FlowObjective(null_prob=0.0).make_null_indicator(100).any()


def test_roll_null_targets_exact():
    x1 = torch.arange(8.0).view(8, 1, 1).expand(8, 3, 2)
    null = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
    rolled = FlowObjective.roll_null_targets(x1, null)
    # flagged 1, 3, 4, 7 take the targets of 3, 4, 7, 1; the others keep their own
    assert rolled[:, 0, 0].tolist() == [0, 3, 2, 4, 7, 5, 6, 1]
    assert torch.equal(FlowObjective.roll_null_targets(x1, torch.zeros(8, dtype=torch.bool)), x1)


def test_loss_uses_indicator_and_rolled_targets():
    obj = FlowObjective(null_prob=0.5, sigma_min=0.0)
    g = torch.Generator().manual_seed(4)
    x0, x1 = torch.randn(16, 8, 4, generator=g), torch.randn(16, 8, 4, generator=g)
    seen = {}

    def model(x, t, null):
        seen.update(x=x, t=t, null=null)
        return torch.zeros_like(x)

    loss, info = obj.loss(model, x0, x1, generator=torch.Generator().manual_seed(5))
    null = info["null_indicator"]
    assert null.any() and not null.all()
    target = FlowObjective.roll_null_targets(x1, null) - x0
    torch.testing.assert_close(info["per_sample_loss"], target.square().mean(dim=(1, 2)))
    torch.testing.assert_close(loss, target.square().mean())
    assert torch.equal(seen["null"], null) and torch.equal(seen["t"], info["t"])
    torch.testing.assert_close(seen["x"], obj.interpolate(x0, FlowObjective.roll_null_targets(x1, null), info["t"]))
    with pytest.raises(InvalidInputError):
        obj.loss(model, x0, x1[:, :4])


def test_loss_falls_on_fixed_batch():
    torch.manual_seed(0)
    model = FlowTransformer(TINY)
    obj = FlowObjective()
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(16, 8, 4, generator=g), torch.randn(16, 8, 4, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, _ = obj.loss(model, x0, x1, generator=torch.Generator().manual_seed(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_binned_losses():
    t = torch.tensor([0.1, 0.2, 0.6, 0.99, 1.0])
    per = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0])
    out = binned_losses(t, per, bins=4)
    assert out == {"t0.00-0.25": 2.0, "t0.50-0.75": 5.0, "t0.75-1.00": 8.0}
