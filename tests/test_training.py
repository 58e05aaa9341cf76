"""The one trainer, on a toy stage: resume exactness, checkpoint safety, NaN handling; and several processes."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from flowtok.errors import CheckpointError
from flowtok.training import checkpoint as ckpt
from flowtok.training.trainer import Stage, TrainConfig, Trainer


class ToyStage(Stage):
    name = "toy"

    def __init__(self, poison_steps=()):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.1), nn.Linear(16, 1))
        self.poison_steps = set(poison_steps)
        self.exported = None

    def batch(self, step, local_batch, rank, world):
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(local_batch, 4, generator=g)
        y = x.sum(dim=1, keepdim=True)
        if step in self.poison_steps:
            x = x * float("nan")
        return {"x": x, "y": y}

    def forward(self, batch):
        loss = ((self.net(batch["x"]) - batch["y"]) ** 2).mean()
        return loss, {"mse": loss.detach()}

    def export(self, out_dir):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.exported = {k: v.clone() for k, v in self.state_dict().items()}


def _cfg(**kw):
    base = dict(steps=30, batch_size=8, lr=1e-2, ckpt_every=10, log_every=5, ema_decay=0.9,
                tensorboard=False, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _run(tmp, steps=30, resume=None, **kw):
    torch.manual_seed(0)
    stage = ToyStage(**kw)
    Trainer(stage, _cfg(steps=steps), tmp, seed=0, device="cpu").fit(resume=resume)
    return stage


def test_loss_falls_and_metrics_logged(tmp_path):
    _run(tmp_path)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert losses[-1] < losses[0] * 0.5
    assert all("samples_per_s" in r for r in recs if "loss" in r)
    assert len(ckpt.list_checkpoints(tmp_path / "checkpoints")) == 3  # keep_last


def test_resume_matches_uninterrupted_run(tmp_path):
    full = _run(tmp_path / "full", steps=30)
    _run(tmp_path / "split", steps=20)  # "killed" after the step-20 checkpoint
    resumed = _run(tmp_path / "split", steps=30, resume="latest")
    for k, v in full.exported.items():
        assert torch.equal(v, resumed.exported[k]), k


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path, caplog):
    _run(tmp_path, steps=30)
    ckpts = ckpt.list_checkpoints(tmp_path / "checkpoints")
    newest = ckpts[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="checksum"):
        ckpt.verify(ckpts[-1])
    found = ckpt.load_latest(tmp_path / "checkpoints")
    assert found is not None and found.step == 20
    assert any("skipping bad checkpoint" in r.message for r in caplog.records)


def test_half_written_checkpoint_is_ignored(tmp_path):
    _run(tmp_path, steps=10)
    d = tmp_path / "checkpoints"
    (d / "step-0000020").mkdir()  # a folder with no manifest, as if killed before the rename
    (d / ".tmp-step-0000030-999").mkdir()
    found = ckpt.load_latest(d)
    assert found.step == 10


def test_nan_batches_are_skipped_without_poisoning_weights(tmp_path):
    stage = _run(tmp_path, steps=12, poison_steps=(3, 7))
    assert all(torch.isfinite(v).all() for v in stage.exported.values())
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in recs if r.get("skipped") == "non-finite") == 2


def test_nan_policy_stop(tmp_path):
    torch.manual_seed(0)
    stage = ToyStage(poison_steps=(2,))
    with pytest.raises(FloatingPointError, match="step 2"):
        Trainer(stage, _cfg(steps=5, nan_policy="stop"), tmp_path, device="cpu").fit()


def test_optimizer_state_loads_with_weights_only(tmp_path):
    _run(tmp_path, steps=10)
    path = ckpt.list_checkpoints(tmp_path / "checkpoints")[-1] / "optimizer.pt"
    state = torch.load(path, weights_only=True)
    assert "state" in state and "param_groups" in state


def test_two_processes_train_checkpoint_once_and_resume(tmp_path, monkeypatch):
    """`torchrun --nproc_per_node 2` (gloo on the CPU, as NCCL on GPUs): the global batch is split, rank 0
    alone writes checkpoints, metrics and the export, and both ranks resume from the same checkpoint."""
    import os
    import subprocess
    import sys

    import yaml

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from soak_resume import tiny_tokenizer_config

    run = tmp_path / "run"
    cfg = tiny_tokenizer_config(run, steps=4, ckpt_every=2)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(*extra: str, procs: int = 2) -> subprocess.CompletedProcess:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
        cmd = [sys.executable, *launcher, "-m", "flowtok.cli", "train", str(tmp_path / "cfg.yaml"), "--device", "cpu",
               *extra]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    first = train()
    assert first.returncode == 0, first.stderr[-2000:]
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step-0000002", "step-0000004"]
    state = ckpt.load_checkpoint(run / "checkpoints" / "step-0000004").state
    assert state["world_size"] == 2 and state["samples_seen"] == 4 * 4  # global batch 4: 2 per process
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == [1, 2, 3, 4]  # one writer: rank 0
    assert (run / "export" / "tokenizer" / "model.safetensors").is_file()

    more = train("train.steps=6", "--resume", "latest")
    assert more.returncode == 0, more.stderr[-2000:]
    assert more.stderr.count("resumed from") == 2 and "at step 4" in more.stderr  # both ranks, same step
    alone = train("train.steps=8", "--resume", "latest", procs=1)  # fewer processes: goes on, and says so
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert "written by 2 processes, resuming on 1" in alone.stderr


class CountingStage(ToyStage):
    """A toy stage whose data position is state (as raw-image shards are): the batches it has drawn."""

    def __init__(self):
        super().__init__()
        self.taken = 0

    def batch(self, step, local_batch, rank, world):
        self.taken += 1
        return super().batch(step, local_batch, rank, world)

    def data_state(self):
        return {"taken": self.taken}


class NoisyStage(ToyStage):
    """A toy stage whose batch takes a draw from the global RNG, as a posterior sample does."""

    def batch(self, step, local_batch, rank, world):
        b = super().batch(step, local_batch, rank, world)
        return {**b, "x": b["x"] + 0.1 * torch.randn_like(b["x"])}


def test_prefetching_the_next_batch_changes_no_number(tmp_path):
    """The next step's batch is drawn during this step's backward, with the RNG of its own step: the run is
    bit for bit the run that draws each batch at the start of its step (the batch's own draw, then dropout)."""
    runs = {}
    for on in (True, False):
        torch.manual_seed(0)
        stage = NoisyStage()
        Trainer(stage, _cfg(steps=12, prefetch=on), tmp_path / str(on), seed=0, device="cpu").fit()
        runs[on] = stage.exported
    for k, v in runs[True].items():
        assert torch.equal(v, runs[False][k]), k


def test_checkpoint_holds_the_data_position_before_the_prefetched_batch(tmp_path):
    torch.manual_seed(0)
    stage = CountingStage()
    Trainer(stage, _cfg(steps=12, ckpt_every=5), tmp_path, seed=0, device="cpu").fit()
    found = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in found] == ["step-0000005", "step-0000010", "step-0000012"]
    for path in found:
        state = json.loads((path / "state.json").read_text())
        step = int(path.name.split("-")[1])
        assert state["data"] == [{"taken": step}], path.name  # at step 10: 10 batches drawn, not 11
