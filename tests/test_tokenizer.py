"""The FlowTiTok image tokenizer, its 2D RoPE and its losses, on the tiny preset (CPU, seconds)."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from flowtok.config import from_dict, preset
from flowtok.errors import ConfigError, InvalidInputError
from flowtok.modeling import atomic_save_safetensors
from flowtok.nn import SwiGLU, count_parameters
from flowtok.nn.rope import RotaryEmbedding2D
from flowtok.tokenizer import (
    TOKENIZER_PRESETS,
    DiagonalGaussian,
    ImageTokenizer,
    PatchDiscriminator,
    TokenizerConfig,
    TokenizerLoss,
    TokenizerLossConfig,
    VGGPerceptualLoss,
    hinge_discriminator_loss,
    latent_scale_factor,
    lecam_regularizer,
    tokenizer_param_counts,
)

TINY = TOKENIZER_PRESETS["tiny"]


@pytest.fixture
def model() -> ImageTokenizer:
    torch.manual_seed(0)
    return ImageTokenizer(TINY).eval()


def images(b: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, TINY.image_size, TINY.image_size, generator=g)


def text(b: int = 2) -> torch.Tensor:
    return torch.randn(b, TINY.text_len, TINY.text_dim, generator=torch.Generator().manual_seed(1))


def test_the_tokenizer_owns_its_latent_scale_and_text_path() -> None:
    """The flows' side of the tokenizer: scaled latents in, clamped images out, text states passed only
    to a decoder that reads them."""
    x = images()
    torch.manual_seed(0)
    model = ImageTokenizer(replace(TINY, scale_factor=2.5)).eval()
    z = model.encode_for_flow(x)
    torch.testing.assert_close(z, model.encode(x) * 2.5)
    assert model.reads_text
    out = model.decode_from_flow(z, text())
    torch.testing.assert_close(out, model.decode(z / 2.5, text()).clamp(0, 1))
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, model.decode_from_flow(z))  # the text states were really read
    torch.testing.assert_close(model.reconstruct(x, text()), model.decode(model.encode(x), text()).clamp(0, 1))
    blind = ImageTokenizer(replace(TINY, text_dim=0)).eval()
    assert not blind.reads_text
    zb = blind.encode_for_flow(x)
    # a text-blind decoder is handed the text states all the same and ignores them, where decode() refuses
    torch.testing.assert_close(blind.decode_from_flow(zb, text()), blind.decode_from_flow(zb))


# -- shapes and the posterior ---------------------------------------------------------------------

def test_encode_decode_shapes(model: ImageTokenizer) -> None:
    x = images(3)
    z = model.encode(x)
    assert z.shape == (3, TINY.num_latent_tokens, TINY.token_channels)
    assert z.dtype == torch.float32
    assert model.decode(z, text(3)).shape == x.shape
    recon, posterior = model(x, text(3))
    assert recon.shape == x.shape and posterior.mean.shape == z.shape
    assert model.scale_factor == pytest.approx(1.0143)
    assert model.latent_shape == (TINY.num_latent_tokens, TINY.token_channels)


def test_decode_without_text_uses_zero_states(model: ImageTokenizer) -> None:
    z = model.encode(images())
    zeros = torch.zeros(2, TINY.text_len, TINY.text_dim)
    assert torch.equal(model.decode(z), model.decode(z, zeros))
    assert not torch.allclose(model.decode(z), model.decode(z, text()))  # the text path is really read


def test_decoder_without_text_path() -> None:
    cfg = replace(TINY, text_dim=0)
    m = ImageTokenizer(cfg).eval()
    z = m.encode(images())
    assert m.decode(z).shape == (2, 3, cfg.image_size, cfg.image_size)
    assert not any("text" in k for k in m.state_dict())
    with pytest.raises(InvalidInputError, match="reads no text"):
        m.decode(z, text())


def test_encode_mode_is_deterministic_and_sample_is_not(model: ImageTokenizer) -> None:
    x = images()
    assert torch.equal(model.encode(x), model.encode(x))
    a = model.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    b = model.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    c = model.encode(x, sample=True, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, model.encode(x))


def test_kl_non_negative_and_zero_at_prior() -> None:
    moments = torch.randn(4, 5, 6) * 3
    assert (DiagonalGaussian(moments).kl() >= 0).all()
    prior = DiagonalGaussian(torch.zeros(2, 5, 6))
    assert torch.equal(prior.kl(), torch.zeros(2))
    # per-sample sum over K x C: one unit of mean gives 0.5 per value
    assert torch.allclose(DiagonalGaussian(torch.cat([torch.ones(1, 5, 3), torch.zeros(1, 5, 3)], -1)).kl(),
                          torch.tensor([0.5 * 15]))


def test_logvar_is_clamped(model: ImageTokenizer) -> None:
    moments = torch.cat([torch.zeros(1, 2, 3), torch.tensor([[[100.0, -100.0, 1.0]] * 2])], dim=-1)
    post = DiagonalGaussian(moments, logvar_min=-30.0, logvar_max=20.0)
    assert post.logvar[0, 0].tolist() == [20.0, -30.0, 1.0]
    assert torch.isfinite(post.var).all() and torch.isfinite(post.kl()).all()
    # through the model: a huge logvar bias is clamped at the configured bound
    c = TINY.token_channels
    with torch.no_grad():
        model.encoder.to_moments.bias[c:] = 1e4
    post = model.encode_posterior(images())
    assert post.logvar.max().item() == TINY.logvar_max
    assert torch.isfinite(post.kl()).all()


def test_latent_scale_factor() -> None:
    z = torch.randn(64, 8, 4, generator=torch.Generator().manual_seed(0)) * 0.25
    assert latent_scale_factor(z) == pytest.approx(4.0, rel=0.05)
    with pytest.raises(InvalidInputError):
        latent_scale_factor(torch.zeros(2, 3, 4))


# -- save / load ---------------------------------------------------------------------------------

def test_save_and_load_is_bit_exact(model: ImageTokenizer, tmp_path) -> None:
    x, t = images(), text()
    model.save_pretrained(tmp_path / "tok")
    loaded = ImageTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.config == model.config
    z = model.encode(x)
    assert torch.equal(loaded.encode(x), z)
    assert torch.equal(loaded.decode(z, t), model.decode(z, t))
    # RoPE tables are derived, not saved
    assert not any("rope" in k for k in model.state_dict())


# -- input errors --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.rand(3, 32, 32), r"\[B, 3"),
        (torch.rand(2, 1, 32, 32), r"\[B, 3"),
        (torch.rand(2, 3, 64, 64), "32x32"),
        (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
        (torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), "float"),
        (torch.rand(1, 3, 32, 32) * 255, r"\[0, 1\]"),
        (torch.rand(1, 3, 32, 32) * 2 - 1, r"\[0, 1\]"),
        ([[0.0]], "torch.Tensor"),
    ],
)
def test_bad_images_raise_one_line(model: ImageTokenizer, bad, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match) as info:
        model.encode(bad)
    assert "\n" not in str(info.value)


def test_bad_latents_and_text_raise(model: ImageTokenizer) -> None:
    with pytest.raises(InvalidInputError, match="latents must be"):
        model.decode(torch.zeros(2, TINY.num_latent_tokens + 1, TINY.token_channels))
    z = model.encode(images())
    with pytest.raises(InvalidInputError, match="text_states must be"):
        model.decode(z, torch.zeros(2, TINY.text_len, TINY.text_dim + 1))
    with pytest.raises(InvalidInputError, match="text_states must be"):
        model.decode(z, torch.zeros(3, TINY.text_len, TINY.text_dim))


def test_slight_overshoot_is_accepted(model: ImageTokenizer) -> None:
    x = images() * 1.1 - 0.05  # bicubic resizing rings a little past [0, 1]
    assert model.encode(x).shape[0] == 2


# -- config and presets --------------------------------------------------------------------------

def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="not divisible by patch_size"):
        TokenizerConfig(image_size=100, patch_size=16)
    with pytest.raises(ConfigError, match="divisible by 4"):
        TokenizerConfig(encoder_width=36, encoder_heads=6)  # head width 6
    with pytest.raises(ConfigError, match="logvar_min"):
        TokenizerConfig(logvar_min=1.0, logvar_max=0.0)
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(TokenizerConfig, {"image_sise": 256})
    with pytest.raises(ConfigError, match="unknown tokenizer preset"):
        preset(TOKENIZER_PRESETS, "nope")
    assert from_dict(TokenizerConfig, {"image_size": 512}) == TOKENIZER_PRESETS["flowtitok-512"]


def test_paper_parameter_counts_on_meta_device() -> None:
    counts = tokenizer_param_counts("flowtitok-256")
    # ViT-B-sized encoder (~86M) and ViT-L-sized decoder (~304M). The exact numbers equal those of
    # the upstream FlowTiTok module built with the same settings (checked once against its code).
    assert 80e6 < counts["encoder"] < 90e6 and 295e6 < counts["decoder"] < 310e6
    assert counts == {"encoder": 85_803_296, "decoder": 304_047_924, "total": 389_851_220}
    # The 512 px tokenizer has the same weights shapes: only the derived RoPE tables grow.
    assert tokenizer_param_counts("flowtitok-512") == counts
    assert tokenizer_param_counts("shapes-128")["total"] <= 10_000_000
    assert tokenizer_param_counts("tiny")["total"] < 100_000


def test_paper_swiglu_widths() -> None:
    with torch.device("meta"):
        m = ImageTokenizer(replace(TINY, encoder_width=768, encoder_heads=12, decoder_width=1024, decoder_heads=16))
    assert m.encoder.blocks[0].mlp.w3.in_features == 2048
    dec = m.decoder.blocks[0].mlp
    assert dec.hidden == 2730 and dec.w3.in_features == 2752  # held padded to a multiple of 64
    sd = m.state_dict()  # checkpoints keep the released (unpadded) shapes
    assert tuple(sd["decoder.blocks.0.mlp.w12.weight"].shape) == (2 * 2730, 1024)
    assert tuple(sd["decoder.blocks.0.mlp.w3.weight"].shape) == (1024, 2730)


def test_swiglu_padding_changes_nothing() -> None:
    torch.manual_seed(0)
    plain = SwiGLU(48, 85, multiple_of=1)
    padded = SwiGLU(48, 85)
    assert padded.padded == 128
    padded.load_state_dict(plain.state_dict())
    x = torch.randn(3, 5, 48)
    torch.testing.assert_close(padded(x), plain(x), rtol=0, atol=1e-6)
    # Training keeps the padding at zero, and the state dict round-trips to the unpadded layer.
    opt = torch.optim.AdamW(padded.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        padded(x).square().mean().backward()
        opt.step()
    assert padded.w12.weight[85:128].abs().max() == 0 and padded.w12.weight[213:].abs().max() == 0
    assert padded.w3.weight[:, 85:].abs().max() == 0
    plain.load_state_dict(padded.state_dict())
    torch.testing.assert_close(plain(x), padded(x), rtol=0, atol=1e-6)
    assert count_parameters(padded) == count_parameters(plain) == sum(p.numel() for p in plain.parameters())


# -- RoPE ----------------------------------------------------------------------------------------

def test_rope_touches_only_grid_tokens_and_keeps_norms() -> None:
    rope = RotaryEmbedding2D(head_dim=16, grid=4)
    q = torch.randn(2, 3, 16 + 5, 16)
    rq, rk = rope(q, q.clone())
    assert torch.equal(rq[:, :, 16:], q[:, :, 16:])
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    assert torch.equal(rq[:, :, 0], q[:, :, 0])  # position (0, 0) is not rotated
    assert torch.equal(rq, rk)


def test_rope_scores_depend_on_relative_position_only() -> None:
    grid, d = 6, 16
    rope = RotaryEmbedding2D(head_dim=d, grid=grid)
    q, k = torch.randn(d), torch.randn(d)

    def score(qpos: tuple[int, int], kpos: tuple[int, int]) -> torch.Tensor:
        seq_q = torch.zeros(grid * grid, d)
        seq_k = torch.zeros(grid * grid, d)
        seq_q[qpos[0] * grid + qpos[1]] = q
        seq_k[kpos[0] * grid + kpos[1]] = k
        return rope.rotate(seq_q)[qpos[0] * grid + qpos[1]] @ rope.rotate(seq_k)[kpos[0] * grid + kpos[1]]

    assert torch.allclose(score((1, 2), (3, 1)), score((2, 4), (4, 3)), atol=1e-5)
    assert not torch.allclose(score((1, 2), (3, 1)), score((1, 2), (1, 3)), atol=1e-3)


def test_rope_layout_first_half_rows_second_half_columns() -> None:
    rope = RotaryEmbedding2D(head_dim=8, grid=3)
    angles = torch.atan2(rope.sin, rope.cos)
    row1_col0 = angles[1 * 3 + 0]
    row0_col1 = angles[0 * 3 + 1]
    # adjacent channels share a frequency; the lowest frequency of each half is 1 radian per step
    assert torch.allclose(row1_col0[:4], torch.tensor([1.0, 1.0, 0.01, 0.01]))
    assert torch.equal(row1_col0[4:], torch.zeros(4))
    assert torch.allclose(row0_col1[4:], torch.tensor([1.0, 1.0, 0.01, 0.01]))


# -- training ------------------------------------------------------------------------------------

def test_optimizer_steps_reduce_loss() -> None:
    torch.manual_seed(0)
    m = ImageTokenizer(TINY).train()
    loss_fn = TokenizerLoss()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x, t = images(4), text(4)
    losses = []
    for _ in range(30):
        recon, posterior = m(x, t)
        total, parts = loss_fn(x, recon, posterior)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert set(parts) == {"reconstruction", "kl", "kl_raw", "total"}
    assert losses[-1] < 0.5 * losses[0]


def test_gradient_checkpointing_matches() -> None:
    torch.manual_seed(0)
    m = ImageTokenizer(TINY)
    x, t = images(), text()
    out = m(x, t, sample=False)[0]
    out.square().mean().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.set_gradient_checkpointing(True)
    out2 = m(x, t, sample=False)[0]
    out2.square().mean().backward()
    assert torch.allclose(out, out2)
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(grads, m.parameters()))


# -- losses --------------------------------------------------------------------------------------

def test_loss_parts_and_kl_reduction(model: ImageTokenizer) -> None:
    x = images()
    recon, post = model(x, text())
    total, parts = TokenizerLoss(TokenizerLossConfig(kl_weight=0.5))(x, recon, post)
    assert torch.allclose(parts["reconstruction"], ((recon - x) ** 2).mean())
    assert torch.allclose(parts["kl"], 0.5 * post.kl().sum() / 2)  # summed over K x C, averaged over B
    assert torch.allclose(total, parts["reconstruction"] + parts["kl"])


def test_missing_perceptual_weights_warn_once_or_raise(caplog, tmp_path) -> None:
    with caplog.at_level(logging.WARNING, logger="flowtok.tokenizer.losses"):
        loss = TokenizerLoss(TokenizerLossConfig(perceptual_weight=1.1))
    warnings = [r for r in caplog.records if "perceptual loss disabled" in r.getMessage()]
    assert len(warnings) == 1 and loss.perceptual is None
    x = images()
    _, parts = loss(x, x.flip(-1), DiagonalGaussian(torch.zeros(2, 4, 8)))
    assert "perceptual" not in parts
    with pytest.raises(ConfigError, match="perceptual loss required"):
        TokenizerLoss(TokenizerLossConfig(perceptual_weight=1.0, require_perceptual=True))
    with pytest.raises(ConfigError, match="not found"):
        TokenizerLoss(TokenizerLossConfig(perceptual_weight=1.0, require_perceptual=True,
                                          perceptual_weights=str(tmp_path / "none.safetensors")))


def test_perceptual_loss_from_weights_file(tmp_path) -> None:
    torch.manual_seed(0)
    net = VGGPerceptualLoss()
    with torch.no_grad():  # the linear heads of LPIPS are non-negative
        for lin in net.lins:
            lin.weight.abs_()
    path = tmp_path / "lpips_vgg.safetensors"
    atomic_save_safetensors(net.state_dict(), path)
    loss = TokenizerLoss(TokenizerLossConfig(perceptual_weight=1.1, perceptual_weights=str(path),
                                             require_perceptual=True))
    assert loss.perceptual is not None and not loss.perceptual.training
    x = images()
    assert torch.allclose(loss.perceptual(x, x), torch.zeros(2), atol=1e-6)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    _, parts = loss(x, y, DiagonalGaussian(torch.zeros(2, 4, 8)))
    assert parts["perceptual"] > 0
    bad = tmp_path / "bad.safetensors"
    atomic_save_safetensors({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(ConfigError, match="perceptual loss required"):
        TokenizerLoss(TokenizerLossConfig(perceptual_weight=1.0, perceptual_weights=str(bad),
                                          require_perceptual=True))


def test_hinge_and_lecam_values() -> None:
    assert hinge_discriminator_loss(torch.tensor([2.0]), torch.tensor([-2.0])).item() == 0.0
    assert hinge_discriminator_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == 1.0
    reg = lecam_regularizer(torch.tensor(1.0), torch.tensor(-1.0), torch.tensor(0.5), torch.tensor(-0.5))
    assert reg.item() == pytest.approx((1.0 + 0.5) ** 2 + (0.5 + 1.0) ** 2)


def test_patch_discriminator_shape() -> None:
    d = PatchDiscriminator(channels=8, num_layers=2)
    assert d(torch.rand(2, 3, 32, 32)).shape == (2, 1, 6, 6)


def test_adversarial_losses_route_gradients_and_learn() -> None:
    torch.manual_seed(0)
    cfg = TokenizerLossConfig(discriminator_weight=0.1, discriminator_start=5, discriminator_channels=8,
                              discriminator_layers=2)
    loss = TokenizerLoss(cfg)
    disc = loss.discriminator
    assert disc is not None
    assert not loss.adversarial_active(4) and loss.adversarial_active(5)
    real = images(4)
    fake = torch.rand(4, 3, 32, 32, requires_grad=True)

    # generator side: gradients reach the fake images, never the discriminator
    _, parts = loss(real, fake, DiagonalGaussian(torch.zeros(4, 4, 8)), step=5)
    assert "adversarial" in parts
    g = loss.generator_adv_loss(fake)
    g.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())

    # discriminator side: learns to separate, the fake images get no gradient, the EMAs move
    fake.grad = None
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    first = None
    for _ in range(20):
        d_loss, d_parts = loss.discriminator_loss(real, fake)
        opt.zero_grad()
        d_loss.backward()
        opt.step()
        first = first if first is not None else d_parts["hinge"].item()
    assert fake.grad is None
    assert d_parts["hinge"].item() < first
    assert d_parts["logits_real"] > d_parts["logits_fake"]
    assert loss.ema_real_logits.item() != 0.0 and "ema_real_logits" in loss.state_dict()
    with pytest.raises(ConfigError):
        TokenizerLoss().discriminator_loss(real, fake)
