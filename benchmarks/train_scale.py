"""Training at scale on one GPU: pre-tokenise, stream, resume, decode raw JPEG shards (issue 18's must-shows).

Phases (``--phases``, in order; each writes its numbers into the results JSON):

- ``setup``: a random-init small tokenizer (77 x 16 latents, 64 px; speed only) and a random-init CLIP text
  tower of the paper's shape (768 wide, 12 layers; transformers' CLIPTextModel), saved as folders.
- ``pretokenize``: ``flowtok pretokenize`` of ``--n`` shapes-world samples (rendered on the GPU) with CLIP ids;
  a second folder that lists the first ``--small`` samples' shards only (the 100k set).
- ``jpeg``: ``--jpeg-n`` 256-px JPEGs written as webdataset tar shards, then decoded samples/s through
  :class:`~flowtok.training.loader.RawImageSource` with each of ``--jpeg-workers`` loader workers.
- ``baseline``: ``benchmarks/train_step.py`` (FlowTok-XL, compiled, ``--batch``): the flow alone.
- ``resident``: the same ``flowtok train`` run as ``train`` with its data resident on the GPU
  (``benchmarks/train_resident.py``: one batch served for every step, the posterior draw and the text tower
  still run in the step): the streaming run's same-work baseline.
- ``train``: ``flowtok train`` FlowTok-XL t2i streaming the big set, the CLIP tower in the step, compiled, then
  ``--resume latest`` for a few more steps (time to the first step and the trainer's ``resume timing:``
  breakdown), then the small set (memory and RSS; ``--train-sets big`` skips it).

Inductor's cache lives in ``--work``/inductor_cache (``TORCHINDUCTOR_CACHE_DIR``), so the resume compiles from
the first run's cache. One call on a fresh GPU machine, about 6 minutes:

    python benchmarks/train_scale.py --phases setup,pretokenize,baseline,train --n 120000 --small 100000 \
        --shard-size 20000 --train-sets big --compile-scope blocks --steps 40 --resume-steps 5 --log-every 5 \
        --train-timeout 200 --work /tmp/fs --out $OUT/scale.json

    python benchmarks/train_scale.py --out results/scale.json                        # the GPU run
    python benchmarks/train_scale.py --tiny --device cpu --work /tmp/scale_tiny      # checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save(results: dict, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))


def setup(args, work: Path) -> dict[str, Any]:
    from dataclasses import replace

    from transformers import CLIPTextConfig, CLIPTextModel

    from flowtok.tokenizer import TOKENIZER_PRESETS, ImageTokenizer

    torch.manual_seed(0)
    k, c = (8, 4) if args.tiny else (77, 16)
    tok = ImageTokenizer(replace(TOKENIZER_PRESETS["tiny"], image_size=64, patch_size=16, num_latent_tokens=k,
                                 token_channels=c, text_dim=0, encoder_width=256 if not args.tiny else 32,
                                 encoder_depth=2 if not args.tiny else 1, encoder_heads=4 if not args.tiny else 2))
    tok.save_pretrained(work / "tokenizer")
    width, layers = (64, 2) if args.tiny else (768, 12)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                                        num_attention_heads=max(1, width // 64), max_position_embeddings=77,
                                        vocab_size=49408, projection_dim=width))
    clip.save_pretrained(work / "clip")
    return {"tokenizer": {"image_size": 64, "latents": [k, c], "init": "random", "encoder_width": 256},
            "text_encoder": {"kind": "CLIPTextModel, random init", "width": width, "layers": layers}}


def _flowtok(args, cmd: list[str], log_path: Path, timeout: float, procs: int = 1) -> tuple[int, float]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
                if procs > 1 else [sys.executable])
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        rc = subprocess.run([*launcher, "-m", "flowtok.cli", *cmd], stdout=fh, stderr=subprocess.STDOUT,
                            timeout=timeout).returncode
    return rc, time.perf_counter() - t0


def pretokenize(args, work: Path) -> dict[str, Any]:
    spec = json.dumps({"name": "clip", "path": str(work / "clip")})
    out = work / "tokens_big"
    rc, dt = _flowtok(args, ["pretokenize", "--tokenizer", str(work / "tokenizer"), "--out", str(out),
                             "--n", str(args.n), "--shard-size", str(args.shard_size), "--batch-size", "1024",
                             "--workers", str(args.workers), "--text-encoder", spec, "--no-progress",
                             *(["--device", args.device] if args.device else [])],
                      work / "pretokenize.log", args.pretok_timeout)
    if rc:
        raise RuntimeError(f"pretokenize failed: {(work / 'pretokenize.log').read_text()[-2000:]}")
    meta = json.loads((out / "meta.json").read_text())
    size = sum(p.stat().st_size for p in out.glob("shard-*.safetensors"))
    small = work / "tokens_small"  # the first shards only: a set of --small samples beside the same files
    small.mkdir(exist_ok=True)
    keep = meta["shards"][: max(1, args.small // args.shard_size)]
    for s in keep:
        link = small / s["name"]
        if not link.exists():
            link.symlink_to(out / s["name"])
    (small / "meta.json").write_text(json.dumps({**meta, "shards": keep, "n": sum(s["n"] for s in keep)}))
    return {"n": meta["n"], "seconds": dt, "samples_per_s": meta["n"] / dt, "bytes": size,
            "bytes_per_sample": size / meta["n"], "shards": len(meta["shards"]), "small_n": sum(s["n"] for s in keep)}


def jpeg(args, work: Path) -> dict[str, Any]:
    import io
    import tarfile

    from flowtok.shapes import render_batch, sample_at
    from flowtok.training.data import DataConfig
    from flowtok.training.loader import RawImageSource

    shards = work / "jpeg"
    shards.mkdir(exist_ok=True)
    per = 256
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for s in range(0, args.jpeg_n, per):
        path = shards / f"shard-{s // per:05d}.tar"
        if path.exists():
            continue
        pairs = [sample_at(0, i) for i in range(s, min(s + per, args.jpeg_n))]
        images = (render_batch([p[0] for p in pairs], 256, dev).clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).cpu()
        with tarfile.open(path, "w") as tar:
            for j, (img, (_, cap)) in enumerate(zip(images.numpy(), pairs)):
                from PIL import Image

                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("txt", cap.encode())):
                    info = tarfile.TarInfo(f"{s + j:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out: dict[str, Any] = {"images": args.jpeg_n, "size": 256, "quality": 90, "cores": os.cpu_count(), "rates": {}}
    for w in args.jpeg_workers:
        cfg = DataConfig(kind="webdataset", path=str(shards), size=256, workers=w, prefetch=4, shuffle_buffer=1000)
        src = RawImageSource(cfg, seed=0, device=dev)
        src.get(0, 64, 0, 1)  # workers started, first pools read
        t0, n = time.perf_counter(), 0
        for step in range(1, args.jpeg_batches + 1):
            n += len(src.get(step, 64, 0, 1)["captions"])
        if dev.type == "cuda":
            torch.cuda.synchronize()
        rate = n / (time.perf_counter() - t0)
        out["rates"][str(w)] = rate
        log(f"jpeg 256 px, {w} workers: {rate:.0f} samples/s")
        del src
    return out


def baseline(args, work: Path) -> dict[str, Any]:
    res = work / "train_step.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--variants", "compile", "--batches",
           str(args.batch), "--ckpt-batches", "", "--search-presets", "", "--iters", str(args.iters),
           "--warmup", "3", "--out", str(res), *(["--tiny"] if args.tiny else []),
           *(["--device", args.device] if args.device else [])]
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, timeout=args.baseline_timeout).returncode
    items = json.loads(res.read_text())["items"] if res.exists() else []
    ok = [i for i in items if i.get("status") == "ok" and "samples_per_s" in i]
    return {"rc": rc, "seconds": time.perf_counter() - t0, "items": ok,
            "samples_per_s": ok[0]["samples_per_s"] if ok else None}


def _train_cfg(args, work: Path, data: Path, run: Path, steps: int) -> Path:
    import yaml

    k, c = (8, 4) if args.tiny else (77, 16)
    cfg = {"stage": "t2i", "run_dir": str(run), "seed": 0,
           "data": {"kind": "tokens", "path": str(data), "workers": args.workers, "prefetch": 4,
                    "in_memory": "stream"},
           "model": {"tokenizer_path": str(work / "tokenizer"),
                     "text_encoder": {"name": "clip", "path": str(work / "clip")},
                     "projector_preset": "tiny" if args.tiny else "paper",
                     "projector": {"latent_channels": c, "text_dim": 64} if args.tiny else {},
                     "flow_preset": "tiny" if args.tiny else "FlowTok-XL",
                     "flow": {"num_tokens": k, "in_channels": c} if args.tiny else {}, "eval_prompts": 0},
           "train": {"steps": steps, "batch_size": args.batch, "lr": 1e-4, "betas": [0.9, 0.95],
                     "weight_decay": 0.03, "ema_decay": 0.9999, "compile": not args.tiny, "ckpt_every": 10**9,
                     "compile_scope": args.compile_scope,
                     "log_every": args.log_every, "eval_every": 0, "tensorboard": False, "progress": False}}
    path = run.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def resident(args, work: Path) -> dict[str, Any]:
    run = work / "run_resident"
    cfg = _train_cfg(args, work, work / "tokens_big", run, args.steps)
    dev = ["--device", args.device] if args.device else []
    t0 = time.perf_counter()
    with open(work / "resident.log", "w") as fh:
        rc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_resident.py"), str(cfg), *dev],
                            stdout=fh, stderr=subprocess.STDOUT, timeout=args.train_timeout).returncode
    return {"rc": rc, "seconds": time.perf_counter() - t0, **_summary(_records(run), args.skip_logs)}


def _records(run: Path) -> list[dict]:
    p = run / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def _summary(recs: list[dict], skip: int) -> dict[str, Any]:
    steps = [r for r in recs if "samples_per_s" in r]
    first = next((r for r in recs if "first_step_s" in r), {})
    tail = steps[skip:] or steps[-1:]
    mean = (lambda k: sum(r[k] for r in tail) / len(tail) if tail and k in tail[0] else None)  # noqa: E731
    return {"samples_per_s": mean("samples_per_s"), "data_wait_frac": mean("data_wait_frac"),
            "data_wait_s": mean("data_wait_s"), "gpu_peak_gib": max((r.get("gpu_peak_gib", 0) for r in steps),
                                                                      default=None),
            "host_rss_gib": max((r.get("host_rss_gib", 0) for r in tail), default=None),
            "first_step_s": first.get("first_step_s"), "since_process_start_s": first.get("since_process_start_s"),
            "resume_setup_s": first.get("resume_setup_s"), "resume_timings": first.get("resume_timings"),
            "log_records": steps}


def train(args, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    dev = ["--device", args.device] if args.device else []
    sets = [s for s in (("big", work / "tokens_big", args.steps), ("small", work / "tokens_small", args.steps))
            if s[0] in args.train_sets]
    for name, data, steps in sets:
        run = work / f"run_{name}"
        rc, dt = _flowtok(args, ["train", str(_train_cfg(args, work, data, run, steps)), *dev],
                          work / f"train_{name}.log", args.train_timeout)
        out[name] = {"rc": rc, "seconds": dt, **_summary(_records(run), args.skip_logs)}
        log(f"train {name}: rc {rc}, {dt:.0f} s, {json.dumps({k: v for k, v in out[name].items() if k != 'log_records'})}")
        if name == "big":
            n0 = len(_records(run))
            cfg = _train_cfg(args, work, data, run, steps + args.resume_steps)
            rc, dt = _flowtok(args, ["train", str(cfg), "--resume", "latest", *dev], work / "resume.log",
                              args.train_timeout)
            out["resume"] = {"rc": rc, "seconds": dt, **_summary(_records(run)[n0:], 0)}
            log(f"resume: rc {rc}, first step {out['resume']['since_process_start_s']} s after process start; "
                f"setup {out['resume']['resume_setup_s']} s; {json.dumps(out['resume']['resume_timings'])}")
            for line in (work / "resume.log").read_text().splitlines():
                if "resume timing:" in line:
                    out["resume"]["timing_line"] = line
                    log(line)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--work", default="/tmp/flowtok_scale")
    p.add_argument("--out", default=None)
    p.add_argument("--phases", default="setup,pretokenize,jpeg,baseline,train")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--small", type=int, default=100_000)
    p.add_argument("--shard-size", type=int, default=50_000)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--resume-steps", type=int, default=10)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--skip-logs", type=int, default=2, help="log records dropped as warm-up (compilation)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--jpeg-n", type=int, default=8192)
    p.add_argument("--jpeg-batches", type=int, default=60)
    p.add_argument("--jpeg-workers", default="1,4,16")
    p.add_argument("--pretok-timeout", type=float, default=420)
    p.add_argument("--baseline-timeout", type=float, default=300)
    p.add_argument("--train-timeout", type=float, default=300)
    p.add_argument("--train-sets", default="big,small", help="'big' (then its resume), 'small' (memory vs big)")
    p.add_argument("--compile-scope", default="stage", choices=["stage", "blocks"],
                   help="train.compile_scope: the whole stage (minutes of cold compile for XL) or the flow's blocks")
    args = p.parse_args(argv)
    # Compiled kernels are cached under the work folder: the resumed run finds the first run's cache, as a
    # user's second run on the same machine does (the default, under /tmp/torchinductor_$USER, would too).
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(args.work) / "inductor_cache"))
    args.jpeg_workers = [int(w) for w in args.jpeg_workers.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prev = Path(args.out) if args.out and Path(args.out).exists() else None
    results: dict[str, Any] = json.loads(prev.read_text()) if prev else {}
    results.setdefault("env", {"torch": torch.__version__, "cuda": torch.cuda.get_device_name()
                               if torch.cuda.is_available() else None, "cpus": os.cpu_count()})
    results.setdefault("settings", {}).update({k: v for k, v in vars(args).items() if k not in ("out",)})
    phases = {"setup": setup, "pretokenize": pretokenize, "jpeg": jpeg, "baseline": baseline,
              "resident": resident, "train": train}
    for name in args.phases.split(","):
        log(f"phase {name}")
        t0 = time.perf_counter()
        try:
            results[name] = phases[name](args, work)
        except Exception as exc:  # noqa: BLE001 - record and go on to the next phase
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
        log(f"phase {name}: {time.perf_counter() - t0:.0f} s: "
            f"{json.dumps(results[name], default=str)[:600]}")
        save(results, args.out)
    if "train" in results and "baseline" in results:
        big, base = results["train"].get("big", {}), results["baseline"].get("samples_per_s")
        if base and big.get("samples_per_s"):
            results["ratio_vs_train_step"] = big["samples_per_s"] / base
    same = results.get("resident", {}).get("samples_per_s")
    if same and results.get("train", {}).get("big", {}).get("samples_per_s"):
        results["ratio_vs_resident"] = results["train"]["big"]["samples_per_s"] / same
    save(results, args.out)
    return results


if __name__ == "__main__":
    main()
