"""The compact pre-tokenised format: what a flow stage reads at scale, about 5 KB a sample.

A folder written by ``flowtok pretokenize``::

    meta.json                   format, latent and text shapes, tokenizer and text-encoder specs, shards
    shard-00000.safetensors     moments [n, K, 2C] f16   the tokenizer's posterior: mean | logvar
                                input_ids [n, L] i32     the caption's token ids (the text encoder's own)
                                text_offsets [n + 1] i64 and text [T] u8: the captions, UTF-8, concatenated

Only the posterior (not a sample of it) and the token ids (not the text encoder's states) are stored:
the posterior is sampled at train time, as the authors do, and the frozen text encoder runs inside the
training step, batched in bf16. For the paper's shapes (77 x 16 latents, 77 CLIP tokens) a sample costs
77 * 32 * 2 + 77 * 4 + its caption = about 5.3 KB, against 121 KB with stored 768-wide text states.

:class:`TokenShards` reads rows by position with ``os.pread`` at offsets taken from each file's
safetensors header, so any sample is one small read, the set never has to fit in memory (resident
memory does not grow with it: read pages stay in the kernel's page cache), and a resumed run starts at
once. Small sets can be held in memory instead (``in_memory``), chosen by :func:`plan_memory`.
:func:`epoch_permutation` shuffles a set of any size per epoch in O(1) memory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import atomic_write_text
from ..errors import DataError

log = logging.getLogger(__name__)

FORMAT = "flowtok-tokens-v1"
_DTYPES = {"F16": np.float16, "I32": np.int32, "I64": np.int64, "U8": np.uint8}
_FIELDS = ("moments", "input_ids", "text_offsets", "text")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def write_shard(path: Path, moments: np.ndarray, input_ids: np.ndarray, texts: list[str],
                metadata: dict[str, str] | None = None) -> None:
    """Write one shard atomically (a temporary name renamed into place: a shard file that exists is whole)."""
    from safetensors.numpy import save_file

    encoded = [t.encode("utf-8") for t in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded])
    tensors: dict[str, np.ndarray] = {"moments": np.ascontiguousarray(moments, dtype=np.float16),
               "input_ids": np.ascontiguousarray(input_ids, dtype=np.int32),
               "text_offsets": offsets,
               "text": np.frombuffer(b"".join(encoded) or b"\0", dtype=np.uint8).copy()}
    if not len(moments) == len(input_ids) == len(texts):
        raise ValueError("moments, input_ids and texts must have one row per sample")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class _Field:
    offset: int  # absolute byte offset of row 0 in the file
    row_bytes: int
    dtype: Any
    row_shape: tuple[int, ...]


def read_header(path: Path) -> tuple[int, dict[str, _Field]]:
    """``(number of samples, field -> where its rows are)`` of a shard, from its safetensors header alone."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise DataError(f"{path} is not a token shard (too short)")
            size = int.from_bytes(head, "little")
            if not 0 < size < 1 << 24:
                raise DataError(f"{path} is not a token shard (bad header size)")
            header = json.loads(fh.read(size))
        file_size = path.stat().st_size
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable token shard ({type(exc).__name__})") from None
    fields: dict[str, _Field] = {}
    for name in _FIELDS:
        info = header.get(name)
        if not isinstance(info, dict) or info.get("dtype") not in _DTYPES:
            raise DataError(f"{path} is not a token shard (no valid '{name}')")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        shape = tuple(int(s) for s in info["shape"])
        start, end = (8 + size + int(o) for o in info["data_offsets"])
        if end > file_size or end - start != int(np.prod(shape)) * dtype.itemsize:
            raise DataError(f"{path} is truncated or corrupt ('{name}' runs past the end of the file)")
        row_shape = shape[1:]
        fields[name] = _Field(start, int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize, dtype, row_shape)
    n = int(header["moments"]["shape"][0])
    if int(header["input_ids"]["shape"][0]) != n or int(header["text_offsets"]["shape"][0]) != n + 1:
        raise DataError(f"{path} is corrupt: its fields hold different numbers of samples")
    return n, fields


def epoch_permutation(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample index at each of ``positions`` (in [0, n)) of epoch ``epoch``: a pseudo-random
    permutation of [0, n) keyed by (seed, epoch), computed without materialising it.

    A 4-round Feistel network over the smallest even-bit domain holding ``n``, with cycle-walking back
    into [0, n): a bijection, so every sample comes exactly once per epoch, and memory is O(batch)
    whatever the size of the set (a materialised permutation of 220M samples is 1.7 GB per process).
    """
    x = np.asarray(positions, dtype=np.uint64)
    if n <= 1:
        return np.zeros_like(x)
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = np.random.default_rng([seed, epoch, 0xF10]).integers(0, 1 << 62, size=4, dtype=np.uint64)
    out = x.copy()
    todo = np.ones(len(x), dtype=bool)
    with np.errstate(over="ignore"):
        while todo.any():
            v = out[todo]
            left, right = v >> np.uint64(half), v & mask
            for k in keys:
                h = (right ^ k) * np.uint64(0x9E3779B97F4A7C15)
                h ^= h >> np.uint64(29)
                h *= np.uint64(0xBF58476D1CE4E5B9)
                h ^= h >> np.uint64(32)
                left, right = right, left ^ (h & mask)
            out[todo] = (left << np.uint64(half)) | right
            todo = out >= np.uint64(n)
    return out.astype(np.int64)


def plan_memory(n: int, bytes_per_sample: int, choice: str, available: int | None = None,
                fraction: float = 0.25) -> tuple[bool, str]:
    """Whether to hold ``n`` samples in host memory, and the arithmetic that decided it (one line).

    ``choice``: ``auto`` (in memory when the set takes at most ``fraction`` of the available host memory),
    ``memory`` (refused with the arithmetic when it cannot fit) or ``stream``.
    """
    need = n * bytes_per_sample
    if available is None:
        available = available_host_memory()
    line = (f"{n:,} samples x {bytes_per_sample:,} B = {need / 2**30:.2f} GiB per process; "
            f"{available / 2**30:.1f} GiB host memory available")
    if choice == "stream":
        return False, line + "; streaming from disk (data.in_memory: stream)"
    if choice == "memory":
        if need > 0.9 * available:
            raise DataError(f"data.in_memory is 'memory' but the set does not fit: {line}; "
                            "use data.in_memory: stream")
        return True, line + "; held in memory (data.in_memory: memory)"
    fits = need <= fraction * available
    how = "held in memory" if fits else "streamed from disk"
    return fits, line + f"; {how} (auto: in memory up to {fraction:.0%} of it)"


def available_host_memory() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


class TokenShards:
    """A pre-tokenised folder, read by sample index (``read``) from disk or, with ``in_memory``, from RAM.

    File handles are opened lazily, per process, so an instance can be handed to DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike, in_memory: bool = False) -> None:
        self.root = Path(path)
        meta_path = self.root / "meta.json"
        if not self.root.is_dir():
            raise DataError(f"data.path {self.root} does not exist or is not a folder")
        if not meta_path.is_file():
            raise DataError(f"{self.root} is not a pre-tokenised folder (no meta.json); run 'flowtok pretokenize'")
        try:
            self.meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{meta_path} is corrupt: {exc}") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            got = self.meta.get("format") if isinstance(self.meta, dict) else None
            raise DataError(f"{self.root} holds format {got!r}, not {FORMAT!r} "
                            "(older latents folders are read with data.kind: latents)")
        self.paths: list[Path] = []
        self.fields: list[dict[str, _Field]] = []
        counts = []
        shards = self.meta.get("shards") if isinstance(self.meta, dict) else None
        if not isinstance(shards, list) or not shards:
            raise DataError(f"{meta_path} is corrupt: expected an object with a list of 'shards'")
        for i, shard in enumerate(shards):
            name = shard.get("name") if isinstance(shard, dict) else None
            # Shard names are file names in this folder, never paths elsewhere.
            if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name) or name.startswith("."):
                raise DataError(f"{meta_path}: shards[{i}] needs a plain file 'name', got {name!r}")
            if isinstance(shard.get("n"), bool) or not isinstance(shard.get("n"), int):
                raise DataError(f"{meta_path}: shards[{i}] needs a sample count 'n', got {shard.get('n')!r}")
        for shard in shards:
            p = self.root / shard["name"]
            if not p.is_file():
                raise DataError(f"{self.root}: shard {shard['name']} listed in meta.json is missing")
            n, fields = read_header(p)
            if n != shard["n"]:
                raise DataError(f"{p} holds {n} samples, meta.json says {shard['n']}")
            if n:
                self.paths.append(p)
                self.fields.append(fields)
                counts.append(n)
        if not counts:
            raise DataError(f"{self.root} holds no samples")
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n = int(self.starts[-1])
        f0 = self.fields[0]
        self.moments_shape = f0["moments"].row_shape
        self.ids_len = f0["input_ids"].row_shape[0]
        self.bytes_per_sample = (f0["moments"].row_bytes + f0["input_ids"].row_bytes + 8
                                 + int(self.meta.get("mean_text_bytes", 64)))
        self._fds: dict[int, int] = {}
        self._pid = -1
        self._ram: list[dict[str, np.ndarray]] | None = None
        if in_memory:
            self._ram = [self._load_shard(i) for i in range(len(self.paths))]

    def __len__(self) -> int:
        return self.n

    def _load_shard(self, i: int) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        return load_file(str(self.paths[i]))

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker must not share the parent's file offsets
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return fd

    def _pread(self, shard: int, f: _Field, row: int, count: int = 1) -> np.ndarray:
        want = f.row_bytes * count
        buf = os.pread(self._fd(shard), want, f.offset + row * f.row_bytes)
        if len(buf) != want:
            raise DataError(f"{self.paths[shard]} is truncated (short read at row {row})")
        return np.frombuffer(buf, dtype=f.dtype).reshape(count, *f.row_shape) if f.row_shape else \
            np.frombuffer(buf, dtype=f.dtype)

    def read(self, indices: np.ndarray) -> dict[str, Any]:
        """``moments`` [B, K, 2C] f16, ``input_ids`` [B, L] i32 (numpy) and ``captions`` of ``indices``."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"sample index out of range [0, {self.n})")
        shards = np.searchsorted(self.starts, idx, side="right") - 1
        rows = idx - self.starts[shards]
        moments = np.empty((len(idx), *self.moments_shape), dtype=np.float16)
        ids = np.empty((len(idx), self.ids_len), dtype=np.int32)
        captions: list[str] = [""] * len(idx)
        for j in np.lexsort((rows, shards)):  # file order: sequential where the batch allows
            s, r = int(shards[j]), int(rows[j])
            if self._ram is not None:
                t = self._ram[s]
                moments[j], ids[j] = t["moments"][r], t["input_ids"][r]
                a, b = int(t["text_offsets"][r]), int(t["text_offsets"][r + 1])
                captions[j] = t["text"][a:b].tobytes().decode("utf-8")
                continue
            f = self.fields[s]
            moments[j] = self._pread(s, f["moments"], r)[0]
            ids[j] = self._pread(s, f["input_ids"], r)[0]
            a, b = (int(v) for v in self._pread(s, f["text_offsets"], r, 2))
            captions[j] = os.pread(self._fd(s), int(b - a), f["text"].offset + int(a)).decode("utf-8")
        return {"moments": moments, "input_ids": ids, "captions": captions}

    def captions(self) -> list[str]:
        """Every sample's caption, in index order (one read of each shard's text and offsets)."""
        out: list[str] = []
        for s in range(len(self.paths)):
            if self._ram is not None:
                text, offsets = self._ram[s]["text"].tobytes(), self._ram[s]["text_offsets"]
            else:
                f = self.fields[s]
                offsets = self._pread(s, f["text_offsets"], 0, int(self.starts[s + 1] - self.starts[s]) + 1)
                text = os.pread(self._fd(s), int(offsets[-1]), f["text"].offset)
                if len(text) != int(offsets[-1]):
                    raise DataError(f"{self.paths[s]} is truncated (short read of its captions)")
            out.extend(text[int(a):int(b)].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:]))
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"], state["_pid"] = {}, -1
        return state


# What two pre-tokenised folders must share to be read as one set: the latent and text shapes, the tokenizer
# (its config and latent scale) and the text encoder whose ids are stored.
_MERGE_KEYS = ("num_tokens", "channels", "text_length", "text_encoder", "eos_token_id", "pad_token_id",
               "vocab_size", "scale_factor", "tokenizer")


def merge(sources: list[str | os.PathLike], out: str | os.PathLike, copy: bool = False) -> dict[str, Any]:
    """Join pre-tokenised folders into one that a flow stage reads as a single set (``data.path=OUT``).

    The folders must have been written with the same tokenizer and text encoder; the first difference is one
    :class:`DataError` that names the field and both values. Shards are hard-linked into ``out`` (no data is
    copied; ``copy=True``, or a link across file systems, copies), renamed ``m<source>-<shard>``, and
    ``meta.json`` is written last, atomically: a folder with a meta.json is whole. The merged meta keeps
    what the stages read: ``source`` is kept when every folder shares it (``"shapes"`` makes the
    image-to-text stage train on canonical captions), else ``"mixed"``; ``world`` is kept when shared, else
    each world's count is listed under ``worlds``. Returns the merged meta.
    """
    if len(sources) < 2:
        raise DataError("merge needs at least two pre-tokenised folders")
    dest = Path(out)
    roots = [Path(s) for s in sources]
    if any(dest.resolve() == r.resolve() for r in roots):
        raise DataError(f"--out {dest} is one of the folders to merge; write the merged set elsewhere")
    if dest.exists() and any(dest.iterdir()):
        raise DataError(f"--out {dest} exists and is not empty")
    for r in roots:
        if not r.is_dir():
            raise DataError(f"{r} does not exist or is not a folder")
    sets = [TokenShards(r) for r in roots]  # each folder checked: meta, shard names, counts and headers
    first = sets[0].meta
    for root, s in zip(roots[1:], sets[1:]):
        for key in _MERGE_KEYS:
            if s.meta.get(key) != first.get(key):
                raise DataError(f"{root} does not match {roots[0]}: {key} {s.meta.get(key)!r} against "
                                f"{first.get(key)!r} (merge folders written with one tokenizer and text "
                                "encoder)")
    dest.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    for i, (root, s) in enumerate(zip(roots, sets)):
        for entry in s.meta["shards"]:
            name = f"m{i:03d}-{entry['name']}"
            target, tmp = dest / name, dest / f".{name}.tmp"
            if copy:
                shutil.copyfile(root / entry["name"], tmp)
            else:
                try:
                    os.link(root / entry["name"], tmp)
                except OSError:  # another file system, or links not allowed: copy
                    shutil.copyfile(root / entry["name"], tmp)
            os.replace(tmp, target)
            shards.append({"name": name, "n": entry["n"]})
    counts = [len(s) for s in sets]
    meta = {k: v for k, v in first.items() if k not in ("shards", "world", "source")}
    meta.update(n=sum(counts), shards=shards,
                mean_text_bytes=round(sum(int(s.meta.get("mean_text_bytes", 64)) * len(s) for s in sets)
                                      / sum(counts)),
                merged_from=[{"path": str(r), "n": len(s), "source": s.meta.get("source"),
                              "world": s.meta.get("world")} for r, s in zip(roots, sets)])
    kinds = {s.meta.get("source") for s in sets}
    meta["source"] = kinds.pop() if len(kinds) == 1 else "mixed"
    worlds = [s.meta.get("world") for s in sets]
    if len(set(worlds)) == 1 and worlds[0] is not None:
        meta["world"] = worlds[0]
    elif any(w is not None for w in worlds):
        meta["worlds"] = {str(w): sum(len(s) for s in sets if s.meta.get("world") == w)
                          for w in dict.fromkeys(worlds)}
    for s in sets:
        s.close()
    atomic_write_text(dest / "meta.json", json.dumps(meta, indent=2, default=str))
    log.info("%s: %d samples from %d folders", dest, meta["n"], len(roots))
    return meta
