"""flowtok convert: upstream-named state dicts (built here at tiny sizes) -> flowtok folders.

The builders below write the key names and shapes of the FlowTok release (libs/flowtitok.py,
libs/model/blocks.py, libs/model/flowtok_t2i.py, libs/model/trans_autoencoder.py at d4d43c5), and the
reference functions recompute upstream's forward from those raw tensors, so a renamed, transposed or
mis-split weight shows up as a numeric difference, not only as a key error.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flowtok.cli import main
from flowtok.convert import (
    convert_tokenizer_state_dict,
    detect_kind,
    read_checkpoint,
    split_flow_state_dict,
)
from flowtok.errors import CheckpointError
from flowtok.flow import FLOW_PRESETS, FlowConfig, FlowTransformer
from flowtok.text import PROJECTOR_PRESETS, ClipBPETokenizer, ProjectorConfig, TextProjector
from flowtok.tokenizer import TOKENIZER_PRESETS, ImageTokenizer, TokenizerConfig

K, C, TEXT = 8, 4, 32  # latent tokens, channels, text width (= the tiny CLIP's hidden size)
TOK = TokenizerConfig(image_size=32, patch_size=8, num_latent_tokens=K, token_channels=C,
                      encoder_width=32, encoder_depth=2, encoder_heads=2,
                      decoder_width=48, decoder_depth=2, decoder_heads=3, text_dim=TEXT, text_len=K)
FLOW = FlowConfig(num_tokens=K, in_channels=C, width=32, depth=2, num_heads=2)
PROJ = ProjectorConfig(text_dim=TEXT, width=TEXT, depth=2, num_heads=4, ffn_dim=48, latent_channels=C,
                       align_hidden=24, kl_form="crossflow")


def _rand(g: torch.Generator):
    return lambda *shape: 0.2 * torch.randn(*shape, generator=g)


def _upstream_rope(head_dim: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionRotaryEmbeddingFast(head_dim // 2, grid): per-axis pairs, rows then columns."""
    dim = head_dim // 2
    freqs = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    f = (torch.arange(grid).float()[:, None] * freqs).repeat_interleave(2, dim=-1)  # [g, dim]
    table = torch.cat([f[:, None].expand(grid, grid, dim), f[None].expand(grid, grid, dim)], -1)
    return table.reshape(grid * grid, head_dim).cos(), table.reshape(grid * grid, head_dim).sin()


def upstream_tokenizer_state(cfg: TokenizerConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    r = _rand(torch.Generator().manual_seed(seed))
    p, k, c = cfg.patch_size, cfg.num_latent_tokens, cfg.token_channels
    s: dict[str, torch.Tensor] = {}
    for part, width, heads, depth in (("encoder", cfg.encoder_width, cfg.encoder_heads, cfg.encoder_depth),
                                      ("decoder", cfg.decoder_width, cfg.decoder_heads, cfg.decoder_depth)):
        hidden = int(2 / 3 * int(4 * width))
        cos, sin = _upstream_rope(width // heads, cfg.grid_size)
        s[f"{part}.positional_embedding.freqs_cos"] = cos
        s[f"{part}.positional_embedding.freqs_sin"] = sin
        s[f"{part}.latent_token_positional_embedding"] = r(k, width)
        for ln in ("ln_pre", "ln_post"):
            s[f"{part}.{ln}.weight"], s[f"{part}.{ln}.bias"] = 1 + r(width), r(width)
        for i in range(depth):
            b = f"{part}.transformer.{i}."
            for name, shape in (("ln_1", (width,)), ("ln_2", (width,)), ("attn.qkv", (3 * width, width)),
                                ("attn.proj", (width, width)), ("mlp.w12", (2 * hidden, width)),
                                ("mlp.w3", (width, hidden))):
                s[b + name + ".weight"] = (1 + r(*shape)) if name.startswith("ln") else r(*shape)
                s[b + name + ".bias"] = r(shape[0])
    we, wd = cfg.encoder_width, cfg.decoder_width
    s["latent_tokens"] = r(k, we)
    s["encoder.patch_embed.weight"], s["encoder.patch_embed.bias"] = r(we, 3, p, p), r(we)
    s["encoder.conv_out.weight"], s["encoder.conv_out.bias"] = r(2 * c, we, 1, 1), r(2 * c)
    s["decoder.decoder_embed.weight"], s["decoder.decoder_embed.bias"] = r(wd, c), r(wd)
    s["decoder.mask_token"] = r(1, 1, wd)
    s["decoder.text_guidance_proj.weight"] = r(wd, cfg.text_dim)
    s["decoder.text_guidance_proj.bias"] = r(wd)
    s["decoder.text_guidance_positional_embedding"] = r(cfg.text_len, wd)
    s["decoder.ffn.0.weight"], s["decoder.ffn.0.bias"] = r(p * p * 3, wd, 1, 1), r(p * p * 3)
    s["decoder.conv_out.weight"], s["decoder.conv_out.bias"] = r(3, 3, 3, 3), r(3)
    return s


def upstream_flow_state(flow: FlowConfig, proj: ProjectorConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """FlowTok (nnet) keys: the DiT and, in the same dict, the text projector and alignment MLP."""
    from flowtok.nn import sincos_1d

    r = _rand(torch.Generator().manual_seed(seed))
    d, c, w = flow.width, flow.in_channels, proj.width
    s = {"x_embedder.weight": r(d, c), "x_embedder.bias": r(d),
         "t_embedder.mlp.0.weight": r(d, flow.freq_dim), "t_embedder.mlp.0.bias": r(d),
         "t_embedder.mlp.2.weight": r(d, d), "t_embedder.mlp.2.bias": r(d),
         "y_embedder.embedding_table.weight": r(2, d), "pos_embed": sincos_1d(flow.num_tokens, d)[None],
         "final_layer.linear.weight": r(c, d), "final_layer.linear.bias": r(c),
         "final_layer.adaLN_modulation.1.weight": r(2 * d, d), "final_layer.adaLN_modulation.1.bias": r(2 * d),
         "t2t_temperature": torch.tensor(math.log(1 / 0.07)) + r(()),
         "context_encoder.linear.weight": r(2 * c, w), "context_encoder.linear.bias": r(2 * c),
         "context_projector.0.weight": r(proj.align_hidden, proj.text_dim),
         "context_projector.0.bias": r(proj.align_hidden),
         "context_projector.2.weight": r(proj.align_hidden, proj.align_hidden),
         "context_projector.2.bias": r(proj.align_hidden),
         "context_projector.4.weight": r(c, proj.align_hidden), "context_projector.4.bias": r(c)}
    for i in range(flow.depth):
        for name, shape in (("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)), ("mlp.fc1", (4 * d, d)),
                            ("mlp.fc2", (d, 4 * d)), ("adaLN_modulation.1", (6 * d, d))):
            s[f"blocks.{i}.{name}.weight"], s[f"blocks.{i}.{name}.bias"] = r(*shape), r(shape[0])
    for i in range(proj.depth):
        b = f"context_encoder.layers.{i}."
        for n in "QKVO":
            s[f"{b}attn.W_{n}.weight"], s[f"{b}attn.W_{n}.bias"] = r(w, w), r(w)
        s[b + "feed_forward.ffn_1.weight"], s[b + "feed_forward.ffn_1.bias"] = r(proj.ffn_dim, w), r(proj.ffn_dim)
        s[b + "feed_forward.ffn_2.weight"], s[b + "feed_forward.ffn_2.bias"] = r(w, proj.ffn_dim), r(w)
        for n in ("norm1", "norm2"):
            s[f"{b}{n}.g"], s[f"{b}{n}.b"] = 1 + r(w), r(w)
    return s


def reference_velocity(s: dict, x: torch.Tensor, t: torch.Tensor, null: torch.Tensor, heads: int) -> torch.Tensor:
    """Upstream FlowTok._forward recomputed from its raw tensors."""
    b, n, _ = x.shape
    d = s["x_embedder.weight"].shape[0]

    def lin(z, name):
        return F.linear(z, s[name + ".weight"], s[name + ".bias"])

    def ln(z):
        return F.layer_norm(z, (d,), eps=1e-6)

    h = lin(x, "x_embedder") + s["pos_embed"]
    half = s["t_embedder.mlp.0.weight"].shape[1] // 2
    args = t[:, None] * torch.exp(-math.log(10000) * torch.arange(half) / half)
    c = lin(F.silu(lin(torch.cat([args.cos(), args.sin()], -1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + s["y_embedder.embedding_table.weight"][null.long()]
    depth = len({k.split(".")[1] for k in s if k.startswith("blocks.")})
    for i in range(depth):
        sh1, sc1, g1, sh2, sc2, g2 = lin(F.silu(c), f"blocks.{i}.adaLN_modulation.1").chunk(6, 1)
        y = ln(h) * (1 + sc1[:, None]) + sh1[:, None]
        q, k, v = lin(y, f"blocks.{i}.attn.qkv").view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v
        h = h + g1[:, None] * lin(a.transpose(1, 2).reshape(b, n, d), f"blocks.{i}.attn.proj")
        y = ln(h) * (1 + sc2[:, None]) + sh2[:, None]
        h = h + g2[:, None] * lin(F.gelu(lin(y, f"blocks.{i}.mlp.fc1"), approximate="tanh"), f"blocks.{i}.mlp.fc2")
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, 1)
    return lin(ln(h) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")


def reference_projector(s: dict, x: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream FlowEncoder (post-LN, unbiased-std LayerNorm, no mask) -> (mean, logvar)."""
    b, n, w = x.shape

    def lin(z, name):
        return F.linear(z, s[name + ".weight"], s[name + ".bias"])

    def norm(z, name):
        return s[name + ".g"] * (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-5) + s[name + ".b"]

    depth = len({k.split(".")[2] for k in s if k.startswith("context_encoder.layers.")})
    for i in range(depth):
        p = f"context_encoder.layers.{i}."
        q, k, v = (lin(x, f"{p}attn.W_{m}").view(b, n, heads, -1).transpose(1, 2) for m in "QKV")
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(w // heads), -1) @ v
        x = norm(x + lin(a.transpose(1, 2).reshape(b, n, w), p + "attn.W_O"), p + "norm1")
        x = norm(x + lin(F.relu(lin(x, p + "feed_forward.ffn_1")), p + "feed_forward.ffn_2"), p + "norm2")
    return lin(x, "context_encoder.linear").chunk(2, -1)


# -- tokenizer ----------------------------------------------------------------------------------------
def test_tokenizer_mapping_and_forward_match_upstream_heads() -> None:
    state = upstream_tokenizer_state(TOK)
    model = ImageTokenizer(TOK).eval()
    model.load_state_dict(convert_tokenizer_state_dict(state, TOK), strict=True)
    assert torch.equal(model.encoder.latent_tokens, state["latent_tokens"])

    seen = {}
    model.encoder.norm_post.register_forward_hook(lambda m, i, o: seen.__setitem__("enc", o))
    model.decoder.norm_post.register_forward_hook(lambda m, i, o: seen.__setitem__("dec", o))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mean = model.encode(images)
        z = torch.randn(2, K, C, generator=torch.Generator().manual_seed(2))
        text = torch.randn(2, K, TEXT, generator=torch.Generator().manual_seed(3))
        decoded = model.decode(z, text)
    assert mean.shape == (2, K, C) and decoded.shape == (2, 3, 32, 32) and torch.isfinite(decoded).all()

    # Upstream's encoder head: [B, W, K, 1] 1x1 conv, then the first C channels are the mean.
    enc = seen["enc"].permute(0, 2, 1)[..., None]
    moments = F.conv2d(enc, state["encoder.conv_out.weight"], state["encoder.conv_out.bias"])
    assert torch.allclose(mean, moments[:, :C, :, 0].permute(0, 2, 1), atol=1e-5)
    # Upstream's decoder head: 1x1 conv, rearrange 'b (p1 p2 c) h w -> b c (h p1) (w p2)', 3x3 conv.
    g, p = TOK.grid_size, TOK.patch_size
    grid = seen["dec"].permute(0, 2, 1).reshape(2, -1, g, g)
    pix = F.conv2d(grid, state["decoder.ffn.0.weight"], state["decoder.ffn.0.bias"])
    pix = pix.view(2, p, p, 3, g, g).permute(0, 3, 4, 1, 5, 2).reshape(2, 3, g * p, g * p)
    ref = F.conv2d(pix, state["decoder.conv_out.weight"], state["decoder.conv_out.bias"], padding=1)
    assert torch.allclose(decoded, ref, atol=1e-5)


def test_tokenizer_mapping_errors_name_the_key() -> None:
    state = upstream_tokenizer_state(TOK)
    with pytest.raises(CheckpointError, match="left-over weight 'decoder.extra'"):
        convert_tokenizer_state_dict({**state, "decoder.extra": torch.zeros(1)}, TOK)
    swapped = dict(state)
    swapped["encoder.positional_embedding.freqs_cos"] = state["encoder.positional_embedding.freqs_cos"].flip(0)
    with pytest.raises(CheckpointError, match="RoPE"):
        convert_tokenizer_state_dict(swapped, TOK)
    flat = {**state, "decoder.ffn.0.weight": state["decoder.ffn.0.weight"][:, :, 0, 0]}
    with pytest.raises(CheckpointError, match="1x1 conv"):
        convert_tokenizer_state_dict(flat, TOK)


# -- flow + text projector ----------------------------------------------------------------------------
def test_flow_split_and_forward_match_upstream_reference() -> None:
    state = upstream_flow_state(FLOW, PROJ)
    flow_state, proj_state = split_flow_state_dict(state)
    flow, proj = FlowTransformer(FLOW).eval(), TextProjector(PROJ).eval()
    flow.load_state_dict(flow_state, strict=True)
    proj.load_state_dict(proj_state, strict=True)

    g = torch.Generator().manual_seed(4)
    x, cond = torch.randn(3, K, C, generator=g), torch.randn(3, K, TEXT, generator=g)
    t, null = torch.tensor([0.0, 0.4, 0.99]), torch.tensor([0, 1, 0])
    with torch.no_grad():
        v = flow(x, t, null)
        out = proj(cond, sample=False)
        target = proj.align_target(cond)
        mean, logvar = reference_projector(state, cond, PROJ.num_heads)
        ref_target = F.linear(F.silu(F.linear(F.silu(F.linear(
            cond, state["context_projector.0.weight"], state["context_projector.0.bias"])),
            state["context_projector.2.weight"], state["context_projector.2.bias"])),
            state["context_projector.4.weight"], state["context_projector.4.bias"])
    assert torch.allclose(v, reference_velocity(state, x, t, null, FLOW.num_heads), atol=1e-5)
    assert not torch.allclose(v[1], flow(x, t, torch.tensor([0, 0, 0]))[1])  # the null row is used
    assert torch.allclose(out.mean, mean, atol=1e-5) and torch.allclose(out.logvar, logvar, atol=1e-5)
    assert torch.allclose(target, ref_target, atol=1e-6)
    assert proj.logit_scale.item() == state["t2t_temperature"].item()


# -- reading ------------------------------------------------------------------------------------------
def test_read_checkpoint_unwraps_and_accepts_safetensors(tmp_path: Path) -> None:
    state = {"x_embedder.weight": torch.ones(2, 2), "pos_embed": torch.zeros(1, 2, 2)}
    torch.save({"step": 10, "model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    assert set(read_checkpoint(tmp_path / "w.pth")) == set(state)
    save_file(state, str(tmp_path / "w.bin"))  # a safetensors file under a .bin name
    assert torch.equal(read_checkpoint(tmp_path / "w.bin")["x_embedder.weight"], state["x_embedder.weight"])
    torch.save({"step": 10}, tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match="no state dict"):
        read_checkpoint(tmp_path / "none.pth")


@pytest.fixture()
def paper_presets_tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink the presets the converter targets so that the CLI runs end to end in a second."""
    monkeypatch.setitem(TOKENIZER_PRESETS, "flowtitok-512", TOK)
    monkeypatch.setitem(FLOW_PRESETS, "FlowTok-XL", FLOW)
    monkeypatch.setitem(PROJECTOR_PRESETS, "paper", PROJ)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=TEXT, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu")
    CLIPTextModel(cfg).save_pretrained(folder)
    ClipBPETokenizer.bundled().save_vocab_files(folder)
    return folder


def test_cli_converts_tokenizer_and_flow_into_a_pipeline(paper_presets_tiny, clip_folder: Path,
                                                          tmp_path: Path, capsys) -> None:
    from flowtok.pipelines import FlowTokPipeline

    tok_state, flow_state = upstream_tokenizer_state(TOK), upstream_flow_state(FLOW, PROJ)
    torch.save(tok_state, tmp_path / "FlowTiTok_512.bin")
    torch.save(flow_state, tmp_path / "FlowTok-XL.pth")
    assert detect_kind(tok_state) == "tokenizer-512" and detect_kind(flow_state) == "flow-xl"

    assert main(["convert", "--from-official", str(tmp_path / "FlowTiTok_512.bin"), "--kind", "tokenizer-512",
                 "--out", str(tmp_path / "tok")]) == 0
    assert main(["convert", "--from-official", str(tmp_path / "FlowTok-XL.pth"), "--kind", "flow-xl",
                 "--tokenizer", str(tmp_path / "tok"), "--clip", str(clip_folder), "--out", str(tmp_path / "pipe")]) == 0
    spec = json.loads((tmp_path / "pipe" / "pipeline.json").read_text())
    assert spec["text_encoder"] == {"name": "clip", "path": str(clip_folder)}
    assert set(spec["components"]) == {"tokenizer", "text_projector", "t2i_flow"}
    assert spec["defaults"]["guidance_scale"] == 2.0 and spec["defaults"]["num_inference_steps"] == 20

    pipe = FlowTokPipeline.from_pretrained(tmp_path / "pipe", device="cpu")
    x = torch.randn(2, K, C)
    with torch.no_grad():
        v = pipe.t2i_flow(x, torch.tensor([0.2, 0.7]), torch.tensor([0, 1]))
    assert torch.allclose(v, reference_velocity(flow_state, x, torch.tensor([0.2, 0.7]), torch.tensor([0, 1]),
                                                FLOW.num_heads), atol=1e-5)
    images = pipe.text_to_image("a red circle", num_inference_steps=2, output_type="np",
                                generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 32, 32, 3)

    # Without --tokenizer the components are written, and pipeline.json says what is there.
    assert main(["convert", "--from-official", str(tmp_path / "FlowTok-XL.pth"), "--kind", "flow-xl",
                 "--out", str(tmp_path / "partial")]) == 0
    spec = json.loads((tmp_path / "partial" / "pipeline.json").read_text())
    assert spec["text_encoder"] == {"name": "clip", "path": "openai/clip-vit-large-patch14-336"}
    assert TextProjector.from_pretrained(tmp_path / "partial" / "text_projector").config == PROJ


def _cli_error(args: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(["convert", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowtok: error:") and "\n" not in err, err
    return err


def test_cli_errors_are_one_line(paper_presets_tiny, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "out")
    torch.save(upstream_tokenizer_state(TOK), tmp_path / "tok.bin")
    torch.save(upstream_flow_state(FLOW, PROJ), tmp_path / "xl.pth")

    data = (tmp_path / "tok.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    err = _cli_error(["--from-official", str(tmp_path / "cut.bin"), "--kind", "tokenizer-512", "--out", out], capsys)
    assert "corrupt or truncated" in err

    err = _cli_error(["--from-official", str(tmp_path / "tok.bin"), "--kind", "flow-xl", "--out", out], capsys)
    assert "looks like a 'tokenizer-512' checkpoint" in err and "--kind tokenizer-512" in err
    err = _cli_error(["--from-official", str(tmp_path / "xl.pth"), "--kind", "flow-h", "--out", out], capsys)
    assert "'flow-xl'" in err

    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # a whole module, not a state dict
    err = _cli_error(["--from-official", str(tmp_path / "pickled.pth"), "--kind", "flow-xl", "--out", out], capsys)
    assert "weights_only" in err and "torch.nn.modules.linear.Linear" in err

    broken = upstream_flow_state(FLOW, PROJ)
    broken["blocks.1.mlp.fc1.weight"] = broken["blocks.1.mlp.fc1.weight"][:-1]
    torch.save(broken, tmp_path / "shape.pth")
    err = _cli_error(["--from-official", str(tmp_path / "shape.pth"), "--kind", "flow-xl", "--out", out], capsys)
    assert "'blocks.1.mlp.fc1.weight' has shape (127, 32)" in err
    del broken["blocks.1.mlp.fc1.weight"]
    torch.save(broken, tmp_path / "missing.pth")
    err = _cli_error(["--from-official", str(tmp_path / "missing.pth"), "--kind", "flow-xl", "--out", out], capsys)
    assert "missing weight 'blocks.1.mlp.fc1.weight'" in err
    ImageTokenizer(replace(TOK, token_channels=2)).save_pretrained(tmp_path / "tok2")
    err = _cli_error(["--from-official", str(tmp_path / "xl.pth"), "--kind", "flow-xl", "--tokenizer",
                      str(tmp_path / "tok2"), "--out", out], capsys)
    assert f"tokenizer latents are {K} x 2" in err
    err = _cli_error(["--from-official", str(tmp_path / "nope.pth"), "--kind", "flow-xl", "--out", out], capsys)
    assert "not found" in err
    assert not Path(out).exists()
