"""Readers for users' image-caption data, on real files written to tmp_path, broken ones included."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowtok.data import ImageCaptionFolder, WebDatasetReader, load_image
from flowtok.data.readers import resize_and_crop
from flowtok.errors import DataError, InvalidInputError
from flowtok.shapes import export_shapes, shapes_batch


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _write_folder(root: Path, rows: list[dict], index: str = "jsonl") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if index == "jsonl":
        (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        lines = ["file,caption"] + [f'{r["file"]},"{r["caption"]}"' for r in rows]
        (root / "captions.csv").write_text("\n".join(lines) + "\n")
    return root


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------------------- load_image


def test_load_image_converts_every_mode_to_rgb(tmp_path) -> None:
    grey16 = Image.fromarray(np.full((8, 8), 32896, np.uint16))  # 0x8080: mid-grey in 16 bits
    assert grey16.mode.startswith("I;16")
    grey16.save(tmp_path / "g16.png")
    out = np.asarray(load_image(tmp_path / "g16.png"))
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3) and np.all(out == 128)

    Image.new("L", (8, 8), 200).save(tmp_path / "l.png")
    assert np.all(np.asarray(load_image(tmp_path / "l.png")) == 200)

    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red: shows as white
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgb = np.asarray(load_image(_png(rgba)))
    assert tuple(rgb[1, 1]) == (255, 255, 255) and tuple(rgb[0, 0]) == (0, 0, 255)

    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.info["transparency"] = 0
    assert tuple(np.asarray(load_image(_png(palette)))[0, 0]) == (0, 200, 0)

    buf = io.BytesIO()
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(buf, format="JPEG", quality=95)
    red = np.asarray(load_image(buf.getvalue())).astype(int)[8, 8]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60

    floats = Image.fromarray(np.full((4, 4), 0.5, np.float32))  # mode F, values in [0, 1]
    assert np.all(np.asarray(load_image(_tiff(floats))) == 128)


def _tiff(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="TIFF")
    return buf.getvalue()


def test_load_image_errors_are_one_line_data_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="image file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(DataError, match="not a readable image"):
        load_image(b"this is not an image", name="x.png")
    good = _png(Image.new("RGB", (64, 64), (10, 20, 30)))
    with pytest.raises(DataError, match="truncated or corrupt") as info:
        load_image(good[: len(good) // 2])
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="exceeds the limit of 1000 pixels"):
        load_image(good, max_pixels=1000)
    assert load_image(good, max_pixels=None).size == (64, 64)


def test_resize_and_crop() -> None:
    image = Image.new("RGB", (300, 100))
    assert resize_and_crop(image, 64).size == (64, 64)
    a = resize_and_crop(image, 64, "random", np.random.default_rng(1))
    b = resize_and_crop(image, 64, "random", np.random.default_rng(1))
    assert a.tobytes() == b.tobytes()
    assert resize_and_crop(Image.new("RGB", (5, 7)), 32).size == (32, 32)  # small images upscale


# ---------------------------------------------------------------------------- image folder


def test_folder_reads_jsonl_and_csv(tmp_path) -> None:
    exported = export_shapes(tmp_path / "shapes", 4, seed=2, size=64)
    ds = ImageCaptionFolder(exported, resolution=32)
    _, texts, _ = shapes_batch(2, 0, 4, size=64)
    assert len(ds) == 4
    image, text = ds[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert 0 <= float(image.min()) and float(image.max()) <= 1
    assert text == texts[1]

    root = tmp_path / "csv"
    root.mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(root / "a.png")
    Image.new("LA", (20, 40), (100, 255)).save(root / "b.png")
    _write_folder(root, [{"file": "a.png", "caption": "a red thing, wide"},
                         {"file": "b.png", "caption": "grey"}], index="csv")
    ds = ImageCaptionFolder(root, resolution=16, crop="random", seed=3)
    image, text = ds[0]
    assert text == "a red thing, wide" and image.shape == (3, 16, 16)
    assert torch.allclose(image[0], torch.ones(16, 16)) and float(image[1].max()) == 0
    assert torch.allclose(ds[1][0], torch.full((3, 16, 16), 100 / 255))
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    images, captions = next(iter(loader))
    assert images.shape == (2, 3, 16, 16) and list(captions) == ["a red thing, wide", "grey"]


def test_folder_random_crops_follow_seed_and_epoch(tmp_path) -> None:
    ramp = np.tile(np.arange(0, 256, 2, dtype=np.uint8), (32, 1))  # 128 x 32, brighter to the right
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    _write_folder(tmp_path, [{"file": "ramp.png", "caption": "a ramp"}])
    ds = ImageCaptionFolder(tmp_path, resolution=32, crop="random", seed=0)
    crops = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        first, again = ds[0][0], ds[0][0]
        assert torch.equal(first, again)
        crops.append(float(first.mean()))
    assert len(set(crops)) > 1
    centre = ImageCaptionFolder(tmp_path, resolution=32)[0][0]
    assert abs(float(centre.mean()) - 127 / 255) < 0.02


def _broken_folder(tmp_path: Path) -> Path:
    root = tmp_path / "broken"
    root.mkdir()
    good = _png(Image.new("RGB", (32, 32), (0, 0, 255)))
    (root / "good.png").write_bytes(good)
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "text.png").write_bytes(b"hello")
    (root / "empty.png").write_bytes(good)
    rows = [{"file": "truncated.png", "caption": "cut"},
            {"file": "good.png", "caption": "a blue square"},
            {"file": "missing.png", "caption": "gone"},
            {"file": "empty.png", "caption": "   "},
            {"file": "text.png", "caption": "not an image"}]
    _write_folder(root, rows)
    with open(root / "captions.jsonl", "a") as f:
        f.write("{not json\n")
    return root


def test_folder_raises_one_line_errors(tmp_path) -> None:
    root = _broken_folder(tmp_path)
    with pytest.raises(DataError, match="image file not found"):
        ImageCaptionFolder(root)
    # Index problems fixed, image problems remain: they surface on access.
    lines = (root / "captions.jsonl").read_text().splitlines()
    (root / "captions.jsonl").write_text("\n".join(lines[:2] + [lines[4]]) + "\n")
    ds = ImageCaptionFolder(root)
    with pytest.raises(DataError, match="truncated.png: truncated or corrupt"):
        ds[0]
    assert ds[1][1] == "a blue square"
    with pytest.raises(DataError, match="text.png: not a readable image"):
        ds[2]
    with pytest.raises(DataError, match="no captions.jsonl or captions.csv"):
        ImageCaptionFolder(tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        ImageCaptionFolder(tmp_path / "nowhere")
    with pytest.raises(InvalidInputError):
        ImageCaptionFolder(root, on_error="ignore")


def test_folder_skips_and_counts(tmp_path, caplog) -> None:
    root = _broken_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="flowtok.data.readers"):
        ds = ImageCaptionFolder(root, resolution=16, on_error="skip")
        assert len(ds) == 3  # truncated, good, text
        assert dict(ds.skipped) == {"missing_file": 1, "empty_caption": 1, "bad_record": 1}
        samples = [ds[i] for i in range(len(ds))]
    # Every unreadable image is replaced by the next good sample, never by garbage.
    assert [text for _, text in samples] == ["a blue square"] * 3
    assert all(torch.allclose(img[2], torch.ones(16, 16)) for img, _ in samples)
    assert ds.skipped["bad_image"] == 3  # truncated at 0, text at 2 (tried twice: from 2 and from 0)
    assert "skipping (missing_file)" in caplog.text

    (root / "good.png").write_bytes(b"")
    ds = ImageCaptionFolder(root, on_error="skip")
    with pytest.raises(DataError, match="every image failed"):
        ds[0]


def test_folder_bad_csv_header(tmp_path) -> None:
    (tmp_path / "captions.csv").write_text("path,text\na.png,x\n")
    with pytest.raises(DataError, match="'file' and 'caption'"):
        ImageCaptionFolder(tmp_path)


# ---------------------------------------------------------------------------- webdataset shards


def test_webdataset_reads_exported_shards(tmp_path) -> None:
    out = export_shapes(tmp_path / "shards", 5, seed=4, size=64, shards=True, shard_size=2)
    _, texts, _ = shapes_batch(4, 0, 5, size=64)
    for spec in (out, str(out / "shapes-{000000..000002}.tar"), sorted(out.glob("*.tar"))):
        samples = list(WebDatasetReader(spec, resolution=32))
        assert [t for _, t in samples] == texts
        assert all(img.shape == (3, 32, 32) for img, _ in samples)
    loader = torch.utils.data.DataLoader(WebDatasetReader(out, resolution=32), batch_size=None, num_workers=2)
    assert sorted(t for _, t in loader) == sorted(texts)


def _broken_shard(path: Path) -> Path:
    good = _png(Image.new("RGB", (20, 20), (0, 255, 0)))
    with tarfile.open(path, "w") as tar:
        _add(tar, "s0.png", good)
        _add(tar, "s0.json", json.dumps({"caption": "green from json"}).encode())
        _add(tar, "s1.png", good)                       # no caption
        _add(tar, "s2.txt", b"no image here")           # no image
        _add(tar, "s3.jpg", good[:40])                  # truncated image
        _add(tar, "s3.txt", b"cut")
        _add(tar, "s4.png", good)
        _add(tar, "s4.txt", b"  ")                      # empty caption
        _add(tar, "s5.png", good)
        _add(tar, "s5.json", b"{broken")                # unreadable caption
        _add(tar, "sub/s6.PNG", good)
        _add(tar, "sub/s6.txt", "grün".encode())
    return path


def test_webdataset_raises_on_the_first_bad_sample(tmp_path) -> None:
    shard = _broken_shard(tmp_path / "bad.tar")
    reader = WebDatasetReader(shard, resolution=8)
    it = iter(reader)
    assert next(it)[1] == "green from json"
    with pytest.raises(DataError, match="s1: no .txt or .json caption"):
        next(it)
    (tmp_path / "junk.tar").write_bytes(b"definitely not a tar archive" * 40)
    with pytest.raises(DataError, match="junk.tar: not a tar file"):
        list(WebDatasetReader(tmp_path / "junk.tar"))
    with pytest.raises(DataError, match="shard not found"):
        WebDatasetReader(tmp_path / "absent.tar")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no .tar shards"):
        WebDatasetReader(tmp_path / "empty_dir")


def test_webdataset_skips_and_counts(tmp_path) -> None:
    shard = _broken_shard(tmp_path / "bad.tar")
    whole = shard.read_bytes()
    (tmp_path / "junk.tar").write_bytes(b"\x00garbage" * 200)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: 512 * 5])  # first sample complete, then cut inside a member
    reader = WebDatasetReader([shard, tmp_path / "junk.tar", cut], resolution=8, on_error="skip")
    samples = list(reader)
    assert [t for _, t in samples] == ["green from json", "grün", "green from json"]
    assert all(torch.allclose(img[1], torch.ones(8, 8)) for img, _ in samples)
    assert dict(reader.skipped) == {"missing_caption": 1, "missing_image": 1, "bad_image": 1,
                                    "empty_caption": 1, "bad_caption": 1, "bad_shard": 2}
