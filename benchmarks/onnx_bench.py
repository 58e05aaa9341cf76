"""ONNX export of a pipeline against PyTorch: agreement, accuracy, CPU latency, and the browser page.

    python benchmarks/onnx_bench.py accuracy --onnx EXPORT --n 500      # 500 held-out scenes each way
    python benchmarks/onnx_bench.py accuracy --onnx EXPORT --parts i2t  # captions only (t2i: images only)
    python benchmarks/onnx_bench.py precisions --onnx EXPORT --n 200    # the judge's accuracy per precision / int8 graph
    python benchmarks/onnx_bench.py latency --onnx EXPORT --threads 2   # onnxruntime vs PyTorch on 2 cores
    python benchmarks/onnx_bench.py browser --onnx EXPORT               # headless Chromium, flowtok demo --static's page

EXPORT comes from ``flowtok export onnx --out EXPORT`` (default model: the bundled flowtok-shapes);
write int8 files for every graph (``export_onnx(..., int8_graphs=all)``) to measure where int8 holds.

accuracy: held-out prompts (``split="test"``: unseen colour-shape pairs and relations) -> images by
PyTorch and by onnxruntime from the SAME text-latent draw (the runtime's numpy draw fed to PyTorch),
PSNR between them; held-out rendered scenes -> captions both ways, the share identical; the shapes
judge's exact-scene accuracy of both. Captions follow the pipeline's defaults (the bundle's
``caption_grammar: shapes``: both decode under the grammar table, the runtime's from manifest.json).

precisions: the same accuracies through onnxruntime for the fp32 and fp16 graph sets and with int8
tried one graph at a time (fp32 elsewhere), so the table says which graphs keep the accuracy in int8.

latency: medians of ``--iters`` calls after one warm-up; 4 images at 20 steps, 4 images at 1 step,
one caption at 20 steps; PyTorch with ``torch.set_num_threads(T)``, onnxruntime with ``T`` intra-op threads.

browser: the page's time from prompt to image and from image to caption, cold (graphs downloaded and
compiled on first use) and warm (second call), and the bytes the page downloads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

GRAPHS = ("text_encoder", "text_projector", "t2i_flow", "i2t_flow", "image_encoder", "image_decoder", "text_decoder")


def _info(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "host": platform.node(), "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def _psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mse = ((a - b) ** 2).mean(axis=(1, 2, 3))
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-20))


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from flowtok.export.runtime import OnnxFlowTokPipeline
    from flowtok.pipelines import FlowTokPipeline

    torch.set_num_threads(args.threads)
    pt = FlowTokPipeline.from_pretrained(args.model, device="cpu")
    ox = OnnxFlowTokPipeline.from_pretrained(args.onnx, num_threads=args.threads)
    steps, guidance = pt.defaults.num_inference_steps, pt.defaults.guidance_scale
    result: dict[str, Any] = {"n": args.n, "steps": steps, "guidance": guidance, "split": "test",
                              "caption_grammar": pt.defaults.caption_grammar}
    if "i2t" in args.parts:
        result.update(_caption_agreement(args, pt, ox))
    if "t2i" in args.parts:
        result.update(_image_agreement(args, pt, ox, steps, guidance))
    return result


def _image_agreement(args: argparse.Namespace, pt: Any, ox: Any, steps: int, guidance: float) -> dict[str, Any]:
    import torch

    from flowtok import shapes
    from flowtok.sampling import sample

    scenes, prompts = [], []
    for i in range(args.n):
        scene, text = shapes.sample_at(args.seed, i, split="test")
        scenes.append(scene)
        prompts.append(text)
    rng = np.random.default_rng(args.seed)
    psnrs, judged = [], {"pytorch": 0, "onnx_fp32": 0}
    start = time.perf_counter()
    for b in range(0, args.n, args.batch):
        batch = prompts[b:b + args.batch]
        z, states = ox.encode_prompt(batch, sample=False)
        _, logvar = ox.run("text_projector", states=states)
        eps = rng.standard_normal(z.shape, dtype=np.float32)
        z = (z + np.exp(0.5 * logvar) * eps).astype(np.float32)
        got = ox.decode_latents(ox.solve("t2i_flow", z, steps, guidance), states).transpose(0, 2, 3, 1)
        with torch.no_grad():
            tstates = pt.text_encoder.encode(batch).states
            out = pt.text_projector(tstates, sample=False)
            tz = out.mean + torch.exp(0.5 * out.logvar) * torch.from_numpy(eps)
            lat = sample(pt.t2i_flow, tz, num_steps=steps, guidance_scale=guidance)
            want = pt.decode_latents(lat, tstates).permute(0, 2, 3, 1).float().numpy()
        psnrs.extend(_psnr(got, want).tolist())
        for g, w, s in zip(got, want, scenes[b:b + args.batch]):
            judged["onnx_fp32"] += shapes.scene_matches(shapes.judge(g), s)
            judged["pytorch"] += shapes.scene_matches(shapes.judge(w), s)
        print(f"t2i {b + len(batch)}/{args.n}, min PSNR so far {min(psnrs):.1f} dB, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    return {"t2i_psnr_db": {"min": min(psnrs), "median": statistics.median(psnrs), "mean": statistics.fmean(psnrs),
                            "share_at_least_40": sum(p >= 40 for p in psnrs) / len(psnrs)},
            "judge_exact": {k: v / args.n for k, v in judged.items()},
            "t2i_seconds": time.perf_counter() - start}


def _caption_agreement(args: argparse.Namespace, pt: Any, ox: Any) -> dict[str, Any]:
    """Held-out rendered scenes captioned by both (under the defaults' caption grammar, if any)."""
    from flowtok import shapes

    start = time.perf_counter()
    caption_scenes = [shapes.sample_at(args.seed + 1, i, split="test")[0] for i in range(args.n)]
    images = [shapes.render(s, size=128) for s in caption_scenes]
    pt_caps = pt.image_to_text(images, batch_size=args.batch)
    ox_caps = ox.image_to_text(images, batch_size=args.batch)
    same = sum(a == b for a, b in zip(pt_caps, ox_caps))

    def caption_accuracy(caps: list[str]) -> float:
        return sum(shapes.scene_matches(_parse(c), s) for c, s in zip(caps, caption_scenes)) / args.n

    return {"i2t_identical": same / args.n,
            "caption_exact": {"pytorch": caption_accuracy(pt_caps), "onnx_fp32": caption_accuracy(ox_caps)},
            "captions_parse": {"pytorch": sum(_parse(c) is not None for c in pt_caps) / args.n,
                               "onnx_fp32": sum(_parse(c) is not None for c in ox_caps) / args.n},
            "caption_differences": [[a, b] for a, b in zip(pt_caps, ox_caps) if a != b][:10],
            "i2t_seconds": time.perf_counter() - start}


def precisions(args: argparse.Namespace) -> dict[str, Any]:
    """The judge's accuracy for the fp32 and fp16 graph sets and for int8 one graph at a time."""
    from flowtok import shapes
    from flowtok.export.runtime import OnnxFlowTokPipeline

    scenes, prompts = [], []
    for i in range(args.n):
        scene, text = shapes.sample_at(args.seed, i, split="test")
        scenes.append(scene)
        prompts.append(text)
    caption_scenes = [shapes.sample_at(args.seed + 1, i, split="test")[0] for i in range(args.n)]
    images = [shapes.render(s, size=128) for s in caption_scenes]
    result: dict[str, Any] = {"n": args.n, "split": "test"}
    variants: dict[str, dict[str, str]] = {"fp32": {}, "fp16": dict.fromkeys(GRAPHS, "fp16")}
    manifest = json.loads((Path(args.onnx) / "manifest.json").read_text())
    for name in GRAPHS:
        if "int8" in manifest["graphs"].get(name, {}).get("files", {}):
            variants[f"int8:{name}"] = {name: "int8"}
    for label, choice in variants.items():
        if args.only and label not in args.only:
            continue
        pipe = OnnxFlowTokPipeline.from_pretrained(args.onnx, num_threads=args.threads)
        pipe.graph_file = _chooser(pipe.root, pipe.manifest, choice)  # type: ignore[method-assign]
        rng = np.random.default_rng(args.seed)
        hits = 0
        for b in range(0, args.n, args.batch):
            made = pipe.text_to_image(prompts[b:b + args.batch], generator=rng, output_type="np")
            hits += sum(shapes.scene_matches(shapes.judge(im), s) for im, s in zip(made, scenes[b:]))
        caps = pipe.image_to_text(images, batch_size=args.batch)
        cap_hits = sum(shapes.scene_matches(_parse(c), s) for c, s in zip(caps, caption_scenes))
        result[label] = {"judge_exact": hits / args.n, "caption_exact": cap_hits / args.n}
        print(label, result[label], flush=True)
        del pipe
    return result


def _parse(caption: str) -> Any:
    from flowtok import shapes
    from flowtok.errors import InvalidInputError

    try:
        return shapes.parse(caption)
    except InvalidInputError:  # a caption outside the world's grammar is simply wrong
        return None


def _chooser(root: Path, manifest: dict[str, Any], choice: dict[str, str]) -> Any:
    # Holds no reference to the pipeline, so that each variant's sessions are freed with it.
    def graph_file(name: str) -> Path:
        return root / manifest["graphs"][name]["files"][choice.get(name, "fp32")]

    return graph_file


def _median_time(fn: Any, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def latency(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from flowtok import shapes
    from flowtok.export.runtime import OnnxFlowTokPipeline
    from flowtok.pipelines import FlowTokPipeline

    torch.set_num_threads(args.threads)
    prompts = ["a large red circle in the top left", "two small blue squares", "a green triangle below a yellow star",
               "a purple circle on the right"]
    image = shapes.render(shapes.sample_at(0, 0, split="test")[0], size=128)
    out: dict[str, Any] = {"threads": args.threads, "iters": args.iters}
    pt = FlowTokPipeline.from_pretrained(args.model, device="cpu")
    runners = {"pytorch": pt}
    for precision in args.precisions:
        runners[f"onnx_{precision}"] = OnnxFlowTokPipeline.from_pretrained(args.onnx, precision=precision,
                                                                          num_threads=args.threads)
    for name, pipe in runners.items():
        gen = (lambda p=pipe: torch.Generator().manual_seed(0)) if name == "pytorch" else (lambda p=pipe: 0)
        out[name] = {
            "4_images_20_steps_s": _median_time(lambda p=pipe, g=gen: p.text_to_image(
                prompts, num_inference_steps=20, generator=g()), args.iters),
            "4_images_1_step_s": _median_time(lambda p=pipe, g=gen: p.text_to_image(
                prompts, num_inference_steps=1, generator=g()), args.iters),
            "1_caption_20_steps_s": _median_time(lambda p=pipe: p.image_to_text([image], num_inference_steps=20),
                                                 args.iters),
        }
        print(name, out[name], flush=True)
    return out


def browser(args: argparse.Namespace) -> dict[str, Any]:
    import base64
    import io
    import tempfile

    from PIL import Image
    from playwright.sync_api import sync_playwright

    from flowtok import shapes
    from flowtok.serving.static import build_site, serve

    site = build_site(args.onnx, Path(tempfile.mkdtemp()) / "site", precision=args.precision)
    server = serve(site, port=0, block=False)
    url = f"http://127.0.0.1:{server.server_port}/"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run"]
    scene = shapes.sample_at(0, 0, split="test")[0]
    scene_png = Path(tempfile.mkdtemp()) / "scene.png"
    shapes.render(scene, size=128).save(scene_png)
    result: dict[str, Any] = {"precision": args.precision, "runs": []}
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path="/usr/bin/chromium", args=flags)
        result["chromium"] = chromium.version
        for _ in range(args.iters):
            page = chromium.new_context().new_page()  # a fresh context: nothing cached
            page.set_default_timeout(600_000)
            sizes: list[int] = []
            page.on("response", lambda r, s=sizes: s.append(len(r.body())) if r.ok else None)
            t0 = time.perf_counter()
            page.goto(url)
            page.wait_for_function("window.flowtok && window.flowtok.ready")
            entry: dict[str, Any] = {"page_ready_s": time.perf_counter() - t0,
                                     "threads": page.evaluate("self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency) : 1")}
            for i, prompt in enumerate(["a large red circle in the top left", "a small blue star at the center"]):
                page.fill("#prompt", prompt)
                page.evaluate("window.flowtok.timings.textToImage = 0")
                page.click("#generate")
                page.wait_for_function("window.flowtok.timings.textToImage > 0")
                entry[f"prompt_to_image_{'cold' if i == 0 else 'warm'}_s"] = \
                    page.evaluate("window.flowtok.timings.textToImage") / 1000
                data = page.evaluate("document.getElementById('image').toDataURL('image/png')")
                img = Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))).convert("RGB")
                entry[f"judge_ok_{i}"] = shapes.judge(img) == shapes.parse(prompt)
            for i in range(2):
                page.evaluate("window.flowtok.timings.imageToText = 0")
                page.set_input_files("#file", [])
                page.set_input_files("#file", str(scene_png))
                page.wait_for_function("window.flowtok.timings.imageToText > 0")
                entry[f"image_to_caption_{'cold' if i == 0 else 'warm'}_s"] = \
                    page.evaluate("window.flowtok.timings.imageToText") / 1000
            entry["caption"] = page.eval_on_selector("#caption", "e => e.value")
            entry["caption_ok"] = shapes.scene_matches(_parse(entry["caption"]), scene)
            entry["bytes_downloaded"] = sum(sizes)
            entry["model_bytes"] = page.evaluate("window.flowtok.web.bytes")
            result["runs"].append(entry)
            print(entry, flush=True)
            page.context.close()
        chromium.close()
    server.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("accuracy", "precisions", "latency", "browser"):
        p = sub.add_parser(name)
        p.add_argument("--onnx", required=True, help="an export from `flowtok export onnx`")
        p.add_argument("--model", default=None, help="the pipeline folder it came from (default: the bundled one)")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--iters", type=int, default=3)
        p.add_argument("--out", default=None, help="write the JSON result here too")
    for name in ("accuracy", "precisions"):
        sub.choices[name].add_argument("--n", type=int, default=500 if name == "accuracy" else 200)
        sub.choices[name].add_argument("--batch", type=int, default=100)
        sub.choices[name].add_argument("--seed", type=int, default=0)
    sub.choices["accuracy"].add_argument("--parts", nargs="+", choices=["i2t", "t2i"], default=["i2t", "t2i"],
                                         help="captions (i2t) and/or images (t2i)")
    sub.choices["precisions"].add_argument("--only", nargs="*", default=None, help="variant labels to run")
    sub.choices["latency"].add_argument("--precisions", nargs="+", default=["fp32", "fp16"])
    sub.choices["browser"].add_argument("--precision", default="fp16")
    args = parser.parse_args()
    result = {"benchmark": f"onnx {args.what}", **_info(args), **globals()[args.what](args)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
