"""Throughput of the distillation stage, part by part: where a step of ``flowtok train distill`` goes.

A text-to-image distillation step on the shapes world draws captions (host), tokenises and encodes them
(MiniLM), draws the projector's posterior, integrates the teacher (``teacher_steps`` guided Euler steps,
two flow evaluations each), then trains the student on one segment per sample. Each part is timed alone
(median of ``--iters`` after a warm-up, synchronised), the teacher both eagerly and replayed from a CUDA
graph (``model.teacher_cuda_graph``), and then whole training runs through the one trainer with the
graph off and on, and with ``--compile`` also with the teacher's blocks compiled (``model.teacher_compile``)
(samples/s of the last logged interval, which leaves out the compile and the capture).

The teacher and projector have the shapes presets' sizes and random weights (speed does not depend on
the weights) unless ``--teacher`` / ``--projector`` name trained folders.

    python benchmarks/distill_step.py --out results/distill.json            # GPU
    python benchmarks/distill_step.py --device cpu --batch 8 --train-steps 4 # seconds: checks the script
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Budget, Results, env_info, log, pick_device, time_call  # noqa: E402

from flowtok.config import preset  # noqa: E402
from flowtok.flow import FLOW_PRESETS, FlowTransformer  # noqa: E402
from flowtok.sampling import CudaGraphed  # noqa: E402
from flowtok.text import PROJECTOR_PRESETS, TextProjector  # noqa: E402
from flowtok.training.data import DataConfig  # noqa: E402
from flowtok.training.run import build_run  # noqa: E402
from flowtok.training.stages import DistillStage, DistillStageConfig  # noqa: E402


def random_parts(folder: Path) -> tuple[str, str]:
    """A shapes-size teacher flow and text projector with random weights, saved under ``folder``."""
    torch.manual_seed(0)
    teacher = FlowTransformer(preset(FLOW_PRESETS, "shapes"))
    teacher.save_pretrained(folder / "t2i_flow")
    TextProjector(preset(PROJECTOR_PRESETS, "shapes", latent_channels=teacher.config.in_channels)).save_pretrained(
        folder / "text_projector")
    return str(folder / "t2i_flow"), str(folder / "text_projector")


def parts(stage: DistillStage, device: torch.device, batch: int, iters: int) -> dict[str, Any]:
    """Median seconds of each part of one batch, and what the whole ``stage.batch`` costs."""
    caps = stage.shapes.train_captions(0, batch, 0, 1)
    enc, proj = stage.encoder, stage.projector
    ts = enc.encode(caps)
    x0 = proj(ts.states.float(), ts.mask, sample=True).z.float()
    ids, mask = enc.tokenize(caps)
    eager = stage._teacher_trajectory
    graphed = CudaGraphed(eager)
    steps = iter(range(10**9))
    timings = {
        "captions": lambda: stage.shapes.train_captions(1, batch, 0, 1),
        "tokenize": lambda: enc.tokenize(caps),
        "text encoder (encode_tokens)": lambda: enc.encode_tokens(ids, mask),
        "text encoder (encode: captions in)": lambda: enc.encode(caps),
        "projector": lambda: proj(ts.states.float(), ts.mask, sample=True),
        "teacher trajectory, eager": lambda: eager(x0),
        "teacher trajectory, CUDA graph": lambda: graphed(x0),
        # consecutive steps, as the trainer asks: on CUDA the next step's captions are drawn meanwhile
        "stage.batch (all of it)": lambda: stage.batch(next(steps), batch, 0, 1),
    }
    out: dict[str, Any] = {}
    for name, fn in timings.items():
        if "graph" in name and device.type != "cuda":
            continue
        with torch.no_grad():
            out[name] = round(time_call(fn, device, warmup=2, iters=iters)["median_s"] * 1e3, 2)
        log(f"  {name}: {out[name]} ms")
    if device.type == "cuda":
        same = torch.allclose(graphed(x0), eager(x0), atol=1e-4, rtol=1e-4)
        out["graph_equals_eager"] = bool(same)
    return {"ms_per_batch": out}


def train_run(tmp: Path, teacher: str, projector: str, device: torch.device, batch: int, steps: int,
              graph: bool, guidance: float, compile_teacher: bool = False) -> dict[str, Any]:
    """Samples/s of a short real run of the distill stage (the last ``log_every`` interval)."""
    import json

    run_dir = tmp / f"run-graph{int(graph)}-compile{int(compile_teacher)}"
    cfg = {"stage": "distill", "run_dir": str(run_dir), "seed": 0, "data": {"kind": "shapes", "size": 128},
           "model": {"teacher_path": teacher, "projector_path": projector, "teacher_guidance": guidance,
                     "student_steps": [1, 2, 4], "teacher_cuda_graph": graph,
                     "teacher_compile": compile_teacher},
           "train": {"steps": steps, "batch_size": batch, "log_every": max(steps // 2, 1), "ckpt_every": 10**9,
                     "ema_decay": 0.999, "tensorboard": False, "progress": False}}
    build_run(cfg, device=str(device)).fit()
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in recs if "samples_per_s" in r]
    return {"samples_per_s": round(rates[-1], 1), "steps": steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--guidance", type=float, default=3.0, help="teacher guidance (1.0: one evaluation per step)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=200, help="steps of each whole training run")
    p.add_argument("--compile", action="store_true", help="CUDA: also a run with model.teacher_compile and the graph")
    p.add_argument("--skip-parts", action="store_true", help="only the training runs")
    p.add_argument("--teacher", default=None, help="a trained flow folder (default: random shapes-size)")
    p.add_argument("--projector", default=None, help="a trained projector folder (default: random)")
    p.add_argument("--deadline", type=float, default=None, help="seconds from now to stop starting items")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    budget = Budget(args.deadline)
    res = Results(args.out, env_info(device), vars(args))
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp_name:
        tmp = Path(tmp_name)
        teacher, projector = random_parts(tmp / "parts")
        teacher = args.teacher or teacher
        projector = args.projector or projector

        def by_part() -> dict[str, Any]:
            cfg = DistillStageConfig(teacher_path=teacher, projector_path=projector,
                                     teacher_guidance=args.guidance, teacher_compile=False)  # eager, as labelled
            stage = DistillStage(cfg, DataConfig(kind="shapes", size=128), seed=0)
            stage.to(device)
            stage.setup(device)
            return parts(stage, device, args.batch, args.iters)

        if not args.skip_parts:
            res.run("parts", by_part, device, budget, batch=args.batch)
        variants = [(False, False)] if device.type != "cuda" else [(False, False), (True, False)]
        if args.compile and device.type == "cuda":  # the stage compiles the teacher on CUDA only
            variants.append((True, True))
        for graph, comp in variants:
            res.run(f"train, teacher_cuda_graph={graph}, teacher_compile={comp}",
                    lambda g=graph, c=comp: train_run(tmp, teacher, projector, device, args.batch, args.train_steps,
                                                      g, args.guidance, c),
                    device, budget, reserve_s=30, batch=args.batch)
    return 0 if all(i["status"] == "ok" for i in res.data["items"]) else 1


if __name__ == "__main__":
    sys.exit(main())
