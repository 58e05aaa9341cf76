"""Kill a real training run with SIGKILL again and again, resume it with ``--resume latest`` each time,
and check that it ends with the same weights, bit for bit, as a run that was never interrupted.

The run is ``flowtok train`` (a subprocess, exactly as a user starts it) on the tokenizer stage with
the tiny preset at 64 px on CPU, checkpointing every ``--ckpt-every`` steps. Kills alternate between

- *checkpoint kills*: the run SIGKILLs itself at a chosen point of a checkpoint write (before or after
  each file, before or after the rename), through the test-only ``FLOWTOK_TEST_KILL_AT`` hook of
  :mod:`flowtok.training.checkpoint`, because a timer lands in those few milliseconds only by luck;
- *timer kills*: the parent waits until the run has logged a new step, then a random time of 0 to
  ``--window`` steps (timed on the reference run), then sends SIGKILL (these land anywhere: a step, a
  checkpoint, the logging).

Now and then (``--corrupt-every``) the newest checkpoint is damaged after a kill (truncated weights,
a flipped byte in the optimizer state) to check that the resume names it and falls back to the one before.
Such a checkpoint stays damaged until a run gets far enough to write its step again, so a resume may pass
over two: each must be named, one line each, and nothing else.

After every kill the next run must resume from the newest checkpoint that verifies, and no more than
the steps since that checkpoint may be lost (``ckpt_every``; twice that after a deliberate corruption).

CI runs 20 kills through ``tests/test_reliability_resume.py``. By hand, the long soak::

    .venv/bin/python benchmarks/soak_resume.py --kills 100 --out runs/soak

prints a JSON summary (kills, where they landed, resumes, fallbacks, steps lost, wall time, peak RSS
of the training processes) and exits non-zero if any check failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from flowtok.errors import CheckpointError
from flowtok.training import checkpoint as ckpt

PHASES = ("tmpdir", "model", "ema", "optimizer", "state", "manifest", "rename", "renamed")
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")
SKIPPED = re.compile(r"skipping bad checkpoint: (.+)")


def tiny_tokenizer_config(run_dir: Path, steps: int, ckpt_every: int, seed: int = 0) -> dict:
    """The tokenizer stage at its tiny size: a few milliseconds of compute per step on one CPU core."""
    return {
        "stage": "tokenizer", "run_dir": str(run_dir), "seed": seed,
        "data": {"kind": "shapes", "size": 64, "split": "train"},
        "model": {"preset": "tiny", "overrides": {"text_dim": 0, "image_size": 64, "patch_size": 16},
                  "eval_images": 4},
        "train": {"steps": steps, "batch_size": 4, "lr": 1e-3, "ckpt_every": ckpt_every, "keep_last": 3,
                  "log_every": 1, "ema_decay": 0.9, "tensorboard": False, "progress": False},
    }


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop(ckpt.KILL_ENV, None)
    # One thread in every run: the same reduction order in the reference and the resumed runs.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _train_cmd(config: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "flowtok.cli", "train", str(config), "--device", "cpu"]
    return cmd + ["--resume", "latest"] if resume else cmd


def newest_valid(ckpt_dir: Path) -> int:
    """Step of the newest checkpoint that verifies (0: none), checked here, outside the training process."""
    for path in reversed(ckpt.list_checkpoints(ckpt_dir)):
        try:
            ckpt.verify(path)
        except CheckpointError:
            continue
        return int(path.name[len(ckpt.PREFIX):])
    return 0


def bad_newer_than(ckpt_dir: Path, step: int) -> list[Path]:
    """The checkpoints after ``step`` that fail to verify: a resume to ``step`` must name each as it passes it over.
    Usually the one damaged on purpose; a checkpoint damaged at an earlier kill stays here until a run rewrites it."""
    bad = []
    for path in ckpt.list_checkpoints(ckpt_dir):
        if int(path.name[len(ckpt.PREFIX):]) > step:
            try:
                ckpt.verify(path)
            except CheckpointError:
                bad.append(path)
    return bad


def _logged_steps(metrics: Path, offset: int) -> list[int]:
    if not metrics.is_file():
        return []
    with open(metrics, "rb") as fh:
        fh.seek(offset)
        lines = fh.read().decode(errors="replace").splitlines()
    steps = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # the last line may be cut by the kill
            continue
        if "loss" in rec:
            steps.append(int(rec["step"]))
    return steps


def weights_digest(path: Path) -> str:
    """SHA-256 of every tensor's name, dtype, shape and bytes, and of the metadata, in sorted order. Not of
    the file's bytes: safetensors writes its metadata map in an order that varies from process to process."""
    import torch
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        digest.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _corrupt(ckpt_dir: Path, step: int, how: str) -> Path:
    folder = ckpt_dir / f"{ckpt.PREFIX}{step:07d}"
    if how == "truncate":
        target = folder / "model.safetensors"
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        target = folder / "optimizer.pt"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    return target


@dataclass
class SoakReport:
    kills: int = 0
    checkpoint_kills: dict[str, int] = field(default_factory=dict)  # phase -> count
    timer_kills: int = 0
    timer_kills_inside_checkpoint_write: int = 0
    starts_checked: int = 0  # runs whose start (resume step, or scratch) was checked against the disk
    fallbacks_after_corruption: int = 0
    older_damage_passed_over: int = 0  # resumes that also named a checkpoint damaged at an earlier kill
    max_steps_lost: int = 0
    steps_lost_total: int = 0
    runs: int = 0
    identical_to_uninterrupted: bool = False
    reference_sha256: str = ""
    resumed_sha256: str = ""
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    failures: list[str] = field(default_factory=list)


def _step_seconds(metrics: Path, batch: int) -> float:
    """Median wall time of one step (checkpoint writes included) in the reference run."""
    rates = sorted(batch / r["samples_per_s"] for r in map(json.loads, metrics.read_text().splitlines())
                   if r.get("samples_per_s"))
    return rates[len(rates) // 2]


def soak(out: Path, kills: int = 20, steps: int = 80, ckpt_every: int = 2, seed: int = 0, window: float = 3.0,
         corrupt_every: int = 7, timeout: float = 120.0) -> SoakReport:
    """Run the reference and the killed-and-resumed training under ``out`` and compare; see the module doc."""
    t0 = time.perf_counter()
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = random.Random(seed)
    rep = SoakReport()
    env = _env()

    def config(name: str) -> Path:
        path = out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_tokenizer_config(out / name, steps, ckpt_every)))
        return path

    ref = subprocess.run(_train_cmd(config("reference"), resume=False), env=env, capture_output=True, text=True,
                         timeout=timeout)
    rep.runs += 1
    if ref.returncode != 0:
        rep.failures.append(f"reference run failed: {ref.stderr.strip().splitlines()[-1:]}")
        return rep

    # Timer kills are spread over a few steps' time, whatever the machine's speed.
    step_s = _step_seconds(out / "reference" / "metrics.jsonl", tiny_tokenizer_config(out, 1, 1)["train"]["batch_size"])
    cfg = config("killed")
    run_dir = out / "killed"
    ckpt_dir, metrics = run_dir / "checkpoints", run_dir / "metrics.jsonl"
    expected, fallback_from = 0, None
    order = list(PHASES)
    while rep.kills < kills:
        k = rep.kills
        run_env = dict(env)
        phase = None
        if k % 2 == 0:  # a checkpoint kill in the first checkpoint this run writes
            target = min(expected + ckpt_every, steps)
            if k % (2 * len(PHASES)) == 0:  # every phase once per round, in a random order
                order = rng.sample(PHASES, len(PHASES))
            phase = order[(k // 2) % len(PHASES)]
            run_env[ckpt.KILL_ENV] = f"{target}:{phase}"
        offset = metrics.stat().st_size if metrics.is_file() else 0
        bad = bad_newer_than(ckpt_dir, expected)
        tmp_before = set(ckpt_dir.glob(f".tmp-{ckpt.PREFIX}*"))
        log_path = out / f"run-{rep.runs:03d}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(_train_cmd(cfg, resume=True), env=run_env, stdout=log, stderr=subprocess.STDOUT)
            rep.runs += 1
            if phase is None:  # a timer kill once this run has made progress
                deadline = time.monotonic() + timeout
                while proc.poll() is None and not _logged_steps(metrics, offset) and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(rng.uniform(0, window * step_s))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                rep.failures.append(f"run {rep.runs} hung")
                break
        text = log_path.read_text(errors="replace")
        _check_resume(rep, text, expected, fallback_from, bad)
        if rc == 0:
            rep.failures.append(f"run {rep.runs} finished before its kill: raise --steps")
            break
        if rc != -signal.SIGKILL:
            rep.failures.append(f"run {rep.runs} exited with {rc}, not by SIGKILL: {text.strip().splitlines()[-1:]}")
            break
        rep.kills += 1
        if phase is not None:
            rep.checkpoint_kills[phase] = rep.checkpoint_kills.get(phase, 0) + 1
        else:
            rep.timer_kills += 1
            if set(ckpt_dir.glob(f".tmp-{ckpt.PREFIX}*")) - tmp_before:  # it died with a write half done
                rep.timer_kills_inside_checkpoint_write += 1
        done = _logged_steps(metrics, offset)
        expected, fallback_from = newest_valid(ckpt_dir), None
        if done:
            lost = max(done) - expected
            rep.max_steps_lost = max(rep.max_steps_lost, lost)
            rep.steps_lost_total += max(lost, 0)
            if lost > ckpt_every:
                rep.failures.append(f"kill {rep.kills}: {lost} steps lost, more than ckpt_every={ckpt_every}")
        if corrupt_every and rep.kills % corrupt_every == 0 and expected > ckpt_every:
            how = "truncate" if (rep.kills // corrupt_every) % 2 else "flip"
            fallback_from = _corrupt(ckpt_dir, expected, how)
            expected = newest_valid(ckpt_dir)

    final = subprocess.run(_train_cmd(cfg, resume=True), env=env, capture_output=True, text=True, timeout=timeout)
    rep.runs += 1
    _check_resume(rep, final.stderr, expected, fallback_from, bad_newer_than(ckpt_dir, expected))
    if final.returncode != 0:
        rep.failures.append(f"final resume failed: {final.stderr.strip().splitlines()[-1:]}")
    else:
        a = out / "reference" / "export" / "tokenizer" / "model.safetensors"
        b = run_dir / "export" / "tokenizer" / "model.safetensors"
        rep.reference_sha256, rep.resumed_sha256 = weights_digest(a), weights_digest(b)
        rep.identical_to_uninterrupted = rep.reference_sha256 == rep.resumed_sha256
        if not rep.identical_to_uninterrupted:
            rep.failures.append("final weights differ from the uninterrupted run")
    rep.wall_s = round(time.perf_counter() - t0, 1)
    rep.peak_rss_mb = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    return rep


def _check_resume(rep: SoakReport, text: str, expected: int, fallback_from: Path | None, bad: list[Path]) -> None:
    """The run's log must show a resume from the newest intact checkpoint (or a fresh start if none), after one
    line naming each damaged checkpoint it passed over (``bad``), the one damaged on purpose (``fallback_from``) among them."""
    m = RESUMED.search(text)
    if m is None:
        if "Traceback" in text or "flowtok: error" in text:
            rep.failures.append(f"run {rep.runs} failed before resuming: {text.strip().splitlines()[-1:]}")
        elif "no checkpoint in" in text:
            if expected != 0:
                rep.failures.append(f"run {rep.runs} started from scratch; step {expected} was intact")
            else:
                rep.starts_checked += 1  # rightly from scratch: no intact checkpoint yet
        return  # otherwise killed before it got to the resume: nothing to check
    rep.starts_checked += 1
    step = int(m.group(2))
    if step != expected:
        rep.failures.append(f"run {rep.runs} resumed at step {step}, the newest intact checkpoint is {expected}")
    skipped = SKIPPED.findall(text)
    named = [next((line for line in skipped if str(path) in line), None) for path in bad]
    if len(skipped) != len(bad) or None in named:
        rep.failures.append(f"run {rep.runs}: damaged {[p.name for p in bad]} not each named in one line: {skipped}")
        return
    if len(bad) > (fallback_from is not None):
        rep.older_damage_passed_over += 1
    if fallback_from is not None:
        if fallback_from.parent in bad and fallback_from.name in named[bad.index(fallback_from.parent)]:
            rep.fallbacks_after_corruption += 1
        else:
            rep.failures.append(f"run {rep.runs}: the file damaged on purpose, {fallback_from}, not named: {skipped}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default 4 per kill: a run nets about 1.5 steps between kills)")
    p.add_argument("--ckpt-every", type=int, default=2)
    p.add_argument("--window", type=float, default=3.0, help="timer kills: random delay of at most this many steps")
    p.add_argument("--corrupt-every", type=int, default=7, help="damage the newest checkpoint every N kills (0: never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/soak_resume")
    args = p.parse_args(argv)
    rep = soak(Path(args.out), kills=args.kills, steps=args.steps or 4 * args.kills, ckpt_every=args.ckpt_every, seed=args.seed,
               window=args.window, corrupt_every=args.corrupt_every)
    print(json.dumps({"command": " ".join(sys.argv), **asdict(rep)}, indent=2))
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
