"""Reading and writing where the other side may be hostile: JSON from users' files, output files in
shared folders. One place for the rules, so every reader and writer applies the same ones.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` whose every failure is a one-line ValueError.

    Python's parser recurses once per nesting level, so ``[[[[...]]]]`` a hundred thousand deep
    raises RecursionError, which is not a ValueError and would escape a reader's error handling.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise ValueError("JSON too deeply nested") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None


def write_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], Any] | None = None,
                     write_path: Callable[[str], Any] | None = None, fsync: bool = True) -> Path:
    """Write ``path`` through a temporary file in its folder, then rename it into place.

    The temporary file gets an unpredictable name and is created with ``O_CREAT | O_EXCL`` (by
    :func:`tempfile.mkstemp`), so a symlink planted in a shared folder is never followed; the
    rename replaces a link at ``path`` itself, never its target. On any failure (a full disk, an
    encoder error, an interrupt) the temporary file is removed; ``path`` is then untouched. A failure
    to write (full disk, read-only folder, a file where the folder should be, a writer's own I/O
    error) is an :class:`~flowtok.errors.OutputError` naming ``path``; anything else is re-raised.
    Give ``write(fileobj)``, or ``write_path(name)`` for writers that want a file name.
    """
    from safetensors import SafetensorError

    from .errors import OutputError

    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {_reason(exc)}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            if write is not None:
                write(fh)
            fh.flush()
            if write_path is not None:
                write_path(tmp)
            if fsync:
                os.fsync(fh.fileno()) if write_path is None else _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, (OSError, SafetensorError)) and not isinstance(exc, OutputError):
            raise OutputError(f"cannot write {path}: {_reason(exc)}") from None
        raise
    return path


def _reason(exc: BaseException) -> str:
    strerror = getattr(exc, "strerror", None)
    if strerror:
        return strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _fsync_path(name: str) -> None:
    with open(name, "rb") as fh:
        os.fsync(fh.fileno())
