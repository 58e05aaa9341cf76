"""Model folders and pipelines (issue 19, second group): hostile config.json values refused before any
allocation, components of disagreeing shapes refused by assemble, malformed pipeline.json, files that are
not checkpoints at all named for what they are, and the authors' sampler grid."""

import json
import math
import resource
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flowtok.cli import main
from flowtok.config import preset
from flowtok.convert import read_checkpoint
from flowtok.errors import CheckpointError, FlowTokError
from flowtok.flow import FLOW_PRESETS, FlowTransformer
from flowtok.pipelines import FlowTokPipeline, assemble_pipeline
from flowtok.sampling import sample
from flowtok.text import DECODER_PRESETS, PROJECTOR_PRESETS, TextDecoder, TextProjector
from flowtok.tokenizer import TOKENIZER_PRESETS, ImageTokenizer

K, C = 4, 4


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    """Component folders of an untrained tiny pipeline, plus a flow model of another token count."""
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    ImageTokenizer(replace(TOKENIZER_PRESETS["tiny"], text_dim=0)).save_pretrained(root / "tokenizer")
    TextProjector(replace(PROJECTOR_PRESETS["tiny"], latent_channels=C)).save_pretrained(root / "text_projector")
    FlowTransformer(preset(FLOW_PRESETS, "tiny", num_tokens=K, in_channels=C)).save_pretrained(root / "t2i_flow")
    FlowTransformer(preset(FLOW_PRESETS, "tiny", num_tokens=K, in_channels=C)).save_pretrained(root / "i2t_flow")
    TextDecoder(replace(DECODER_PRESETS["tiny"], num_tokens=K, latent_channels=C)).save_pretrained(root / "text_decoder")
    FlowTransformer(preset(FLOW_PRESETS, "tiny", num_tokens=6, in_channels=C)).save_pretrained(root / "flow_k6")
    return root


@pytest.fixture(scope="module")
def pipe_dir(parts, tmp_path_factory) -> Path:
    comps = {n: parts / n for n in ("tokenizer", "text_projector", "t2i_flow", "i2t_flow", "text_decoder")}
    return assemble_pipeline(tmp_path_factory.mktemp("pipe") / "pipe", comps, defaults={"num_inference_steps": 1})


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def _cli_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flowtok: error: "), err
    return err[0]


# ------------------------------------------------------------------------------------------ config.json
@pytest.mark.parametrize("field,value,needle", [
    ("width", 2**20, "width"), ("width", 16384, "width"), ("depth", 10**7, "depth"),
    ("depth", 1e7, "depth"), ("mlp_ratio", "NaN", "mlp_ratio"), ("mlp_ratio", "Infinity", "mlp_ratio"),
    ("num_heads", 3, "num_heads"), ("freq_dim", 2**40, "freq_dim"),
])
def test_hostile_config_values_are_refused_before_allocating(parts, tmp_path, capsys, field, value, needle):
    folder = Path(shutil.copytree(parts / "t2i_flow", tmp_path / "flow"))
    text = (folder / "config.json").read_text()
    cfg = json.loads(text)
    cfg[field] = value
    (folder / "config.json").write_text(json.dumps(cfg).replace('"NaN"', "NaN").replace('"Infinity"', "Infinity"))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError) as exc:
        FlowTransformer.from_pretrained(folder)
    assert needle in _one_line(exc)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100 * 1024  # KiB: nothing allocated


def test_tokenizer_image_size_disagreeing_with_its_weights_is_refused(parts, tmp_path):
    folder = Path(shutil.copytree(parts / "tokenizer", tmp_path / "tok"))
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["image_size"] == 32
    cfg["image_size"] = 256
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as exc:
        ImageTokenizer.from_pretrained(folder)
    assert "image_size is 256, but the weights were saved with image_size = 32" in _one_line(exc)
    cfg["image_size"], cfg["scale_factor"] = 32, 0.5  # a float setting (a latent scale) may be re-calibrated
    (folder / "config.json").write_text(json.dumps(cfg))
    assert ImageTokenizer.from_pretrained(folder).config.scale_factor == 0.5


# ------------------------------------------------------------------------------------------ pipelines
def test_assemble_refuses_components_of_mismatched_shapes(parts, tmp_path, capsys):
    comps = {"tokenizer": parts / "tokenizer", "text_projector": parts / "text_projector",
             "t2i_flow": parts / "flow_k6"}
    with pytest.raises(CheckpointError) as exc:
        assemble_pipeline(tmp_path / "p", comps)
    assert "t2i_flow models 6 x 4 tokens; the tokenizer's latents are 4 x 4" in _one_line(exc)
    assert not (tmp_path / "p").exists()  # refused before anything was written
    line = _cli_error(capsys, ["assemble", "--out", str(tmp_path / "q"), "--tokenizer", str(parts / "tokenizer"),
                               "--text-projector", str(parts / "text_projector"),
                               "--t2i-flow", str(parts / "flow_k6")])
    assert "6 x 4" in line
    base = ["assemble", "--out", str(tmp_path / "r"), "--tokenizer", str(parts / "tokenizer"),
            "--text-projector", str(parts / "text_projector")]
    assert "--defaults: not valid JSON" in _cli_error(capsys, [*base, "--defaults", "{bad"])
    assert "--defaults must be a JSON object" in _cli_error(capsys, [*base, "--defaults", "[1]"])
    assert "not valid JSON" in _cli_error(capsys, [*base, "--text-encoder", "{"])
    assert "defaults.num_inference_steps" in _cli_error(capsys, [*base, "--defaults", '{"num_inference_steps": 0}'])


@pytest.mark.parametrize("spec", [
    '{"pipeline_type": "flowtok", "components": ["tokenizer"]}',
    '{"pipeline_type": "flowtok", "components": {"tokenizer": 3}}',
    '{"pipeline_type": "flowtok", "components": {"tokenizer": "../../etc"}}',
    '{"pipeline_type": "flowtok", "components": {"tokenizer": "/etc"}}',
    '{"pipeline_type": "flowtok", "components": {"painter": "tokenizer"}}',
    '{"pipeline_type": "flowtok", "components": {"tokenizer": "tokenizer", "text_projector": "text_projector"}, '
    '"text_encoder": 5}',
    '{"pipeline_type": "flowtok", "components": {"tokenizer": "tokenizer", "text_projector": "text_projector"}, '
    '"defaults": [1]}',
    '{"pipeline_type": "flowtok", "components": {"tokenizer": "tokenizer", "text_projector": "text_projector"}, '
    '"defaults": {"guidance_scale": "big"}}',
    '{"pipeline_type": "flowtok", "components": {"tokenizer": "tokenizer", "text_projector": "text_projector"}, '
    '"text_encoder": {"name": "minilm", "colour": 1}}',
    '[' * 50_000 + ']' * 50_000,
    '{"pipeline_type": "flowtok", "components": {"tokenizer": "tokenizer", "text_projector": "text_projector", '
    '"t2i_flow": "t2i_flow_k6"}}',
])
def test_malformed_pipeline_json_is_one_line(pipe_dir, parts, tmp_path, capsys, spec):
    root = Path(shutil.copytree(pipe_dir, tmp_path / "pipe"))
    shutil.copytree(parts / "flow_k6", root / "t2i_flow_k6")
    (root / "pipeline.json").write_text(spec)
    with pytest.raises(FlowTokError) as exc:
        FlowTokPipeline.from_pretrained(root, device="cpu")
    _one_line(exc)
    _cli_error(capsys, ["generate", "a red circle", "--model", str(root), "-o", str(tmp_path / "o.png")])


# ---------------------------------------------------------------------------------------- converter
@pytest.mark.parametrize("content,needle", [
    (bytes(range(256)) * 20, "not a PyTorch or safetensors checkpoint"),
    (b"<!DOCTYPE html>\n<html><head><title>FlowTok-XL.pth</title></head><body>...</body></html>", "an HTML page"),
    (b"\n  <html lang='en'>", "an HTML page"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 2793426213\n",
     "a Git LFS pointer"),
    (b"\x1f\x8b\x08\x00" + b"\x00" * 60, "gzip-compressed"),
])
def test_converter_says_what_a_non_checkpoint_is(tmp_path, capsys, content, needle):
    path = tmp_path / "FlowTok-XL.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as exc:
        read_checkpoint(path)
    msg = _one_line(exc)
    assert needle in msg and "pickles" not in msg
    line = _cli_error(capsys, ["convert", "--from-official", str(path), "--kind", "flow-xl", "--out", str(tmp_path / "o")])
    assert needle in line
    if needle == "a Git LFS pointer":
        assert "2.60 GiB" in msg and "git lfs pull" in msg


def test_raw_pickle_gives_one_line_and_no_torch_warning(tmp_path, capsys):
    import pickle

    path = tmp_path / "model.pth"
    path.write_bytes(pickle.dumps({"w": [1, 2, 3], "cls": Path}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's two-line protocol warning would raise here
        with pytest.raises(CheckpointError) as exc:
            read_checkpoint(path)
    assert "pickles Python objects" in _one_line(exc)
    line = _cli_error(capsys, ["convert", "--from-official", str(path), "--kind", "flow-xl", "--out", str(tmp_path / "o")])
    assert "pickles" in line


# --------------------------------------------------------------------------------------- sampler grid
def test_upstream_grid_reproduces_the_authors_euler_loop():
    torch.manual_seed(0)
    w = torch.randn(6, 6) * 0.3

    def field(x, t, null):
        return torch.tanh(x @ w) * (1 + t[:, None, None]) + torch.where(null[:, None, None], 0.5, 0.0)

    x0 = torch.randn(3, 5, 6)
    n = 7
    # The FlowTok release's loop, written out: evaluate on linspace(0, 1 - 1e-5, N), step (1 - 1e-5) / N.
    x = x0.clone()
    for t in torch.linspace(0, 1 - 1e-5, n):
        v_cond = field(x, t.expand(3), torch.zeros(3, dtype=torch.bool))
        v_null = field(x, t.expand(3), torch.ones(3, dtype=torch.bool))
        x = x + (1 - 1e-5) / n * (v_null + 2.0 * (v_cond - v_null))
    ours = sample(field, x0, method="euler-upstream", num_steps=n, guidance_scale=2.0)
    assert torch.allclose(ours, x, atol=1e-6, rtol=0)
    plain = sample(field, x0, method="euler", num_steps=n, guidance_scale=2.0)
    assert (plain - x).abs().max() > 1e-3  # the grids really differ
    from flowtok.sampling import UPSTREAM_T_MAX

    assert UPSTREAM_T_MAX == 1 - 1e-5 and math.isclose(UPSTREAM_T_MAX, 0.99999)


def test_upstream_grid_through_the_pipeline_and_cli(pipe_dir, tmp_path):
    pipe = FlowTokPipeline.from_pretrained(pipe_dir, device="cpu")
    a = pipe.text_to_image("a red circle", num_inference_steps=3, sampler="euler-upstream", output_type="pt",
                           sample_text_latent=False)
    b = pipe.text_to_image("a red circle", num_inference_steps=3, sampler="euler", output_type="pt",
                           sample_text_latent=False)
    assert a.shape == b.shape and torch.isfinite(a).all()
    assert main(["generate", "a red circle", "--steps", "2", "--sampler", "euler-upstream", "--model", str(pipe_dir),
                 "-o", str(tmp_path / "u.png")]) == 0
