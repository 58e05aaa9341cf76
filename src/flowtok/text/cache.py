"""The text encoders' state cache: ``caption -> (states, mask, ids)`` in memory, one safetensors file on disk."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Any

import torch

from ..errors import DataError, InvalidInputError
from ..modeling import atomic_save_safetensors, load_safetensors


class TextStateCache:
    """LRU cache ``caption -> (states [L, D], mask [L], ids [L])`` on the CPU, float32.

    ``save`` writes one safetensors file: ``states`` [N, L, D], ``mask`` [N, L], ``input_ids`` [N, L];
    the captions (JSON list, same order) and the encoder spec sit in the metadata, and ``load``
    refuses a file made by another encoder or another ``max_length``.
    """

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._items: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, caption: str) -> bool:
        return caption in self._items

    def get(self, caption: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        item = self._items.get(caption)
        if item is not None:
            self._items.move_to_end(caption)
        return item

    def put(self, caption: str, states: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor) -> None:
        if self.max_items <= 0:
            return
        self._items[caption] = (states.detach().float().cpu(), mask.cpu(), ids.cpu())
        self._items.move_to_end(caption)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def save(self, path: str | os.PathLike, spec: dict[str, Any]) -> None:
        if not self._items:
            raise InvalidInputError("the text-state cache is empty; nothing to save")
        caps = list(self._items)
        tensors = {
            "states": torch.stack([self._items[c][0] for c in caps]),
            "mask": torch.stack([self._items[c][1] for c in caps]),
            "input_ids": torch.stack([self._items[c][2] for c in caps]),
        }
        meta = {"captions": json.dumps(caps), "encoder": json.dumps(spec, sort_keys=True)}
        atomic_save_safetensors(tensors, path, metadata=meta)

    def load(self, path: str | os.PathLike, spec: dict[str, Any]) -> int:
        """Add the entries of a saved cache file; returns how many were read."""
        from safetensors import safe_open

        tensors = load_safetensors(path)
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if json.loads(meta.get("encoder", "null")) != json.loads(json.dumps(spec, sort_keys=True)):
            raise DataError(f"text-state cache {path} was made by encoder {meta.get('encoder')}, not {spec}")
        caps = json.loads(meta.get("captions", "[]"))
        if len(caps) != tensors["states"].shape[0]:
            raise DataError(f"text-state cache {path} is corrupt: caption count != row count")
        for i, c in enumerate(caps):
            self.put(c, tensors["states"][i], tensors["mask"][i], tensors["input_ids"][i])
        return len(caps)
