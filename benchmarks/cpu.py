"""The shapes model on a small CPU: images/s, captions/s and cold start, through FlowTokPipeline.

    python benchmarks/cpu.py                           # the bundled model (FlowTokPipeline.from_pretrained())
    python benchmarks/cpu.py --model path/to/pipeline  # any pipeline folder
    python benchmarks/cpu.py --random shapes           # shapes-sized components with random weights

Every component of FlowTok is non-autoregressive (the text decoder reads all positions at once), so
the time of a call does not depend on the weights: ``--random shapes`` (the bundled model's presets:
shapes-128 tokenizer, shapes projector / flows / decoder, 32 x 16 latents, MiniLM text encoder) gives
the bundled model's speed before it exists. ``--random tiny`` is for the unit test.

Cold start is measured in a fresh interpreter: ``import flowtok``, ``from_pretrained`` (the text
encoder included) and the first image, each apart. The warm numbers are medians of ``--iters`` calls.
Targets (2 cores): 4 images at 20 steps in under 10 s; one caption in under 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Budget, Results, env_info, log, time_call  # noqa: E402

PROMPTS = ["a large red circle in the top left", "two small blue squares", "a green triangle below a yellow star",
           "a purple circle on the right"]

_COLD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads({threads})
from flowtok.pipelines import FlowTokPipeline
t1 = time.perf_counter()
pipe = FlowTokPipeline.from_pretrained({model!r}, device="cpu")
t2 = time.perf_counter()
pipe.text_to_image({prompt!r}, num_inference_steps={steps}, generator=torch.Generator().manual_seed(0))
t3 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1, "first_image_s": t3 - t2, "total_s": t3 - t0}}))
"""


def random_pipeline(out: Path, size: str) -> Path:
    """A pipeline folder of randomly initialised components with the shapes (or tiny) presets."""
    from flowtok.config import preset
    from flowtok.flow import FLOW_PRESETS, FlowTransformer
    from flowtok.pipelines import FlowTokPipeline
    from flowtok.text import DECODER_PRESETS, PROJECTOR_PRESETS, TextDecoder, TextProjector, load_text_encoder
    from flowtok.tokenizer import TOKENIZER_PRESETS, ImageTokenizer

    torch.manual_seed(0)
    tok_cfg = TOKENIZER_PRESETS["shapes-128"]
    if size == "tiny":
        import dataclasses

        tok_cfg = dataclasses.replace(TOKENIZER_PRESETS["tiny"], text_dim=0, image_size=32, num_latent_tokens=8)
    k, c = tok_cfg.num_latent_tokens, tok_cfg.token_channels
    tokenizer = ImageTokenizer(tok_cfg)
    projector = TextProjector(preset(PROJECTOR_PRESETS, size, latent_channels=c))
    flows = [FlowTransformer(preset(FLOW_PRESETS, size, num_tokens=k, in_channels=c)) for _ in range(2)]
    decoder = TextDecoder(preset(DECODER_PRESETS, size, num_tokens=k, latent_channels=c))
    encoder = load_text_encoder({"name": "minilm"}, max_length=k)
    pipe = FlowTokPipeline(tokenizer, encoder, projector, flows[0], flows[1], decoder)
    return pipe.save_pretrained(out)


def cold_start(model: str | None, threads: int, steps: int) -> dict[str, Any]:
    code = _COLD.format(threads=threads, model=model, prompt=PROMPTS[0], steps=steps)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "cold start failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="pipeline folder (default: the bundled model)")
    p.add_argument("--random", choices=("shapes", "tiny"), default=None,
                   help="benchmark a random-weight pipeline of these presets instead")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from flowtok.pipelines import FlowTokPipeline

    tmp = None
    model = args.model
    if args.random:
        tmp = tempfile.TemporaryDirectory()
        model = str(random_pipeline(Path(tmp.name) / f"random-{args.random}", args.random))
    device = torch.device("cpu")
    settings = {"model": args.model or ("random-" + args.random if args.random else "bundled"),
                "threads": args.threads, "steps": args.steps, "iters": args.iters}
    results = Results(args.out, env_info(device), settings)
    budget = Budget()
    results.run("cold start", lambda: cold_start(model, args.threads, args.steps), device, budget)
    pipe = FlowTokPipeline.from_pretrained(model, device="cpu")
    images = pipe.text_to_image(PROMPTS[:1], num_inference_steps=args.steps)  # warm-up, and an input to caption
    gen = torch.Generator()

    def t2i(n: int) -> dict[str, Any]:
        t = time_call(lambda: pipe.text_to_image(PROMPTS[:n], num_inference_steps=args.steps,
                                                 generator=gen.manual_seed(0)), device, 0, args.iters)
        return {**t, "images_per_s": n / t["median_s"]}

    def i2t(n: int) -> dict[str, Any]:
        batch = images * n
        t = time_call(lambda: pipe.image_to_text(batch, num_inference_steps=args.steps), device, 1, args.iters)
        return {**t, "captions_per_s": n / t["median_s"]}

    results.run(f"text_to_image 1 image {args.steps} steps", lambda: t2i(1), device, budget, part="t2i", batch=1)
    results.run(f"text_to_image 4 images {args.steps} steps", lambda: t2i(4), device, budget, part="t2i", batch=4)
    results.run(f"image_to_text 1 caption {args.steps} steps", lambda: i2t(1), device, budget, part="i2t", batch=1)
    results.run(f"image_to_text 4 captions {args.steps} steps", lambda: i2t(4), device, budget, part="i2t", batch=4)
    log(f"\n{args.threads} CPU threads, {args.steps} steps, model {settings['model']}")
    for i in results.data["items"]:
        if i.get("status") != "ok":
            log(f"{i['name']}: {i['status']} {i.get('error', '')}")
        elif i["name"] == "cold start":
            log(f"cold start: import {i['import_s']:.2f} s + load {i['load_s']:.2f} s + first image "
                f"{i['first_image_s']:.2f} s = {i['total_s']:.2f} s")
        else:
            rate = i.get("images_per_s") or i.get("captions_per_s")
            log(f"{i['name']}: {i['median_s']:.3f} s ({rate:.2f}/s)")
    if tmp is not None:
        tmp.cleanup()
    return results.data


if __name__ == "__main__":
    main()
