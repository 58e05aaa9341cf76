"""Text side: encoders (MiniLM offline, CLIP from a local folder), CLIP BPE ids, projector, decoder."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flowtok.config import preset
from flowtok.errors import CheckpointError, ConfigError, DataError, InvalidInputError
from flowtok.text import (
    DECODER_PRESETS,
    PROJECTOR_PRESETS,
    ClipBPETokenizer,
    CLIPTextEncoder,
    MiniLMTextEncoder,
    TextDecoder,
    TextProjector,
    TextStateCache,
    convert_upstream_state_dict,
    load_text_encoder,
    text_roundtrip_accuracy,
)

FIXTURE = Path(__file__).parent / "fixtures" / "clip_ids.json"
CAPTIONS = [
    "a red circle above a blue square",
    "two green triangles",
    "a yellow star left of a purple hexagon",
    "three small orange circles",
    "a blue square below a red star",
    "one big green hexagon",
]


@pytest.fixture
def one_thread():
    """Tiny training loops run faster on one thread than fighting over a busy CPU with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder(max_length=16, device="cpu", cache_size=32)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77)
    CLIPTextModel(cfg).save_pretrained(folder)
    ClipBPETokenizer.bundled().save_vocab_files(folder)
    return folder


# -- encoders ---------------------------------------------------------------------------------------
def test_minilm_loads_with_network_off(tmp_path: Path) -> None:
    code = (
        "from flowtok.text import MiniLMTextEncoder\n"
        "e = MiniLMTextEncoder(device='cpu')\n"
        "s = e.encode(['a dog on the beach', 'a red square'])\n"
        "print(tuple(s.states.shape), e.dim, e.vocab_size)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "(2, 77, 384) 384 30522"


def test_minilm_states_mask_ids(minilm: MiniLMTextEncoder) -> None:
    st = minilm.encode(CAPTIONS[:2])
    assert st.states.shape == (2, 16, 384) and st.states.dtype == torch.float32
    assert st.mask.dtype == torch.bool and st.input_ids.dtype == torch.long
    # [CLS] a red circle above a blue square [SEP] -> 9 real tokens, then pads
    assert st.mask[0].sum().item() == 9 and not st.mask[0, 9:].any()
    assert st.input_ids[0, 0].item() == minilm.bos_token_id and st.input_ids[0, 8].item() == minilm.eos_token_id
    assert (st.input_ids[0, 9:] == minilm.pad_token_id).all()
    assert minilm.decode_ids(st.input_ids) == CAPTIONS[:2]
    assert not any(p.requires_grad for p in minilm.model.parameters())
    # The training loops' path (ids in, one forward) gives the same states as captions in.
    direct = minilm.encode_tokens(*minilm.tokenize(CAPTIONS[:2]))
    assert torch.equal(direct.input_ids, st.input_ids) and torch.equal(direct.mask, st.mask)
    torch.testing.assert_close(direct.states, st.states, atol=1e-5, rtol=1e-5)


def test_encode_without_cache_batches_in_chunks(minilm: MiniLMTextEncoder) -> None:
    """No cache (the training loops' encoders): tensors in chunks of 256, the same states as the cached path."""
    plain = MiniLMTextEncoder(max_length=16, device="cpu")
    caps = [f"{c} number {i}" for i in range(100) for c in CAPTIONS[:3]]  # 300: two chunks
    got, ref = plain.encode(caps), minilm.encode(caps)
    assert got.states.shape == (300, 16, 384) and len(plain.cache) == 0
    assert torch.equal(got.input_ids, ref.input_ids) and torch.equal(got.mask, ref.mask)
    torch.testing.assert_close(got.states, ref.states, atol=1e-5, rtol=1e-5)


def test_empty_caption_is_invalid_input(minilm: MiniLMTextEncoder) -> None:
    with pytest.raises(InvalidInputError, match="prompt 1 is empty"):
        minilm.encode(["a cat", "   \n"])
    with pytest.raises(InvalidInputError, match="prompt 0"):
        minilm.tokenize([""])
    with pytest.raises(InvalidInputError, match="prompt 1 is a int"):
        minilm.encode(["a cat", 3])  # type: ignore[list-item]


def test_truncation_warns_and_counts(minilm: MiniLMTextEncoder) -> None:
    before = minilm.truncated_count
    long = " ".join(["word"] * 40)
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = minilm.tokenize(["short one", long, long + " more"])
    assert minilm.truncated_count == before + 2
    assert mask[1].all() and ids[1, -1].item() == minilm.eos_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        minilm.tokenize(["short one"])  # no warning for a caption that fits
    assert minilm.truncated_count == before + 2


def test_cache_lru_and_safetensors_file(minilm: MiniLMTextEncoder, tmp_path: Path) -> None:
    first = minilm.encode(CAPTIONS[:3])
    assert all(c in minilm.cache for c in CAPTIONS[:3])
    again = minilm.encode([CAPTIONS[2], CAPTIONS[0]])
    torch.testing.assert_close(again.states[0], first.states[2])
    minilm.save_cache(tmp_path / "cache.safetensors")
    cache = TextStateCache(max_items=2)
    n = cache.load(tmp_path / "cache.safetensors", {**minilm.spec, "max_length": 16})
    assert n >= 3 and len(cache) == 2  # the LRU keeps only the newest two
    with pytest.raises(DataError, match="made by encoder"):
        TextStateCache(8).load(tmp_path / "cache.safetensors", {"name": "clip", "path": "x", "max_length": 16})


def test_load_text_encoder_spec_errors() -> None:
    with pytest.raises(ConfigError, match="needs a 'path'"):
        load_text_encoder({"name": "clip"})
    with pytest.raises(ConfigError, match="unknown config key"):
        load_text_encoder({"name": "minilm", "pth": "x"})
    with pytest.raises(ConfigError, match="expected one of"):
        load_text_encoder("t5")
    with pytest.raises(CheckpointError, match="not found"):
        load_text_encoder({"name": "clip", "path": "/nonexistent/clip"})


# -- CLIP -------------------------------------------------------------------------------------------
def test_clip_bpe_matches_open_clip_reference_ids() -> None:
    """Fixture ids come from open_clip's own tokenizer.py (see the note inside the JSON)."""
    data = json.loads(FIXTURE.read_text())
    assert len(data["captions"]) == 100
    tok = ClipBPETokenizer.bundled()
    assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id) == (49408, 49406, 49407)
    rows = tok(data["captions"], context_length=data["context_length"])
    for caption, row, ref in zip(data["captions"], rows, data["ids"]):
        assert row == ref + [0] * (77 - len(ref)), caption


def test_clip_encoder_from_local_folder(clip_folder: Path) -> None:
    data = json.loads(FIXTURE.read_text())
    enc = load_text_encoder({"name": "clip", "path": str(clip_folder)}, device="cpu")
    assert isinstance(enc, CLIPTextEncoder)
    assert json.loads(json.dumps(enc.spec)) == {"name": "clip", "path": str(clip_folder)}
    assert (enc.dim, enc.vocab_size, enc.pad_token_id, enc.max_length) == (32, 49408, 0, 77)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixture holds over-long captions on purpose
        ids, mask = enc.tokenize(data["captions"])
    for row, ref, m in zip(ids.tolist(), data["ids"], mask):
        assert row == ref + [0] * (77 - len(ref))
        assert m.sum().item() == len(ref)  # mask covers SOT .. EOT
    expected_cut = sum(len(ClipBPETokenizer.bundled().encode(c)) > 75 for c in data["captions"])
    assert enc.truncated_count == expected_cut > 0
    st = enc.encode(["a photo of a cat.", "Don't PANIC!!"])
    assert st.states.shape == (2, 77, 32) and st.states.dtype == torch.float32
    assert enc.decode_ids(st.input_ids) == ["a photo of a cat.", "don't panic!!"]
    # A causal tower: content states do not depend on what the padding holds.
    padded_eot = st.input_ids.clone()
    padded_eot[~st.mask] = 49407
    with torch.no_grad():
        alt = enc.model(input_ids=padded_eot).last_hidden_state
    torch.testing.assert_close(alt[st.mask], st.states[st.mask], atol=1e-5, rtol=1e-5)


def test_clip_tower_compiled_by_layers_gives_the_same_states(clip_folder: Path) -> None:
    """train.compile compiles the frozen tower inside the step layer by layer (the "eager" backend checks the
    wiring on a CPU: dynamo traces each layer); states, mask and ids are those of the plain tower."""
    from flowtok.training.stages.base import Stage

    enc = CLIPTextEncoder(clip_folder, max_length=16, device="cpu")
    captions = ["a red circle", "two small blue squares on the left"]
    plain = enc.encode(captions)
    layers = max((m for m in enc.model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)  # encoder.layers
    assert enc.compile_layers(backend="eager") == len(layers) == 2
    assert all(layer._compiled_call_impl is not None for layer in layers)
    again = enc.encode(captions)
    torch.testing.assert_close(again.states, plain.states)
    assert torch.equal(again.mask, plain.mask) and torch.equal(again.input_ids, plain.input_ids)

    class WithEncoder(Stage):
        frozen_helpers = ("encoder",)

    stage = WithEncoder()
    stage.encoder = CLIPTextEncoder(clip_folder, max_length=16, device="cpu")
    stage.compile_helpers(backend="eager")  # what the trainer calls under train.compile
    compiled = [m._compiled_call_impl is not None for m in stage.encoder.model.modules()
                if type(m).__name__ == "CLIPEncoderLayer"]
    assert compiled == [True, True]


def test_clip_tokenizer_files_round_trip(clip_folder: Path) -> None:
    tok = ClipBPETokenizer.from_files(clip_folder / "vocab.json", clip_folder / "merges.txt")
    ref = ClipBPETokenizer.bundled()
    texts = ["an astronaut riding a horse on mars", "50% off $9.99", "Привет мир"]
    assert tok(texts) == ref(texts)
    assert ref.decode(ref([texts[0]])[0]) == texts[0]


# -- projector --------------------------------------------------------------------------------------
def test_projector_shapes_and_sampling() -> None:
    cfg = preset(PROJECTOR_PRESETS, "tiny", text_dim=24, width=32, latent_channels=8)
    proj = TextProjector(cfg).eval()
    x = torch.randn(3, 77, 24)
    g = torch.Generator().manual_seed(1)
    out = proj(x, sample=True, generator=g)
    assert out.z.shape == out.mean.shape == out.logvar.shape == (3, 77, 8)
    again = proj(x, sample=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.z, again.z)
    det = proj(x, sample=False)
    torch.testing.assert_close(det.z, det.mean)
    assert proj.input_proj is not None
    assert TextProjector(preset(PROJECTOR_PRESETS, "tiny", text_dim=64)).input_proj is None
    with pytest.raises(InvalidInputError, match="text states"):
        proj(torch.randn(3, 77, 25))


def test_projector_ignores_mask_by_default_like_upstream() -> None:
    proj = TextProjector(preset(PROJECTOR_PRESETS, "tiny", text_dim=16, width=16, dropout=0.0)).eval()
    x = torch.randn(2, 10, 16)
    mask = torch.arange(10)[None].expand(2, 10) < torch.tensor([[4], [7]])
    torch.testing.assert_close(proj(x, mask, sample=False).z, proj(x, sample=False).z)
    masked = TextProjector(preset(PROJECTOR_PRESETS, "tiny", text_dim=16, width=16, dropout=0.0, use_mask=True)).eval()
    masked.load_state_dict(proj.state_dict())
    assert not torch.allclose(masked(x, mask, sample=False).z, proj(x, sample=False).z)


def test_kl_forms() -> None:
    mean = torch.tensor([[[0.0, 1.0], [2.0, -1.0]]])
    logvar = torch.tensor([[[0.0, 0.5], [-1.0, 0.0]]])
    std = TextProjector(preset(PROJECTOR_PRESETS, "tiny", text_dim=8, latent_channels=2)).kl_loss(mean, logvar)
    expected = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum()
    torch.testing.assert_close(std, expected)
    cf = TextProjector(preset(PROJECTOR_PRESETS, "tiny", text_dim=8, latent_channels=2, kl_form="crossflow"))
    expected_cf = -0.5 * (1 + logvar - (0.3 * mean) ** 6 - logvar.exp()).sum()
    torch.testing.assert_close(cf.kl_loss(mean, logvar), expected_cf)
    assert not torch.allclose(std, cf.kl_loss(mean, logvar))
    zero = torch.zeros(2, 3, 2)
    assert std.item() > 0 and cf.kl_loss(zero, zero).item() == 0.0
    bm = TextProjector(preset(PROJECTOR_PRESETS, "tiny", text_dim=8, latent_channels=2, kl_reduction="batch_mean"))
    two = torch.cat([mean, mean]), torch.cat([logvar, logvar])
    torch.testing.assert_close(bm.kl_loss(*two), expected)
    assert PROJECTOR_PRESETS["paper"].kl_form == "standard"


def test_align_loss_symmetric_infonce_learnable_temperature() -> None:
    torch.manual_seed(0)
    proj = TextProjector(preset(PROJECTOR_PRESETS, "tiny", text_dim=12, latent_channels=4))
    assert math.isclose(proj.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    states, z = torch.randn(5, 7, 12), torch.randn(5, 7, 4)
    loss = proj.align_loss(z, states)
    target = proj.align_mlp(states)
    zn, tn = F.normalize(z.flatten(1), dim=-1), F.normalize(target.flatten(1), dim=-1)
    logits = proj.logit_scale.exp() * zn @ tn.T
    labels = torch.arange(5)
    row, col = F.cross_entropy(logits, labels), F.cross_entropy(logits.T, labels)
    torch.testing.assert_close(loss, 0.5 * (row + col))
    assert not torch.isclose(row, col)  # both directions really are in the loss
    loss.backward()
    assert proj.logit_scale.grad is not None and proj.logit_scale.grad.abs().item() > 0
    # Perfectly aligned pairs at a high temperature give a near-zero loss.
    with torch.no_grad():
        proj.logit_scale.fill_(math.log(100.0))
    assert proj.align_loss(target.detach(), states).item() < 0.05


def test_upstream_keys_map_one_to_one_and_paper_param_count() -> None:
    proj = TextProjector(PROJECTOR_PRESETS["paper"])
    assert proj.num_params() == 24_329_777
    reverse = {}
    for i in range(6):
        for ours, theirs in [("attn.q_proj", "attn.W_Q"), ("attn.k_proj", "attn.W_K"), ("attn.v_proj", "attn.W_V"),
                             ("attn.out_proj", "attn.W_O"), ("ffn.fc1", "feed_forward.ffn_1"),
                             ("ffn.fc2", "feed_forward.ffn_2")]:
            for p in ("weight", "bias"):
                reverse[f"layers.{i}.{ours}.{p}"] = f"context_encoder.layers.{i}.{theirs}.{p}"
        for n in ("norm1", "norm2"):
            reverse[f"layers.{i}.{n}.weight"] = f"context_encoder.layers.{i}.{n}.g"
            reverse[f"layers.{i}.{n}.bias"] = f"context_encoder.layers.{i}.{n}.b"
    for p in ("weight", "bias"):
        reverse[f"to_moments.{p}"] = f"context_encoder.linear.{p}"
        for j in (0, 2, 4):
            reverse[f"align_mlp.{j}.{p}"] = f"context_projector.{j}.{p}"
    reverse["logit_scale"] = "t2t_temperature"
    own = proj.state_dict()
    assert set(reverse) == set(own)
    upstream = {"module." + reverse[k]: v.clone() for k, v in own.items()}
    upstream["module.blocks.0.attn.qkv.weight"] = torch.zeros(1)  # DiT keys are ignored
    converted = convert_upstream_state_dict(upstream)
    assert set(converted) == set(own)
    proj.load_state_dict(converted, strict=True)


def test_projector_and_decoder_save_load(tmp_path: Path) -> None:
    proj = TextProjector(preset(PROJECTOR_PRESETS, "tiny", text_dim=16)).eval()
    dec = TextDecoder(preset(DECODER_PRESETS, "tiny", vocab_size=50, num_tokens=10)).eval()
    proj.save_pretrained(tmp_path / "p")
    dec.save_pretrained(tmp_path / "d")
    p2, d2 = TextProjector.from_pretrained(tmp_path / "p"), TextDecoder.from_pretrained(tmp_path / "d")
    x = torch.randn(2, 10, 16)
    torch.testing.assert_close(p2(x, sample=False).z, proj(x, sample=False).z)
    z = torch.randn(2, 10, 16)
    torch.testing.assert_close(d2(z), dec(z))
    with pytest.raises(CheckpointError, match="flowtok_text_projector"):
        TextDecoder.from_pretrained(tmp_path / "p")


# -- decoder ----------------------------------------------------------------------------------------
def test_decoder_presets_and_heads() -> None:
    assert DECODER_PRESETS["paper"].depth == 6 and DECODER_PRESETS["paper"].width == 768
    dec = TextDecoder(preset(DECODER_PRESETS, "tiny", vocab_size=100, num_tokens=12, head_dim=8))
    assert dec(torch.randn(2, 12, 16)).shape == (2, 12, 100)
    full = TextDecoder(preset(DECODER_PRESETS, "tiny", vocab_size=100, num_tokens=12, head_dim=None))
    assert full.num_params() > dec.num_params()
    with pytest.raises(InvalidInputError, match="text latent"):
        dec(torch.randn(2, 13, 16))


def test_decoder_loss_falls_and_predicts_pads(one_thread: None) -> None:
    torch.manual_seed(0)
    dec = TextDecoder(preset(DECODER_PRESETS, "tiny", vocab_size=40, num_tokens=8, depth=1))
    z = torch.randn(4, 8, 16)
    ids = torch.randint(3, 40, (4, 8))
    mask = torch.arange(8)[None] < torch.tensor([[3], [5], [8], [4]])
    ids[~mask] = 0
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    first = dec.loss(z, ids, mask).item()
    for _ in range(60):
        loss = dec.loss(z, ids, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    pred = dec(z).argmax(-1)
    assert (pred[~mask] == 0).float().mean().item() > 0.9  # the end of the caption is learned
    no_pads = TextDecoder(preset(DECODER_PRESETS, "tiny", vocab_size=40, num_tokens=8, depth=1, pad_loss_weight=0.0))
    no_pads.load_state_dict(dec.state_dict())
    assert no_pads.loss(z, ids, mask).item() != dec.loss(z, ids, mask).item()


def test_decode_checks_vocabulary(minilm: MiniLMTextEncoder) -> None:
    dec = TextDecoder(preset(DECODER_PRESETS, "tiny", vocab_size=100, num_tokens=16))
    with pytest.raises(ConfigError, match="30522"):
        dec.decode(torch.randn(1, 16, 16), minilm)


def test_tiny_text_autoencoder_learns_captions(minilm: MiniLMTextEncoder, one_thread: None) -> None:
    torch.manual_seed(0)
    st = minilm.encode(CAPTIONS)
    proj = TextProjector(preset(PROJECTOR_PRESETS, "tiny", dropout=0.0))
    dec = TextDecoder(preset(DECODER_PRESETS, "tiny", num_tokens=16))
    assert text_roundtrip_accuracy(proj, dec, minilm, CAPTIONS) == 0.0
    opt = torch.optim.AdamW([*proj.parameters(), *dec.parameters()], lr=3e-3)
    acc = 0.0
    for step in range(1, 301):
        out = proj(st.states, st.mask)
        loss = dec.loss(out.z, st.input_ids, st.mask) + 1e-4 * proj.kl_loss(out.mean, out.logvar) / len(CAPTIONS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            acc = text_roundtrip_accuracy(proj, dec, minilm, CAPTIONS)
            if acc == 1.0:
                break
    assert acc == 1.0, f"round trip {acc:.2f} after {step} steps"
    assert proj.training and dec.training  # the metric restores the modes it found
    with torch.no_grad():
        assert dec.decode(proj(st.states, sample=False).z, minilm) == CAPTIONS
