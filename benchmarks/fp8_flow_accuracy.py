"""Shapes accuracy of the text-to-image flow in FP8, plain blocks against the fused path, beside the float model.

What ``flowtok eval t2i --n N --objects 1,2,3 --split both --fid-n 0 --batch-size B [--fp8] [--fast]`` measures,
for three pipelines generated from the same prompts and seeds:

* ``float``: the pipeline as loaded;
* ``fp8 plain``: the flow's blocks in FP8 with static scales calibrated as ``eval t2i --fp8`` calibrates them (32
  training-split captions apart from the test prompts), sampled through the plain blocks;
* ``fp8 fused``: the same FP8 blocks through the fused DiT path (``enable_fused_inference``; at batch 300 x 32
  tokens every step is fused), what ``--fast --fp8`` runs;
* ``fp8-in fused`` (``--inputs-only``): only qkv and fc1 in FP8 (``quantize_fp8(layers=("qkv", "fc1"))``), fused.

Where the device has no FP8 matmuls (a CPU) the FP8 numbers are emulated: e4m3 weights and inputs, float
matmuls with bf16 outputs, so the judged accuracy is what an FP8 GPU would give up to accumulation order. Besides
the accuracy per group, each FP8 row records how many images differ in any pixel from the float model's and from
the plain FP8 blocks', and the mean absolute pixel difference (0..255).

    python benchmarks/fp8_flow_accuracy.py --device cpu --n 300 --out results/fp8-accuracy.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import log  # noqa: E402

from flowtok.eval.cli import _calibration_captions  # noqa: E402
from flowtok.nn.fp8 import fp8_supported  # noqa: E402
from flowtok.pipelines import FlowTokPipeline  # noqa: E402
from flowtok.shapes import benchmark  # noqa: E402


def evaluate(pipe: FlowTokPipeline, args) -> tuple[dict[str, Any], np.ndarray]:
    """The shapes accuracy of ``pipe`` and every generated image (uint8, in generation order)."""
    images: list[np.ndarray] = []

    def generate(prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        out = pipe.text_to_image(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance,
                                 generator=generator, output_type="pt", batch_size=args.batch_size)
        images.append((out.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
        return out

    t0 = time.perf_counter()
    result = benchmark.evaluate_t2i(generate, n_per_group=args.n, seed=args.seed, objects=(1, 2, 3),
                                    splits=("train", "test"), batch_size=args.batch_size, fid_n=0,
                                    generator_device=pipe.device, world=args.world)
    result["seconds"] = time.perf_counter() - t0
    return result, np.concatenate(images)


def exact(result: dict[str, Any]) -> dict[str, float]:
    return {f"{split}/{k}": v["exact"] for split, groups in result["accuracy"].items()
            for k, v in groups["objects"].items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="pipeline folder (default: the bundled model)")
    p.add_argument("--device", default=None)
    p.add_argument("--n", type=int, default=300, help="prompts per group (3 object counts x 2 splits)")
    p.add_argument("--batch-size", type=int, default=300)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world", default="v2")
    p.add_argument("--inputs-only", action="store_true", help="also the fused flow with only qkv and fc1 in FP8")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    pipe = FlowTokPipeline.from_pretrained(args.model, device=args.device)
    emulate = not fp8_supported(pipe.device)
    out: dict[str, Any] = {"device": str(pipe.device), "emulated": emulate, "torch": torch.__version__,
                           "command": " ".join(sys.argv), "options": vars(args), "rows": {}}
    state = {k: v.clone() for k, v in pipe.t2i_flow.state_dict().items()}
    ref_result, ref_images = evaluate(pipe, args)
    out["rows"]["float"] = {"exact": exact(ref_result), "seconds": ref_result["seconds"]}
    log(f"float: {out['rows']['float']}")
    plain_images = None
    prompts = _calibration_captions(args.seed, 8)  # as `eval t2i --fp8` calibrates (the text-to-image flow only)

    def calibrate() -> None:
        pipe.text_to_image(prompts, output_type="pt", generator=torch.Generator(pipe.device).manual_seed(0))

    forms = [("fp8 plain", True, False), ("fp8 fused", True, True)]
    if args.inputs_only:
        forms.append(("fp8-in fused", False, True))
    for name, outputs, fused in forms:
        pipe.t2i_flow = type(pipe.t2i_flow)(pipe.t2i_flow.config).to(pipe.device, pipe.dtype).eval()
        pipe.t2i_flow.load_state_dict(state)
        pipe.t2i_flow.quantize_fp8(emulate=emulate, layers=None if outputs else ("qkv", "fc1"), calibrate=calibrate)
        if fused:
            pipe.t2i_flow.enable_fused_inference()
        result, images = evaluate(pipe, args)
        row: dict[str, Any] = {"exact": exact(result), "seconds": result["seconds"],
                               "images_differing_from_float": int((images != ref_images).any(axis=(1, 2, 3)).sum()),
                               "mean_abs_diff_vs_float": float(np.abs(images.astype(np.int16) - ref_images).mean())}
        if plain_images is not None:
            row["mean_abs_diff_vs_fp8_plain"] = float(np.abs(images.astype(np.int16) - plain_images).mean())
            row["images_differing_from_fp8_plain"] = int((images != plain_images).any(axis=(1, 2, 3)).sum())
        else:
            plain_images = images
        out["rows"][name] = row
        log(f"{name}: {row}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
