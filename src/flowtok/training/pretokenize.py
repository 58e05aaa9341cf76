"""Pre-tokenisation: encode a dataset once into image latents and text states, written as shards.

Flow training then reads latents instead of pixels and captions, as the paper does (the frozen
tokenizer and text encoder run once, not every epoch). A shard folder holds::

    meta.json                   tokenizer, text encoder, shapes and counts
    shard-00000.safetensors     image_latents [n,K,C] f16 (unscaled), text_states [n,L,D] f16,
                                text_mask [n,L] u8, input_ids [n,L] i32
    shard-00000.jsonl           one {"caption": ..., "scene": ...} line per sample

``LatentShards`` loads every shard into memory (on the training device when asked), so a training
step is an index gather.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import atomic_write_text
from ..errors import CheckpointError, DataError
from ..modeling import atomic_save_safetensors, load_safetensors
from ..shapes import Scene
from ..untrusted import parse_json

log = logging.getLogger(__name__)


@torch.no_grad()
def pretokenize(source, n: int, out_dir: str | Path, tokenizer, text_encoder, batch_size: int = 256,
                shard_size: int = 50_000, progress: bool = True) -> Path:
    """Encode ``n`` samples of ``source`` (a trainer batch source) into shards under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf: dict[str, list] = {"image_latents": [], "text_states": [], "text_mask": [], "input_ids": [], "meta": []}
    shards, done, step = [], 0, 0
    bar = tqdm(total=n, desc="pretokenize", disable=not progress)

    def flush() -> None:
        if not buf["meta"]:
            return
        name = f"shard-{len(shards):05d}"
        tensors = {k: torch.cat(buf[k]) for k in ("image_latents", "text_states", "text_mask", "input_ids")}
        atomic_save_safetensors(tensors, out / f"{name}.safetensors")
        atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(m) + "\n" for m in buf["meta"]))
        shards.append({"name": name, "n": len(buf["meta"])})
        for v in buf.values():
            v.clear()

    while done < n:
        b = source.get(step, batch_size, 0, 1)
        take = min(batch_size, n - done)
        images, captions = b["images"][:take], b["captions"][:take]
        scenes = (b.get("scenes") or [None] * take)[:take]
        lat = tokenizer.encode(images)
        ts = text_encoder.encode(captions)
        buf["image_latents"].append(lat.half().cpu())
        buf["text_states"].append(ts.states.half().cpu())
        buf["text_mask"].append(ts.mask.to(torch.uint8).cpu())
        buf["input_ids"].append(ts.input_ids.to(torch.int32).cpu())
        buf["meta"].extend({"caption": c, "scene": s.to_dict() if s is not None else None}
                           for c, s in zip(captions, scenes))
        done += take
        step += 1
        bar.update(take)
        if len(buf["meta"]) >= shard_size:
            flush()
    flush()
    bar.close()
    k, c = tokenizer.latent_shape
    meta = {"format": "flowtok-latents-v1", "n": done, "shards": shards, "num_tokens": k, "channels": c,
            "text_dim": text_encoder.dim, "text_length": text_encoder.max_length,
            "text_encoder": text_encoder.spec, "scale_factor": tokenizer.scale_factor,
            "tokenizer": tokenizer.config.__dict__ if hasattr(tokenizer.config, "__dict__") else None}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2, default=str))
    return out


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
