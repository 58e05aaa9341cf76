"""Crash safety of a real training run: `flowtok train` (tokenizer stage, tiny, CPU) SIGKILLed 20 times,
half of them inside a checkpoint write, resumed each time with ``--resume latest``; plus NaN batches on
the same real stage. The kill loop lives in ``benchmarks/soak_resume.py`` (its 100-kill soak is run by hand)."""

import functools
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowtok.cli import main
from flowtok.training import checkpoint as ckpt
from flowtok.training.run import build_run
from flowtok.training.trainer import NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def _soak_module():
    spec = importlib.util.spec_from_file_location("soak_resume", ROOT / "benchmarks" / "soak_resume.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_twenty_sigkills_resume_to_identical_weights(tmp_path):
    soak = _soak_module()
    rep = soak.soak(tmp_path / "soak", kills=20, steps=80, ckpt_every=2, seed=0, corrupt_every=7)
    assert rep.failures == []
    assert rep.kills == 20 and rep.timer_kills == 10
    assert sum(rep.checkpoint_kills.values()) == 10
    assert len(rep.checkpoint_kills) == 8  # every phase of a checkpoint write was hit at least once
    # Every run that got as far as resuming started from the newest checkpoint that verified.
    assert rep.starts_checked == 21  # 20 killed runs and the final one
    assert rep.fallbacks_after_corruption == 2  # two damaged checkpoints named and passed over
    assert rep.max_steps_lost <= 2  # never more than the steps since the last checkpoint
    # Bit for bit: the exported file of the killed-20-times run equals the uninterrupted run's.
    assert rep.identical_to_uninterrupted and rep.reference_sha256 == rep.resumed_sha256
    a = load_file(tmp_path / "soak" / "reference" / "export" / "tokenizer" / "model.safetensors")
    b = load_file(tmp_path / "soak" / "killed" / "export" / "tokenizer" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_soak_accepts_an_older_damaged_checkpoint_named_beside_the_new_one(tmp_path, caplog):
    """A checkpoint damaged on purpose at one kill can still lie above the newest intact one at the next
    (no run got far enough to rewrite it): the resume then names both, one line each. The case CI hit."""
    soak = _soak_module()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    for step in (8, 10, 12):
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.full((3,), float(step))}, {"w": torch.zeros(3)},
                             opt.state_dict(), {"step": step}, keep_last=0)
    soak._corrupt(tmp_path, 12, "truncate")  # at an earlier kill
    flipped = soak._corrupt(tmp_path, 10, "flip")  # at this kill
    bad = soak.bad_newer_than(tmp_path, 8)
    assert [p.name for p in bad] == ["step-0000010", "step-0000012"]
    with caplog.at_level("WARNING", logger="flowtok"):
        assert ckpt.load_latest(tmp_path).step == 8
    log = "\n".join(r.getMessage() for r in caplog.records) + "\nresumed from x at step 8\n"
    rep = soak.SoakReport()
    soak._check_resume(rep, log, 8, flipped, bad)
    assert rep.failures == [] and rep.fallbacks_after_corruption == 1 and rep.starts_checked == 1
    assert rep.older_damage_passed_over == 1
    # A skip the disk does not account for, or one fewer line than damaged checkpoints, is a failure.
    for wrong in (bad[:1], bad + [tmp_path / "step-0000014"]):
        rep = soak.SoakReport()
        soak._check_resume(rep, log, 8, flipped, wrong)
        assert len(rep.failures) == 1 and "not each named in one line" in rep.failures[0]
    rep = soak.SoakReport()
    soak._check_resume(rep, log.replace("optimizer.pt", "model.safetensors"), 8, flipped, bad)
    assert len(rep.failures) == 1 and "damaged on purpose" in rep.failures[0]


def _tiny_tokenizer_run(tmp: Path, **train):
    soak = _soak_module()
    cfg = soak.tiny_tokenizer_config(tmp, steps=8, ckpt_every=4)
    cfg["train"].update(train)
    return build_run(cfg, device="cpu")


def _poison(trainer, steps: set[int], value: float) -> None:
    """Make the real stage's batches non-finite at ``steps`` (as a corrupt image or an overflow would)."""
    stage = trainer.stage
    clean = stage.batch

    def batch(step, local_batch, rank, world):
        b = clean(step, local_batch, rank, world)
        if step in steps:
            b["images"] = b["images"].clone()
            b["images"][0, 0, 0, 0] = value
        return b

    stage.batch = batch


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_batches_are_skipped_on_a_real_stage(tmp_path, caplog, value):
    trainer = _tiny_tokenizer_run(tmp_path)
    _poison(trainer, {2, 5}, value)
    out = trainer.fit()
    skips = [r.getMessage().split(";")[0] for r in caplog.records if "step skipped" in r.getMessage()]
    assert skips == ["non-finite values in batch['images'] at step 2", "non-finite values in batch['images'] at step 5"]
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r.get("skipped") == "non-finite"] == [2, 5]
    exported = load_file(out / "tokenizer" / "model.safetensors")  # the EMA weights
    assert all(torch.isfinite(v).all() for v in exported.values())
    last = ckpt.load_latest(tmp_path / "checkpoints")
    assert last.step == 8
    for state in (last.model, last.ema):
        assert all(torch.isfinite(v).all() for v in state.values())


def test_nan_policy_stop_on_a_real_stage_leaves_the_checkpoint_clean(tmp_path):
    trainer = _tiny_tokenizer_run(tmp_path, nan_policy="stop")
    _poison(trainer, {5}, math.nan)
    with pytest.raises(NonFiniteLossError, match="step 5 .*nan_policy is 'stop'") as exc:
        trainer.fit()
    assert "\n" not in str(exc.value)
    last = ckpt.load_latest(tmp_path / "checkpoints")
    assert last.step == 4 and all(torch.isfinite(v).all() for v in last.ema.values())


def test_too_many_nans_in_a_row_stop_even_when_skipping(tmp_path):
    trainer = _tiny_tokenizer_run(tmp_path, max_consecutive_nan=2)
    _poison(trainer, {1, 2, 3}, math.nan)
    with pytest.raises(NonFiniteLossError, match="3 in a row"):
        trainer.fit()


def test_cli_resume_errors_are_one_line(tmp_path, capsys):
    soak = _soak_module()
    import yaml

    cfg = tmp_path / "tok.yaml"
    cfg.write_text(yaml.safe_dump(soak.tiny_tokenizer_config(tmp_path / "run", steps=2, ckpt_every=2)))
    assert main(["train", str(cfg), "--device", "cpu"]) == 0
    good = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    capsys.readouterr()

    # An explicit checkpoint folder that is damaged is an error, not a silent fresh start.
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(good, bad)
    (bad / "ema.safetensors").write_bytes(b"\x00" * 10)
    assert main(["train", str(cfg), "--device", "cpu", "--resume", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ema.safetensors is corrupt or truncated" in err[0]

    # A checkpoint of other shapes (here: a wider tokenizer) names the first mismatching weight.
    assert main(["train", str(cfg), "model.overrides.encoder_width=64", "run_dir=" + str(tmp_path / "wide"),
                 "--device", "cpu", "--resume", str(good)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has shape" in err[0]

    # A checkpoint written by another stage.
    state = json.loads((bad / "state.json").read_text())
    shutil.rmtree(bad)
    shutil.copytree(good, bad)
    state["stage"] = "t2i"
    (bad / "state.json").write_text(json.dumps(state))
    ckpt.write_manifest(bad, 2)
    assert main(["train", str(cfg), "--device", "cpu", "--resume", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "written by stage 't2i'" in err[0]
