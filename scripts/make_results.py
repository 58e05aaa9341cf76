"""Regenerate docs/results.md (tables + plots) for a pipeline, by default the bundled flowtok-shapes.

    python scripts/make_results.py                 # about 10-20 minutes on 2 CPU cores
    python scripts/make_results.py --n 500 --recon-n 500 --batch-size 16   # the page: 91 min on 2 shared cores
    python scripts/make_results.py --n 20 --fid-n 0 --out /tmp/quick   # a quick look

Every number comes from flowtok.shapes.benchmark on this run; each result JSON (with its full
protocol) is written next to the page under results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from pathlib import Path

import torch
from few_step import markdown_table  # scripts/, this file's folder, is on sys.path

from flowtok.config import atomic_write_text
from flowtok.eval import plot_curve
from flowtok.pipelines import FlowTokPipeline
from flowtok.shapes import benchmark as bench
from flowtok.shapes.world import WORLDS


def _shown(path) -> str:
    """The model path relative to the working directory when it lies below it (no machine paths in docs)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _acc_table(res: dict, title: str) -> list[str]:
    lines = [f"| {title} | n | exact | colour | shape | size | position | unreadable |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for split, block in res["accuracy"].items():
        for k, a in block["objects"].items():
            lines.append(f"| {split}, {k} object{'s' if k != '1' else ''} | {a['n']} | **{_pct(a['exact'])}** | "
                         f"{_pct(a['color'])} | {_pct(a['shape'])} | {_pct(a['size'])} | {_pct(a['position'])} | "
                         f"{_pct(a['unreadable'])} |")
    return lines


def _few_step_section(fs: dict) -> list[str]:
    p = fs["protocol"]
    lines = ["## Few-step generation: teacher against distilled student", "",
             f"`{fs['env']['command']}` ({fs['env']['elapsed_s'] / 60:.1f} min). One-object scenes, "
             f"{p['n_per_split']} per split; the teacher (the bundled flow) at guidance {p['teacher_guidance']} "
             f"for text to image, the student at {p['student_guidance']} (the teacher's guidance is baked in); "
             f"FID on {p['fid_n']} generated images against as many real renders. Full record: "
             "[results/few_step.json](results/few_step.json)." + (f" {fs['note']}" if fs.get("note") else ""), ""]
    return lines + markdown_table(fs["results"]) + ["", "![few-step](results/few_step.png)", ""]


def compute(args, out: Path, steps_grid: list[int], guid_grid: list[float]):
    """Run every evaluation of the page; writes and returns the result records."""
    pipe = FlowTokPipeline.from_pretrained(args.model, device="cpu")
    steps0, g0 = pipe.defaults.num_inference_steps, pipe.defaults.guidance_scale

    def gen_fn(steps: int, guidance: float):
        return lambda prompts, generator: pipe.text_to_image(list(prompts), num_inference_steps=steps,
                                                             guidance_scale=guidance, generator=generator,
                                                             output_type="pt")

    def cap_fn(steps: int):
        return lambda images: pipe.image_to_text(images, num_inference_steps=steps)

    t0 = time.perf_counter()
    if args.t2i_from:
        t2i = json.loads(Path(args.t2i_from).read_text())
        if args.fid_n > 0:
            prompts = [bench.shapes.sample_at(0, i, "train", world=args.world)[1] for i in range(args.fid_n)]
            t2i["fid"] = bench.generated_fid(gen_fn(steps0, g0), prompts, torch.Generator().manual_seed(0),
                                             args.batch_size, None)
            t2i["fid"]["prompts"] = f"shapes seen-split stream seed 0, samples 0..{args.fid_n - 1}"
    else:
        t2i = bench.evaluate_t2i(gen_fn(steps0, g0), n_per_group=args.n, batch_size=args.batch_size,
                                 fid_n=args.fid_n, world=args.world)
    if args.i2t_from:
        i2t = json.loads(Path(args.i2t_from).read_text())
    else:
        i2t = bench.evaluate_i2t(cap_fn(steps0), n_per_group=args.n, batch_size=args.batch_size, world=args.world)
    recon = bench.evaluate_recon(pipe.image_tokenizer.reconstruct,
                                 n=args.recon_n, batch_size=args.batch_size, fid=args.fid_n > 0, world=args.world)
    sweep: dict[str, dict] = {"t2i_steps": {}, "t2i_guidance": {}, "i2t_steps": {}}
    for s in steps_grid:
        r = bench.evaluate_t2i(gen_fn(s, g0), n_per_group=args.sweep_n, objects=(1,), batch_size=args.batch_size,
                               world=args.world)
        sweep["t2i_steps"][s] = {k: v["all"]["exact"] for k, v in r["accuracy"].items()}
        r = bench.evaluate_i2t(cap_fn(s), n_per_group=args.sweep_n, objects=(1,), batch_size=args.batch_size,
                               metrics=False, world=args.world)
        sweep["i2t_steps"][s] = {k: v["all"]["exact"] for k, v in r["accuracy"].items()}
    for g in guid_grid:
        r = bench.evaluate_t2i(gen_fn(steps0, g), n_per_group=args.sweep_n, objects=(1,), batch_size=args.batch_size,
                               world=args.world)
        sweep["t2i_guidance"][g] = {k: v["all"]["exact"] for k, v in r["accuracy"].items()}
    elapsed = time.perf_counter() - t0

    env = {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
           "threads": args.threads, "world": args.world, "model": _shown(pipe.model_path), "steps": steps0, "guidance": g0,
           "command": "python scripts/make_results.py " + " ".join(
               f"--{k.replace('_', '-')}" + ("" if v is True else f" {Path(v).name if k.endswith('_from') else v}")
               for k, v in vars(args).items()
               if v is not None and v is not False and k not in ("few_step", "append")),
           "elapsed_s": round(elapsed, 1)}
    for name, res in {"t2i": t2i, "i2t": i2t, "recon": recon, "sweeps": sweep, "env": env}.items():
        atomic_write_text(out / "results" / f"{name}.json", json.dumps(res, indent=2, default=str) + "\n")
    return t2i, i2t, recon, sweep, env



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=100, help="prompts / images per group (object count x split)")
    ap.add_argument("--sweep-n", type=int, default=50, help="per split, one-object prompts, for the plots")
    ap.add_argument("--fid-n", type=int, default=500)
    ap.add_argument("--recon-n", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--world", default="v1", choices=list(WORLDS),
                    help="the shapes world the benchmarks draw (default v1: the world the bundled model was trained "
                         "on; the v2 world's figures are in the appended section)")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--t2i-from", default=None, help="use this `flowtok eval t2i` JSON for the text-to-image tables "
                    "(FID is still computed here with --fid-n)")
    ap.add_argument("--i2t-from", default=None, help="use this `flowtok eval i2t` JSON for the image-to-text tables")
    ap.add_argument("--few-step", default=None, help="few_step.json of scripts/few_step.py: adds its table")
    ap.add_argument("--append", default="docs/results/world_v2.md",
                    help="a hand-written markdown section appended to the page when the file exists (the v2 world: "
                         "its judge, its out-of-distribution set and their protocols)")
    ap.add_argument("--page-only", action="store_true",
                    help="only rebuild results.md and the plots from the JSONs of an earlier run under --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    steps_grid, guid_grid = [1, 2, 4, 8, 20], [1.0, 1.5, 2.0, 3.0, 4.0]
    if args.page_only:
        t2i, i2t, recon, sweep, env = (json.loads((out / "results" / f"{n}.json").read_text())
                                       for n in ("t2i", "i2t", "recon", "sweeps", "env"))
        sweep = {k: {(float(x) if k == "t2i_guidance" else int(x)): v for x, v in d.items()} for k, d in sweep.items()}
    else:
        t2i, i2t, recon, sweep, env = compute(args, out, steps_grid, guid_grid)
    steps0, g0, elapsed = env["steps"], env["guidance"], env["elapsed_s"]
    splits = list(sweep["t2i_steps"][steps_grid[0]])
    plot_curve(steps_grid, {f"text->image, {s}": [sweep["t2i_steps"][x][s] for x in steps_grid] for s in splits}
               | {f"image->text, {s}": [sweep["i2t_steps"][x][s] for x in steps_grid] for s in splits},
               out / "results" / "accuracy_vs_steps.png", "Euler steps", "exact accuracy (1 object)",
               title="flowtok-shapes: accuracy against sampling steps", logx=True)
    plot_curve(guid_grid, {f"text->image, {s}": [sweep["t2i_guidance"][x][s] for x in guid_grid] for s in splits},
               out / "results" / "accuracy_vs_guidance.png", "guidance scale", "exact accuracy (1 object)",
               title=f"flowtok-shapes: text->image accuracy against guidance ({steps0} steps)")

    lines = ["# Results: the bundled flowtok-shapes model", "",
             f"Regenerated by `{env['command']}` on {env['date_utc']} ({env['machine']}, {env['threads']} CPU threads, "
             f"torch {env['torch']}; {elapsed / 60:.1f} min). Model: `{env['model']}`; {steps0} Euler steps, "
             f"guidance {g0} unless a plot says otherwise; shapes world {env.get('world', 'v1')}. "
             "Full protocols: [results/](results/).", "",
             "Groups: *seen* prompts follow the training rule; *held_out* prompts contain a colour-shape pair "
             "or a relation combination that never occurs in training (compositional generalisation). "
             "Exact = every object's colour, shape, size and position read back correctly by the shapes judge "
             "(text->image) or by parsing the caption (image->text)."
             + (" The accuracy tables come from `flowtok eval` runs given with `--t2i-from` / `--i2t-from`; "
                "their options are recorded in results/t2i.json and results/i2t.json."
                if "_from" in env["command"] else ""), "",
             "## Text to image (judge-exact accuracy, %)", ""]
    lines += _acc_table(t2i, "group")
    if "fid" in t2i:
        f = t2i["fid"]
        lines += ["", f"FID against real renders: **{f['fid']:.2f}** "
                      + (f"(KID {f['kid']:.4f}) " if f.get('kid') is not None else "")
                      + f"on {f['generated_n']} images; "
                      "FID at this sample count is biased upwards, compare only at equal n."]
    lines += ["", "## Image to text (exact-scene accuracy of parsed captions, %)", ""]
    lines += _acc_table(i2t, "group")
    cm = i2t.get("caption_metrics", {})
    if cm:
        lines += ["", "| split | BLEU-1 | BLEU-4 | METEOR | ROUGE-L | CIDEr | SPICE |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for split, m in cm.items():
            spice = m.get("spice")
            lines.append(f"| {split} | {m['bleu_1']:.3f} | {m['bleu_4']:.3f} | {m['meteor']:.3f} | {m['rouge_l']:.3f} | "
                         f"{m['cider']:.3f} | {spice if isinstance(spice, float) else 'unavailable'} |")
    r = recon
    lines += ["", "## Tokenizer reconstruction", "",
              f"On {r['protocol']['n']} rendered scenes (any split): PSNR "
              f"**{r['psnr']:.2f} dB** (std {r['psnr_std']:.2f}), SSIM **{r['ssim']:.4f}**"
              + (f", rFID {r['rfid']:.2f} (rKID {r['rkid']:.4f})" if "rfid" in r else "") + ".",
              "", "## Plots", "", "![accuracy against steps](results/accuracy_vs_steps.png)", "",
              "![accuracy against guidance](results/accuracy_vs_guidance.png)", ""]
    if args.few_step:
        lines += _few_step_section(json.loads(Path(args.few_step).read_text()))
    if args.append and Path(args.append).is_file():
        lines += ["", Path(args.append).read_text().rstrip()]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    print(f"wrote {out / 'results.md'} in {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
