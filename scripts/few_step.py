"""Few-step generation on the shapes benchmark: teacher against distilled student, 1 to 20 Euler steps.

    python scripts/few_step.py --t2i-student runs/shapes/distill-t2i/export/t2i_flow \\
        --i2t-student runs/shapes/distill-i2t/export/i2t_flow --out docs/results

For each direction, model (the pipeline's flow = teacher, the student swapped into the same pipeline)
and step count: exact accuracy on one-object scenes of the seen and held-out splits (text to image:
the judge reads the generated image; image to text: the caption is parsed), and for text to image the
FID of ``--fid-n`` generated images against as many real renders. The teacher samples at the pipeline's
default guidance, the student at 1.0 (the teacher's guidance is baked in by distillation). Writes
``few_step.json`` and ``few_step.png`` under ``--out`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import torch

from flowtok.config import atomic_write_text
from flowtok.eval import plot_curve
from flowtok.flow import FlowTransformer
from flowtok.pipelines import FlowTokPipeline
from flowtok.shapes import benchmark as bench


def markdown_table(rows: dict[str, dict]) -> list[str]:
    """The rows of a few_step.json (``direction/model/steps`` -> accuracies, FID) as a Markdown table."""
    lines = ["| direction | model | steps | seen exact % | held-out exact % | FID |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, v in rows.items():
        d, name, steps = key.split("/")
        fid = f"{v['fid']:.1f}" if v.get("fid") is not None else ""
        lines.append(f"| {d} | {name} | {steps} | {100 * v['seen']:.0f} | {100 * v['held_out']:.0f} | {fid} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="pipeline folder (default: the bundled model)")
    ap.add_argument("--t2i-student", default=None)
    ap.add_argument("--i2t-student", default=None)
    ap.add_argument("--steps", default="1,2,4,8,20")
    ap.add_argument("--n", type=int, default=100, help="one-object scenes per split")
    ap.add_argument("--fid-n", type=int, default=200, help="text to image: generated images for FID (0: none)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--note", default="", help="how the students were trained (shown with the table)")
    ap.add_argument("--reuse", default=None, help="an earlier few_step.json: copy its rows instead of measuring "
                    "them again, except for the groups named in --recompute")
    ap.add_argument("--recompute", default="", help="comma-separated groups to measure, e.g. t2i/student")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps_grid = [int(s) for s in args.steps.split(",")]
    pipe = FlowTokPipeline.from_pretrained(args.model, device="cpu")
    g0 = pipe.defaults.guidance_scale
    flows = {"t2i": {"teacher": pipe.t2i_flow}, "i2t": {"teacher": pipe.i2t_flow}}
    for key, path in (("t2i", args.t2i_student), ("i2t", args.i2t_student)):
        if path:
            flows[key]["student"] = FlowTransformer.from_pretrained(path, dtype=pipe.dtype).eval()

    rows: dict[str, dict] = {}
    reused: set[str] = set()
    if args.reuse:
        keep = {g for g in args.recompute.split(",") if g}
        old = json.loads(Path(args.reuse).read_text())["results"]
        rows.update({k: v for k, v in old.items() if k.rsplit("/", 1)[0] not in keep})
        reused = {k.rsplit("/", 1)[0] for k in rows}
    t0 = time.perf_counter()
    for name, flow in flows["t2i"].items():
        if f"t2i/{name}" in reused:
            continue
        guidance = g0 if name == "teacher" else 1.0
        for s in steps_grid:
            pipe.t2i_flow = flow

            def gen(prompts, generator, s=s, guidance=guidance):
                return pipe.text_to_image(list(prompts), num_inference_steps=s, guidance_scale=guidance,
                                          generator=generator, output_type="pt")

            r = bench.evaluate_t2i(gen, n_per_group=args.n, objects=(1,), batch_size=args.batch_size,
                                   fid_n=args.fid_n)
            rows[f"t2i/{name}/{s}"] = {**{k: v["all"]["exact"] for k, v in r["accuracy"].items()},
                                       "fid": r.get("fid", {}).get("fid"), "guidance": guidance}
            print(f"t2i {name:7s} {s:2d} steps: {rows[f't2i/{name}/{s}']}", flush=True)
    pipe.t2i_flow = flows["t2i"]["teacher"]
    for name, flow in flows["i2t"].items():
        if f"i2t/{name}" in reused:
            continue
        for s in steps_grid:
            pipe.i2t_flow = flow
            r = bench.evaluate_i2t(lambda images, s=s: pipe.image_to_text(images, num_inference_steps=s),
                                   n_per_group=args.n, objects=(1,), batch_size=args.batch_size, metrics=False)
            rows[f"i2t/{name}/{s}"] = {k: v["all"]["exact"] for k, v in r["accuracy"].items()}
            print(f"i2t {name:7s} {s:2d} steps: {rows[f'i2t/{name}/{s}']}", flush=True)
    pipe.i2t_flow = flows["i2t"]["teacher"]

    out = Path(args.out)
    record = {"env": {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      "torch": torch.__version__, "threads": args.threads,
                      "command": "python scripts/few_step.py " + " ".join(
                          f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v and k != "note"),
                      "elapsed_s": round(time.perf_counter() - t0, 1)},
              "note": args.note, "reused": sorted(reused), "students": {"t2i": args.t2i_student, "i2t": args.i2t_student},
              "protocol": {"objects": 1, "n_per_split": args.n, "fid_n": args.fid_n, "teacher_guidance": g0,
                           "student_guidance": 1.0},
              "results": rows}
    atomic_write_text(out / "few_step.json", json.dumps(record, indent=2) + "\n")
    curves = {}
    for key in ("t2i", "i2t"):
        for name in flows[key]:
            for split in ("seen", "held_out"):
                curves[f"{key} {name}, {split}"] = [rows[f"{key}/{name}/{s}"][split] for s in steps_grid]
    plot_curve(steps_grid, curves, out / "few_step.png", "Euler steps", "exact accuracy (1 object)",
               title="teacher vs distilled student against steps", logx=True)
    print("\n" + "\n".join(markdown_table(rows)))


if __name__ == "__main__":
    main()
