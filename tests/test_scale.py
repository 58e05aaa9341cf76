"""Training at scale on tiny data: the compact token format streamed across ranks and loader workers, exact
resume, pre-tokenisation that resumes and stops at the end of the data, raw-image shards in workers, the
two former DDP crashes, gradient accumulation, and data errors that are one line."""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from flowtok.config import from_dict
from flowtok.data.tokens import TokenShards, epoch_permutation, plan_memory
from flowtok.errors import ConfigError, DataError
from flowtok.training.data import DataConfig
from flowtok.training.loader import RawImageSource, TokenSource
from flowtok.training.trainer import Stage, TrainConfig, Trainer

K, C = 8, 4
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
    [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}


def _torchrun(args: list[str], procs: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny tokenizer (64 px, 8 x 4 latents) and 50 shapes samples pre-tokenised in shards of 16."""
    from flowtok.text import load_text_encoder
    from flowtok.tokenizer import TOKENIZER_PRESETS, ImageTokenizer
    from flowtok.training.pretokenize import pretokenize

    root = tmp_path_factory.mktemp("scale")
    torch.manual_seed(0)
    tok = ImageTokenizer(replace(TOKENIZER_PRESETS["tiny"], text_dim=0, image_size=64, patch_size=16,
                                 num_latent_tokens=K, token_channels=C))
    tok.save_pretrained(root / "tok")
    enc = load_text_encoder({"name": "minilm"}, max_length=K, device="cpu")
    pretokenize(DataConfig(kind="shapes", size=64), root / "tokens", tok.eval(), enc, n=50, batch_size=8,
                shard_size=16, workers=0, progress=False)
    return root


def test_compact_format_reads_back(tiny):
    from flowtok.shapes import sample_at

    shards = TokenShards(tiny / "tokens")
    assert len(shards) == 50 and [s["n"] for s in shards.meta["shards"]] == [16, 16, 16, 2]
    got = shards.read(np.array([49, 0, 17]))
    assert got["moments"].shape == (3, K, 2 * C) and got["moments"].dtype == np.float16
    assert got["captions"] == [sample_at(0, i)[1] for i in (49, 0, 17)]
    assert (got["input_ids"][:, 0] == shards.meta["eos_token_id"] - 1).all() or got["input_ids"][:, 0].min() > 0
    ram = TokenShards(tiny / "tokens", in_memory=True).read(np.array([49, 0, 17]))
    assert np.array_equal(ram["moments"], got["moments"]) and ram["captions"] == got["captions"]
    # The paper's shapes: 77 x 32 f16 moments + 77 int32 ids = 5,236 bytes a sample before its caption.
    assert 77 * 2 * 16 * 2 + 77 * 4 == 5236


def test_epoch_permutation_is_a_new_bijection_each_epoch():
    for n in (1, 2, 7, 1000, 12345):
        p0 = epoch_permutation(np.arange(n), n, seed=3, epoch=0)
        assert sorted(p0.tolist()) == list(range(n))
    p1 = epoch_permutation(np.arange(1000), 1000, seed=3, epoch=1)
    assert not np.array_equal(epoch_permutation(np.arange(1000), 1000, 3, 0), p1)


def test_memory_plan_shows_its_arithmetic():
    hold, line = plan_memory(1000, 5000, "auto", available=10**9)
    assert hold and "1,000 samples x 5,000 B" in line
    hold, _ = plan_memory(10**6, 5000, "auto", available=10**9)
    assert not hold
    with pytest.raises(DataError, match="does not fit.*GiB"):
        plan_memory(10**6, 5000, "memory", available=10**9)


STREAM = textwrap.dedent("""
    import json, os, sys, torch
    from flowtok.training.loader import TokenSource
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    src = TokenSource(sys.argv[1], seed=5, device=torch.device("cpu"), workers=2, prefetch=2, in_memory="stream")
    seen = [src.get(step, 5, rank, world)["index"].tolist() for step in range(10)]  # global batch 10: 2 epochs
    json.dump(seen, open(f"{sys.argv[2]}/rank{rank}.json", "w"))
""")


def test_two_ranks_stream_every_sample_once_per_epoch(tiny, tmp_path):
    script = tmp_path / "stream.py"
    script.write_text(STREAM)
    run = _torchrun([str(script), str(tiny / "tokens"), str(tmp_path)])
    assert run.returncode == 0, run.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    epochs = [[i for step in range(e * 5, e * 5 + 5) for r in (0, 1) for i in ranks[r][step]] for e in (0, 1)]
    for order in epochs:
        assert sorted(order) == list(range(50))  # each sample once per epoch, across both ranks
    assert epochs[0] != epochs[1]  # a new order each epoch
    assert not set(ranks[0][0]) & set(ranks[1][0])


def test_resume_mid_epoch_reads_the_same_batches(tiny):
    def batches(start: int, stop: int):
        src = TokenSource(str(tiny / "tokens"), seed=1, device=torch.device("cpu"), workers=1, in_memory="stream")
        return [src.get(s, 6, 0, 1) for s in range(start, stop)]

    whole, resumed = batches(0, 12), batches(5, 12)  # step 5 is mid-epoch (50 samples, 6 a step)
    for a, b in zip(whole[5:], resumed):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image_moments"], b["image_moments"])
        assert a["captions"] == b["captions"]
    # Gradient accumulation: 2 micro-batches of 3 read the samples of the batch of 6.
    src = TokenSource(str(tiny / "tokens"), seed=1, device=torch.device("cpu"), workers=0, in_memory="memory")
    micro = torch.cat([src.get(7, 3, m, 2)["index"] for m in range(2)])
    assert torch.equal(micro, whole[7]["index"])


def test_raw_image_shards_resume_from_the_saved_position(tmp_path):
    from flowtok.shapes import export_shapes

    export_shapes(tmp_path / "wds", 30, size=64, shards=True, shard_size=6)
    cfg = DataConfig(kind="webdataset", path=str(tmp_path / "wds"), size=64, workers=2, prefetch=2,
                     shuffle_buffer=8)
    a = RawImageSource(cfg, seed=0, device=torch.device("cpu"))
    first = [a.get(s, 4, 0, 1) for s in range(5)]
    saved = json.loads(json.dumps(a.state()))
    more = [a.get(s, 4, 0, 1) for s in range(5, 12)]  # past the end of an epoch (30 samples)
    b = RawImageSource(cfg, seed=0, device=torch.device("cpu"))
    b.load_state(saved)
    again = [b.get(s, 4, 0, 1) for s in range(5, 12)]
    assert [x["captions"] for x in again] == [x["captions"] for x in more]
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(again, more))
    epoch0 = [c for x in first + more for c in x["captions"]][:30]
    assert len(set(epoch0)) > 20  # shuffled across shards, not one shard's samples in a row


def test_two_former_ddp_crashes_now_train(tiny, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from soak_resume import tiny_tokenizer_config

    tok = tiny_tokenizer_config(tmp_path / "tok", steps=4, ckpt_every=4)
    tok["model"]["loss"] = {"discriminator_weight": 0.1, "discriminator_start": 2}  # late discriminator
    t2i = {"stage": "t2i", "run_dir": str(tmp_path / "t2i"), "seed": 0,
           "data": {"kind": "tokens", "path": str(tiny / "tokens"), "workers": 1},
           "train": {"steps": 3, "batch_size": 4, "ckpt_every": 3, "tensorboard": False, "progress": False},
           "model": {"tokenizer_path": str(tiny / "tok"), "projector_preset": "tiny",
                     "projector": {"latent_channels": C}, "flow_preset": "tiny",
                     "flow": {"num_tokens": K, "in_channels": C}, "align_weight": 0.0, "eval_prompts": 0}}
    for cfg in (tok, t2i):
        path = tmp_path / f"{cfg['stage']}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        run = _torchrun(["-m", "flowtok.cli", "train", str(path), "--device", "cpu"])
        assert run.returncode == 0, run.stderr[-3000:]
        assert (Path(cfg["run_dir"]) / "checkpoints").is_dir()


class Linear(Stage):
    name = "linear"

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def batch(self, step, local_batch, rank, world):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(local_batch * world, 4, generator=g)[rank * local_batch:(rank + 1) * local_batch]
        return {"x": x, "y": x.sum(dim=1, keepdim=True)}

    def forward(self, batch):
        loss = ((self.net(batch["x"]) - batch["y"]) ** 2).mean()
        return loss, {}

    def export(self, out_dir):
        pass


def test_accumulating_4_x_8_equals_one_batch_of_32(tmp_path):
    weights = []
    for accum in (1, 4):
        torch.manual_seed(0)
        stage = Linear()
        cfg = TrainConfig(steps=2, batch_size=32, grad_accum=accum, lr=1e-2, ema_decay=0.0, tensorboard=False,
                          progress=False, ckpt_every=100)
        Trainer(stage, cfg, tmp_path / f"a{accum}", device="cpu").fit()
        weights.append(torch.cat([p.detach().flatten() for p in stage.parameters()]))
    assert torch.allclose(weights[0], weights[1], atol=1e-6, rtol=1e-5)


def test_text_decoder_with_a_missing_data_path_is_one_line(tmp_path, capsys):
    from flowtok.cli import main

    cfg = {"stage": "text_decoder", "run_dir": str(tmp_path / "run"),
           "data": {"kind": "tokens", "path": str(tmp_path / "absent")},
           "train": {"steps": 1, "batch_size": 2, "tensorboard": False, "progress": False},
           "model": {"decoder_preset": "tiny", "decoder": {"num_tokens": 32}, "projector_preset": "tiny",
                     "max_length": 32}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "absent" in err and "does not exist" in err


def test_pretokenize_stops_at_the_end_and_resumes(tiny, tmp_path, caplog):
    from flowtok.cli import main
    from flowtok.shapes import export_shapes

    export_shapes(tmp_path / "folder", 10, size=64)
    out = tmp_path / "tokens"
    args = ["pretokenize", "--tokenizer", str(tiny / "tok"), "--out", str(out), "--data", "folder",
            "--path", str(tmp_path / "folder"), "--n", "25", "--shard-size", "4", "--workers", "0", "--no-progress"]
    assert main(args) == 0
    assert TokenShards(out).n == 10 and "stopping there, not at --n 25" in caplog.text  # no wrapping
    kept = (out / "shard-00000.safetensors").stat().st_mtime_ns
    (out / "shard-00001.safetensors").unlink()  # as if killed before this shard was written
    assert main(args) == 0
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == kept  # done shards are skipped
    assert TokenShards(out).read(np.arange(10))["captions"] == [
        json.loads(line)["caption"] for line in (tmp_path / "folder" / "captions.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["tokenizer", "t2i_b", "t2i_xl", "t2i_h", "i2t_xl", "text_decoder"])
def test_paper_configs_parse(name):
    """The paper's recipes are valid configs (parsed and checked, not built: FlowTok-H is 1.1B parameters)."""
    from flowtok.config import from_dict, load_yaml
    from flowtok.training.run import RunConfig
    from flowtok.training.stages import STAGES

    data = load_yaml(Path(__file__).resolve().parents[1] / "configs" / "paper" / f"{name}.yaml")
    run = from_dict(RunConfig, data)
    from_dict(STAGES[run.stage][1], run.model, "model")
    assert run.train.batch_size % (8 * run.train.grad_accum) == 0 and run.train.batch_size % 64 == 0


def test_shapes_scenes_sampled_in_workers_are_the_steps_own():
    """On a GPU the shapes source samples scenes in loader workers; forced on here, every micro-batch (two
    accumulation micro-steps, a jump back as after a resume, a one-off other size) equals the in-process one,
    with three micro-steps drawn in one render."""
    from flowtok.training.data import ShapesSource
    from flowtok.training.loader import SceneStream

    cfg = DataConfig(kind="shapes", size=64, workers=2, prefetch=2)
    plain = ShapesSource(cfg, seed=3, device=torch.device("cpu"))
    ahead = ShapesSource(DataConfig(kind="shapes", size=64, workers=2, prefetch=2, render_ahead=3), seed=3,
                         device=torch.device("cpu"))
    ahead.scenes = SceneStream(3, cfg.split, cfg.num_objects, workers=2, prefetch=2, shapes_world=cfg.world)
    keys = [(0, 4, 0, 2), (0, 4, 1, 2), (1, 4, 0, 2), (1, 4, 1, 2), (0, 4, 1, 2), (5, 16, 0, 1), (1, 4, 1, 2)]
    for key in keys:
        a, b = plain.get(*key), ahead.get(*key)
        assert a["captions"] == b["captions"], key
        assert torch.equal(a["images"], b["images"]), key


def test_text_only_stages_train_on_the_captions_of_the_rendered_scenes():
    """The text decoder and distillation draw captions without images: the same captions shapes_batch gives
    those samples (v2 names a white background only when the drawing has one)."""
    from flowtok.shapes import shapes_batch
    from flowtok.training.stages.shapes_world import ShapesWorld

    world = ShapesWorld(0, DataConfig(kind="shapes", size=64))
    _, captions, _ = shapes_batch(0, (3 * 2 + 1) * 32, 32, size=64)
    assert world.train_captions(3, 32, 1, 2) == captions
    _, held_out, _ = world.test_batch(8, 5, torch.device("cpu"), size=64)
    assert world.test_captions(8, 5) == held_out


def test_data_world_picks_the_shapes_world():
    """``data.world: v1`` draws the canonical world for training (in process and in loader workers) and for
    in-training evaluation; the default is v2."""
    from flowtok.shapes import shapes_batch
    from flowtok.training.data import ShapesSource
    from flowtok.training.loader import SceneStream
    from flowtok.training.stages.shapes_world import ShapesWorld

    assert DataConfig().world == "v2"
    with pytest.raises(ConfigError):
        from_dict(DataConfig, {"kind": "shapes", "world": "v3"}, "data")
    cfg = DataConfig(kind="shapes", size=64, workers=2, prefetch=2, world="v1")
    plain = ShapesSource(cfg, seed=3, device=torch.device("cpu"))
    ahead = ShapesSource(cfg, seed=3, device=torch.device("cpu"))
    ahead.scenes = SceneStream(3, cfg.split, cfg.num_objects, workers=2, prefetch=2, shapes_world="v1")
    v1_images, v1_captions, _ = shapes_batch(3, 4, 4, size=64, world="v1")
    v2_images, _, _ = shapes_batch(3, 4, 4, size=64)
    for source in (plain, ahead):
        got = source.get(1, 4, 0, 1)
        assert got["captions"] == v1_captions
        assert torch.equal(got["images"], v1_images) and not torch.equal(got["images"], v2_images)
    world = ShapesWorld(3, cfg)
    images, captions, _ = world.test_batch(4, 5, torch.device("cpu"))
    want, want_captions, _ = shapes_batch(3 + 5, 0, 4, split="test", size=64, world="v1")
    assert torch.equal(images, want) and captions == want_captions == world.test_captions(4, 5)
    assert world.train_captions(1, 4, 0, 1) == v1_captions


def test_tokenizer_step_benchmark_times_the_stream_data_path(tmp_path):
    """``benchmarks/tokenizer_step.py --stream W`` (run on a GPU for docs/benchmarks.md) times the scenes taken
    from W loader workers, a render of ``render_ahead`` steps, and ``ShapesSource.get``; here on the CPU with
    one worker, and its JSON record holds the three."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import tokenizer_step

    out = tmp_path / "tok.json"
    tokenizer_step.main(["--device", "cpu", "--batch", "4", "--iters", "1", "--threads", "1", "--stream", "1",
                         "--render-ahead", "2", "--stream-steps", "3", "--out", str(out)])
    items = {i["name"]: i for i in json.loads(out.read_text())["items"]}
    for name in ("stream_scenes", "stream_render", "stream_get"):
        assert items[name]["status"] == "ok" and items[name]["ms"] > 0 and items[name]["batch"] == 4
    assert items["stream_scenes"]["workers"] == 1 and items["stream_render"]["render_ahead"] == 2
    # the medians of the same calls, each returned before it was synchronised
    assert 0 < items["stream_render"]["host_ms"] <= items["stream_render"]["ms"] + 0.01
