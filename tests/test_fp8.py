"""FP8 inference layers: checked in emulation (same quantised numbers, float matmul) on the CPU."""

import pytest
import torch
from torch import nn

from flowtok.errors import InvalidInputError
from flowtok.flow import FLOW_PRESETS, FlowTransformer
from flowtok.nn.fp8 import E4M3_MAX, FP8Linear, fp8_supported, quantize_linears
from test_speed_options import _model as _live_flow  # a tiny flow whose adaLN layers compute something


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def test_fp8_linear_is_close_to_the_float_layer_but_quantised():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = FP8Linear(lin, emulate=True)
    assert q.weight_fp8.dtype == torch.float8_e4m3fn and q.weight_scale.shape == (1, 48)
    assert float(q.weight_fp8.float().abs().max()) == E4M3_MAX  # each output row uses the full e4m3 range
    x = torch.randn(3, 7, 64)
    ref, out = lin(x), q(x)
    assert out.shape == ref.shape and out.dtype == x.dtype
    err = _rel(out, ref)
    assert 1e-4 < err < 0.05, err  # e4m3 keeps 3 mantissa bits: a few percent, not zero


def test_fp8_rows_are_scaled_independently_and_padding_changes_nothing():
    torch.manual_seed(1)
    q = FP8Linear(nn.Linear(32, 32), emulate=True)
    x = torch.randn(16, 32)
    x[3] *= 1e4  # one huge token must not wipe out the precision of the others
    full = q(x)
    alone = torch.cat([q(x[i:i + 1]) for i in range(16)])  # 1 row, padded to 16
    assert torch.equal(full, alone)
    ref = nn.functional.linear(x, q.weight_fp8.float() * q.weight_scale.t(), q.bias)
    assert _rel(full[:3], ref[:3]) < 0.05


def test_quantize_linears_skips_unaligned_and_kept_layers():
    net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 10), nn.Linear(10, 32), nn.Linear(32, 32))
    done = quantize_linears(net, keep=lambda name, _: name == "4", emulate=True)
    assert done == ["0"]
    assert isinstance(net[0], FP8Linear) and all(isinstance(net[i], nn.Linear) for i in (2, 3, 4))


def test_flow_transformer_fp8_velocity_error_and_guards(tmp_path):
    flow = _live_flow()
    x, t, null = torch.randn(4, 8, 4), torch.rand(4), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        ref = flow(x, t, null)
        flow.quantize_fp8(emulate=True)
        out = flow(x, t, null)
    assert 0 < _rel(out, ref) < 0.05
    block = flow.blocks[0]
    assert isinstance(block.attn.qkv, FP8Linear) and isinstance(block.adaLN_modulation[1], nn.Linear)
    assert not any(p.requires_grad for p in flow.parameters())
    flow.to(torch.bfloat16)  # a dtype move keeps the e4m3 weights and their float32 scales
    assert block.attn.qkv.weight_fp8.dtype == torch.float8_e4m3fn
    assert block.attn.qkv.weight_scale.dtype == torch.float32
    with torch.no_grad():
        assert _rel(flow(x.bfloat16(), t, null), ref) < 0.08
    with pytest.raises(InvalidInputError, match="FP8-quantised"):
        flow.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()
    with pytest.raises(InvalidInputError, match="already in FP8"):  # not "nothing to quantise"
        flow.quantize_fp8(emulate=True)


@pytest.mark.skipif(fp8_supported(), reason="this machine has FP8 matmuls")
def test_fp8_without_fp8_hardware_is_a_one_line_error():
    with pytest.raises(InvalidInputError, match="compute capability 8.9"):
        FlowTransformer(FLOW_PRESETS["tiny"]).quantize_fp8()


def test_calibrated_static_scales():
    from flowtok.nn.fp8 import calibrate_input_amax

    flow = _live_flow()
    x, t, null = torch.randn(6, 8, 4), torch.rand(6), torch.tensor([0, 1, 0, 1, 0, 1])
    with torch.no_grad():
        ref = flow(x, t, null)
    amax = calibrate_input_amax(flow.blocks, lambda: flow(x, t, null), keep=lambda n, _: "adaLN" in n)
    assert set(amax) == {f"{i}.{layer}" for i in range(2) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert all(v > 0 for v in amax.values())
    flow.quantize_fp8(emulate=True, calibrate=lambda: flow(x, t, null))
    qkv = flow.blocks[0].attn.qkv
    assert qkv.static and qkv.input_scale.shape == () and qkv.weight_scale.shape == ()
    assert float(qkv.input_scale) == pytest.approx(amax["0.attn.qkv"] / E4M3_MAX)
    with torch.no_grad():
        out = flow(x, t, null)
        assert 0 < _rel(out, ref) < 0.05
        assert torch.isfinite(flow(x * 50, t, null)).all()  # beyond the calibrated range: saturates, no inf
    with pytest.raises(InvalidInputError, match="input_amax"):
        FP8Linear(nn.Linear(16, 16), emulate=True, input_amax=float("nan"))


# ------------------------------------------------------------------------------------ the image decoder
def _tiny_tokenizer():
    from flowtok.tokenizer import TOKENIZER_PRESETS, ImageTokenizer

    torch.manual_seed(0)
    tok = ImageTokenizer(TOKENIZER_PRESETS["tiny"]).eval()
    with torch.no_grad():  # the zero-initialised pixel head would hide every difference
        tok.decoder.to_pixels.weight.normal_(0, 0.5)
    k, c = tok.latent_shape
    return tok, torch.randn(6, k, c)


@pytest.mark.parametrize("static", [True, False])
def test_decoder_fp8_quantises_the_decoder_blocks_but_the_mlp_output(static):
    tok, lat = _tiny_tokenizer()
    with torch.no_grad():
        ref = tok.decode(lat)
        tok.quantize_decoder_fp8(emulate=True, calibrate=(lambda: tok.decode(lat[:3])) if static else None)
        out = tok.decode(lat)
    block = tok.decoder.blocks[0]
    for layer in (block.attn.qkv, block.attn.proj, block.mlp.w12):
        assert isinstance(layer, FP8Linear) and layer.static == static
    assert type(block.mlp.w3) is nn.Linear  # its SwiGLU input has the widest range: kept
    assert not any(isinstance(m, FP8Linear) for m in tok.encoder.modules())
    assert type(tok.decoder.to_pixels) is nn.Linear and not any(p.requires_grad for p in tok.parameters())
    assert 1e-4 < _rel(out, ref) < 0.05
    with pytest.raises(InvalidInputError, match="FP8-quantised"):
        tok.save_pretrained("unused")


def test_decoder_fp8_is_refused_on_compiled_blocks_and_without_fp8_matmuls():
    from flowtok.nn.regions import compile_regions

    tok, _ = _tiny_tokenizer()
    if not fp8_supported(next(tok.parameters()).device):
        with pytest.raises(InvalidInputError, match="compute capability"):
            tok.quantize_decoder_fp8()
    compile_regions(tok.decoder.blocks)  # lazy: nothing is compiled until a call
    with pytest.raises(InvalidInputError, match="before compiling"):
        tok.quantize_decoder_fp8(emulate=True)
    assert not any(isinstance(m, FP8Linear) for m in tok.modules())


def test_decoder_fp8_with_no_aligned_linear_is_refused():
    from dataclasses import replace

    from flowtok.tokenizer import TOKENIZER_PRESETS, ImageTokenizer

    tok = ImageTokenizer(replace(TOKENIZER_PRESETS["tiny"], decoder_width=24))  # 24 -> 72, 24 -> 128: unaligned
    with pytest.raises(InvalidInputError, match="nothing to run in FP8"):
        tok.quantize_decoder_fp8(emulate=True)

