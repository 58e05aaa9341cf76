"""Captions constrained to the shapes world's grammar: the decoder's per-position scores, read as a
choice among the captions :func:`~flowtok.shapes.parse` accepts.

The text decoder is non-autoregressive: it scores every token id at every position at once, and its
argmax can repeat or contradict itself ("a large large triangle square ..."). Every caption of the
world is a template with fixed words, a where-phrase for one object, and object slots
``a <size> <colour> <shape>``, and every one of those words is a single token of the text encoder's
vocabulary. So for each (template, where-phrase) skeleton the token at every position is either
fixed or one of a slot's few words, and the best caption of a skeleton takes each slot word's best
score independently. :func:`grammar_decode` scores every skeleton (fixed tokens, the best slot words,
and the end and pad tokens after the caption, which is how the decoder says where a caption ends)
and writes the best one: the exact maximum of the summed log-probabilities over the whole grammar,
read from the grammar's few hundred token ids only; the caption always parses.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .captions import _SIZE_WORDS, _TEMPLATES, _WHERE
from .world import COLORS, SHAPES

# The slot word classes, in the order of an object's phrase after "a".
_SLOT_WORDS: tuple[tuple[str, ...], ...] = (
    tuple(w for ws in _SIZE_WORDS.values() for w in ws), tuple(COLORS), SHAPES)


@dataclass(frozen=True)
class _Skeletons:
    template: list[tuple[str, str]]   # (template, where-phrase) per skeleton
    fixed: torch.Tensor               # [K, L] token id at each position (slot positions: any)
    slot: torch.Tensor                # [K, L] -1 fixed, else 3 * object + word class
    words: list[torch.Tensor]         # per word class, its token ids
    vocab: torch.Tensor               # every token id a caption of the grammar can hold


def _single_ids(encoder, words: tuple[str, ...]) -> torch.Tensor:
    ids = []
    for w in words:
        content = encoder._content_ids([w])[0]
        if len(content) != 1:
            raise ConfigError(f"the shapes grammar needs one token per word; {w!r} is {len(content)} tokens "
                              "for this text encoder")
        ids.append(content[0])
    return torch.tensor(ids)


@functools.lru_cache(maxsize=4)
def _skeletons(encoder) -> _Skeletons:
    words = [_single_ids(encoder, ws) for ws in _SLOT_WORDS]
    # Two fillings that differ in every slot word mark the slot positions.
    fill_a = [ws[0] for ws in _SLOT_WORDS]
    fill_b = [ws[1] for ws in _SLOT_WORDS]
    skeletons, rows_a, rows_b, n_obj = [], [], [], []
    for (n, kind), templates in _TEMPLATES.items():
        wheres = [p for ps in _WHERE.values() for p in ps] if kind == "cell" else [""]
        for template in templates:
            for where in wheres:
                skeletons.append((template, where))
                n_obj.append(n)
                rows_a.append(template.format(*[f"a {' '.join(fill_a)}"] * n, w=where))
                rows_b.append(template.format(*[f"a {' '.join(fill_b)}"] * n, w=where))
    ids_a, mask = encoder.tokenize(rows_a)
    ids_b, _ = encoder.tokenize(rows_b)
    if not bool(mask[:, -1].logical_not().all()):
        raise ConfigError("the shapes grammar's longest caption does not fit the text encoder's max_length")
    differ = ids_a != ids_b
    slot = torch.full_like(ids_a, -1)
    for k in range(len(skeletons)):
        pos = torch.nonzero(differ[k]).flatten()
        if len(pos) != 3 * n_obj[k]:
            raise ConfigError("the shapes grammar could not find its slot words in the tokenised captions")
        slot[k, pos] = torch.arange(len(pos))
    # Scores are read only at these ids, with every id renumbered by its place among them.
    vocab, local = torch.unique(torch.cat([ids_a.flatten(), *words]), return_inverse=True)
    fixed = local[:ids_a.numel()].view_as(ids_a)
    offset, local_words = ids_a.numel(), []
    for w in words:
        local_words.append(local[offset:offset + len(w)])
        offset += len(w)
    return _Skeletons(skeletons, fixed, slot, local_words, vocab)


@torch.no_grad()
def grammar_decode_logits(logits: torch.Tensor, encoder) -> list[str]:
    """The best caption of the grammar for each row of decoder logits ``[B, L, V]``.

    Every skeleton fills all ``L`` positions (the caption, then end and pads), so the per-position
    normaliser of the log-probabilities is the same for all of them: raw logits rank the captions
    exactly as log-probabilities do, and only the grammar's few hundred token ids need reading.
    """
    sk = _skeletons(encoder)
    b, length, _ = logits.shape
    sub = logits[..., sk.vocab.to(logits.device)].float().cpu()  # [B, L, U]
    fixed, slot = sk.fixed[:, :length], sk.slot[:, :length]
    positions = torch.arange(length).view(1, -1).expand_as(fixed)
    score = sub[:, positions, fixed]  # [B, K, L]
    best_word = torch.zeros(b, 3, length, dtype=torch.long)
    best_score = torch.empty(b, 3, length)
    for c, ids in enumerate(sk.words):
        best_score[:, c], best_word[:, c] = sub[:, :, ids].max(-1)
    word_class = (slot % 3).clamp(min=0)
    slot_score = best_score[:, word_class, positions]  # [B, K, L]
    total = torch.where(slot >= 0, slot_score, score).sum(-1)  # [B, K]
    out = []
    for row, k in enumerate(total.argmax(-1).tolist()):
        template, where = sk.template[k]
        pos = torch.nonzero(slot[k] >= 0).flatten().tolist()
        chosen = [_SLOT_WORDS[i % 3][int(best_word[row, i % 3, p])] for i, p in enumerate(pos)]
        phrases = [f"a {' '.join(chosen[j:j + 3])}" for j in range(0, len(chosen), 3)]
        out.append(template.format(*phrases, w=where))
    return out


def grammar_decode(decoder, z: torch.Tensor, encoder) -> list[str]:
    """Captions of the text latents ``z`` ``[B, K, C]``, each the decoder's best caption of the grammar."""
    with torch.no_grad():
        return grammar_decode_logits(decoder(z), encoder)
