"""Training checkpoints that survive a kill at any moment.

A checkpoint is a folder ``step-0000500/`` holding ``model.safetensors`` (the stage's trainable
weights), ``ema.safetensors``, ``optimizer.pt`` (tensors and plain Python only, read back with
``weights_only=True``), ``state.json`` and, written last, ``manifest.json`` with the SHA-256 of every
64 MiB chunk of every file (hashed and checked on all cores at once: one SHA-256 of a whole file runs on one
core at about 1.5 GB/s, 7 s for the 11 GB checkpoint of a FlowTok-XL run; older checkpoints hold one
SHA-256 per file, still read). The folder is first written under a hidden temporary name and renamed into place, so a reader
sees a whole checkpoint or none. On resume the newest checkpoint whose manifest verifies is used; a
truncated or corrupt one is named in one warning line and skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import atomic_write_text
from ..errors import CheckpointError, OutputError
from ..modeling import atomic_save_safetensors, load_safetensors
from ..untrusted import parse_json

log = logging.getLogger(__name__)

PREFIX = "step-"
FILES = ("model.safetensors", "ema.safetensors", "optimizer.pt", "state.json")
CHUNK = 64 << 20  # bytes a manifest checksum covers
# Test-only fault injection: "<step>:<phase>" SIGKILLs this process at that point of that checkpoint's
# write (phases: tmpdir, model, ema, optimizer, state, manifest, rename, renamed). A timer cannot hit
# these windows reliably; tests/test_reliability_resume.py and benchmarks/soak_resume.py use it.
KILL_ENV = "FLOWTOK_TEST_KILL_AT"


def _fault_point(step: int, phase: str) -> None:
    if os.environ.get(KILL_ENV) == f"{step}:{phase}":
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_range(path: Path, start: int, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        fh.seek(start)
        while length > 0:  # file reads and hashlib updates of large blocks release the GIL: threads scale
            block = fh.read(min(length, 8 << 20))
            if not block:
                break
            h.update(block)
            length -= len(block)
    return h.hexdigest()


def chunk_digests(paths: list[Path], chunk: int) -> dict[str, list[str]]:
    """SHA-256 of every ``chunk`` bytes of every file (an empty file: one digest of nothing), all in a thread
    pool, keyed by file name."""
    jobs = [(p, start) for p in paths for start in range(0, max(p.stat().st_size, 1), chunk)]
    with ThreadPoolExecutor(min(32, os.cpu_count() or 1, len(jobs))) as pool:
        digests = list(pool.map(lambda job: _sha256_range(job[0], job[1], chunk), jobs))
    out: dict[str, list[str]] = {p.name: [] for p in paths}
    for (p, _), d in zip(jobs, digests):
        out[p.name].append(d)
    return out


def write_manifest(folder: Path, step: int) -> None:
    """``manifest.json`` of the checkpoint files in ``folder`` (also what a test uses to make a damaged file
    verify, so that only the checks of its contents stand between it and a resume)."""
    digests = chunk_digests([folder / name for name in FILES], CHUNK)
    atomic_write_text(folder / "manifest.json",
                      json.dumps({"step": step, "chunk_bytes": CHUNK, "sha256_chunks": digests}, indent=2))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class Checkpoint:
    """A verified checkpoint. ``ema`` is read on first use (a resume reads it on a background thread
    while the model compiles); ``timings`` holds the seconds each part of the read took."""

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timings: dict[str, float] = field(default_factory=dict)
    _ema: dict[str, torch.Tensor] | None = None

    @property
    def ema(self) -> dict[str, torch.Tensor]:
        if self._ema is None:
            t0 = time.perf_counter()
            self._ema = load_safetensors(self.path / "ema.safetensors", self.device)
            self.timings["read_ema_s"] = time.perf_counter() - t0
        return self._ema


def save_checkpoint(ckpt_dir: Path, step: int, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor],
                    optimizer: dict[str, Any], state: dict[str, Any], keep_last: int = 3) -> Path:
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"{PREFIX}{step:07d}"
    tmp = ckpt_dir / f".tmp-{PREFIX}{step:07d}-{os.getpid()}"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write(tmp, ckpt_dir, final, step, model, ema, optimizer, state)
    except BaseException as exc:
        # A full disk or a dead NFS mount: no half-written folder per attempt; the checkpoints
        # already in place were never touched (a new one replaces them only by the final rename).
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):  # OutputError is one too
            reason = str(exc) if isinstance(exc, OutputError) else f"cannot write {tmp}: {exc.strerror or exc}"
            raise OutputError(f"{reason}; checkpoint {final.name} not written, the earlier checkpoints are "
                              "intact") from None
        raise
    prune(ckpt_dir, keep_last)
    return final


def _write(tmp: Path, ckpt_dir: Path, final: Path, step: int, model: dict[str, torch.Tensor],
           ema: dict[str, torch.Tensor], optimizer: dict[str, Any], state: dict[str, Any]) -> None:
    _fault_point(step, "tmpdir")
    atomic_save_safetensors(model, tmp / "model.safetensors")
    _fault_point(step, "model")
    atomic_save_safetensors(ema, tmp / "ema.safetensors")
    _fault_point(step, "ema")
    with open(tmp / "optimizer.pt", "wb") as fh:
        try:
            torch.save(optimizer, fh)
        except RuntimeError as exc:  # torch's zip writer reports a failed write (a full disk) this way
            raise OutputError(f"cannot write {tmp / 'optimizer.pt'}: {str(exc).splitlines()[0]}") from None
        fh.flush()
        _fault_point(step, "optimizer")
        os.fsync(fh.fileno())
    atomic_write_text(tmp / "state.json", json.dumps(state, indent=2))
    _fault_point(step, "state")
    write_manifest(tmp, step)
    _fault_point(step, "manifest")
    _fsync_dir(tmp)
    replaced = None
    if final.exists():  # a re-run of the same step after a resume: replace it whole
        # Hidden first, deleted after: a kill inside the deletion must not leave half a checkpoint in view.
        replaced = ckpt_dir / f".tmp-{final.name}-{os.getpid()}-replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    _fault_point(step, "rename")
    os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    _fault_point(step, "renamed")
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def prune(ckpt_dir: Path, keep_last: int) -> None:
    for stale in Path(ckpt_dir).glob(f".tmp-{PREFIX}*"):
        # Left behind by a run killed mid-write; never a valid checkpoint.
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    if keep_last <= 0:
        return
    steps = list_checkpoints(ckpt_dir)
    for path in steps[:-keep_last]:
        hidden = path.with_name(f".tmp-{path.name}-pruned")  # out of view before its files go
        try:
            os.replace(path, hidden)
        except OSError:
            continue
        shutil.rmtree(hidden, ignore_errors=True)


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit():
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def verify(path: Path) -> None:
    """Raise CheckpointError naming what is wrong with the checkpoint folder ``path``."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no manifest (incomplete write)")
    try:
        manifest = json.loads(manifest_path.read_text())
        chunked = "sha256_chunks" in manifest
        expected = manifest["sha256_chunks"] if chunked else manifest["sha256"]
        chunk = int(manifest["chunk_bytes"]) if chunked else 0
        if not isinstance(expected, dict) or (chunked and chunk <= 0):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"checkpoint {path}: manifest.json is corrupt") from None
    for name in FILES:
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
    paths = [path / name for name in FILES]
    if chunked:
        found: dict[str, Any] = chunk_digests(paths, chunk)
    else:  # a checkpoint written before chunked checksums: one SHA-256 per file, one file per thread
        with ThreadPoolExecutor(len(paths)) as pool:
            found = dict(zip(FILES, pool.map(_sha256, paths)))
    for name in FILES:
        if found[name] != expected.get(name):
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt or truncated (checksum mismatch)")


def load_checkpoint(path: Path, validate: Callable[[Checkpoint], None] | None = None,
                    device: str | torch.device = "cpu") -> Checkpoint:
    """Read and check a checkpoint folder, its weights placed straight on ``device``. The manifest proves the
    files are the ones written, not that what was written is sound: ``state.json``, the tensors and the
    optimizer state are checked too, and ``validate(checkpoint)`` may check more (e.g. that the optimizer
    state fits the optimizer). The optimizer state is memory-mapped: its tensors are read when used."""
    path = Path(path)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    verify(path)
    timings["verify_s"] = (t1 := time.perf_counter()) - t0
    try:
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"checkpoint {path}: optimizer.pt cannot be read ({type(exc).__name__})") from None
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) \
            or not isinstance(optimizer.get("param_groups"), list):
        raise CheckpointError(f"checkpoint {path}: optimizer.pt holds no optimizer state")
    timings["read_optimizer_s"] = (t2 := time.perf_counter()) - t1
    try:
        state = parse_json((path / "state.json").read_bytes())
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: state.json is malformed ({exc})") from None
    step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint {path}: state.json has no valid 'step'")
    model = load_safetensors(path / "model.safetensors", device)
    timings["read_model_s"] = (t3 := time.perf_counter()) - t2
    found = Checkpoint(path=path, step=step, model=model, optimizer=optimizer, state=state,
                       device=torch.device(device), timings=timings)
    if validate is not None:
        validate(found)
        timings["validate_s"] = time.perf_counter() - t3
    return found


def load_latest(ckpt_dir: Path, validate: Callable[[Checkpoint], None] | None = None,
                device: str | torch.device = "cpu") -> Checkpoint | None:
    """The newest checkpoint that verifies and is sound; bad ones are named in one warning line each and
    the one before is tried."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return load_checkpoint(path, validate, device)
        except CheckpointError as exc:
            log.warning("skipping bad checkpoint: %s", exc)
    return None


def check_optimizer_state(found: Checkpoint, optimizer: torch.optim.Optimizer) -> None:
    """CheckpointError unless ``found.optimizer`` has the groups and parameter counts of ``optimizer``
    (what ``load_state_dict`` would otherwise fail on half-way)."""
    saved = found.optimizer["param_groups"]
    own = optimizer.param_groups
    ok = len(saved) == len(own) and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                        and len(g["params"]) == len(o["params"]) for g, o in zip(saved, own))
    if not ok:
        raise CheckpointError(f"checkpoint {found.path}: optimizer.pt does not match this model's parameters")
    for key, value in found.optimizer["state"].items():
        if not isinstance(value, dict) or not all(torch.is_tensor(v) or isinstance(v, (int, float))
                                                  for v in value.values()):
            raise CheckpointError(f"checkpoint {found.path}: optimizer.pt has a malformed entry {key!r}")
