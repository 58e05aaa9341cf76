"""The resume path's speed-ups keep it exact and safe: chunked checksums that catch damage anywhere, old
one-hash-per-file manifests still read, the optimizer state and EMA restored in the background, and the
timing breakdown logged once."""

import json
import logging

import pytest
import torch

from flowtok.errors import CheckpointError
from flowtok.training import checkpoint as ckpt
from flowtok.training.trainer import Trainer
from test_training import ToyStage, _cfg, _run


def test_chunked_manifest_catches_a_flipped_byte_in_any_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "CHUNK", 256)  # many chunks per file even for a toy model
    _run(tmp_path, steps=10)
    folder = ckpt.list_checkpoints(tmp_path / "checkpoints")[-1]
    manifest = json.loads((folder / "manifest.json").read_text())
    size = (folder / "optimizer.pt").stat().st_size
    assert manifest["chunk_bytes"] == 256 and len(manifest["sha256_chunks"]["optimizer.pt"]) == -(-size // 256)
    ckpt.verify(folder)
    data = bytearray((folder / "optimizer.pt").read_bytes())
    data[size // 2] ^= 1  # a middle chunk, not the first or the last
    (folder / "optimizer.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.pt is corrupt"):
        ckpt.verify(folder)


def test_old_whole_file_manifest_still_verifies_and_resumes(tmp_path):
    full = _run(tmp_path / "full", steps=30)
    _run(tmp_path / "split", steps=20)
    folder = ckpt.list_checkpoints(tmp_path / "split" / "checkpoints")[-1]
    old = {"step": 20, "sha256": {name: ckpt._sha256(folder / name) for name in ckpt.FILES}}
    (folder / "manifest.json").write_text(json.dumps(old))  # as written before chunked checksums
    ckpt.verify(folder)
    resumed = _run(tmp_path / "split", steps=30, resume="latest")
    for k, v in full.exported.items():
        assert torch.equal(v, resumed.exported[k]), k


def test_resume_logs_one_timing_line_and_restores_optimizer_and_ema(tmp_path, caplog):
    _run(tmp_path, steps=10)
    found = ckpt.load_latest(tmp_path / "checkpoints")
    assert found is not None and set(found.timings) >= {"verify_s", "read_optimizer_s", "read_model_s"}
    caplog.set_level(logging.INFO)
    torch.manual_seed(0)
    stage = ToyStage()
    trainer = Trainer(stage, _cfg(steps=11), tmp_path, seed=0, device="cpu")
    trainer.fit(resume="latest")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resume timing:")]
    assert len(lines) == 1
    for part in ("checkpoint read", "verify", "weights restore", "data position", "in the background",
                 "first step (compile)"):
        assert part in lines[0], part
    rec = next(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
               if '"first_step_s"' in line and json.loads(line)["step"] == 11)
    assert {"optimizer_restore_s", "ema_restore_s", "waited_s"} <= set(rec["resume_timings"])


def test_resume_at_the_last_step_still_exports_the_restored_ema(tmp_path):
    first = _run(tmp_path, steps=10)
    again = _run(tmp_path, steps=10, resume="latest")  # nothing left to train: the export waits for the EMA
    for k, v in first.exported.items():
        assert torch.equal(v, again.exported[k]), k


def test_unreadable_ema_is_one_checkpoint_error(tmp_path):
    _run(tmp_path, steps=10)
    folder = ckpt.list_checkpoints(tmp_path / "checkpoints")[-1]
    from flowtok.modeling import atomic_save_safetensors

    atomic_save_safetensors({"other": torch.zeros(3)}, folder / "ema.safetensors")
    ckpt.write_manifest(folder, 10)
    with pytest.raises(CheckpointError, match="EMA"):
        _run(tmp_path, steps=12, resume="latest")


def test_compile_scope_blocks_compiles_the_flow_blocks_not_the_stage(tmp_path, monkeypatch):
    """train.compile_scope: blocks (what benchmarks/train_scale.py's one-call GPU run uses): each flow's blocks
    are compiled regionally and the stage runs eager around them; the text tower is compiled too."""
    from flowtok.flow import FLOW_PRESETS, FlowTransformer

    calls = []
    monkeypatch.setattr(FlowTransformer, "compile_blocks", lambda self, **kw: calls.append("blocks") or self)
    monkeypatch.setattr(torch, "compile", lambda *a, **kw: pytest.fail("the whole stage was compiled"))

    class WithFlow(ToyStage):
        def __init__(self):
            super().__init__()
            self.flow = FlowTransformer(FLOW_PRESETS["tiny"])
            self.flow.requires_grad_(False)

        def compile_helpers(self, **options):
            calls.append("helpers")

    torch.manual_seed(0)
    Trainer(WithFlow(), _cfg(steps=2, compile=True, compile_scope="blocks"), tmp_path, seed=0, device="cpu").fit()
    assert calls == ["helpers", "blocks"]
