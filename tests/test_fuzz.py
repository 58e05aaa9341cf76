"""Bad input, tried systematically: prompts, images, data, configs and checkpoints, through the public API
and through the CLI. Each bad input must give one clear line (a FlowTokError; exit code 2 and one stderr
line from the CLI) or a counted skip; each valid-but-odd input (non-Latin text, emoji, grey / RGBA /
16-bit / CMYK / GIF images) must work. Hypothesis adds random cases to the hand-picked ones."""

import ast
import io
import json
import math
import resource
import struct
import tarfile
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from flowtok.cli import main
from flowtok.config import preset
from flowtok.data import ImageCaptionFolder, WebDatasetReader, load_image
from flowtok.errors import CheckpointError, ConfigError, DataError, FlowTokError, InvalidInputError
from flowtok.flow import FLOW_PRESETS, FlowTransformer
from flowtok.pipelines import FlowTokPipeline
from flowtok.text import DECODER_PRESETS, PROJECTOR_PRESETS, TextDecoder, TextProjector, load_text_encoder
from flowtok.tokenizer import TOKENIZER_PRESETS, ImageTokenizer
from flowtok.training.run import build_run

ROOT = Path(__file__).resolve().parents[1]
K, C = 4, 4
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory) -> Path:
    """An untrained tiny pipeline: robustness does not need good weights, and building it takes a second."""
    torch.manual_seed(0)
    tok = ImageTokenizer(replace(TOKENIZER_PRESETS["tiny"], text_dim=0))
    pipe = FlowTokPipeline(
        tok, load_text_encoder("minilm", max_length=K),
        TextProjector(replace(PROJECTOR_PRESETS["tiny"], latent_channels=C)),
        FlowTransformer(preset(FLOW_PRESETS, "tiny", num_tokens=K, in_channels=C)),
        FlowTransformer(preset(FLOW_PRESETS, "tiny", num_tokens=K, in_channels=C)),
        TextDecoder(replace(DECODER_PRESETS["tiny"], num_tokens=K, latent_channels=C)),
        defaults={"num_inference_steps": 2})
    return pipe.save_pretrained(tmp_path_factory.mktemp("fuzz") / "pipe")


@pytest.fixture(scope="module")
def pipe(pipe_dir) -> FlowTokPipeline:
    return FlowTokPipeline.from_pretrained(pipe_dir, device="cpu")


def _cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr. Returns that line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flowtok: error: "), err
    return err[0]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A 200-byte PNG whose header promises width x height RGB pixels (1.2 GB decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (3 * width + 1) * 8)  # a few rows; a decoder would ask for all
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------- prompts
ODD_PROMPTS = [
    "一个红色的圆形在左上角",            # Chinese
    "دائرة حمراء كبيرة",                 # Arabic, right to left
    "बड़ा लाल वृत्त",                      # Devanagari
    "большой красный круг",               # Cyrillic
    "🔴 a red circle 🟦🐱🚀",              # emoji
    "a red\x00circle\x07 with\tcontrol\x1bchars",
    "\u200fa\u0301 e\u0301 combining marks",
    "x" * 4000,                            # long but within the limit: truncated by the encoder
]
BAD_PROMPTS = ["", "   ", "\n\t\r", "\x00\x01\x7f", "\u200b\u200e", "x" * 100_000]


@pytest.mark.parametrize("prompt", ODD_PROMPTS)
def test_odd_prompts_make_finite_images(pipe, prompt):
    out = pipe.text_to_image(prompt, num_inference_steps=1, output_type="np",
                             generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


@pytest.mark.parametrize("prompt", BAD_PROMPTS + [None, 3, b"bytes", ["ok", ""], []])
def test_bad_prompts_are_one_line_errors(pipe, prompt):
    with pytest.raises(InvalidInputError) as exc:
        pipe.text_to_image(prompt, num_inference_steps=1)
    _one_line(exc)


@FUZZ
@given(st.text(max_size=300))
def test_any_unicode_prompt_is_an_image_or_one_line_error(pipe, prompt):
    try:
        out = pipe.text_to_image(prompt, num_inference_steps=1, output_type="pt")
    except InvalidInputError as exc:
        assert "\n" not in str(exc)
        return
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("kwargs", [
    {"num_inference_steps": 0}, {"num_inference_steps": -3}, {"num_inference_steps": 10**9},
    {"num_inference_steps": 2.5}, {"guidance_scale": math.nan}, {"guidance_scale": math.inf},
    {"guidance_scale": "2"}, {"batch_size": 0}, {"output_type": "gif"}, {"sampler": "rk45"},
])
def test_bad_sampling_arguments_are_one_line_errors(pipe, kwargs):
    with pytest.raises(InvalidInputError) as exc:
        pipe.text_to_image("a red circle", **{"num_inference_steps": 1, **kwargs})
    _one_line(exc)


def test_prompts_through_the_cli(pipe_dir, tmp_path, capsys):
    for i, prompt in enumerate(["一个红色的圆形", "🔴🟦 emoji only"]):
        out = tmp_path / f"odd-{i}.png"
        assert main(["generate", prompt, "-o", str(out), "--steps", "1", "--model", str(pipe_dir)]) == 0
        assert Image.open(out).size == (32, 32)
    for prompt in ["", " \t ", "\x00", "y" * 100_000]:
        line = _cli_error(capsys, ["generate", prompt, "--steps", "1", "--model", str(pipe_dir),
                                   "-o", str(tmp_path / "x.png")])
        assert "prompt 0" in line
    assert "--steps" in _cli_error(capsys, ["generate", "a", "--steps", "0", "--model", str(pipe_dir)])
    assert "num_inference_steps" in _cli_error(capsys, ["generate", "a", "--steps", "99999999",
                                                        "--model", str(pipe_dir), "-o", str(tmp_path / "y.png")])
    (tmp_path / "file").write_text("not a folder")
    assert "cannot write" in _cli_error(capsys, ["generate", "a", "--steps", "1", "--model", str(pipe_dir),
                                                 "-o", str(tmp_path / "file" / "x.png")])


# -------------------------------------------------------------------------------------------- images
def _odd_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    frames = [Image.new("P", (24, 24), i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    return {
        "1x1.png": _encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"),
        "grey.png": _encode(rgb.convert("L"), "PNG"),
        "bilevel.png": _encode(rgb.convert("1"), "PNG"),
        "rgba.png": _encode(rgb.convert("RGBA"), "PNG"),
        "grey-alpha.png": _encode(rgb.convert("LA"), "PNG"),
        "16bit.png": _encode(Image.fromarray((rng.random((30, 30)) * 65535).astype(np.uint16)), "PNG"),
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "exif-rotated.jpg": _encode(rgb, "JPEG", exif=exif),
        "animated.gif": gif.getvalue(),
        "palette.png": _encode(rgb.convert("P"), "PNG"),
        "wide.png": _encode(Image.new("RGB", (1000, 3), (0, 0, 255)), "PNG"),
        "float.tif": _encode(Image.fromarray(rng.random((16, 16)).astype(np.float32)), "TIFF"),
        "image.bmp": _encode(rgb, "BMP"),
        "image.webp": _encode(rgb, "WEBP"),
        "thin.png": _encode(Image.new("L", (1, 60_000), 90), "PNG"),  # an aspect-ratio bomb, harmless now
    }


def _bad_images() -> dict[str, bytes]:
    png = _encode(Image.new("RGB", (64, 64), (0, 128, 0)), "PNG")
    jpg = _encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    return {
        "random.png": np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "empty.png": b"",
        "text.jpg": b"just some text, not a picture\n",
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpg[: len(jpg) // 3],
        "bomb.png": _png_bomb(),
        "photo.png": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"  # EPS: never Ghostscript
                      b"newpath 0 0 moveto 16 16 lineto stroke showpage\n%%EOF\n"),
        "bomb.gif": (b"GIF89a" + struct.pack("<HHBBB", 20000, 20000, 0x80, 0, 0) + b"\x00" * 6
                     + b"," + struct.pack("<HHHHB", 0, 0, 20000, 20000, 0) + b"\x02\x02\x44\x01\x00;"),
    }


def test_odd_images_are_captioned(pipe, tmp_path):
    paths = []
    for name, data in _odd_images().items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    caps = pipe.image_to_text(paths, num_inference_steps=1)
    assert len(caps) == len(paths) and all(isinstance(c, str) for c in caps)
    # The same images handed over as PIL images (lazily opened) and as bytes.
    assert len(pipe.image_to_text([Image.open(p) for p in paths[:4]], num_inference_steps=1)) == 4
    assert len(pipe.image_to_text([p.read_bytes() for p in paths[4:8]], num_inference_steps=1)) == 4


def test_odd_arrays_and_tensors_work(pipe):
    ok = [np.zeros((5, 7), np.uint8), np.zeros((9, 9, 1), np.uint8), np.full((9, 9, 4), 200, np.uint8),
          np.zeros((3, 300, 3), np.uint8)]
    assert len(pipe.image_to_text(ok, num_inference_steps=1)) == 4
    assert len(pipe.image_to_text(torch.rand(2, 3, 17, 23), num_inference_steps=1)) == 2


@pytest.mark.parametrize("bad", [
    np.zeros((8, 8), np.float64), np.zeros((8, 8, 5), np.uint8), np.zeros((0, 0), np.uint8),
    np.zeros((8, 8), np.uint16), torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.full((1, 3, 8, 8), 255.0),
    torch.full((1, 3, 8, 8), -1.0), torch.full((1, 3, 8, 8), math.nan), torch.zeros(1, 1, 8, 8),
    torch.zeros(0, 3, 8, 8), [], 42, None,
], ids=lambda b: type(b).__name__)
def test_bad_arrays_and_tensors_are_one_line_errors(pipe, bad):
    with pytest.raises(InvalidInputError) as exc:
        pipe.image_to_text(bad, num_inference_steps=1)
    _one_line(exc)


@pytest.mark.parametrize("name", list(_bad_images()))
def test_bad_image_files_are_one_line_errors(pipe, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(_bad_images()[name])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError) as exc:
        pipe.image_to_text(path, num_inference_steps=1)
    msg = _one_line(exc)
    assert name in msg
    if "bomb" in name:  # refused from the header, never decoded: no memory (ru_maxrss is in KiB)
        assert "decompression bomb" in msg
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100 * 1024


def test_images_through_the_cli(pipe_dir, tmp_path, capsys):
    paths = []
    for name, data in _odd_images().items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    capsys.readouterr()
    assert main(["caption", *paths, "--steps", "1", "--with-names", "--model", str(pipe_dir)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(paths)
    for name, data in _bad_images().items():
        (tmp_path / name).write_bytes(data)
        assert name in _cli_error(capsys, ["caption", paths[0], str(tmp_path / name), "--model", str(pipe_dir)])
    assert "not found" in _cli_error(capsys, ["caption", str(tmp_path / "missing.png"), "--model", str(pipe_dir)])
    # A folder is captioned file by file into a JSONL; its unreadable files make one line and exit 2.
    line = _cli_error(capsys, ["caption", str(tmp_path), "--jsonl", str(tmp_path / "out.jsonl"), "--model", str(pipe_dir)])
    assert "could not be read" in line and str(tmp_path / "out.jsonl") in line


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_are_an_image_or_one_line_error(data):
    try:
        image = load_image(data, name="fuzz")
    except DataError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("fuzz:")
        return
    assert image.mode == "RGB" and image.width >= 1


@FUZZ
@given(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]), st.data())
def test_damaged_image_files_are_an_image_or_one_line_error(fmt, data):
    rng = np.random.default_rng(3)
    good = bytearray(_encode(Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)), fmt))
    cut = data.draw(st.integers(0, len(good)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(1, 255)), max_size=4))
    for pos, x in flips:
        good[pos] ^= x
    try:
        image = load_image(bytes(good[:cut] if data.draw(st.booleans()) else good), name="damaged")
    except DataError as exc:
        assert "\n" not in str(exc)
        return
    assert image.mode == "RGB"


# ---------------------------------------------------------------------------------------------- data
def _folder(root: Path, lines: list[str], files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@FUZZ
@given(st.lists(st.one_of(
    st.builds(lambda f, c: json.dumps({"file": f, "caption": c}),
              st.sampled_from(["a.png", "missing.png", "", "../a.png", "bad.png"]),
              st.one_of(st.text(max_size=20), st.none(), st.integers(), st.lists(st.text(max_size=3), max_size=2))),
    st.builds(json.dumps, st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=10),
                                    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))),
    st.text(max_size=30).filter(lambda t: "\n" not in t and "\r" not in t),
), min_size=1, max_size=12))
def test_mixed_up_jsonl_index_is_counted_or_one_line(tmp_path_factory, lines):
    root = _folder(tmp_path_factory.mktemp("jsonl"), lines,
                   {"a.png": _encode(Image.new("RGB", (9, 9)), "PNG"), "bad.png": b"not a png"})
    try:
        ds = ImageCaptionFolder(root, resolution=8, on_error="skip")
    except DataError as exc:  # nothing usable at all
        assert "no usable samples" in str(exc) and "\n" not in str(exc)
        return
    usable = sum(1 for line in lines if line.strip())
    index_skips = sum(ds.skipped.values())
    assert len(ds) + index_skips == usable  # every non-blank line is a sample or a counted skip
    if index_skips:
        with pytest.raises(DataError) as exc:
            ImageCaptionFolder(root, resolution=8, on_error="raise")
        _one_line(exc)
    try:
        image, caption = ds[0]
    except DataError as exc:  # every indexed image is broken
        assert "every image failed" in str(exc)
        return
    assert image.shape == (3, 8, 8) and caption.strip()


def test_bad_shards_raise_or_are_counted(tmp_path):
    (tmp_path / "random.tar").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    good = io.BytesIO()
    with tarfile.open(fileobj=good, mode="w") as tar:
        for key, members in {"s0": {"png": _encode(Image.new("RGB", (9, 9)), "PNG"), "txt": b"a caption"},
                             "s1": {"png": _encode(Image.new("RGB", (9, 9)), "PNG")},
                             "s2": {"png": b"broken", "txt": b"x"}, "s3": {"txt": b"   "}}.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (tmp_path / "mixed.tar").write_bytes(good.getvalue())
    (tmp_path / "cut.tar").write_bytes(good.getvalue()[:700])
    with pytest.raises(DataError) as exc:
        list(WebDatasetReader(tmp_path, resolution=8))
    _one_line(exc)
    reader = WebDatasetReader(tmp_path, resolution=8, on_error="skip")
    items = list(reader)
    assert [c for _, c in items] == ["a caption"]  # s0 of mixed.tar; cut.tar gives s0 only if intact
    assert reader.skipped["bad_shard"] >= 1 and reader.skipped["missing_caption"] == 1
    assert reader.skipped["bad_image"] == 1 and reader.skipped["missing_image"] >= 1


# --------------------------------------------------------------------------------------------- configs
def _tok_config(tmp: Path) -> dict:
    return {"stage": "tokenizer", "run_dir": str(tmp / "run"), "seed": 0,
            "data": {"kind": "shapes", "size": 64},
            "model": {"preset": "tiny", "overrides": {"text_dim": 0, "image_size": 64, "patch_size": 16},
                      "eval_images": 2},
            "train": {"steps": 1, "batch_size": 2, "tensorboard": False, "progress": False}}


@pytest.mark.parametrize("override,needle", [
    ("train.stepz=3", "unknown config key 'train.stepz'"),
    ("colour=red", "unknown config key 'colour'"),
    ("train.steps=abc", "expected an integer"),
    ("train.lr=[1, 2]", "expected a number"),
    ("seed=1.5", "expected an integer"),
    ("train.steps=0", "must be positive"),
    ("train.ckpt_every=0", "ckpt_every"),
    ("train.log_every=-1", "log_every"),
    ("train.betas=[1.5, 0.9]", "betas"),
    ("train.ema_decay=1.0", "ema_decay"),
    ("train.lr=.nan", "lr"),
    ("train.nan_policy=ignore", "expected one of"),
    ("model.overrides.patch_size=10", "not divisible by patch_size"),
    ("data.size=48", "differs from the tokenizer image_size"),
    ("stage=painter", "unknown stage"),
    ("data.kind=folder", "data.path is required"),
    ("train", "not of the form key=value"),
    ("seed=-1", "seed must be"),
    ("model.overrides.num_latent_tokens=99999999999999999999", "cannot be built with these sizes"),
    ("model.overrides.encoder_width=400000", "cannot be built with these sizes"),
])
def test_bad_configs_are_one_line_cli_errors(tmp_path, capsys, override, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_tok_config(tmp_path)))
    assert needle in _cli_error(capsys, ["train", str(cfg), override, "--device", "cpu"])


def test_bad_config_files_and_data_paths(tmp_path, capsys):
    assert "not found" in _cli_error(capsys, ["train", str(tmp_path / "none.yaml")])
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert "mapping" in _cli_error(capsys, ["train", str(tmp_path / "list.yaml")])
    (tmp_path / "broken.yaml").write_text("stage: [tokenizer\n")
    assert "not valid YAML" in _cli_error(capsys, ["train", str(tmp_path / "broken.yaml")])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_tok_config(tmp_path)))
    assert "not a directory" in _cli_error(capsys, ["train", str(cfg), "data.kind=folder",
                                                    f"data.path={tmp_path / 'nope'}", "--device", "cpu"])
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.tar").write_bytes(b"not a tar at all" * 10)
    assert "not a tar file" in _cli_error(capsys, ["train", str(cfg), "data.kind=webdataset",
                                                   f"data.path={tmp_path / 'shards'}", "--device", "cpu"])


def test_text_latent_shape_differing_from_image_latent_is_a_config_error(pipe_dir, tmp_path, capsys):
    cfg = {"stage": "t2i", "run_dir": str(tmp_path / "t2i"), "data": {"kind": "shapes", "size": 32},
           "model": {"tokenizer_path": str(pipe_dir / "tokenizer"), "projector_preset": "tiny",
                     "projector": {"latent_channels": C + 4}, "flow_preset": "tiny",
                     "flow": {"num_tokens": K, "in_channels": C}},
           "train": {"steps": 1, "batch_size": 2, "tensorboard": False, "progress": False}}
    with pytest.raises(ConfigError, match="text latent has 8 channels, image latent has 4"):
        build_run(cfg, device="cpu")
    (tmp_path / "t2i.yaml").write_text(yaml.safe_dump(cfg))
    assert "channels" in _cli_error(capsys, ["train", str(tmp_path / "t2i.yaml"), "--device", "cpu"])
    assert "flow model expects" in _cli_error(capsys, ["train", str(tmp_path / "t2i.yaml"), f"model.projector.latent_channels={C}",
                                                       "model.flow.num_tokens=6", "--device", "cpu"])


_KEYS = ["train.steps", "train.batch_size", "train.lr", "train.betas", "train.weight_decay", "train.warmup_steps",
         "train.schedule", "train.min_lr_ratio", "train.grad_clip", "train.ema_decay", "train.precision",
         "train.ckpt_every", "train.keep_last", "train.log_every", "train.eval_every", "train.nan_policy",
         "train.max_consecutive_nan", "train.max_minutes", "train.compile", "seed", "data.size", "data.kind",
         "data.split", "data.num_objects", "data.crop", "data.on_error", "model.preset", "model.kl_weight",
         "model.overrides.patch_size", "model.overrides.encoder_heads", "model.overrides.token_channels",
         "model.overrides.num_latent_tokens", "model.overrides.scale_factor", "model.unknown", "train.nope"]
_VALUES = st.one_of(st.sampled_from(["0", "-1", "1", "2", "64", "1e-3", "3e-4", ".nan", ".inf", "-.inf", "true", "null",
                                     "[]", "[0.9, 0.99]", "[2, 0.5]", "{a: 1}", "cosine", "bf16", "skip", "x", "''",
                                     "1.5", "99999999999999999999"]),
                    st.text(max_size=12).filter(lambda s: "\n" not in s))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_KEYS), _VALUES), min_size=1, max_size=3))
def test_random_overrides_build_or_raise_config_error(overrides):
    base = _tok_config(Path("/nonexistent-run-dir"))
    try:
        trainer = build_run(base, [f"{k}={v}" for k, v in overrides], device="cpu")
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    cfg = trainer.cfg
    assert cfg.ckpt_every >= 1 and cfg.log_every >= 1 and 0 <= cfg.ema_decay < 1 and math.isfinite(cfg.lr)


# ----------------------------------------------------------------------------------------- checkpoints
class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def _copy_pipe(pipe_dir: Path, tmp: Path) -> Path:
    import shutil

    return Path(shutil.copytree(pipe_dir, tmp / "pipe"))


@pytest.mark.parametrize("damage", ["wrong_kind", "wrong_shape", "pickle", "truncated", "nan", "no_config",
                                    "bad_json", "bad_pipeline_json", "missing_folder"])
def test_bad_pipeline_checkpoints_are_one_line_errors(pipe_dir, tmp_path, capsys, damage):
    root = _copy_pipe(pipe_dir, tmp_path)
    marker = tmp_path / "pwned.txt"
    flow = root / "t2i_flow"
    if damage == "wrong_kind":  # a tokenizer where the flow model should be
        import shutil

        shutil.rmtree(flow)
        shutil.copytree(root / "tokenizer", flow)
    elif damage == "wrong_shape":
        torch.manual_seed(0)
        FlowTransformer(preset(FLOW_PRESETS, "tiny", num_tokens=K, in_channels=C, width=64)).save_pretrained(tmp_path / "w")
        (flow / "model.safetensors").write_bytes((tmp_path / "w" / "model.safetensors").read_bytes())
    elif damage == "pickle":  # a .pth-style pickle that would run code when unpickled
        torch.save({"weight": _Evil(str(marker))}, flow / "model.safetensors")
    elif damage == "truncated":
        data = (flow / "model.safetensors").read_bytes()
        (flow / "model.safetensors").write_bytes(data[: len(data) - 100])
    elif damage == "nan":
        from safetensors.torch import load_file, save_file

        state = load_file(flow / "model.safetensors")
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key][..., 0] = math.nan
        save_file(state, flow / "model.safetensors")
    elif damage == "no_config":
        (flow / "config.json").unlink()
    elif damage == "bad_json":
        (flow / "config.json").write_text('{"model_type": "flowtok_flow", "width": "wide"')
    elif damage == "bad_pipeline_json":
        (root / "pipeline.json").write_text("[1, 2")
    elif damage == "missing_folder":
        import shutil

        shutil.rmtree(flow)
    with pytest.raises(CheckpointError) as exc:
        FlowTokPipeline.from_pretrained(root, device="cpu")
    _one_line(exc)
    _cli_error(capsys, ["generate", "a red circle", "--steps", "1", "--model", str(root), "-o", str(tmp_path / "o.png")])
    assert not marker.exists()  # no pickled code ever ran


def test_evil_pickle_in_a_training_checkpoint_is_refused(tmp_path, capsys):
    from flowtok.training import checkpoint as ckpt

    cfg = _tok_config(tmp_path)
    cfg["train"].update(steps=2, ckpt_every=2)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--device", "cpu"]) == 0
    folder = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    marker = tmp_path / "pwned.txt"
    torch.save({"state": {}, "param_groups": [], "x": _Evil(str(marker))}, folder / "optimizer.pt")
    ckpt.write_manifest(folder, 2)  # checksums agree: only pickle guards
    line = _cli_error(capsys, ["train", str(tmp_path / "c.yaml"), "--device", "cpu", "--resume", str(folder)])
    assert "optimizer.pt cannot be read" in line and not marker.exists()


def test_no_torch_load_without_weights_only_in_the_source_tree():
    """Every torch.load in the repository passes weights_only=True: a pickle must never run code."""
    offenders, calls = [], 0
    files = [p for top in ("src", "tests", "benchmarks", "scripts") for p in sorted((ROOT / top).glob("**/*.py"))]
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
                offenders.append(f"{path}:{node.lineno} imports torch.load by name")
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                continue
            calls += 1
            ok = any(kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
                     for kw in node.keywords)
            if not ok:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert calls >= 2  # the checkpoint reader and the converter, at least: the scan does see them
    assert offenders == []


def test_flowtok_errors_are_the_only_escape(pipe):
    """A sweep of wrong argument types into the public API: FlowTokError, never TypeError or AttributeError."""
    for call in (lambda: pipe.text_to_image({"a": 1}), lambda: pipe.image_to_text(b"\x00" * 10),
                 lambda: pipe.interpolate("a", "b", num_frames=1), lambda: pipe.interpolate("a", "b", num_frames=2.5),
                 lambda: pipe.image_to_text(["a.png", 3]), lambda: pipe.encode_prompt(""),
                 lambda: FlowTokPipeline.from_pretrained(Path("/definitely/not/here"))):
        with pytest.raises(FlowTokError) as exc:
            call()
        _one_line(exc)


def test_fuzz_benchmark_at_a_fixed_small_budget(tmp_path):
    """benchmarks/fuzz.py (100,000 images and 10,000 model folders by hand) at a CI budget: 400 mutated
    image files and 80 mutated model folders, a few of each through the CLI; no escape."""
    import importlib.util
    import sys
    import warnings

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("fuzz_bench", ROOT / "benchmarks" / "fuzz.py")
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    from demo_load import build_untrained_pipeline

    pipe_dir = build_untrained_pipeline(tmp_path / "base", "tiny")
    tally = fuzz.Tally()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fuzz.fuzz_images(400, tmp_path, tally, seed=1, cli_every=100, pipe_dir=pipe_dir)
        fuzz.fuzz_models(80, tmp_path, tally, seed=1, cli_every=40, pipe_dir=pipe_dir)
    counts = tally.counts
    assert sum(v for k, v in counts.items() if k.endswith("/escape")) == 0, tally.escapes
    assert counts["image/api/ok"] > 0 and counts["image/api/refused"] > 0 and counts["model/api/refused"] > 0
    assert sum(v for k, v in counts.items() if k.startswith("image/")) == 404
    assert sum(v for k, v in counts.items() if k.startswith("model/")) == 80
