"""Pre-tokenisation: encode a dataset once into the compact token format (:mod:`flowtok.data.tokens`).

The frozen image tokenizer runs once per image, not every epoch: each shard stores the tokenizer's
posterior (mean and logvar, f16; sampled at train time) and the caption's token ids and text. The text
encoder is not run here; it runs inside the training step, batched, which keeps a sample at ~5 KB.

Work is split in units, one output shard each: index ranges of ``shard_size`` samples (shapes, image
folders) or one input tar each (webdataset). Under ``torchrun`` rank r encodes units r, r + world, ...;
a unit whose shard file exists and reads back whole is skipped, so a killed run resumes where it
stopped. Image decoding, captions and token ids are prepared in DataLoader worker processes. The run
stops at the end of the data (``--n`` larger than the data is clipped, with a warning). ``meta.json``
is written by rank 0 once every shard is there.

:class:`LatentShards` reads the older ``flowtok-latents-v1`` folders (text-encoder states stored, about
121 KB a sample at 768 wide), whole into memory, after checking up front that they fit.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import atomic_write_text
from ..data.tokens import FORMAT, read_header, shard_name, write_shard
from ..errors import CheckpointError, ConfigError, DataError
from ..modeling import load_safetensors
from ..shapes import Scene, drawn_at, render_batch
from ..untrusted import parse_json

if TYPE_CHECKING:
    from ..data.readers import ImageCaptionFolder

log = logging.getLogger(__name__)


def plan_units(data, n: int | None, shard_size: int) -> tuple[list[Any], int | None]:
    """The work units of a data config and the number of samples they hold (None: unknown before reading)."""
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be positive, got {shard_size}")
    if data.kind == "webdataset":
        if n is not None:
            raise ConfigError("--n does not apply to webdataset input: every sample of the given shards is "
                              "encoded (choose shards with a brace pattern, e.g. data/shard-{000..099}.tar)")
        from ..data.readers import WebDatasetReader

        return list(range(len(WebDatasetReader(data.path, resolution=data.size).shards))), None
    if data.kind == "folder":
        from ..data.readers import ImageCaptionFolder

        total = len(ImageCaptionFolder(data.path, resolution=data.size, on_error=data.on_error))
        if n is not None and n > total:
            log.warning("%s holds %d samples; stopping there, not at --n %d", data.path, total, n)
        n = total if n is None else min(n, total)
    elif data.kind == "shapes":
        if n is None:
            raise ConfigError("--n is required for the shapes world (it has no end)")
    else:
        raise ConfigError(f"pretokenize reads shapes, folder or webdataset data, not {data.kind!r}")
    if n <= 0:
        raise ConfigError(f"--n must be positive, got {n}")
    return [(a, min(a + shard_size, n)) for a in range(0, n, shard_size)], n


def _ids(tokenize, captions: list[str]) -> torch.Tensor:
    """Token ids; the truncation of long captions is said once, by the main process, not per chunk."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tokenize(captions)[0].to(torch.int32)


class _Chunks(torch.utils.data.Dataset):
    """Host work of a chunk of a range unit, in a worker: scenes or decoded images, captions, token ids."""

    def __init__(self, data, seed: int, chunks: list[tuple[int, int, int, bool]], tokenize) -> None:
        self.data, self.seed, self.chunks, self.tokenize = data, seed, chunks, tokenize
        self.folder: ImageCaptionFolder | None = None

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, Any]:
        unit, a, b, last = self.chunks[i]
        out: dict[str, Any] = {"unit": unit, "last": last}
        if self.data.kind == "shapes":
            # Each sample is drawn as the shapes stream draws it (position, size, shade, style, background).
            got = [drawn_at(self.seed, j, self.data.split, self.data.num_objects, self.data.world) for j in range(a, b)]
            out["scenes"], captions, out["drawings"] = [g[0] for g in got], [g[1] for g in got], [g[2] for g in got]
        else:
            from ..data.readers import ImageCaptionFolder

            if self.folder is None:
                # DataConfig requires a path for every kind but shapes.
                self.folder = ImageCaptionFolder(str(self.data.path), resolution=self.data.size, crop=self.data.crop,
                                                 on_error=self.data.on_error, seed=self.seed)
            items = [self.folder[j] for j in range(a, b)]
            out["images"], captions = torch.stack([it[0] for it in items]), [it[1] for it in items]
        out["captions"] = captions
        out["input_ids"] = _ids(self.tokenize, captions)
        return out


class _TarUnits(torch.utils.data.IterableDataset):
    """Webdataset input: worker w of W reads units w, w + W, ... of this rank's, in chunks of ``batch``."""

    def __init__(self, data, seed: int, units: list[int], batch: int, tokenize) -> None:
        self.data, self.seed, self.units, self.batch, self.tokenize = data, seed, units, batch, tokenize

    def __iter__(self):
        from ..data.readers import WebDatasetReader

        info = torch.utils.data.get_worker_info()
        w, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = WebDatasetReader(self.data.path, resolution=self.data.size, crop=self.data.crop,
                                  on_error=self.data.on_error, seed=self.seed)
        for unit in self.units[w::workers]:
            items = [it for it in reader._iter_shard(unit)]
            for a in range(0, max(len(items), 1), self.batch):
                part = items[a:a + self.batch]
                captions = [it[1] for it in part]
                yield {"unit": unit, "last": a + self.batch >= len(items), "captions": captions,
                       "images": torch.stack([it[0] for it in part]) if part else torch.zeros(0),
                       "input_ids": _ids(self.tokenize, captions) if part else torch.zeros(0, dtype=torch.int32)}


def _shard_done(path: Path, expected: int | None) -> bool:
    if not path.is_file():
        return False
    try:
        n, _ = read_header(path)
    except DataError:
        return False
    return expected is None or n == expected


@torch.no_grad()
def pretokenize(data, out_dir: str | Path, tokenizer, text_encoder, n: int | None = None, batch_size: int = 256,
                shard_size: int = 50_000, seed: int = 0, workers: int = 4, rank: int = 0, world: int = 1,
                progress: bool = True) -> Path:
    """Encode ``data`` (a :class:`~flowtok.training.data.DataConfig`) into token shards under ``out_dir``.

    This process encodes units ``rank, rank + world, ...``; shards already on disk are skipped. Rank 0
    writes ``meta.json`` after ``barrier`` (a callable, for several processes) once every shard exists.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    units, total = plan_units(data, n, shard_size)
    sizes = {i: (u[1] - u[0]) if isinstance(u, tuple) else None for i, u in enumerate(units)}
    mine = [i for i in range(len(units)) if i % world == rank and not _shard_done(out / shard_name(i), sizes[i])]
    skipped = len(range(rank, len(units), world)) - len(mine)
    if skipped:
        log.info("rank %d: %d of its shards already done, skipped", rank, skipped)
    device = next(tokenizer.parameters()).device
    tokenize = text_encoder.tokenize
    log.info("token ids: %d per caption (BOS, content, EOS); longer captions are cut", text_encoder.max_length)
    if data.kind == "webdataset":
        ds: Any = _TarUnits(data, seed, mine, batch_size, tokenize)
        loader_kw: dict[str, Any] = {}
    else:
        chunks = [(i, a, min(a + batch_size, units[i][1]), a + batch_size >= units[i][1])
                  for i in mine for a in range(units[i][0], units[i][1], batch_size)]
        ds = _Chunks(data, seed, chunks, tokenize)
        loader_kw = {"shuffle": False}
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                         pin_memory=device.type == "cuda", **loader_kw)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    pending: dict[int, dict[str, list]] = {}
    want = sum(sizes[i] or 0 for i in mine) or None
    bar = tqdm(total=want, desc=f"pretokenize rank {rank}", disable=not progress, unit="sample")
    for chunk in loader:
        part = pending.setdefault(chunk["unit"], {"moments": [], "input_ids": [], "captions": []})
        if len(chunk["captions"]):
            if "scenes" in chunk:
                images = render_batch(chunk["scenes"], data.size, device, chunk["drawings"])
            else:
                images = chunk["images"].to(device, non_blocking=True)
            with amp:
                post = tokenizer.encode_posterior(images)
            part["moments"].append(torch.cat([post.mean, post.logvar], -1).half().cpu())
            part["input_ids"].append(chunk["input_ids"])
            part["captions"].extend(chunk["captions"])
            bar.update(len(chunk["captions"]))
        if chunk["last"]:
            done = pending.pop(chunk["unit"])
            k2 = 2 * tokenizer.latent_shape[1]
            moments = (torch.cat(done["moments"]).numpy() if done["moments"]
                       else np.zeros((0, tokenizer.latent_shape[0], k2), np.float16))
            ids = (torch.cat(done["input_ids"]).numpy() if done["input_ids"]
                   else np.zeros((0, text_encoder.max_length), np.int32))
            write_shard(out / shard_name(chunk["unit"]), moments, ids, done["captions"])
    bar.close()
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0:
        write_meta(out, len(units), total, tokenizer, text_encoder, data.kind,
                   data.world if data.kind == "shapes" else None)
    return out


def write_meta(out: Path, num_units: int, planned: int | None, tokenizer, text_encoder, source: str,
               shapes_world: str | None = None) -> None:
    shards: list[dict[str, Any]] = []
    text_bytes = 0
    for i in range(num_units):
        path = out / shard_name(i)
        if not path.is_file():
            raise DataError(f"{path} is missing: a process stopped before finishing; run pretokenize again")
        count, fields = read_header(path)
        shards.append({"name": path.name, "n": count})
        text_bytes += path.stat().st_size - fields["text"].offset
    n = sum(s["n"] for s in shards)
    if planned is not None and n != planned:
        raise DataError(f"{out}: the shards hold {n} samples, {planned} were planned")
    k, c = tokenizer.latent_shape
    meta = {"format": FORMAT, "n": n, "shards": shards, "num_tokens": k, "channels": c,
            "text_length": text_encoder.max_length, "text_encoder": text_encoder.spec,
            "eos_token_id": text_encoder.eos_token_id, "pad_token_id": text_encoder.pad_token_id,
            "vocab_size": text_encoder.vocab_size, "scale_factor": tokenizer.scale_factor,
            "tokenizer": {k: v for k, v in vars(tokenizer.config).items() if not k.startswith("_")},
            "source": source, "mean_text_bytes": round(text_bytes / max(n, 1))}
    if shapes_world is not None:
        meta["world"] = shapes_world
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2, default=str))
    log.info("%s: %d samples in %d shards", out, n, len(shards))


_TENSORS = ("image_latents", "text_states", "text_mask", "input_ids")


def _read_meta(root: Path) -> dict[str, Any]:
    """``meta.json`` of a pre-tokenised folder, checked: every problem is one DataError line."""
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{root} is not a pre-tokenised folder (no meta.json); run 'flowtok pretokenize'")
    try:
        meta = parse_json(meta_path.read_bytes())
    except ValueError as exc:
        raise DataError(f"{meta_path} is corrupt: {exc}") from None
    shards = meta.get("shards") if isinstance(meta, dict) else None
    if not isinstance(shards, list):
        raise DataError(f"{meta_path} is corrupt: expected an object with a list of 'shards'")
    for i, shard in enumerate(shards):
        name = shard.get("name") if isinstance(shard, dict) else None
        n = shard.get("n") if isinstance(shard, dict) else None
        # Shard names are file names in this folder, never paths elsewhere.
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name) or name.startswith("."):
            raise DataError(f"{meta_path}: shards[{i}] needs a plain file 'name', got {name!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise DataError(f"{meta_path}: shards[{i}] needs a sample count 'n', got {n!r}")
    return meta


class LatentShards:
    """All shards of a pre-tokenised folder in memory."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        root = Path(path)
        self.meta = _read_meta(root)
        self._check_fits(root, torch.device(device))
        parts: dict[str, list[torch.Tensor]] = {}
        self.records: list[dict[str, Any]] = []
        for shard in self.meta["shards"]:
            name, n = shard["name"], shard["n"]
            try:
                tensors = load_safetensors(root / f"{name}.safetensors")
            except CheckpointError as exc:
                raise DataError(f"{root}: {exc}") from None
            missing = [k for k in _TENSORS if k not in tensors]
            if missing:
                raise DataError(f"shard {name} in {root} lacks the tensor '{missing[0]}'")
            lines_path = root / f"{name}.jsonl"
            if not lines_path.is_file():
                raise DataError(f"shard {name} in {root} has no {lines_path.name}")
            lines = lines_path.read_text(encoding="utf-8", errors="replace").splitlines()
            if len(lines) != n or any(tensors[k].shape[0] != n for k in _TENSORS):
                raise DataError(f"shard {name} in {root} is incomplete")
            for k in _TENSORS:
                parts.setdefault(k, []).append(tensors[k])
            for lineno, line in enumerate(lines, 1):
                try:
                    record = parse_json(line)
                except ValueError as exc:
                    raise DataError(f"{lines_path}:{lineno}: {exc}") from None
                if not isinstance(record, dict) or not isinstance(record.get("caption"), str):
                    raise DataError(f"{lines_path}:{lineno}: expected an object with a 'caption' string")
                self.records.append(record)
        if not self.records:
            raise DataError(f"{root} holds no samples")
        self.device = torch.device(device)
        self.tensors = {k: torch.cat(v).to(self.device) for k, v in parts.items()}

    def _check_fits(self, root: Path, device: torch.device) -> None:
        """Refuse up front, with the arithmetic, a set that cannot be held (it would die mid-load)."""
        from ..data.tokens import available_host_memory

        size = sum((root / f"{s['name']}.safetensors").stat().st_size for s in self.meta["shards"]
                   if (root / f"{s['name']}.safetensors").is_file())
        n = max(1, int(self.meta.get("n", 1)))
        host = available_host_memory()
        line = (f"{n:,} samples x {size / n / 1024:.0f} KB = {size / 2**30:.2f} GiB, about {2.1 * size / 2**30:.2f} "
                f"GiB at peak while loading; {host / 2**30:.1f} GiB host memory available")
        if 2.1 * size > 0.9 * host:
            raise DataError(f"{root} does not fit in memory: {line}; re-run 'flowtok pretokenize' to write the "
                            "compact streamed format (data.kind: tokens)")
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if size > 0.5 * free:
                raise DataError(f"{root} would take {size / 2**30:.2f} GiB of the {free / 2**30:.1f} GiB free on "
                                f"{device}, beside the model; use the compact streamed format (data.kind: tokens)")
        log.info("data %s: %s; held in memory", root, line)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):  # map-style access for IndexedSource's bookkeeping
        return self.records[i]

    def gather(self, idx: list[int], device: torch.device) -> dict[str, Any]:
        ix = torch.as_tensor(idx, device=self.device)
        t = {k: v.index_select(0, ix).to(device, non_blocking=True) for k, v in self.tensors.items()}
        recs = [self.records[i] for i in idx]
        scenes = [Scene.from_dict(r["scene"]) for r in recs] if all(r.get("scene") for r in recs) else None
        return {"image_latents_raw": t["image_latents"].float(), "text_states": t["text_states"].float(),
                "text_mask": t["text_mask"].bool(), "input_ids": t["input_ids"].long(),
                "captions": [r["caption"] for r in recs], "scenes": scenes, "index": ix}
