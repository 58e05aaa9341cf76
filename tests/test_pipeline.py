"""FlowTokPipeline on untrained tiny components (CPU, seconds): the one inference path, its defaults,
its input/output processing and the Hub round trip of every component."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flowtok.cli import main
from flowtok.config import preset
from flowtok.errors import CheckpointError
from flowtok.flow import FLOW_PRESETS, FlowTransformer
from flowtok.pipelines import COMPONENTS, FlowTokPipeline, SamplingDefaults
from flowtok.text import DECODER_PRESETS, PROJECTOR_PRESETS, TextDecoder, TextProjector, load_text_encoder
from flowtok.tokenizer import TOKENIZER_PRESETS, ImageTokenizer

K, C = 4, 4


def _pipeline(text_dim: int) -> FlowTokPipeline:
    torch.manual_seed(0)
    encoder = load_text_encoder("minilm", max_length=K)
    tok = ImageTokenizer(replace(TOKENIZER_PRESETS["tiny"], text_dim=text_dim, text_len=K))
    flows = [FlowTransformer(preset(FLOW_PRESETS, "tiny", num_tokens=K, in_channels=C)) for _ in range(2)]
    with torch.no_grad():  # a freshly built flow's output layer is zero (adaLN-Zero): give it a velocity field
        for p in (p for f in flows for p in f.parameters()):
            p.add_(0.1 * torch.randn_like(p))
        if tok.reads_text:  # and make the decoder's text path matter as much as a trained one's
            tok.decoder.text_proj.weight.normal_(0, 1)
            tok.decoder.to_pixels.weight.normal_(0, 0.5)
    return FlowTokPipeline(
        tok, encoder, TextProjector(replace(PROJECTOR_PRESETS["tiny"], latent_channels=C)), *flows,
        TextDecoder(replace(DECODER_PRESETS["tiny"], num_tokens=K, latent_channels=C))).to("cpu")


@pytest.fixture(scope="module")
def reading() -> FlowTokPipeline:
    """A pipeline whose image decoder reads the prompt's text states (the paper's tokenizer)."""
    return _pipeline(text_dim=load_text_encoder("minilm", max_length=K).dim)


def test_interpolation_frames_decode_with_the_prompts_text_states(reading):
    """Frame 0 between two prompts is the image text_to_image draws for the first prompt: same text latent
    AND same text states for the decoder (it used to decode every frame under the zero-text input)."""
    kw = {"num_inference_steps": 2, "guidance_scale": 2.0, "output_type": "pt"}
    frames = reading.interpolate("a red circle", "a blue square", num_frames=3, **kw)
    first = reading.text_to_image("a red circle", sample_text_latent=False, **kw)
    last = reading.text_to_image("a blue square", sample_text_latent=False, **kw)
    torch.testing.assert_close(frames[:1], first, atol=1e-5, rtol=0)
    torch.testing.assert_close(frames[2:], last, atol=1e-5, rtol=0)
    # and from an image: its caption's text states, so every frame reads text
    image = reading.text_to_image("a green star", output_type="pt", num_inference_steps=1)
    assert reading.interpolate("a red circle", image, num_frames=2, **kw).shape == (2, 3, 32, 32)


def test_interpolation_honours_the_sampler(reading):
    kw = {"num_inference_steps": 2, "output_type": "pt"}
    heun = reading.interpolate("a red circle", "a blue square", num_frames=2, sampler="heun", **kw)
    euler = reading.interpolate("a red circle", "a blue square", num_frames=2, sampler="euler", **kw)
    heun_first = reading.text_to_image("a red circle", sample_text_latent=False, sampler="heun", **kw)
    torch.testing.assert_close(heun[:1], heun_first, atol=1e-5, rtol=0)
    assert not torch.allclose(heun, euler)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A saved pipeline whose own sampling defaults differ from the code's."""
    pipe = _pipeline(text_dim=0)
    pipe.defaults = SamplingDefaults(num_inference_steps=3, guidance_scale=3.0, sampler="heun")
    return pipe.save_pretrained(tmp_path_factory.mktemp("pipe") / "p")


def test_the_folders_sampling_defaults_win_and_every_caller_reads_them(folder, tmp_path, capsys):
    pipe = FlowTokPipeline.from_pretrained(folder, device="cpu")
    assert pipe.defaults == SamplingDefaults(num_inference_steps=3, guidance_scale=3.0, sampler="heun")
    assert SamplingDefaults().guidance_scale == 2.0  # the code's default, overruled by the folder
    implicit = pipe.text_to_image("a red circle", output_type="pt", sample_text_latent=False)
    explicit = pipe.text_to_image("a red circle", output_type="pt", sample_text_latent=False,
                                  num_inference_steps=3, guidance_scale=3.0, sampler="heun")
    assert torch.equal(implicit, explicit)
    assert not torch.equal(implicit, pipe.text_to_image("a red circle", output_type="pt", sample_text_latent=False,
                                                        guidance_scale=2.0))
    # flowtok eval records the settings it sampled with: the folder's
    out = tmp_path / "t2i.json"
    assert main(["eval", "t2i", "--model", str(folder), "--device", "cpu", "--n", "1", "--objects", "1",
                 "--split", "seen", "--fid-n", "0", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["sampling"] == {"num_inference_steps": 3, "guidance_scale": 3.0,
                                                       "sampler": "heun"}
    capsys.readouterr()
    from flowtok.pipelines import BUNDLED_MODEL

    bundled = json.loads((BUNDLED_MODEL / "pipeline.json").read_text())["defaults"]
    assert FlowTokPipeline.from_pretrained(device="cpu").defaults.guidance_scale == bundled["guidance_scale"] == 3.0


@pytest.mark.parametrize("defaults", [{"guidance_scale": "loud"}, {"num_inference_steps": 0}, {"steps": 20}, [20]])
def test_bad_sampling_defaults_in_a_folder_are_one_checkpoint_error(folder, tmp_path, defaults):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    spec = json.loads((bad / "pipeline.json").read_text())
    (bad / "pipeline.json").write_text(json.dumps({**spec, "defaults": defaults}))
    with pytest.raises(CheckpointError) as exc:
        FlowTokPipeline.from_pretrained(bad, device="cpu")
    assert "pipeline.json" in str(exc.value) and "\n" not in str(exc.value)


def test_each_public_method_checks_its_prompts_once(folder, monkeypatch):
    import flowtok.pipelines as pipelines

    pipe = FlowTokPipeline.from_pretrained(folder, device="cpu")
    calls = []
    real = pipelines.check_prompts
    monkeypatch.setattr(pipelines, "check_prompts", lambda p: calls.append(p) or real(p))
    pipe.text_to_image(["a red circle", "a blue square"], num_inference_steps=1, batch_size=1)
    assert len(calls) == 1
    assert pipe.image_tokenizer is pipe.__dict__["image_tokenizer"] and not hasattr(pipe, "tokenizer")


# ------------------------------------------------------------------------------ saving and loading
def _components(pipe: FlowTokPipeline) -> dict[str, torch.nn.Module]:
    return {name: getattr(pipe, name) for name in COMPONENTS}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_component_saves_and_loads_a_folder(reading, tmp_path):
    for name, model in _components(reading).items():
        folder = model.save_pretrained(tmp_path / name)
        assert {"config.json", "model.safetensors"} <= {p.name for p in folder.iterdir()}
        assert json.loads((folder / "config.json").read_text())["model_type"] == model.model_type
        back = type(model).from_pretrained(folder)
        assert _same_weights(model, back) and back.config == model.config and not back.training


def _hub_cache(cache: Path, repo_id: str, folder: Path, revision: str = "a" * 40) -> None:
    """The layout huggingface_hub keeps a downloaded repo in (refs/main -> snapshots/<commit>/files)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(folder, repo / "snapshots" / revision)


def test_every_component_loads_from_a_hub_id_in_the_local_cache(reading, tmp_path):
    for name, model in _components(reading).items():
        _hub_cache(tmp_path / "cache", f"someone/{name}", model.save_pretrained(tmp_path / name))
        back = type(model).from_pretrained(f"someone/{name}", cache_dir=tmp_path / "cache", local_files_only=True)
        assert _same_weights(model, back)
    with pytest.raises(CheckpointError, match="cannot get 'someone/absent' from the Hugging Face Hub"):
        ImageTokenizer.from_pretrained("someone/absent", cache_dir=tmp_path / "cache", local_files_only=True)


def test_a_hub_id_downloads_config_and_weights(reading, tmp_path, monkeypatch):
    import huggingface_hub

    folder = reading.image_tokenizer.save_pretrained(tmp_path / "tok")
    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename, kwargs.get("revision")))
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    back = ImageTokenizer.from_pretrained("someone/tok", revision="v1")
    assert _same_weights(reading.image_tokenizer, back)
    assert asked == [("someone/tok", "config.json", "v1"), ("someone/tok", "model.safetensors", "v1")]
    (folder / "model.safetensors").write_bytes(b"not safetensors")  # a corrupt download: one clear line
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        ImageTokenizer.from_pretrained("someone/tok")
    with pytest.raises(CheckpointError, match="model folder not found"):
        ImageTokenizer.from_pretrained(tmp_path / "no" / "such" / "folder")


def test_push_to_hub_uploads_the_saved_folder(reading, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    uploaded = {}

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, tmp_path / "uploaded")
        uploaded["repo_id"] = repo_id
        return "https://huggingface.co/someone/flow/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: type("Url", (), {"repo_id": repo_id})())
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert reading.t2i_flow.push_to_hub("someone/flow").endswith("/commit/0")
    assert uploaded["repo_id"] == "someone/flow"
    files = {p.name for p in (tmp_path / "uploaded").iterdir()}
    assert files == {"config.json", "model.safetensors", "README.md"}
    assert "FlowTransformer.from_pretrained" in (tmp_path / "uploaded" / "README.md").read_text()
    assert _same_weights(reading.t2i_flow, FlowTransformer.from_pretrained(tmp_path / "uploaded"))


def test_saved_weights_are_byte_identical_across_processes(reading, tmp_path):
    """safetensors writes its metadata from a Rust HashMap, in an order that changes per process; the saved
    header is put in sorted order, so two runs that end with the same weights write the same bytes."""
    folder = reading.image_tokenizer.save_pretrained(tmp_path / "tok")
    raw = (folder / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"]) and len(header["__metadata__"]) >= 2
    assert _same_weights(reading.image_tokenizer, ImageTokenizer.from_pretrained(folder))
