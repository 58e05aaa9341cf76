"""The run folder: one training at a time, and a resume that continues the same run.

:func:`claim_run_dir` creates the folder and takes an exclusive ``flock`` on ``run_dir/.lock`` for
the life of the training process (the kernel drops it when the process ends, even on SIGKILL, so a
killed run never leaves a stale lock). A second training in the same folder would delete the first
one's temporary checkpoints and overwrite its files; it is refused with one line instead.

:func:`check_resume_config` compares a resumed run's config with the ``config.yaml`` the folder
already holds: a changed seed, global batch size or data source would continue the run on other
data or other random draws while claiming to be the same run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import IO, Any

from ..errors import ConfigError
from ..untrusted import write_atomically

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# What must not change when a run is resumed: the run's identity, not its length or its learning rate.
RESUME_KEYS = (("seed",), ("train", "batch_size"), ("data",), ("stage",))


def claim_run_dir(run_dir: Path) -> IO[str]:
    """Create ``run_dir`` and lock it; returns the open lock file (keep it open for the run)."""
    import fcntl

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} is a file, not a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / LOCK_NAME, "a+")  # noqa: SIM115 - held open until the run ends
    except OSError as exc:
        raise ConfigError(f"run_dir {run_dir} cannot be written: {exc.strerror or type(exc).__name__}") from None
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise ConfigError(f"run_dir {run_dir} is in use by another training (pid {holder}); wait for it to end "
                          "or choose another run_dir") from None
    if not os.access(run_dir, os.W_OK):
        lock.close()
        raise ConfigError(f"run_dir {run_dir} is not writable")
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def _get(config: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(config, dict):
            return None
        config = config.get(key)  # type: ignore[assignment]
    return config


def check_resume_config(run_dir: Path, config: dict[str, Any], allow_change: bool = False) -> None:
    """ConfigError if resuming ``run_dir`` with ``config`` changes what :data:`RESUME_KEYS` name."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return
    try:
        old = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        old = None
    if not isinstance(old, dict):
        log.warning("%s is unreadable; the resumed run's config replaces it", path)
        return
    changed = [".".join(key) for key in RESUME_KEYS if _get(old, key) != _get(config, key)]
    if not changed:
        return
    detail = ", ".join(f"{k}: {_get(old, tuple(k.split('.')))!r} -> {_get(config, tuple(k.split('.')))!r}"
                       for k in changed)
    if not allow_change:
        raise ConfigError(f"resuming {run_dir} with a changed {', '.join(changed)} ({detail}) would not continue the "
                          "same run; pass --allow-config-change to resume anyway, or choose a new run_dir")
    kept = path.with_name("config.before-resume.yaml")
    write_atomically(kept, lambda fh: fh.write(path.read_bytes()))
    log.warning("resuming with a changed %s (%s); the previous config is kept in %s", ", ".join(changed), detail, kept)
