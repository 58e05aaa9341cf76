"""Many inputs from the command line: prompts from a file -> images, a folder of images -> captions.

Both stream: inputs are read ``batch_size`` at a time, each batch's results are written (images as
files, one JSON line per input) before the next batch is read, so memory does not grow with the
count. The JSONL file is written under a temporary name and renamed when the run ends, so a reader
never sees half of it. An input that cannot be used (an over-long prompt, a file that is not an
image) becomes a JSON line with an ``"error"`` field; the others go on.

``pipe`` is a :class:`~flowtok.pipelines.FlowTokPipeline` or the torch-free
:class:`~flowtok.export.runtime.OnnxFlowTokPipeline`: only ``text_to_image`` / ``image_to_text`` are called.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

from .errors import FlowTokError, InvalidInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
T = TypeVar("T")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def iter_prompts(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``(line number, prompt)`` for each non-blank line of a UTF-8 text file, read lazily."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"prompts file not found: {p}")
    try:
        with open(p, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    yield number, line.rstrip("\r\n")
    except UnicodeDecodeError:
        raise InvalidInputError(f"{p} is not a UTF-8 text file (one prompt per line)") from None


def iter_images(folder: str | os.PathLike) -> Iterator[Path]:
    """Image files under ``folder`` (recursively, by suffix), in sorted order, one folder at a time."""
    root = Path(folder)
    if not root.is_dir():
        raise InvalidInputError(f"image folder not found: {root}")
    for here, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                yield Path(here) / name


class _JsonlWriter:
    """JSON lines under a temporary name, renamed into place by :meth:`close` (kept on failure for a look)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            self.fh: IO[str] = open(self.tmp, "w", encoding="utf-8")
        except OSError as exc:
            raise InvalidInputError(f"cannot write {self.path}: {exc.strerror or type(exc).__name__}") from None

    def write(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.path)


def _one_by_one(run: Callable[[list[T]], list[Any]], batch: list[T]) -> list[Any | FlowTokError]:
    """``run(batch)``; when the batch is refused, each item alone, so that one bad input costs one result."""
    try:
        return list(run(batch))
    except FlowTokError:
        if len(batch) == 1:
            raise
    out: list[Any | FlowTokError] = []
    for item in batch:
        try:
            out.extend(run([item]))
        except FlowTokError as exc:
            out.append(exc)
    return out


def _count(items: Iterable[Any]) -> int:
    return sum(1 for _ in items)


def generate_from_file(pipe: Any, prompts_file: str | os.PathLike, out_dir: str | os.PathLike,
                       save_image: Callable[[Any, Path], None], batch_size: int = 16, seed: int = 0,
                       progress: bool = True, **sample_kwargs: Any) -> tuple[int, int]:
    """One image per prompt line, ``out_dir/NNNNNN.png`` (the line number), and ``out_dir/results.jsonl``;
    returns (done, failed). One generator seeded with ``seed`` draws every batch in turn."""
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"--batch-size must be a positive integer, got {batch_size!r}")
    out = Path(out_dir)
    total = _count(iter_prompts(prompts_file))
    if total == 0:
        raise InvalidInputError(f"{prompts_file} holds no prompt")
    generator = _generator(pipe, seed)
    writer = _JsonlWriter(out / "results.jsonl")
    done = failed = 0
    with tqdm(total=total, desc="text -> image", unit="image", disable=not progress or None) as bar:
        for batch in batched(iter_prompts(prompts_file), batch_size):
            prompts = [p for _, p in batch]
            results = _one_by_one(lambda ps: pipe.text_to_image(ps, generator=generator, **sample_kwargs), prompts)
            for (line, prompt), result in zip(batch, results):
                record: dict[str, Any] = {"line": line, "prompt": prompt}
                if isinstance(result, FlowTokError):
                    record["error"] = str(result)
                    failed += 1
                else:
                    path = out / f"{line:06d}.png"
                    save_image(result, path)
                    record["file"] = path.name
                    done += 1
                writer.write(record)
            bar.update(len(batch))
    writer.close()
    return done, failed


def caption_folder(pipe: Any, folder: str | os.PathLike, jsonl: str | os.PathLike, batch_size: int = 32,
                   progress: bool = True, **sample_kwargs: Any) -> tuple[int, int]:
    """One caption per image file under ``folder`` into ``jsonl`` (``{"file", "caption"}``); returns (done, failed)."""
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"--batch-size must be a positive integer, got {batch_size!r}")
    root = Path(folder)
    total = _count(iter_images(root))
    if total == 0:
        raise InvalidInputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    writer = _JsonlWriter(jsonl)
    done = failed = 0
    with tqdm(total=total, desc="image -> text", unit="image", disable=not progress or None) as bar:
        for batch in batched(iter_images(root), batch_size):
            results = _one_by_one(lambda paths: pipe.image_to_text([str(p) for p in paths], **sample_kwargs), batch)
            for path, result in zip(batch, results):
                record: dict[str, Any] = {"file": path.relative_to(root).as_posix()}
                if isinstance(result, FlowTokError):
                    record["error"] = str(result)
                    failed += 1
                else:
                    record["caption"] = result
                    done += 1
                writer.write(record)
            bar.update(len(batch))
    writer.close()
    return done, failed


def _generator(pipe: Any, seed: int) -> Any:
    # The PyTorch pipeline takes a torch.Generator on its device, the ONNX runtime a numpy one.
    device = getattr(pipe, "device", None)
    if device is None:
        import numpy as np

        return np.random.default_rng(seed)
    import torch

    return torch.Generator(device=device).manual_seed(seed)
