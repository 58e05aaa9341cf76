"""Readers for users' own image-caption data: an image folder with an index, and webdataset shards.

Both yield ``(image, caption)`` with ``image`` a float tensor ``[3, resolution, resolution]`` in
[0, 1] (shorter side resized to ``resolution``, then a centre or random crop). Every problem with
the data is either a one-line :class:`~flowtok.errors.DataError` (``on_error="raise"``, the
default) or, with ``on_error="skip"``, a logged skip counted by reason in ``reader.skipped``;
never a traceback from deep inside PIL or tarfile and never a silently wrong sample.

With a ``DataLoader`` and ``num_workers > 0`` each worker keeps its own ``skipped`` counter.
"""

from __future__ import annotations

import collections
import csv
import logging
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image

from ..errors import DataError, InvalidInputError
from ..imageio import (  # noqa: F401 - re-exported: the readers' image loading lives in flowtok.imageio
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    SUPPORTED_FORMATS,
    _to_rgb,
    load_image,
    resize_and_crop,
)
from ..untrusted import parse_json

logger = logging.getLogger(__name__)

# A webdataset member larger than this is refused from its tar header, never read: a small
# compressed shard can hold gigabytes of zeros.
MAX_MEMBER_BYTES = 64 * 2**20
# A brace pattern expanding to more shards than this is a typo, not a dataset.
MAX_SHARDS = 100_000
_LOGGED_PER_REASON = 10  # skips logged at WARNING per reason; the rest at DEBUG


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float tensor ``[3, H, W]`` in [0, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class _ReaderBase:
    """Shared argument checks, per-reason skip accounting and image preparation."""

    def __init__(self, resolution: int, crop: str, on_error: str, seed: int, max_pixels: int | None) -> None:
        if not isinstance(resolution, int) or resolution < 8:
            raise InvalidInputError(f"resolution must be an integer >= 8, got {resolution!r}")
        if crop not in ("center", "random"):
            raise InvalidInputError(f"crop must be 'center' or 'random', got {crop!r}")
        if on_error not in ("raise", "skip"):
            raise InvalidInputError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.resolution, self.crop, self.on_error, self.seed = resolution, crop, on_error, seed
        self.max_pixels = max_pixels
        self.epoch = 0
        self.skipped: collections.Counter[str] = collections.Counter()

    def set_epoch(self, epoch: int) -> None:
        """Random crops depend on (seed, epoch, sample); call this each epoch for fresh crops."""
        self.epoch = epoch

    def _problem(self, reason: str, message: str) -> None:
        """Raise, or count and log a skip, as ``on_error`` says."""
        if self.on_error == "raise":
            raise DataError(message)
        self.skipped[reason] += 1
        level = logging.WARNING if self.skipped[reason] <= _LOGGED_PER_REASON else logging.DEBUG
        logger.log(level, "skipping (%s): %s", reason, message)
        if self.skipped[reason] == _LOGGED_PER_REASON:
            logger.warning("further '%s' skips are logged at debug level", reason)

    def _prepare(self, source: str | Path | bytes, name: str, rng_key: Sequence[int]) -> torch.Tensor:
        image = load_image(source, self.max_pixels, name=name)
        rng = np.random.default_rng([self.seed, self.epoch, *rng_key]) if self.crop == "random" else None
        return pil_to_tensor(resize_and_crop(image, self.resolution, self.crop, rng))


def _reason_of(exc: DataError) -> str:
    text = str(exc)
    if "not found" in text:
        return "missing_file"
    if "exceeds the limit" in text or "decompression bomb" in text:
        return "too_large"
    return "bad_image"


class ImageCaptionFolder(_ReaderBase, torch.utils.data.Dataset):
    """An image folder indexed by ``captions.jsonl`` (``{"file": ..., "caption": ...}`` per line)
    or ``captions.csv`` (header ``file,caption``); ``file`` is relative to ``root``.

    The index is checked when the dataset is built (bad lines, empty captions and missing files
    raise or are dropped and counted). Images are decoded on access; with ``on_error="skip"`` an
    unreadable one is counted and the next sample in order is returned in its place, so an epoch
    never stops part way.
    """

    def __init__(self, root: str | Path, resolution: int = 128, crop: str = "center", on_error: str = "raise",
                 seed: int = 0, max_pixels: int | None = MAX_IMAGE_PIXELS) -> None:
        super().__init__(resolution, crop, on_error, seed, max_pixels)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a directory")
        self.records: list[tuple[Path, str]] = []
        jsonl, csv_path = self.root / "captions.jsonl", self.root / "captions.csv"
        if jsonl.is_file():
            self.index_path = jsonl
            rows = self._read_jsonl(jsonl)
        elif csv_path.is_file():
            self.index_path = csv_path
            rows = self._read_csv(csv_path)
        else:
            raise DataError(f"{self.root}: no captions.jsonl or captions.csv index found")
        for where, file, text in rows:
            self._add_record(where, file, text)
        if not self.records:
            raise DataError(f"{self.index_path}: no usable samples")

    def _read_jsonl(self, path: Path) -> Iterator[tuple[str, object, object]]:
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = parse_json(line)
                except ValueError as exc:
                    self._problem("bad_record", f"{where}: {exc}")
                    continue
                if not isinstance(row, dict) or "file" not in row or "caption" not in row:
                    self._problem("bad_record", f"{where}: expected an object with 'file' and 'caption'")
                    continue
                yield where, row["file"], row["caption"]

    def _read_csv(self, path: Path) -> Iterator[tuple[str, object, object]]:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"file", "caption"} <= set(reader.fieldnames):
                raise DataError(f"{path}: the header must name the columns 'file' and 'caption'")
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:  # a field over csv's limit, a NUL byte, ...: that line only
                    self._problem("bad_record", f"{path}:{reader.line_num}: unreadable CSV line ({exc})")
                    continue
                yield f"{path}:{reader.line_num}", row["file"], row["caption"]

    def _add_record(self, where: str, file: object, text: object) -> None:
        if not isinstance(file, str) or not file.strip():
            self._problem("bad_record", f"{where}: 'file' must be a non-empty string")
            return
        if not isinstance(text, str) or not text.strip():
            self._problem("empty_caption", f"{where}: empty caption for {file}")
            return
        relative = os.path.normpath(file)
        if os.path.isabs(relative) or relative == ".." or relative.startswith(".." + os.sep):
            # The index is data too: it may not make the reader open files elsewhere on the machine.
            self._problem("outside_root", f"{where}: {file!r} lies outside the data folder {self.root}")
            return
        path = self.root / relative
        if not path.is_file():
            self._problem("missing_file", f"{where}: image file not found: {path}")
            return
        self.records.append((path, text.strip()))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        n = len(self.records)
        if not -n <= index < n:
            raise IndexError(index)
        index %= n
        for attempt in range(n):
            i = (index + attempt) % n
            path, text = self.records[i]
            try:
                return self._prepare(path, str(path), (i,)), text
            except DataError as exc:
                self._problem(_reason_of(exc), str(exc))
        raise DataError(f"{self.root}: every image failed to load")


def _brace_options(body: str) -> tuple[int, list[str] | range, int]:
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") else 0
        values = range(int(lo), int(hi) + 1)
        return len(values), values, width
    options = body.split(",")
    return len(options), options, 0


def _expand_braces(pattern: str, limit: int = MAX_SHARDS) -> list[str]:
    """``shard-{000..009}.tar`` / ``{a,b}`` expansion, the webdataset URL convention.

    The number of names is counted before any is made: ``{000000..999999999}`` (a typo) is a
    DataError, not gigabytes of strings.
    """
    total = 1
    for body in re.findall(r"\{([^{}]*)\}", pattern):
        total *= _brace_options(body)[0]
        if total > limit:
            raise DataError(f"{pattern}: the brace pattern names more than {limit} shards; is a range mistyped?")
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail = pattern[:m.start()], pattern[m.end():]
    _, options, width = _brace_options(m.group(1))
    return [out for opt in options for out in _expand_braces(head + str(opt).zfill(width) + tail, limit)]


class WebDatasetReader(_ReaderBase, torch.utils.data.IterableDataset):
    """Webdataset tar shards: each sample is ``<key>.<image ext>`` plus ``<key>.txt`` (the caption)
    or ``<key>.json`` (with a ``caption`` or ``text`` field).

    ``urls_or_dir`` is a folder of ``*.tar``, one shard path, a brace pattern such as
    ``data/shard-{000000..000009}.tar``, or a list of paths. Shards are split between DataLoader
    workers. Skip reasons: ``bad_shard`` (not a tar, or cut short: the rest of that shard is
    lost), ``missing_image``, ``missing_caption``, ``empty_caption``, ``bad_caption``,
    ``bad_image``, ``too_large`` (an image of too many pixels, or a member of more than
    ``max_member_bytes``, refused from its tar header without being read).
    """

    def __init__(self, urls_or_dir: str | Path | Sequence[str | Path], resolution: int = 128,
                 crop: str = "center", on_error: str = "raise", seed: int = 0,
                 max_pixels: int | None = MAX_IMAGE_PIXELS, max_member_bytes: int = MAX_MEMBER_BYTES) -> None:
        super().__init__(resolution, crop, on_error, seed, max_pixels)
        self.max_member_bytes = max_member_bytes
        self.shards = self._resolve(urls_or_dir)
        if not self.shards:
            raise DataError(f"{urls_or_dir}: no .tar shards found")

    @staticmethod
    def _resolve(spec: str | Path | Sequence[str | Path]) -> list[Path]:
        if isinstance(spec, (str, Path)):
            path = Path(spec)
            if path.is_dir():
                return sorted(path.glob("*.tar"))
            items: list[str | Path] = list(_expand_braces(str(spec)))
        else:
            items = list(spec)
        shards = [Path(s) for s in items]
        for shard in shards:
            if not shard.is_file():
                raise DataError(f"{shard}: shard not found")
        return shards

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        info = torch.utils.data.get_worker_info()
        shard_ids = range(len(self.shards))
        if info is not None:
            shard_ids = shard_ids[info.id::info.num_workers]
        for shard_id in shard_ids:
            yield from self._iter_shard(shard_id)

    def _iter_shard(self, shard_id: int) -> Iterator[tuple[torch.Tensor, str]]:
        for count, (key, files) in enumerate(self.samples_of(shard_id)):
            sample = self._decode(self.shards[shard_id], shard_id, count, key, files)
            if sample is not None:
                yield sample

    @property
    def spec(self) -> str:
        return str(self.shards[0].parent) if self.shards else "?"

    def samples_of(self, shard_id: int) -> Iterator[tuple[str, dict[str, bytes | int]]]:
        """The undecoded samples of one shard; a bad or cut-short shard is a ``bad_shard`` problem."""
        shard = self.shards[shard_id]
        count = 0
        try:
            for key, files in self._samples(shard, self.max_member_bytes):
                count += 1
                yield key, files
        except (tarfile.TarError, EOFError, OSError) as exc:
            what = "not a tar file" if count == 0 and isinstance(exc, tarfile.ReadError) else "cut short or corrupt"
            self._problem("bad_shard", f"{shard}: {what} ({exc})")

    def decode(self, shard_id: int, index: int, key: str, files: dict[str, bytes | int],
               prepare=None) -> tuple[torch.Tensor, str] | None:
        """``(image, caption)`` of one undecoded sample, or None when it is skipped; ``prepare(reader,
        bytes, name, rng_key)`` replaces the float-tensor decoding (the loader's workers ship uint8)."""
        return self._decode(self.shards[shard_id], shard_id, index, key, files, prepare)

    @staticmethod
    def _samples(shard: Path, max_bytes: int) -> Iterator[tuple[str, dict[str, bytes | int]]]:
        """Consecutive tar members sharing a key (path up to the basename's first dot) form a sample.

        A member over ``max_bytes`` is given as its size (an int) instead of its bytes; the stream
        skips over it without keeping it."""
        with tarfile.open(shard, "r|*") as tar:
            key: str | None = None
            files: dict[str, bytes | int] = {}
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                this_key = f"{directory}/{stem}" if directory else stem
                if this_key != key and files:
                    yield key, files  # type: ignore[misc]
                    files = {}
                key = this_key
                if member.size > max_bytes:
                    files[ext.lower()] = member.size
                    continue
                data = tar.extractfile(member)
                files[ext.lower()] = data.read() if data is not None else b""
            if files:
                yield key, files  # type: ignore[misc]

    def _decode(self, shard: Path, shard_id: int, index: int, key: str, files: dict[str, bytes | int],
                prepare=None) -> tuple[torch.Tensor, str] | None:
        where = f"{shard}:{key}"
        oversized = next(((ext, size) for ext, size in files.items() if isinstance(size, int)), None)
        if oversized is not None:
            self._problem("too_large", f"{where}.{oversized[0]}: member of {oversized[1]} bytes exceeds the "
                                       f"limit of {self.max_member_bytes} bytes")
            return None
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
        if image_ext is None:
            self._problem("missing_image", f"{where}: no image ({'/'.join(IMAGE_EXTENSIONS)}) in sample")
            return None
        text = self._caption(where, cast(dict[str, bytes], files))  # no int (oversized) member left
        if text is None:
            return None
        try:
            name = f"{where}.{image_ext}"
            image = (self._prepare(files[image_ext], name, (shard_id, index)) if prepare is None  # type: ignore[arg-type]
                     else prepare(self, files[image_ext], name, (shard_id, index)))
        except DataError as exc:
            self._problem(_reason_of(exc), str(exc))
            return None
        return image, text

    def _caption(self, where: str, files: dict[str, bytes]) -> str | None:
        try:
            if "txt" in files:
                text: object = files["txt"].decode("utf-8")
            elif "json" in files:
                meta = parse_json(files["json"].decode("utf-8"))
                text = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else meta
            else:
                self._problem("missing_caption", f"{where}: no .txt or .json caption in sample")
                return None
        except ValueError as exc:  # UnicodeDecodeError is one too
            reason = str(exc) if not isinstance(exc, UnicodeDecodeError) else "not UTF-8"
            self._problem("bad_caption", f"{where}: unreadable caption ({reason})")
            return None
        if not isinstance(text, str) or not text.strip():
            self._problem("empty_caption", f"{where}: empty caption")
            return None
        return text.strip()
