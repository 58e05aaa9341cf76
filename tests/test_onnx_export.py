"""ONNX export and the torch-free runtime on a tiny untrained pipeline (CPU, seconds per graph)."""

import json
import re
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from flowtok import shapes
from flowtok.caption_grammar import CaptionGrammar
from flowtok.cli import main
from flowtok.errors import CheckpointError, ConfigError, InvalidInputError
from flowtok.export.onnx import export_onnx
from flowtok.export.runtime import OnnxFlowTokPipeline
from flowtok.pipelines import FlowTokPipeline

GRAPHS = {"text_encoder", "text_projector", "t2i_flow", "i2t_flow", "image_encoder", "image_decoder", "text_decoder"}
PROMPTS = ["a large red circle in the top left", "a small blue star at the center"]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    """An untrained tiny pipeline whose image decoder reads the text states (the path the bundle lacks)."""
    from flowtok.config import preset
    from flowtok.flow import FLOW_PRESETS, FlowTransformer
    from flowtok.pipelines import assemble_pipeline
    from flowtok.text import DECODER_PRESETS, PROJECTOR_PRESETS, TextDecoder, TextProjector
    from flowtok.tokenizer import TOKENIZER_PRESETS, ImageTokenizer

    torch.manual_seed(0)
    tok_cfg = replace(TOKENIZER_PRESETS["tiny"], num_latent_tokens=6, text_dim=384, text_len=6)
    k, c = tok_cfg.latent_shape
    parts = {
        "tokenizer": ImageTokenizer(tok_cfg),
        "text_projector": TextProjector(preset(PROJECTOR_PRESETS, "tiny", latent_channels=c)),
        "t2i_flow": FlowTransformer(preset(FLOW_PRESETS, "tiny", num_tokens=k, in_channels=c)),
        "i2t_flow": FlowTransformer(preset(FLOW_PRESETS, "tiny", num_tokens=k, in_channels=c)),
        "text_decoder": TextDecoder(preset(DECODER_PRESETS, "tiny", num_tokens=k, latent_channels=c)),
    }
    for model in parts.values():  # untrained adaLN-Zero flows predict v = 0; give them something to do
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("tiny")
    for name, model in parts.items():
        model.save_pretrained(root / "parts" / name)
    return assemble_pipeline(root / "pipeline", {n: root / "parts" / n for n in parts},
                             defaults={"num_inference_steps": 3, "guidance_scale": 2.0})


@pytest.fixture(scope="module")
def exported(tiny_pipeline, tmp_path_factory) -> Path:
    """Every graph in every precision, int8 included where the bundle keeps fp16 (to test the int8 files)."""
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(tiny_pipeline, out, int8_graphs=sorted(GRAPHS))
    return out


def test_cli_export(tiny_pipeline, tmp_path, capsys, monkeypatch):
    # The text encoder's export is most of the time; the CLI's wiring is what is tested here.
    import flowtok.export.onnx as exporter

    table = exporter._graph_table
    monkeypatch.setattr(exporter, "_graph_table",
                        lambda pipe: {k: v for k, v in table(pipe).items() if k != "text_encoder"})
    assert main(["export", "onnx", "--model", str(tiny_pipeline), "--out", str(tmp_path / "o"),
                 "--precision", "fp32", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "t2i_flow: fp32" in out and "max |onnx - torch| fp32" in out
    assert (tmp_path / "o" / "t2i_flow.fp16.onnx").is_file() and not (tmp_path / "o" / "t2i_flow.int8.onnx").exists()
    assert main(["export", "onnx", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "p")]) == 2
    assert "model folder not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pipes(tiny_pipeline, exported):
    return (FlowTokPipeline.from_pretrained(tiny_pipeline, device="cpu"),
            OnnxFlowTokPipeline.from_pretrained(exported, num_threads=1))


def test_every_graph_is_written_and_agrees_with_pytorch(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert set(manifest["graphs"]) == GRAPHS
    for name, entry in manifest["graphs"].items():
        assert set(entry["files"]) == {"fp32", "fp16", "int8"}, name
        for file in entry["files"].values():
            assert (exported / file).is_file()
        assert entry["max_abs_diff"]["fp32"] < 1e-4, name
        assert entry["max_abs_diff"]["fp16"] < 2e-2, name
        assert entry["bytes"]["fp16"] <= entry["bytes"]["fp32"], name
    # Small float32 tables that float16 would round stay float32; MiniLM's matrices do not.
    sizes = manifest["graphs"]["text_encoder"]["bytes"]
    assert sizes["fp16"] < 0.55 * sizes["fp32"]
    assert manifest["image_latent"]["decoder_reads_text"] is True
    assert manifest["image_latent"]["scale_factor"] == pytest.approx(1.0143)
    assert manifest["defaults"]["num_inference_steps"] == 3
    assert (exported / manifest["text"]["tokenizer"]).is_file()
    assert manifest["defaults"]["caption_grammar"] is None and "caption_grammar" not in manifest


# A grammar that fits the tiny text encoder's 6 tokens ("[CLS] a red circle [SEP] [PAD]"): the shapes
# world's is too long for it (the bundled model's is tested in test_onnx_bundled.py).
TINY_SKELETONS = [("a {} {}", [0, 1]), ("{} {}", [0, 1]), ("the {}", [1]), ("a {} thing", [0])]
TINY_LANGUAGE = re.compile(rf"(a |)({'|'.join(shapes.COLORS)}) ({'|'.join(shapes.SHAPES)})|the ({'|'.join(shapes.SHAPES)})"
                           rf"|a ({'|'.join(shapes.COLORS)}) thing")


@pytest.fixture(scope="module")
def tiny_grammar(pipes) -> CaptionGrammar:
    pt, _ = pipes

    def tokenize(rows):
        ids, mask = pt.text_encoder.tokenize(rows)
        return ids.numpy(), mask.numpy()

    return CaptionGrammar.build("shapes", TINY_SKELETONS, [tuple(shapes.COLORS), shapes.SHAPES],
                                pt.text_encoder._content_ids, tokenize)


@pytest.fixture(scope="module")
def grammar_export(exported, tiny_grammar, tmp_path_factory) -> Path:
    """The tiny export whose manifest carries a grammar table and names it in its defaults."""
    out = tmp_path_factory.mktemp("grammar-onnx")
    manifest = json.loads((exported / "manifest.json").read_text())
    for file in [manifest["text"]["tokenizer"], *(g["files"]["fp32"] for g in manifest["graphs"].values())]:
        (out / file).symlink_to(exported / file)
    for g in manifest["graphs"].values():
        g["files"] = {"fp32": g["files"]["fp32"]}
    manifest["defaults"]["caption_grammar"] = "shapes"
    manifest["caption_grammar"] = tiny_grammar.to_json()
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_grammar_tables_build_decode_and_travel_as_json(tiny_grammar, pipes):
    pt, _ = pipes
    g = tiny_grammar
    assert g.length == 6 and len(g.texts) == 4 and len(g.vocab) == 8 + 6 + 6  # + a, the, thing, [CLS], [SEP], [PAD]
    # One-hot logits of a caption give it back; random logits give a caption of the language, the same
    # from the table read back from its JSON.
    ids, _ = pt.text_encoder.tokenize(["a pink star", "the cross", "brown diamond", "a red thing"])
    onehot = np.eye(pt.text_encoder.vocab_size, dtype=np.float32)[ids.numpy()] * 10
    assert g.decode(onehot) == ["a pink star", "the cross", "brown diamond", "a red thing"]
    noise = np.random.default_rng(0).normal(size=(64, 6, len(g.vocab))) * 3
    captions = g.decode_scores(noise)
    assert captions == CaptionGrammar.from_json(json.loads(json.dumps(g.to_json()))).decode_scores(noise)
    assert all(TINY_LANGUAGE.fullmatch(c) for c in captions) and len(set(captions)) > 20
    # A decoder shorter than the captions scores the positions it has; the rest take the first word.
    assert all(TINY_LANGUAGE.fullmatch(c) for c in g.decode_scores(noise[:, :3]))
    with pytest.raises(InvalidInputError):
        g.decode(np.zeros((1, 6, 100)))  # not the text vocabulary
    with pytest.raises(ConfigError, match="one token per word"):
        CaptionGrammar.build("x", [("a {}", [0])], [("red", "flowtokness")], pt.text_encoder._content_ids, None)


def test_runtime_grammar_captions_match_the_pipelines(pipes, grammar_export, tiny_grammar, monkeypatch):
    """The PyTorch pipeline (its torch decoding path, fed the same table) and the runtime, with the grammar."""
    import flowtok.shapes.grammar as torch_grammar

    pt, _ = pipes
    ox = OnnxFlowTokPipeline.from_pretrained(grammar_export, num_threads=1)
    assert ox.grammar is not None and ox.grammar.texts == tiny_grammar.texts
    monkeypatch.setattr(torch_grammar, "shapes_grammar", lambda encoder: tiny_grammar)
    monkeypatch.setattr(pt, "defaults", replace(pt.defaults, caption_grammar="shapes"))
    images = np.random.default_rng(1).random((12, 3, 32, 32), dtype=np.float32)
    captions = ox.image_to_text(images)
    assert captions == pt.image_to_text(torch.from_numpy(images))
    assert all(TINY_LANGUAGE.fullmatch(c) for c in captions)


def test_malformed_or_missing_grammar_tables_are_refused(grammar_export, tmp_path):
    manifest = json.loads((grammar_export / "manifest.json").read_text())
    for file in grammar_export.iterdir():
        if file.name != "manifest.json":
            (tmp_path / file.name).symlink_to(file.resolve())
    bad = {**manifest["caption_grammar"], "skeletons": [{"text": "a {} {}", "ids": [101, -1, 102]}]}
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "caption_grammar": bad}))
    with pytest.raises(CheckpointError, match="caption_grammar is malformed"):
        OnnxFlowTokPipeline.from_pretrained(tmp_path)
    del manifest["caption_grammar"]  # an export from before grammars: captioning says what to do
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    pipe = OnnxFlowTokPipeline.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="holds no table for it; export the model again"):
        pipe.image_to_text(np.zeros((1, 3, 32, 32), dtype=np.float32))
    pipe.defaults["caption_grammar"] = None  # argmax decoding needs no table
    assert isinstance(pipe.image_to_text(np.zeros((1, 3, 32, 32), dtype=np.float32))[0], str)


def test_graphs_take_any_batch_size(exported, pipes):
    pt, _ = pipes
    session = ort.InferenceSession(str(exported / "t2i_flow.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        x = torch.randn(batch, 6, 4)
        t = torch.rand(batch)
        null = torch.randint(0, 2, (batch,))
        got = session.run(None, {"x": x.numpy(), "t": t.numpy(), "null_indicator": null.numpy()})[0]
        with torch.no_grad():
            want = pt.t2i_flow(x, t, null).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_runtime_text_to_image_matches_the_pipeline(pipes):
    pt, ox = pipes
    want = pt.text_to_image(PROMPTS, output_type="np", sample_text_latent=False)
    got = ox.text_to_image(PROMPTS, output_type="np", sample_text_latent=False)
    assert got.shape == want.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(got, want, atol=1e-4)
    # Sampling the posterior: the runtime's draw fed to PyTorch gives the same image.
    states = pt.text_encoder.encode(PROMPTS).states
    out = pt.text_projector(states, sample=False)
    eps = np.random.default_rng(5).standard_normal(tuple(out.mean.shape), dtype=np.float32)
    z = out.mean + torch.exp(0.5 * out.logvar) * torch.from_numpy(eps)
    from flowtok.sampling import sample

    lat = sample(pt.t2i_flow, z, num_steps=3, guidance_scale=2.0)
    want = pt.decode_latents(lat, states).permute(0, 2, 3, 1).numpy()
    got = ox.text_to_image(PROMPTS, output_type="np", generator=np.random.default_rng(5))
    np.testing.assert_allclose(got, want, atol=1e-4)
    heun_pt = pt.text_to_image(PROMPTS, output_type="np", sample_text_latent=False, sampler="heun")
    heun_ox = ox.text_to_image(PROMPTS, output_type="np", sample_text_latent=False, sampler="heun")
    np.testing.assert_allclose(heun_ox, heun_pt, atol=1e-4)


def test_runtime_image_to_text_matches_the_pipeline(pipes, tmp_path):
    pt, ox = pipes
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(3)]
    images.append(Image.fromarray(rng.integers(0, 256, (33, 33, 4), dtype=np.uint8), "RGBA"))
    images.append(Image.fromarray(rng.integers(0, 256, (20, 64), dtype=np.uint8), "L"))
    path = tmp_path / "a.png"
    images[0].save(path)
    inputs = [*images, str(path), path.read_bytes()]
    np.testing.assert_allclose(ox.image_array(inputs), pt.image_processor.preprocess(inputs).numpy(), atol=1e-6)
    assert ox.image_to_text(inputs) == pt.image_to_text(inputs)
    assert ox.image_to_text(inputs, batch_size=2, guidance_scale=2.0) == pt.image_to_text(inputs, guidance_scale=2.0)


def test_runtime_tokenizes_and_detokenizes_as_the_text_encoder(pipes):
    pt, ox = pipes
    texts = [*PROMPTS, "Héllo   wörld!  I can't see it, 42 cats?", "[SEP] [CLS] 漢字 naïve café", "x" * 300,
             "a, b. c; d: e! f? g's h'm", "\u00e9\u0301 \u212b"]
    with pytest.warns(UserWarning, match="truncated"):
        want_ids, want_mask = pt.text_encoder.tokenize(texts)
    with pytest.warns(UserWarning, match="truncated"):
        got_ids, got_mask = ox.tokenize(texts)
    np.testing.assert_array_equal(got_ids, want_ids.numpy())
    np.testing.assert_array_equal(got_mask, want_mask.numpy().astype(np.int64))
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 30522, (200, 6))
    rows[::3, 0] = 101
    rows[::4, 3] = 102
    rows[::5, 2] = 0
    common = np.array([1037, 2312, 2417, 4418, 1999, 1996, 2327, 2187, 1010, 1012, 1005, 1055, 2321, 2484])
    rows[100:] = rng.choice(common, (100, 6))
    assert ox.decode_ids(rows) == pt.text_encoder.decode_ids(torch.from_numpy(rows))


def test_runtime_precisions_run(exported):
    for precision in ("fp16", "int8"):
        pipe = OnnxFlowTokPipeline.from_pretrained(exported, precision=precision, num_threads=1)
        assert pipe.graph_file("t2i_flow").name == f"t2i_flow.{precision}.onnx"
        images = pipe.text_to_image(PROMPTS[0], generator=0)
        assert images[0].size == (32, 32)
        assert isinstance(pipe.image_to_text(images)[0], str)


def test_runtime_user_errors(exported, tmp_path):
    pipe = OnnxFlowTokPipeline.from_pretrained(exported)
    for bad in ("", "   ", 3, [], ["ok", None], "x" * 5000):
        with pytest.raises(InvalidInputError):
            pipe.text_to_image(bad)
    with pytest.raises(InvalidInputError):
        pipe.text_to_image("a", num_inference_steps=0)
    with pytest.raises(InvalidInputError):
        pipe.text_to_image("a", guidance_scale=float("nan"))
    with pytest.raises(InvalidInputError):
        pipe.image_to_text(np.zeros((1, 3, 32, 32), dtype=np.float32) + 5)
    (tmp_path / "notes.png").write_bytes(b"not pixels")
    with pytest.raises(Exception, match="not a readable image"):
        pipe.image_to_text(str(tmp_path / "notes.png"))
    with pytest.raises(CheckpointError, match="no manifest.json"):
        OnnxFlowTokPipeline.from_pretrained(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        OnnxFlowTokPipeline.from_pretrained(tmp_path)


_NO_TORCH = textwrap.dedent("""
    import json
    import sys
    from importlib.abc import MetaPathFinder

    class NoTorch(MetaPathFinder):
        BLOCKED = ("torch", "transformers", "torchvision", "safetensors", "accelerate")

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ModuleNotFoundError(f"{name} is blocked in this test", name=name)
            return None

    sys.meta_path.insert(0, NoTorch())
    import flowtok.export.runtime as rt

    pipe = rt.OnnxFlowTokPipeline.from_pretrained(sys.argv[1], num_threads=1)
    images = pipe.text_to_image(["a large red circle in the top left", "a blue star"], generator=0)
    captions = pipe.image_to_text(images)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in NoTorch.BLOCKED)
    assert not leaked, leaked
    print("ran without torch:", images[0].size, json.dumps(captions))
""")


def test_runtime_runs_with_torch_absent(grammar_export):
    """The runtime, its caption grammar included, in a fresh interpreter where importing torch (or transformers) fails."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run([sys.executable, "-c", _NO_TORCH, str(grammar_export)], capture_output=True, text=True,
                         timeout=300, env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "ran without torch: (32, 32)" in out.stdout
    captions = json.loads(out.stdout.split("(32, 32) ", 1)[1])
    assert all(TINY_LANGUAGE.fullmatch(c) for c in captions)  # the grammar's decoding ran torch-free too


def test_static_site_copies_one_precision(exported, tmp_path, capsys):
    from flowtok.serving.static import copy_export

    copy_export(exported, tmp_path / "m", precision="int8")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert {tuple(e["files"]) for e in manifest["graphs"].values()} == {("int8",)}
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(
        ["manifest.json", "tokenizer.json", *(f"{g}.int8.onnx" for g in GRAPHS)])
    assert OnnxFlowTokPipeline.from_pretrained(tmp_path / "m", precision="int8").text_to_image("a", generator=0)
    assert main(["demo", "--static", "--ort-web", str(tmp_path / "nowhere")]) == 2
    assert "onnxruntime-web not found" in capsys.readouterr().err
