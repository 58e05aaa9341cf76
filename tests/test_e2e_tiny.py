"""End to end on tiny configs: every stage through the one trainer, a pipeline, and the CLI."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowtok.cli import main
from flowtok.errors import ConfigError, InvalidInputError
from flowtok.flow import FlowTransformer
from flowtok.pipelines import FlowTokPipeline, assemble_pipeline
from flowtok.training.run import build_run

TRAIN = {"steps": 4, "batch_size": 4, "lr": 1e-3, "ckpt_every": 2, "log_every": 2, "tensorboard": False,
         "progress": False, "eval_every": 0}
DATA = {"kind": "shapes", "size": 64, "split": "train"}
K, C = 4, 4


def _run(tmp: Path, name: str, stage: str, model: dict) -> Path:
    cfg = {"stage": stage, "run_dir": str(tmp / name), "seed": 0, "data": DATA, "train": TRAIN, "model": model}
    return build_run(cfg, device="cpu").fit()


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("e2e")
    tok = _run(tmp, "tok", "tokenizer", {"preset": "tiny", "overrides": {"text_dim": 0, "image_size": 64, "patch_size": 16}, "eval_images": 4,
                                      "scale_images": 40})
    t2i = _run(tmp, "t2i", "t2i", {
        "tokenizer_path": str(tok / "tokenizer"), "projector_preset": "tiny", "projector": {"latent_channels": C},
        "flow_preset": "tiny", "flow": {"num_tokens": K, "in_channels": C}, "eval_prompts": 4, "eval_steps": 2})
    dec = _run(tmp, "dec", "text_decoder", {
        "projector_path": str(t2i / "text_projector"), "decoder_preset": "tiny",
        "decoder": {"num_tokens": K, "latent_channels": C}, "max_length": K, "eval_captions": 4})
    i2t = _run(tmp, "i2t", "i2t", {
        "tokenizer_path": str(tok / "tokenizer"), "projector_path": str(t2i / "text_projector"),
        "decoder_path": str(dec / "text_decoder"), "flow_preset": "tiny",
        "flow": {"num_tokens": K, "in_channels": C}, "eval_images": 4, "eval_steps": 2})
    return assemble_pipeline(tmp / "pipe", {
        "tokenizer": tok / "tokenizer", "text_projector": t2i / "text_projector", "t2i_flow": t2i / "t2i_flow",
        "i2t_flow": i2t / "i2t_flow", "text_decoder": dec / "text_decoder"}, dtype=torch.float16)


def test_tokenizer_export_measures_its_scale_factor(tiny_pipeline):
    from flowtok.shapes import shapes_batch
    from flowtok.tokenizer import ImageTokenizer

    tok = ImageTokenizer.from_pretrained(tiny_pipeline.parent / "tok" / "export" / "tokenizer")
    assert tok.scale_factor != 1.0143  # measured, not the preset's
    images = torch.cat([shapes_batch(0, s, 10, split="train", size=64)[0] for s in range(0, 40, 10)])
    with torch.no_grad():
        z = tok.encode(images)
    # The exported weights are the EMA's; the factor was measured on them (rounded to 4 decimals).
    assert (z * tok.scale_factor).std().item() == pytest.approx(1.0, abs=2e-3)


def test_runs_leave_config_metrics_and_checkpoints(tiny_pipeline):
    root = tiny_pipeline.parent
    for name in ("tok", "t2i", "dec", "i2t"):
        assert (root / name / "config.yaml").is_file()
        assert (root / name / "metrics.jsonl").is_file()
        assert (root / name / "checkpoints" / "step-0000004" / "manifest.json").is_file()


def test_pipeline_both_directions(tiny_pipeline):
    pipe = FlowTokPipeline.from_pretrained(tiny_pipeline, device="cpu")
    g = torch.Generator().manual_seed(0)
    images = pipe.text_to_image(["a red circle", "a blue square"], num_inference_steps=3, generator=g)
    assert len(images) == 2 and images[0].size == (64, 64)
    again = pipe.text_to_image(["a red circle", "a blue square"], num_inference_steps=3,
                               generator=torch.Generator().manual_seed(0))
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))  # seeded -> reproducible
    arr = pipe.text_to_image("a red circle", num_inference_steps=2, output_type="np")
    assert arr.shape == (1, 64, 64, 3) and np.isfinite(arr).all()
    caps = pipe.image_to_text(images, num_inference_steps=2)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    frames = pipe.interpolate("a red circle", images[1], num_frames=3, num_inference_steps=2, output_type="pt")
    assert frames.shape == (3, 3, 64, 64)
    caps2, imgs2 = pipe.roundtrip_image(images[:1], num_inference_steps=2)
    assert len(caps2) == 1 and len(imgs2) == 1


@pytest.mark.parametrize("bad", ["", "   ", "\x00\x01", "x" * 5000])
def test_bad_prompts_raise_one_line(tiny_pipeline, bad):
    pipe = FlowTokPipeline.from_pretrained(tiny_pipeline, device="cpu")
    with pytest.raises(InvalidInputError) as exc:
        pipe.text_to_image(bad, num_inference_steps=1)
    assert "\n" not in str(exc.value)


def test_cli_generate_and_caption(tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "a green triangle", "-o", str(out), "--n", "2", "--steps", "2",
                 "--model", str(tiny_pipeline)]) == 0
    files = [tmp_path / "img-0.png", tmp_path / "img-1.png"]
    assert all(Image.open(f).size == (64, 64) for f in files)
    capsys.readouterr()
    assert main(["caption", *map(str, files), "--steps", "2", "--model", str(tiny_pipeline)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2


def test_cli_user_errors_exit_2(tiny_pipeline, tmp_path, capsys):
    not_image = tmp_path / "notes.png"
    not_image.write_bytes(b"this is not a png")
    assert main(["caption", str(not_image), "--model", str(tiny_pipeline)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowtok: error:") and len(err.splitlines()) == 1
    assert main(["generate", "", "--model", str(tiny_pipeline)]) == 2
    assert main(["generate", "x", "--model", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    from flowtok.nn.fp8 import fp8_supported

    if not fp8_supported():  # FP8 on a machine without FP8 matmuls: a one-line error, nothing written
        for mode in ([], ["dynamic"]):
            assert main(["generate", "x", "--model", str(tiny_pipeline), "-o", str(tmp_path / "f.png"),
                         "--fp8", *mode]) == 2
            assert "compute capability 8.9" in capsys.readouterr().err
        assert not (tmp_path / "f.png").exists()


def test_text_latent_shape_mismatch_is_a_config_error(tiny_pipeline, tmp_path):
    tok = tiny_pipeline / "tokenizer"
    with pytest.raises(ConfigError, match="channels"):
        _run(tmp_path, "bad", "t2i", {"tokenizer_path": str(tok), "projector_preset": "tiny",
                                      "flow_preset": "tiny", "flow": {"num_tokens": K, "in_channels": C}})


def test_pretokenize_then_train_on_latents(tiny_pipeline, tmp_path, monkeypatch):
    import flowtok.training.pretokenize as pretok
    from flowtok import shapes

    tok = str(tiny_pipeline / "tokenizer")
    lat = tmp_path / "latents"
    rendered = []
    monkeypatch.setattr(pretok, "render_batch", lambda *a, **kw: rendered.append(shapes.render_batch(*a, **kw))
                        or rendered[-1])
    assert main(["pretokenize", "--tokenizer", tok, "--out", str(lat), "--n", "10", "--batch-size", "4",
                 "--shard-size", "6", "--no-progress"]) == 0
    from flowtok.data.tokens import TokenShards

    shards = TokenShards(lat)
    assert len(shards) == 10 and len(shards.meta["shards"]) == 2
    # The tokenizer saw each sample as the shapes stream draws it (v2: placement, shade, style,
    # background), not the v1 canonical drawing of its scene.
    images, captions, scenes = shapes.shapes_batch(0, 0, 10, size=64)
    torch.testing.assert_close(torch.cat(rendered), images)
    assert not torch.allclose(shapes.render_batch(scenes, 64), images)
    assert shards.read(np.arange(10))["captions"] == captions
    assert shards.moments_shape == (K, 2 * C)  # the posterior: mean and logvar
    data = {"kind": "tokens", "path": str(lat), "workers": 0}
    model = {"tokenizer_path": tok, "projector_preset": "tiny", "projector": {"latent_channels": C},
             "flow_preset": "tiny", "flow": {"num_tokens": K, "in_channels": C}, "eval_prompts": 2, "eval_steps": 1}
    cfg = {"stage": "t2i", "run_dir": str(tmp_path / "t2i"), "data": data, "train": TRAIN, "model": model}
    out = build_run(cfg, device="cpu").fit()
    assert (out / "t2i_flow" / "model.safetensors").is_file()
    i2t = {"tokenizer_path": tok, "projector_path": str(out / "text_projector"), "flow_preset": "tiny",
           "flow": {"num_tokens": K, "in_channels": C}, "eval_images": 2, "eval_steps": 1}
    cfg = {"stage": "i2t", "run_dir": str(tmp_path / "i2t"), "data": data, "train": TRAIN, "model": i2t}
    run = build_run(cfg, device="cpu")
    # The canonical captions' text latents are computed once at setup; a batch's are the ones its own
    # captions give, parsed back to scenes and re-encoded.
    stage = run.stage
    stage.setup(torch.device("cpu"))
    assert stage.targets is not None and stage.targets.shape == (10, K, C)
    b = stage.batch(1, 4, 0, 1)
    ts = stage.encoder.encode([stage.shapes.canonical_caption(stage.shapes.scene_of(c)) for c in b["captions"]])
    want = stage.projector(ts.states.float(), ts.mask, sample=False).mean
    torch.testing.assert_close(b["text_latents"], want)
    out = run.fit()
    assert (out / "i2t_flow" / "model.safetensors").is_file()
    every = shards.read(np.arange(10))["captions"]
    assert shards.captions() == every == TokenShards(lat, in_memory=True).captions()


def test_pretokenize_the_v1_world(tiny_pipeline, tmp_path, monkeypatch, caplog):
    """``--world v1`` encodes the canonical drawings and says so in meta.json; training on those shards with
    the default data.world (v2) warns that its evaluation draws another world."""
    import logging

    import flowtok.training.pretokenize as pretok
    from flowtok import shapes
    from flowtok.data.tokens import TokenShards
    from flowtok.training.data import DataConfig, build_source

    lat = tmp_path / "v1"
    rendered = []
    monkeypatch.setattr(pretok, "render_batch", lambda *a, **kw: rendered.append(shapes.render_batch(*a, **kw))
                        or rendered[-1])
    assert main(["pretokenize", "--tokenizer", str(tiny_pipeline / "tokenizer"), "--out", str(lat), "--n", "4",
                 "--world", "v1", "--no-progress"]) == 0
    images, captions, _ = shapes.shapes_batch(0, 0, 4, size=64, world="v1")
    torch.testing.assert_close(torch.cat(rendered), images)
    shards = TokenShards(lat)
    assert shards.meta["world"] == "v1" and shards.read(np.arange(4))["captions"] == captions
    with caplog.at_level(logging.WARNING, logger="flowtok.training.data"):
        build_source(DataConfig(kind="tokens", path=str(lat), workers=0, world="v1"), 0, torch.device("cpu"))
        assert "drawn in world" not in caplog.text
        build_source(DataConfig(kind="tokens", path=str(lat), workers=0), 0, torch.device("cpu"))
    assert "holds shapes drawn in world v1; in-training evaluation draws data.world=v2" in caplog.text


def test_merge_v2_and_v1_sets_and_train_on_canonical_captions(tiny_pipeline, tmp_path, capsys, caplog):
    """``flowtok data merge`` joins a v2 and a v1 set written with one tokenizer: the merged folder reads
    back as both, in order, and is still shapes data, so the image-to-text stage trains on canonical captions
    (a hand-edited meta.json that dropped ``source: shapes`` once made it train on each sample's own
    wording, and now warns). Folders written otherwise, or an --out that holds files, are one line and
    exit 2."""
    import json
    import logging
    import shutil

    from flowtok import shapes
    from flowtok.data.tokens import TokenShards

    tok = str(tiny_pipeline / "tokenizer")
    for name, n, world in (("a", 6, "v2"), ("b", 4, "v1")):
        assert main(["pretokenize", "--tokenizer", tok, "--out", str(tmp_path / name), "--n", str(n),
                     "--world", world, "--seed", "7", "--shard-size", "4", "--workers", "0",
                     "--no-progress"]) == 0
    merged = tmp_path / "m"
    assert main(["data", "merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(merged)]) == 0
    assert "10 samples in 3 shards (source shapes" in capsys.readouterr().out
    shards = TokenShards(merged)
    want = shapes.shapes_batch(7, 0, 6, size=64)[1] + shapes.shapes_batch(7, 0, 4, size=64, world="v1")[1]
    assert shards.captions() == want and shards.meta["worlds"] == {"v2": 6, "v1": 4}
    first = TokenShards(tmp_path / "a").read(np.arange(6))["moments"]
    assert np.array_equal(shards.read(np.arange(6))["moments"], first)
    i2t = {"tokenizer_path": tok, "projector_path": str(tiny_pipeline / "text_projector"),
           "flow_preset": "tiny", "flow": {"num_tokens": K, "in_channels": C}, "eval_images": 2,
           "eval_steps": 1}
    cfg = {"stage": "i2t", "run_dir": str(tmp_path / "i2t"), "train": TRAIN, "model": i2t,
           "data": {"kind": "tokens", "path": str(merged), "workers": 0}}
    stage = build_run(cfg, device="cpu").stage
    stage.setup(torch.device("cpu"))
    assert stage.is_shapes_data() and stage.targets is not None and stage.targets.shape == (10, K, C)

    edited = tmp_path / "edited"
    shutil.copytree(merged, edited)
    meta = json.loads((edited / "meta.json").read_text())
    meta["source"] = "shapes + 4 v1 scenes"  # what the ninth attempt's job wrote by hand
    (edited / "meta.json").write_text(json.dumps(meta))
    stage = build_run({**cfg, "data": {**cfg["data"], "path": str(edited)}}, device="cpu").stage
    with caplog.at_level(logging.WARNING, logger="flowtok.training.stages.i2t"):
        stage.setup(torch.device("cpu"))
    assert stage.targets is None and "are shapes captions but meta.json says source" in caplog.text

    other = tmp_path / "other"
    shutil.copytree(tmp_path / "b", other)
    meta = json.loads((other / "meta.json").read_text())
    meta["scale_factor"] = meta["scale_factor"] * 2  # as if written by another tokenizer
    (other / "meta.json").write_text(json.dumps(meta))
    errs = []
    for args in ([str(tmp_path / "a"), str(other), "--out", str(tmp_path / "m2")],
                 [str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(merged)]):
        assert main(["data", "merge", *args]) == 2
        errs.append(capsys.readouterr().err.strip())
    assert all(len(e.splitlines()) == 1 for e in errs)
    assert "does not match" in errs[0] and "scale_factor" in errs[0] and "not empty" in errs[1]
    assert not (tmp_path / "m2").exists()


def test_pretokenized_shape_mismatch(tiny_pipeline, tmp_path):
    lat = tmp_path / "latents"
    assert main(["pretokenize", "--tokenizer", str(tiny_pipeline / "tokenizer"), "--out", str(lat), "--n", "4",
                 "--batch-size", "4", "--no-progress"]) == 0
    model = {"tokenizer_path": str(tiny_pipeline / "tokenizer"), "projector_preset": "tiny",
             "projector": {"latent_channels": C}, "flow_preset": "tiny", "flow": {"num_tokens": K, "in_channels": C}}
    cfg = {"stage": "t2i", "run_dir": str(tmp_path / "t2i"), "data": {"kind": "tokens", "path": str(lat)},
           "train": TRAIN, "model": model, "seed": 0}
    import json

    meta = json.loads((lat / "meta.json").read_text())
    meta["channels"] = 99
    (lat / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="pre-tokenised latents"):
        build_run(cfg, device="cpu").fit()


def test_tokenizer_stage_with_patchgan(tmp_path):
    model = {"preset": "tiny", "overrides": {"text_dim": 0, "image_size": 64, "patch_size": 16}, "eval_images": 2,
             "loss": {"discriminator_weight": 0.1, "discriminator_start": 2, "perceptual_weight": 1.0}}
    cfg = {"stage": "tokenizer", "run_dir": str(tmp_path / "gan"), "data": DATA, "train": TRAIN, "model": model}
    trainer = build_run(cfg, device="cpu")
    disc = trainer.stage.loss_fn.discriminator
    before = {k: v.clone() for k, v in disc.state_dict().items()}
    trainer.fit()
    import json

    recs = [json.loads(x) for x in (tmp_path / "gan" / "metrics.jsonl").read_text().splitlines()]
    assert any("disc_hinge" in r for r in recs)  # the discriminator trained from step 2
    assert any(not torch.equal(before[k], v) for k, v in disc.state_dict().items())
    assert trainer.stage.loss_fn.perceptual is None  # no VGG weights here: warned and skipped


def test_distill_stage_gives_a_few_step_student(tiny_pipeline, tmp_path, monkeypatch):
    import json

    import flowtok.shapes as shapes

    def no_render(*a, **k):
        raise AssertionError("text-to-image distillation rendered images")

    monkeypatch.setattr(shapes, "shapes_batch", no_render)  # prompts are all it needs
    model = {"teacher_path": str(tiny_pipeline / "t2i_flow"), "projector_path": str(tiny_pipeline / "text_projector"),
             "teacher_steps": 4, "student_steps": [1, 2], "init_from_teacher": False, "source_latent": "sample"}
    train = {**TRAIN, "steps": 30, "log_every": 10, "lr": 3e-3, "ema_decay": 0.0}
    cfg = {"stage": "distill", "run_dir": str(tmp_path / "d"), "data": DATA, "train": train, "model": model}
    out = build_run(cfg, device="cpu").fit()
    recs = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    assert recs[-1]["segment_mse"] < recs[0]["segment_mse"]
    # The student is a drop-in flow model: a pipeline with it generates in one step.
    student_pipe = assemble_pipeline(tmp_path / "student", {
        "tokenizer": tiny_pipeline / "tokenizer", "text_projector": tiny_pipeline / "text_projector",
        "t2i_flow": out / "t2i_flow"})
    pipe = FlowTokPipeline.from_pretrained(student_pipe, device="cpu")
    img = pipe.text_to_image("a red circle", num_inference_steps=1, guidance_scale=1.0, output_type="np")
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()


def test_distill_prompts_drawn_ahead_change_no_number(tiny_pipeline):
    """The worker thread that draws step s + 1's prompts during step s (on CUDA) gives the same batches."""
    from concurrent.futures import ThreadPoolExecutor

    from flowtok.training.data import DataConfig
    from flowtok.training.stages import DistillStage, DistillStageConfig

    cfg = DistillStageConfig(teacher_path=str(tiny_pipeline / "t2i_flow"),
                             projector_path=str(tiny_pipeline / "text_projector"), teacher_steps=2, student_steps=[1])

    def batches(ahead: bool, steps) -> list[dict]:
        stage = DistillStage(cfg, DataConfig(**DATA), seed=3)
        stage.setup(torch.device("cpu"))
        if ahead:
            stage.pool = ThreadPoolExecutor(max_workers=1)
        out = []
        for step in steps:
            torch.manual_seed(step)  # as the trainer seeds each step
            out.append(stage.batch(step, 4, 0, 1))
        if ahead:
            assert stage.pending[0] == (steps[-1] + 1, 4, 0, 1)  # the next step is on its way
            stage.pool.shutdown()
        return out

    plain = batches(False, [0, 1, 2, 7, 8])  # 7 after 2: a drawn-ahead step 3 must be thrown away
    ahead = batches(True, [0, 1, 2, 7, 8])
    for a, b in zip(plain, ahead, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(plain[0]["x_a"], plain[1]["x_a"])


def test_distill_config_errors(tiny_pipeline, tmp_path):
    model = {"teacher_path": str(tiny_pipeline / "t2i_flow"), "tokenizer_path": str(tiny_pipeline / "tokenizer"),
             "projector_path": str(tiny_pipeline / "text_projector"), "teacher_steps": 20, "student_steps": [3]}
    cfg = {"stage": "distill", "run_dir": str(tmp_path / "d"), "data": DATA, "train": TRAIN, "model": model}
    with pytest.raises(ConfigError, match="divide"):
        build_run(cfg, device="cpu")
    cfg["model"] = {**model, "student_steps": [1], "direction": "i2t", "source_latent": "sample"}
    with pytest.raises(ConfigError, match="t2i only"):
        build_run(cfg, device="cpu")
    cfg["model"] = {**model, "student_steps": [1], "direction": "i2t", "tokenizer_path": ""}
    with pytest.raises(ConfigError, match="tokenizer_path is required"):
        build_run(cfg, device="cpu")


def test_distill_stage_image_to_text(tiny_pipeline, tmp_path):
    model = {"teacher_path": str(tiny_pipeline / "i2t_flow"), "tokenizer_path": str(tiny_pipeline / "tokenizer"),
             "projector_path": str(tiny_pipeline / "text_projector"), "direction": "i2t", "teacher_steps": 2,
             "student_steps": [1]}
    cfg = {"stage": "distill", "run_dir": str(tmp_path / "d"), "data": DATA, "train": TRAIN, "model": model}
    out = build_run(cfg, device="cpu").fit()
    teacher = FlowTransformer.from_pretrained(tiny_pipeline / "i2t_flow")
    student = FlowTransformer.from_pretrained(out / "i2t_flow")
    assert student.config == teacher.config
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values()))


def test_pipeline_fp8_needs_fp8_hardware(tiny_pipeline):
    from flowtok.nn.fp8 import fp8_supported

    pipe = FlowTokPipeline.from_pretrained(tiny_pipeline, device="cpu")
    if fp8_supported():
        pipe.to("cuda", torch.bfloat16).quantize_fp8()
        assert pipe.text_to_image("a red circle", output_type="np").shape[0] == 1
        return
    with pytest.raises(InvalidInputError, match="compute capability 8.9"):
        pipe.quantize_fp8()


def test_pipeline_fp8_calibrated_on_prompts(tiny_pipeline):
    from flowtok.nn.fp8 import FP8Linear

    pipe = FlowTokPipeline.from_pretrained(tiny_pipeline, device="cpu")
    ref = pipe.text_to_image("a red circle", output_type="np", generator=torch.Generator().manual_seed(0))
    pipe.quantize_fp8(calibration_prompts=["a red circle", "two blue squares"], emulate=True)
    for flow in (pipe.t2i_flow, pipe.i2t_flow):  # both calibrated: t2i on the prompts, i2t on their images
        layers = [m for m in flow.modules() if isinstance(m, FP8Linear)]
        assert layers and all(m.static for m in layers)
    img = pipe.text_to_image("a red circle", output_type="np", generator=torch.Generator().manual_seed(0))
    assert img.shape == ref.shape and np.abs(img - ref).mean() < 0.05
    assert len(pipe.image_to_text(torch.from_numpy(img).permute(0, 3, 1, 2))) == 1


def test_image_latents_draw_mode_or_sample(tiny_pipeline):
    from flowtok.tokenizer import ImageTokenizer
    from flowtok.training.stages.base import image_latents

    tok = ImageTokenizer.from_pretrained(tiny_pipeline / "tokenizer").float()
    mean, logvar = torch.randn(3, K, C), torch.zeros(3, K, C)
    batch = {"image_moments": torch.cat([mean, logvar], -1)}
    # The mode is what the pipeline encodes an image to; a draw adds the posterior's unit noise here.
    torch.testing.assert_close(image_latents(batch, tok, "mode"), tok.scale_latents(mean))
    drawn = image_latents(batch, tok, "sample") / tok.scale_factor - mean
    assert 0.5 < drawn.std().item() < 1.5
    with pytest.raises(ConfigError, match="image_latent"):
        image_latents(batch, tok, "median")


def test_tokenizer_evaluation_reports_how_much_of_the_latent_carries_signal(tmp_path):
    """The tokenizer stage's shapes evaluation reports PSNR, the judge and ``latent_active``: the latent numbers
    whose mean varies across the evaluation images more than their posterior noise."""
    import json

    cfg = {"stage": "tokenizer", "run_dir": str(tmp_path / "tok"), "seed": 0, "data": DATA,
           "train": {**TRAIN, "eval_every": 2},
           "model": {"preset": "tiny", "overrides": {"text_dim": 0, "image_size": 64, "patch_size": 16},
                     "eval_images": 8, "scale_images": 0}}
    build_run(cfg, device="cpu").fit()
    evals = [r for r in map(json.loads, (tmp_path / "tok" / "metrics.jsonl").read_text().splitlines())
             if "eval/latent_active" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0 <= r["eval/latent_active"] <= K * C and "eval/psnr" in r for r in evals)


def test_latent_usage_counts_the_numbers_that_vary_more_than_their_noise():
    from flowtok.tokenizer import latent_usage

    g = torch.Generator().manual_seed(0)
    means = torch.randn(200, 4, 8, generator=g) * 0.01  # nearly constant across images
    means[:, 0, :3] *= 200.0  # three numbers vary: variance ~4, against posterior variance 1 (or 0.01: ~400)
    variances = torch.ones(200, 4, 8)
    variances[:, 0, 0] = 0.01
    got = latent_usage(means, variances)
    assert got == {"numbers": 32, "snr_above_1": 3, "snr_above_10": 1, "snr_above_100": 1}
    with pytest.raises(InvalidInputError, match="latent_usage"):
        latent_usage(means, variances[:, :2])
