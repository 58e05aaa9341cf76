"""Untrusted images and data (issue 19, first group): files that are not what they claim, bombs,
crafted metadata, hostile indexes and shards. Each must give one DataError line, or with
``on_error="skip"`` a counted skip; never a traceback, never Ghostscript, never gigabytes."""

import io
import json
import resource
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image

from flowtok.data import ImageCaptionFolder, WebDatasetReader, load_image
from flowtok.data.readers import resize_and_crop
from flowtok.errors import DataError
from flowtok.training.pretokenize import LatentShards

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 16 lineto stroke showpage\n%%EOF\n")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG of width x height grey pixels, compressed to a few hundred bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = (b"\x00" + b"\x00" * width) * height
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _exif_jpeg_ascii_under_short() -> bytes:
    """A JPEG whose EXIF says Orientation 6 and stores an ASCII value under ResolutionUnit (a SHORT tag)."""
    entries = [(0x0112, 3, 1, struct.pack("<HH", 6, 0)), (0x0128, 2, 4, b"abc\x00")]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", t, k, n) + v for t, k, n, v in entries)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)
    buf = io.BytesIO()
    Image.new("RGB", (8, 4), (10, 200, 30)).save(buf, format="JPEG", exif=b"Exif\x00\x00" + tiff)
    return buf.getvalue()


def _other_formats() -> dict[str, bytes]:
    out = {"photo.png": EPS}
    image = Image.new("RGB", (8, 8), (1, 2, 3))
    for fmt, name in (("IM", "im.png"), ("DDS", "dds.jpg"), ("QOI", "qoi.webp"), ("PCX", "pcx.png")):
        buf = io.BytesIO()
        try:
            image.save(buf, format=fmt)
        except (KeyError, OSError):  # this Pillow cannot write the format
            continue
        out[name] = buf.getvalue()
    return out


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------------ images
def test_only_supported_formats_are_opened_and_ghostscript_never_runs(monkeypatch, tmp_path):
    called = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: called.append(a))
    monkeypatch.setattr(EpsImagePlugin, "gs_windows_binary", None, raising=False)
    for name, data in _other_formats().items():
        (tmp_path / name).write_bytes(data)
        for source in (tmp_path / name, data):
            with pytest.raises(DataError) as exc:
                load_image(source, name=name)
            msg = _one_line(exc)
            assert name in msg and "not a readable image file (flowtok reads PNG, JPEG" in msg
    assert called == []
    # An EPS the caller opened lazily is refused too, before anything decodes it.
    with pytest.raises(DataError, match="EPS"):
        load_image(Image.open(io.BytesIO(EPS)))
    assert called == []



@pytest.mark.parametrize("width,height", [(1, 60_000), (60_000, 1), (1, 8_000_000)])
def test_aspect_ratio_bombs_cost_no_memory(width, height):
    data = _png_header_only(width, height)
    assert len(data) < 20_000
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        image = load_image(data, name="thin.png")
    except DataError as exc:
        assert "thin.png" in str(exc) and "\n" not in str(exc)
    else:
        out = resize_and_crop(image, 128)
        assert out.size == (128, 128)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200 * 1024  # KiB: under 200 MB


def test_crop_then_resize_matches_resize_then_crop_on_ordinary_images():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
    out = np.asarray(resize_and_crop(image, 32), dtype=np.int16)
    full = image.resize((48, 32), Image.BICUBIC)
    ref = np.asarray(full.crop((8, 0, 40, 32)), dtype=np.int16)
    assert np.abs(out - ref).mean() < 2.0  # the same picture; only the filter's border samples differ


def test_crafted_exif_is_a_one_line_error_or_ignored():
    data = _exif_jpeg_ascii_under_short()
    try:
        image = load_image(data, name="exif.jpg")
    except DataError as exc:
        assert _one_line(pytest.ExceptionInfo.from_exc_info((DataError, exc, None))).startswith("exif.jpg")
    else:
        assert image.mode == "RGB"


# ---------------------------------------------------------------------------------------- folder index
def _folder(root: Path, index: str, name: str = "captions.jsonl") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.png").write_bytes(_png(Image.new("RGB", (9, 9), (255, 0, 0))))
    (root / name).write_text(index, encoding="utf-8")
    return root


def test_deeply_nested_json_lines_are_bad_records(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    root = _folder(tmp_path / "d", json.dumps({"file": "a.png", "caption": "red"}) + "\n" + deep + "\n"
                   + '{"file": "a.png", "caption": ' + "[" * 50_000 + "]" * 50_000 + "}\n")
    with pytest.raises(DataError) as exc:
        ImageCaptionFolder(root, resolution=8)
    assert "too deeply nested" in _one_line(exc)
    ds = ImageCaptionFolder(root, resolution=8, on_error="skip")
    assert len(ds) == 1 and ds.skipped["bad_record"] == 2


def test_over_long_csv_field_is_a_bad_record(tmp_path):
    index = "file,caption\na.png,red\n" + "a.png," + "x" * 200_000 + "\na.png,also red\n"
    root = _folder(tmp_path / "c", index, "captions.csv")
    with pytest.raises(DataError) as exc:
        ImageCaptionFolder(root, resolution=8)
    assert "captions.csv" in _one_line(exc)
    ds = ImageCaptionFolder(root, resolution=8, on_error="skip")
    assert [c for _, c in ds.records] == ["red", "also red"] and ds.skipped["bad_record"] == 1


def test_index_may_not_name_files_outside_the_data_folder(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png(Image.new("RGB", (9, 9))))
    lines = [{"file": "a.png", "caption": "inside"}, {"file": "../secret.png", "caption": "outside"},
             {"file": str(secret), "caption": "absolute"}, {"file": "sub/../../secret.png", "caption": "sneaky"}]
    root = _folder(tmp_path / "data", "".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(DataError) as exc:
        ImageCaptionFolder(root, resolution=8)
    assert "outside the data folder" in _one_line(exc)
    ds = ImageCaptionFolder(root, resolution=8, on_error="skip")
    assert [c for _, c in ds.records] == ["inside"] and ds.skipped["outside_root"] == 3


# ---------------------------------------------------------------------------------------------- shards
def _tar(path: Path, members: dict[str, bytes], mode: str = "w", huge: dict[str, int] | None = None) -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, size in (huge or {}).items():
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, _Zeros(size))
    return path


class _Zeros(io.RawIOBase):
    """A stream of ``size`` zero bytes, never held in memory at once."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = min(len(buf), self.left)
        buf[:n] = b"\x00" * n
        self.left -= n
        return n


def test_oversized_shard_member_is_refused_without_reading_it(tmp_path):
    png = _png(Image.new("RGB", (9, 9), (0, 0, 255)))
    shard = _tar(tmp_path / "s.tar.gz", {"a.png": png, "a.txt": b"blue", "b.txt": b"huge"}, "w:gz",
                 huge={"b.png": 120 * 2**20})
    assert shard.stat().st_size < 2 * 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError) as exc:
        list(WebDatasetReader(shard, resolution=8, max_member_bytes=16 * 2**20))
    assert "b.png" in _one_line(exc) and "exceeds" in str(exc.value)
    reader = WebDatasetReader(shard, resolution=8, on_error="skip", max_member_bytes=16 * 2**20)
    assert [c for _, c in reader] == ["blue"] and reader.skipped["too_large"] == 1
    # Reading the 120 MiB member would raise the peak by at least that much.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 40 * 1024  # KiB


def test_nested_json_caption_in_a_shard_is_a_bad_caption(tmp_path):
    png = _png(Image.new("RGB", (9, 9)))
    shard = _tar(tmp_path / "n.tar", {"a.png": png, "a.json": b"[" * 100_000 + b"]" * 100_000,
                                      "b.png": png, "b.txt": b"fine"})
    reader = WebDatasetReader(shard, resolution=8, on_error="skip")
    assert [c for _, c in reader] == ["fine"] and reader.skipped["bad_caption"] == 1


def test_brace_range_typo_is_refused_before_expanding(tmp_path):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError) as exc:
        WebDatasetReader(str(tmp_path / "shard-{000000..999999999}.tar"), resolution=8)
    assert "shards" in _one_line(exc)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 50 * 1024


# -------------------------------------------------------------------------------------- latent shards
def _latents(root: Path, n: int = 3) -> Path:
    from flowtok.modeling import atomic_save_safetensors

    root.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors({"image_latents": torch.zeros(n, 4, 4), "text_states": torch.zeros(n, 4, 8),
                             "text_mask": torch.ones(n, 4, dtype=torch.uint8),
                             "input_ids": torch.zeros(n, 4, dtype=torch.int32)}, root / "shard-00000.safetensors")
    (root / "shard-00000.jsonl").write_text("".join(json.dumps({"caption": f"c{i}", "scene": None}) + "\n"
                                                    for i in range(n)))
    (root / "meta.json").write_text(json.dumps({"format": "flowtok-latents-v1", "n": n,
                                                "shards": [{"name": "shard-00000", "n": n}]}))
    return root


@pytest.mark.parametrize("damage", ["no_safetensors", "no_jsonl", "meta_not_json", "meta_list", "meta_no_shards",
                                    "shard_not_dict", "shard_bad_n", "shard_escapes", "jsonl_bad_line",
                                    "missing_tensor", "meta_nested"])
def test_damaged_latent_shards_are_one_line_errors(tmp_path, damage):
    root = _latents(tmp_path / "lat")
    meta = json.loads((root / "meta.json").read_text())
    if damage == "no_safetensors":
        (root / "shard-00000.safetensors").unlink()
    elif damage == "no_jsonl":
        (root / "shard-00000.jsonl").unlink()
    elif damage == "meta_not_json":
        (root / "meta.json").write_text("{broken")
    elif damage == "meta_list":
        (root / "meta.json").write_text("[1, 2]")
    elif damage == "meta_no_shards":
        (root / "meta.json").write_text(json.dumps({"n": 3}))
    elif damage == "shard_not_dict":
        (root / "meta.json").write_text(json.dumps({**meta, "shards": ["shard-00000"]}))
    elif damage == "shard_bad_n":
        (root / "meta.json").write_text(json.dumps({**meta, "shards": [{"name": "shard-00000", "n": "3"}]}))
    elif damage == "shard_escapes":
        (root / "meta.json").write_text(json.dumps({**meta, "shards": [{"name": "../../etc/x", "n": 3}]}))
    elif damage == "jsonl_bad_line":
        (root / "shard-00000.jsonl").write_text('{"caption": "a"}\n{oops\n{"caption": "c"}\n')
    elif damage == "missing_tensor":
        from flowtok.modeling import atomic_save_safetensors

        atomic_save_safetensors({"image_latents": torch.zeros(3, 4, 4)}, root / "shard-00000.safetensors")
    elif damage == "meta_nested":
        (root / "meta.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError) as exc:
        LatentShards(root)
    _one_line(exc)
