"""The bundled model exported to ONNX against PyTorch (the full 500-scene comparison is benchmarks/onnx_bench.py)."""

import json

import numpy as np
import pytest
import torch

from flowtok import shapes
from flowtok.export.runtime import OnnxFlowTokPipeline
from flowtok.pipelines import FlowTokPipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipes(bundled_onnx):
    return FlowTokPipeline.from_pretrained(device="cpu"), OnnxFlowTokPipeline.from_pretrained(bundled_onnx)


def test_every_bundled_graph_agrees_with_pytorch(bundled_onnx):
    manifest = json.loads((bundled_onnx / "manifest.json").read_text())
    assert len(manifest["graphs"]) == 7
    for name, entry in manifest["graphs"].items():
        assert entry["max_abs_diff"]["fp32"] < 1e-4, name
        assert entry["max_abs_diff"]["fp16"] < 1e-2, name
    assert manifest["image_latent"]["scale_factor"] == pytest.approx(3.0877)
    assert manifest["defaults"] == {"num_inference_steps": 20, "guidance_scale": 3.0, "caption_guidance_scale": 1.0,
                                   "sampler": "euler", "caption_grammar": "shapes"}


def test_the_export_carries_the_pipelines_grammar(pipes):
    from flowtok.shapes.grammar import shapes_grammar

    pt, ox = pipes
    want = shapes_grammar(pt.text_encoder)
    assert ox.grammar is not None and ox.grammar.name == "shapes" and len(ox.grammar.texts) == 155
    assert ox.grammar.texts == want.texts and ox.grammar.words == want.words
    np.testing.assert_array_equal(ox.grammar.rows, want.rows)
    # Off-world images (noise): argmax would write anything; both write the same caption of the world.
    noise = np.random.default_rng(0).random((4, 3, 128, 128), dtype=np.float32)
    captions = ox.image_to_text(noise, num_inference_steps=4)
    assert captions == pt.image_to_text(torch.from_numpy(noise), num_inference_steps=4)
    assert all(shapes.parse(c) for c in captions)


def test_bundled_images_and_captions_match_pytorch(pipes):
    pt, ox = pipes
    rng = np.random.default_rng(0)
    scenes = [shapes.sample_scene(rng, num_objects=1, split="test") for _ in range(4)]
    prompts = [shapes.caption(s, rng) for s in scenes]
    want = pt.text_to_image(prompts, output_type="np", sample_text_latent=False)
    got = ox.text_to_image(prompts, output_type="np", sample_text_latent=False)
    psnr = 10 * np.log10(1 / ((want - got) ** 2).mean(axis=(1, 2, 3)))
    assert psnr.min() >= 40, psnr
    images = [shapes.render(s, size=128) for s in scenes]
    captions = ox.image_to_text(images)
    assert captions == pt.image_to_text(images)
    assert all(shapes.parse(c) for c in captions)
    fp16 = OnnxFlowTokPipeline.from_pretrained(ox.root, precision="fp16")
    assert [shapes.judge(im) for im in fp16.text_to_image(prompts, sample_text_latent=False)] == \
        [shapes.judge(im) for im in ox.text_to_image(prompts, sample_text_latent=False)]
