"""Runs and outputs (issue 19, third group): one training per run folder, resumes that continue the same
run, a full disk, checkpoints whose manifest verifies but whose contents do not, streamed generation,
output files that cannot be redirected by a planted symlink, and CLI mistakes that must be one line."""

import logging
import os
import resource
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from flowtok.cli import main
from flowtok.config import preset
from flowtok.flow import FLOW_PRESETS, FlowTransformer
from flowtok.pipelines import FlowTokPipeline
from flowtok.text import DECODER_PRESETS, PROJECTOR_PRESETS, TextDecoder, TextProjector, load_text_encoder
from flowtok.tokenizer import TOKENIZER_PRESETS, ImageTokenizer
from flowtok.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
K, C = 4, 4


def _cli_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("flowtok")]
    assert len(err) == 1 and err[0].startswith("flowtok: error: "), err
    return err[0]


def _config(tmp: Path, steps: int = 2, **train) -> Path:
    cfg = {"stage": "tokenizer", "run_dir": str(tmp / "run"), "seed": 0,
           "data": {"kind": "shapes", "size": 64},
           "model": {"preset": "tiny", "overrides": {"text_dim": 0, "image_size": 64, "patch_size": 16},
                     "eval_images": 2},
           "train": {"steps": steps, "batch_size": 2, "ckpt_every": 2, "tensorboard": False, "progress": False,
                     **train}}
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------- run folder
def test_a_second_training_in_a_locked_run_dir_refuses(tmp_path, capsys):
    cfg = _config(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from flowtok.training.rundir import claim_run_dir; "
                               f"lock = claim_run_dir(Path({str(tmp_path / 'run')!r})); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, env=_env())
    try:
        assert holder.stdout.readline().strip() == b"held"
        line = _cli_error(capsys, ["train", str(cfg), "--device", "cpu"])
        assert f"is in use by another training (pid {holder.pid})" in line
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", str(cfg), "--device", "cpu"]) == 0  # the kernel dropped the lock with the process


def test_run_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    cfg = _config(tmp_path)
    (tmp_path / "run").write_text("not a folder")
    assert "is a file, not a folder" in _cli_error(capsys, ["train", str(cfg), "--device", "cpu"])
    assert "cannot be written" in _cli_error(capsys, ["train", str(cfg), "--device", "cpu",
                                                      f"run_dir={tmp_path / 'run' / 'sub'}"])


def test_resume_with_a_changed_seed_batch_or_data_refuses(tmp_path, capsys):
    cfg = _config(tmp_path)
    assert main(["train", str(cfg), "--device", "cpu"]) == 0
    before = (tmp_path / "run" / "config.yaml").read_text()
    for change, key in (("seed=7", "seed"), ("train.batch_size=4", "train.batch_size"), ("data.split=test", "data")):
        line = _cli_error(capsys, ["train", str(cfg), change, "--device", "cpu", "--resume", "latest"])
        assert f"changed {key}" in line and "--allow-config-change" in line
    assert (tmp_path / "run" / "config.yaml").read_text() == before  # not overwritten
    # Running longer is what resuming is for.
    assert main(["train", str(cfg), "train.steps=4", "--device", "cpu", "--resume", "latest"]) == 0
    assert main(["train", str(cfg), "seed=7", "train.steps=6", "--device", "cpu", "--resume", "latest",
                 "--allow-config-change"]) == 0
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["seed"] == 7
    assert yaml.safe_load((tmp_path / "run" / "config.before-resume.yaml").read_text())["seed"] == 0


def test_disk_full_is_one_line_and_leaves_no_temporary_checkpoint(tmp_path):
    cfg = _config(tmp_path)
    assert main(["train", str(cfg), "--device", "cpu"]) == 0
    ckpts = tmp_path / "run" / "checkpoints"
    first = ckpt.list_checkpoints(ckpts)[-1]
    limit = (first / "model.safetensors").stat().st_size // 2  # every file larger than this fails: "disk full"

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    for _attempt in range(2):
        proc = subprocess.run([sys.executable, "-m", "flowtok.cli", "train", str(cfg), "train.steps=4", "--device",
                               "cpu", "--resume", "latest"], capture_output=True, text=True, env=_env(),
                              preexec_fn=limited, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        err = [line for line in proc.stderr.splitlines() if line.startswith("flowtok:")]
        assert len(err) == 1 and "File too large" in err[0] and "earlier checkpoints are intact" in err[0], err
    assert [p.name for p in ckpts.iterdir()] == [first.name]  # no temporary folder left, per attempt
    ckpt.verify(first)


def test_checkpoint_with_verified_manifest_but_malformed_contents_falls_back(tmp_path, caplog):
    cfg = _config(tmp_path, steps=4)
    assert main(["train", str(cfg), "--device", "cpu"]) == 0
    ckpts = tmp_path / "run" / "checkpoints"
    newest = ckpt.list_checkpoints(ckpts)[-1]
    assert newest.name == "step-0000004"
    for name, damage in (("optimizer.pt", None), ("state.json", '{"step": "four"}')):
        if damage is None:
            torch.save({"state": {}, "param_groups": [{"params": [0]}]}, newest / name)
        else:
            (newest / name).write_text(damage)
    ckpt.write_manifest(newest, 4)  # the manifest verifies: only contents are bad
    ckpt.verify(newest)
    caplog.set_level(logging.INFO)
    assert main(["train", str(cfg), "train.steps=6", "--device", "cpu", "--resume", "latest"]) == 0
    warned = [r.getMessage() for r in caplog.records if "skipping bad checkpoint" in r.getMessage()]
    assert len(warned) == 1 and "step-0000004" in warned[0]
    assert any("resumed from" in r.getMessage() and "step-0000002" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    pipe = FlowTokPipeline(
        ImageTokenizer(replace(TOKENIZER_PRESETS["tiny"], text_dim=0)), load_text_encoder("minilm", max_length=K),
        TextProjector(replace(PROJECTOR_PRESETS["tiny"], latent_channels=C)),
        FlowTransformer(preset(FLOW_PRESETS, "tiny", num_tokens=K, in_channels=C)),
        FlowTransformer(preset(FLOW_PRESETS, "tiny", num_tokens=K, in_channels=C)),
        TextDecoder(replace(DECODER_PRESETS["tiny"], num_tokens=K, latent_channels=C)),
        defaults={"num_inference_steps": 1})
    return pipe.save_pretrained(tmp_path_factory.mktemp("runs") / "pipe")


def test_generate_streams_in_batches(pipe_dir, tmp_path, capsys, monkeypatch):
    calls = []
    real = FlowTokPipeline.text_to_image

    def counting(self, prompt, *a, **k):
        calls.append(len(prompt))
        return real(self, prompt, *a, **k)

    monkeypatch.setattr(FlowTokPipeline, "text_to_image", counting)
    capsys.readouterr()
    assert main(["generate", "a red circle", "--n", "10", "--batch-size", "4", "--model", str(pipe_dir),
                 "-o", str(tmp_path / "img.png")]) == 0
    assert calls == [4, 4, 2]
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / f"img-{i}.png") for i in range(10)]
    assert all(Image.open(p).size == (32, 32) for p in out)
    assert "--batch-size" in _cli_error(capsys, ["generate", "a", "--batch-size", "0", "--model", str(pipe_dir)])


def test_output_is_never_written_through_a_planted_symlink(pipe_dir, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out.png"
    for pid in range(os.getpid() - 5, os.getpid() + 50):  # the old, predictable temporary names
        (tmp_path / f".out.png.tmp-{pid}").symlink_to(victim)
    assert main(["generate", "a red circle", "--model", str(pipe_dir), "-o", str(out)]) == 0
    assert victim.read_text() == "precious" and Image.open(out).size == (32, 32)
    out.unlink()
    out.symlink_to(victim)  # a link at the output name itself is replaced, not followed
    assert main(["generate", "a red circle", "--model", str(pipe_dir), "-o", str(out)]) == 0
    assert victim.read_text() == "precious" and not out.is_symlink()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.png.") and not p.is_symlink()]
    assert leftovers == []


def test_failed_image_write_leaves_no_temporary_file(pipe_dir, tmp_path, capsys, monkeypatch):
    def broken_save(self, fp, format=None, **params):
        fp.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    line = _cli_error(capsys, ["generate", "a red circle", "--model", str(pipe_dir), "-o", str(tmp_path / "o.png")])
    assert "No space left on device" in line
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------- CLI mistakes
def test_cli_mistakes_are_one_line(pipe_dir, tmp_path, capsys):
    gen = ["generate", "a red circle", "--model", str(pipe_dir), "-o", str(tmp_path / "o.png")]
    assert "--seed" in _cli_error(capsys, [*gen, "--seed", str(2**64)])
    assert "--seed" in _cli_error(capsys, [*gen, "--seed", "-1"])
    assert "--device" in _cli_error(capsys, [*gen, "--device", "cpu0"])
    assert "--device" in _cli_error(capsys, [*gen, "--device", "tpu"])
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in _cli_error(capsys, [*gen, "--device", "cuda"])
        assert "no CUDA GPU" in _cli_error(capsys, ["caption", "x.png", "--device", "cuda:1"])
        assert "no CUDA GPU" in _cli_error(capsys, ["train", str(_config(tmp_path)), "--device", "cuda"])
    assert "guidance" in _cli_error(capsys, [*gen, "--guidance", "1e30"])
    demo = ["demo", "--model", str(pipe_dir)]
    assert "--queue-size" in _cli_error(capsys, [*demo, "--queue-size", "0"])
    assert "--concurrency" in _cli_error(capsys, [*demo, "--concurrency", "0"])
    assert "--port" in _cli_error(capsys, [*demo, "--port", "99999"])
    assert "--max-upload-mb" in _cli_error(capsys, [*demo, "--max-upload-mb", "inf"])
    assert "--max-upload-mb" in _cli_error(capsys, [*demo, "--max-upload-mb", "nan"])
    assert "--threads" in _cli_error(capsys, [*gen, "--threads", "0"])


def test_huge_guidance_is_refused_not_blamed_on_the_weights(pipe_dir):
    from flowtok.errors import InvalidInputError

    pipe = FlowTokPipeline.from_pretrained(pipe_dir, device="cpu")
    with pytest.raises(InvalidInputError, match="guidance_scale"):
        pipe.text_to_image("a red circle", guidance_scale=1e30)
    with pytest.raises(InvalidInputError, match="guidance_scale"):  # found by benchmarks/fuzz.py: a TypeError before
        pipe.text_to_image("a red circle", guidance_scale=10**30)
    assert pipe.text_to_image("a red circle", guidance_scale=50.0, output_type="pt").shape == (1, 3, 32, 32)
