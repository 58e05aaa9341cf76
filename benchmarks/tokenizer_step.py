"""Does drawing shapes scenes starve the tokenizer stage? Data time against model time, one step.

    python benchmarks/tokenizer_step.py --device cpu --batch 16 --threads 1    # this CPU, per core
    python benchmarks/tokenizer_step.py --batch 128 --out results/tok_step.json  # a GPU, as the stage runs

The tokenizer stage on ``data.kind: shapes`` gets every batch from ``ShapesSource.get`` inside the step
(no prefetch, no workers): ``shapes_batch(..., device=<the training device>)`` samples each scene, its
drawing and caption on the host (``drawn_at``: numpy and Python, one sample at a time), then draws the
pixels with ``render_batch`` on the training device. Measured here, each at ``--batch``:

* ``sample``: ``drawn_at`` for the batch (host only);
* ``render_host``: ``render_batch`` on the CPU (the cost of rendering on the host instead, per thread);
* ``stage_batch``: ``shapes_batch`` on ``--device``, as the stage calls it (device synchronised);
* ``model_step``: the tokenizer's forward, loss (L2 + KL), backward and AdamW (fused on CUDA) on
  ``--device``, under bf16 autocast on CUDA as the trainer's ``precision: auto`` does.

With ``--stream W`` it also times the data path as the stage runs it on a GPU (``ShapesSource`` with ``W``
loader workers and ``--render-ahead`` steps drawn per render), over ``--stream-steps`` steps:

* ``stream_scenes``: the scenes of a step taken from the workers (their transfer and unpickling in the
  training process), nothing else done meanwhile;
* ``stream_render``: one render of ``render_ahead`` steps' packed drawings on ``--device`` (``concat_packed`` and
  ``render_packed``, as the stage does), per step: the host time until it returns and the synchronised time;
* ``stream_get``: ``ShapesSource.get`` per step, both together, device synchronised at the end (on a CPU
  the stage samples and draws each step in its own process, and so does this).

The summary: the share of a step spent getting data, and how many host cores would render as fast as
the model trains. Rendering itself is a fixed number of small kernels per call (about 2,500 ops
whatever the batch), so on a GPU its host overhead, not its arithmetic, is what a step waits for.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Results, env_info, log, pick_device, time_call  # noqa: E402

from flowtok.shapes import render_batch  # noqa: E402
from flowtok.shapes.stream import drawn_at, shapes_batch  # noqa: E402
from flowtok.tokenizer import TOKENIZER_PRESETS, ImageTokenizer, TokenizerLoss, TokenizerLossConfig  # noqa: E402


def _rate(name: str, t: dict[str, float], batch: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "status": "ok", "batch": batch, "ms": round(1000 * t["median_s"], 2),
            "per_s": round(batch / t["median_s"], 1), **extra}


def measure(device: torch.device, batch: int, world: str, preset: str, iters: int) -> list[dict[str, Any]]:
    cpu = torch.device("cpu")
    start = [0]

    def sample() -> list:
        start[0] += batch
        return [drawn_at(0, start[0] + i, "train", None, world) for i in range(batch)]

    items = [_rate("sample", time_call(sample, cpu, iters=iters), batch, where="host")]
    samples = sample()
    scenes, drawings = [s[0] for s in samples], [s[2] for s in samples]
    t = time_call(lambda: render_batch(scenes, 128, cpu, drawings), cpu, iters=iters)
    items.append(_rate("render_host", t, batch, where="host", threads=torch.get_num_threads()))
    t = time_call(lambda: shapes_batch(0, 0, batch, size=128, device=device, world=world), device, iters=iters)
    items.append(_rate("stage_batch", t, batch, where=str(device)))

    cfg = TOKENIZER_PRESETS[preset]
    tok = ImageTokenizer(cfg).to(device).train()
    loss_fn = TokenizerLoss(TokenizerLossConfig(kl_weight=1e-6)).to(device)
    opt = torch.optim.AdamW(tok.parameters(), lr=1e-4, fused=device.type == "cuda")
    images = shapes_batch(0, 0, batch, size=cfg.image_size, device=device, world=world)[0]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            recon, posterior = tok(images, sample=True)
            loss, _ = loss_fn(images, recon, posterior, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = time_call(step, device, warmup=2, iters=iters)
    items.append(_rate("model_step", t, batch, where=str(device), preset=preset,
                       params_m=round(sum(p.numel() for p in tok.parameters()) / 1e6, 2)))
    return items


def measure_stream(device: torch.device, batch: int, world: str, workers: int, render_ahead: int,
                   steps: int) -> list[dict[str, Any]]:
    """The stage's data path on ``device`` (see the module docstring), per step of ``batch``."""
    from flowtok.shapes.render import concat_packed, render_packed
    from flowtok.training.data import DataConfig, ShapesSource
    from flowtok.training.loader import SceneStream

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def steady(get: Any) -> tuple[list, float]:
        """Start the workers, let them fill their queues, take what they queued, then time ``steps`` gets."""
        get(0, batch, 0, 1)
        time.sleep(2.0)
        first = 1 + 4 * workers
        for s in range(1, first):
            get(s, batch, 0, 1)
        sync()
        t0 = time.perf_counter()
        got = [get(s, batch, 0, 1) for s in range(first, first + steps)]
        sync()
        return got, (time.perf_counter() - t0) / steps

    drawn, per = steady(SceneStream(0, "train", None, workers, 4, world).get)
    items = [{"name": "stream_scenes", "status": "ok", "batch": batch, "ms": round(1000 * per, 2),
              "per_s": round(batch / per, 1), "where": "host", "workers": workers}]
    ahead = drawn[:render_ahead]  # fewer if --stream-steps is smaller
    host, synced = [], []
    for _ in range(4):
        sync()
        t0 = time.perf_counter()
        render_packed(concat_packed([step[2] for step in ahead]), 128, device)
        host.append(time.perf_counter() - t0)
        sync()
        synced.append(time.perf_counter() - t0)
    h, w = sorted(host[1:])[1] / len(ahead), sorted(synced[1:])[1] / len(ahead)
    items.append({"name": "stream_render", "status": "ok", "batch": batch, "ms": round(1000 * w, 2),
                  "host_ms": round(1000 * h, 2), "per_s": round(batch / w, 1), "where": str(device),
                  "render_ahead": len(ahead)})
    _, per = steady(ShapesSource(DataConfig(world=world, workers=workers, render_ahead=render_ahead), 0, device).get)
    items.append({"name": "stream_get", "status": "ok", "batch": batch, "ms": round(1000 * per, 2),
                  "per_s": round(batch / per, 1), "where": str(device), "workers": workers,
                  "render_ahead": render_ahead})
    return items


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--world", choices=("v1", "v2"), default="v2")
    p.add_argument("--preset", default="shapes-128")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--stream", type=int, default=0, metavar="W",
                   help="also time the stage's data path with W loader workers (0: skip)")
    p.add_argument("--render-ahead", type=int, default=16)
    p.add_argument("--stream-steps", type=int, default=128)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    results = Results(args.out, env_info(device), vars(args))
    items = {i["name"]: results.add(i) for i in measure(device, args.batch, args.world, args.preset, args.iters)}
    for i in items.values():
        log(f"{i['name']:12s} {i['where']:6s} batch {i['batch']}: {i['ms']:9.1f} ms  ({i['per_s']:.0f} images/s)")
    if args.stream:
        for i in measure_stream(device, args.batch, args.world, args.stream, args.render_ahead, args.stream_steps):
            results.add(i)
            extra = f", host {i['host_ms']:.1f} ms" if "host_ms" in i else ""
            log(f"{i['name']:13s} {i['where']:6s} per step of {i['batch']}: {i['ms']:8.2f} ms{extra}  "
                f"({i['per_s']:.0f} images/s)")
    data, model = items["stage_batch"]["ms"], items["model_step"]["ms"]
    # Host core-seconds per image when sampling (one thread) and rendering (``threads``) on the host.
    host_s = (items["sample"]["ms"] + items["render_host"]["ms"] * items["render_host"]["threads"]) / 1000 / args.batch
    summary = {"name": "summary", "status": "ok", "data_share_of_step": round(data / (data + model), 3),
               "host_images_per_core_s": round(1 / host_s, 1),
               "host_cores_to_match_model": round(items["model_step"]["per_s"] * host_s, 2)}
    results.add(summary)
    log(f"data {100 * summary['data_share_of_step']:.1f}% of a step; rendering on the host as fast as the model "
        f"trains takes {summary['host_cores_to_match_model']} cores")
    return results.data


if __name__ == "__main__":
    main()
