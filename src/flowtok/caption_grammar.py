"""Captions constrained to a template grammar, read from a text decoder's per-position scores. numpy only.

A grammar is a list of *skeletons*. Each is one token row of the text encoder's length (BOS, the caption,
EOS, pads) in which every position holds a fixed token id or a *slot* of one word class, and its caption
text with ``{}`` where the slot words go, in order. Each slot word is a single token.

The text decoder is non-autoregressive: it scores every token id at every position at once. The best
caption of a skeleton takes each slot's best word independently; the best caption of the grammar is the
skeleton whose sum of scores over all positions (fixed tokens, best slot words, end and pads) is largest.
Every skeleton fills all positions, so the per-position normaliser of the log-probabilities is common to
all of them: raw logits rank the captions exactly as log-probabilities do, and only the grammar's few
hundred token ids (:attr:`CaptionGrammar.vocab`) are read. The result is the exact best caption of the
grammar, and it always belongs to it.

This module is the one definition of that decoding. :mod:`flowtok.shapes.grammar` builds the shapes
world's table from its templates for the PyTorch pipeline; ``flowtok export onnx`` writes the same table
into ``manifest.json`` (``"caption_grammar"``, :meth:`CaptionGrammar.to_json`), which the torch-free
runtime reads back here and the browser page (``serving/web/grammar.js``) decodes with the same
arithmetic: scores summed in float64, position after position, first maximum on ties. Equal logits give
equal captions in all three.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .errors import CheckpointError, ConfigError, InvalidInputError

FORMAT = "flowtok-caption-grammar"
VERSION = 1
SLOT = "{}"


def fill(text: str, words: Sequence[str]) -> str:
    """``text`` with its ``{}`` marks replaced by ``words`` in order."""
    pieces = text.split(SLOT)
    out = [pieces[0]]
    for word, piece in zip(words, pieces[1:]):
        out += [word, piece]
    return "".join(out)


class CaptionGrammar:
    """A grammar's table: ``rows [K, L]`` holds a token id (>= 0) or ``-1 - c`` for a slot of word class ``c``;
    ``texts[k]`` is skeleton ``k``'s caption with one ``{}`` per slot; ``words[c]`` / ``word_ids[c]`` are
    class ``c``'s words and their token ids."""

    def __init__(self, name: str, texts: Sequence[str], rows: np.ndarray, words: Sequence[Sequence[str]],
                 word_ids: Sequence[Sequence[int]]) -> None:
        rows = np.asarray(rows)
        classes = len(words)
        if rows.ndim != 2 or rows.dtype.kind not in "iu" or len(texts) != rows.shape[0] or not len(texts):
            raise ValueError("rows must be a [K, L] integer array with one text per row")
        if classes == 0 or len(word_ids) != classes or any(len(w) != len(i) or not w for w, i in zip(words, word_ids)):
            raise ValueError("every word class needs its words and one token id per word")
        if rows.min() < -classes or min(min(i) for i in word_ids) < 0:
            raise ValueError("a slot names a word class the grammar lacks, or a word id is negative")
        for text, row in zip(texts, rows):
            if text.count(SLOT) != int((row < 0).sum()):
                raise ValueError(f"{text!r} has {text.count(SLOT)} slot marks for {int((row < 0).sum())} slots")
        self.name = name
        self.texts = tuple(texts)
        self.rows = rows.astype(np.int64)
        self.words = tuple(tuple(w) for w in words)
        self.word_ids = tuple(tuple(int(i) for i in ids) for ids in word_ids)
        self.length = rows.shape[1]
        # Scores are read at these ids only; every id is renumbered by its place among them.
        self.vocab = np.unique(np.concatenate([self.rows[self.rows >= 0], *map(np.array, self.word_ids)]))
        local = {int(v): i for i, v in enumerate(self.vocab)}
        self._is_slot = self.rows < 0
        self._fixed = np.vectorize(lambda v: local.get(int(v), 0), otypes=[np.int64])(self.rows)
        self._slot_class = np.where(self._is_slot, -1 - self.rows, 0)
        self._class_local = [np.array([local[i] for i in ids]) for ids in self.word_ids]
        self._slots = [[(int(p), int(-1 - row[p])) for p in np.flatnonzero(row < 0)] for row in self.rows]

    @classmethod
    def build(cls, name: str, skeletons: Sequence[tuple[str, Sequence[int]]], words: Sequence[Sequence[str]],
              content_ids: Callable[[list[str]], list[list[int]]],
              tokenize: Callable[[list[str]], tuple[np.ndarray, np.ndarray]]) -> CaptionGrammar:
        """The table of ``skeletons`` (caption text with ``{}`` per slot, the word class of each slot) for a
        text encoder: ``content_ids`` gives a text's token ids alone, ``tokenize`` its rows
        ``(ids [B, L], mask [B, L])`` as the encoder builds them. Raises :class:`ConfigError` where a word
        is not one token or the longest caption does not fit."""
        word_ids = []
        for ws in words:
            if len(ws) < 2:
                raise ConfigError(f"grammar {name!r}: a word class needs two words or more, got {list(ws)}")
            ids = content_ids(list(ws))
            for w, content in zip(ws, ids):
                if len(content) != 1:
                    raise ConfigError(f"the {name} grammar needs one token per word; {w!r} is {len(content)} "
                                      "tokens for this text encoder")
            word_ids.append([content[0] for content in ids])
        # Two fillings that differ in every slot word mark the slot positions.
        texts = [t for t, _ in skeletons]
        ids_a, mask = tokenize([fill(t, [words[c][0] for c in cs]) for t, cs in skeletons])
        ids_b, _ = tokenize([fill(t, [words[c][1] for c in cs]) for t, cs in skeletons])
        ids_a, ids_b, mask = np.asarray(ids_a), np.asarray(ids_b), np.asarray(mask)
        if mask[:, -1].any():
            raise ConfigError(f"the {name} grammar's longest caption does not fit the text encoder's max_length")
        rows = ids_a.astype(np.int64)
        for k, (_, classes) in enumerate(skeletons):
            pos = np.flatnonzero(ids_a[k] != ids_b[k])
            if len(pos) != len(classes):
                raise ConfigError(f"the {name} grammar could not find its slot words in the tokenised captions")
            rows[k, pos] = -1 - np.asarray(classes)
        return cls(name, texts, rows, words, word_ids)

    # ------------------------------------------------------------------------------------ decoding
    def decode(self, logits: np.ndarray) -> list[str]:
        """The best caption of the grammar for each row of decoder logits ``[B, L', V]`` (``L' <= L``)."""
        logits = np.asarray(logits)
        if logits.ndim != 3 or logits.shape[-1] <= self.vocab[-1]:
            raise InvalidInputError(f"grammar decoding needs logits [B, L, V] over the text vocabulary, got {logits.shape}")
        return self.decode_scores(np.take(logits, self.vocab, axis=-1))

    def decode_scores(self, scores: np.ndarray) -> list[str]:
        """As :meth:`decode`, from the scores at :attr:`vocab`'s ids only: ``[B, L', len(vocab)]``.

        Positions past ``L'`` are not scored; a slot there (a decoder shorter than the grammar's captions)
        takes its class's first word.
        """
        sub = np.asarray(scores, dtype=np.float64)
        if sub.ndim != 3 or sub.shape[1] > self.length or sub.shape[2] != len(self.vocab):
            raise InvalidInputError(f"grammar scores must be [B, <= {self.length}, {len(self.vocab)}], got {sub.shape}")
        batch, length, _ = sub.shape
        best_word = np.zeros((batch, len(self.words), length), dtype=np.int64)
        best_score = np.zeros((batch, len(self.words), length))
        for c, ids in enumerate(self._class_local):
            best_word[:, c] = sub[:, :, ids].argmax(-1)
            best_score[:, c] = sub[:, :, ids].max(-1)
        total = np.zeros((batch, len(self.texts)))
        for p in range(length):  # one position after another: the browser page sums in the same order
            total += np.where(self._is_slot[:, p], best_score[:, self._slot_class[:, p], p], sub[:, p, self._fixed[:, p]])
        out = []
        for b, k in enumerate(total.argmax(-1).tolist()):
            chosen = [self.words[c][best_word[b, c, p] if p < length else 0] for p, c in self._slots[k]]
            out.append(fill(self.texts[k], chosen))
        return out

    # --------------------------------------------------------------------------------------- JSON
    def to_json(self) -> dict[str, Any]:
        """The table as JSON data (``manifest.json``'s ``"caption_grammar"``): rows lose their trailing pads."""
        pad = int(self.rows[0, -1])
        if not (self.rows[:, -1] == pad).all():
            raise ConfigError(f"the {self.name} grammar's rows do not all end in the same pad token")
        skeletons = []
        for text, row in zip(self.texts, self.rows.tolist()):
            while row and row[-1] == pad:
                row.pop()
            skeletons.append({"text": text, "ids": row})
        return {"format": FORMAT, "version": VERSION, "name": self.name, "length": self.length, "pad_token_id": pad,
                "words": [list(w) for w in self.words], "word_ids": [list(i) for i in self.word_ids],
                "skeletons": skeletons}

    @classmethod
    def from_json(cls, data: Any, source: str = "manifest.json") -> CaptionGrammar:
        """A table written by :meth:`to_json`; :class:`CheckpointError` naming ``source`` when it is malformed."""
        def bad(why: str) -> CheckpointError:
            return CheckpointError(f"{source}: caption_grammar {why}")

        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise bad("is not a flowtok caption grammar")
        if data.get("version") != VERSION:
            raise bad(f"has version {data.get('version')!r}; this flowtok reads version {VERSION}")
        try:
            length, pad = data["length"], data["pad_token_id"]
            skeletons = data["skeletons"]
            if not isinstance(length, int) or not isinstance(pad, int) or not isinstance(skeletons, list):
                raise TypeError
            rows = np.full((len(skeletons), length), pad, dtype=np.int64)
            for k, sk in enumerate(skeletons):
                ids = sk["ids"]
                if not isinstance(sk["text"], str) or len(ids) > length or not all(isinstance(i, int) for i in ids):
                    raise TypeError
                rows[k, :len(ids)] = ids
            return cls(str(data["name"]), [sk["text"] for sk in skeletons], rows, data["words"], data["word_ids"])
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"is malformed ({exc or type(exc).__name__})") from None
