"""Captions constrained to the shapes world's grammar: the decoder's per-position scores, read as a
choice among the captions :func:`~flowtok.shapes.parse` accepts.

The text decoder is non-autoregressive, and its argmax can repeat or contradict itself ("a large large
triangle square ..."). Every caption of the world is a template with fixed words, a where-phrase for one
object, and object slots ``a <size> <colour> <shape>``, and every one of those words is a single token of
the text encoder's vocabulary. So each (template, where-phrase) is a skeleton of
:class:`~flowtok.caption_grammar.CaptionGrammar`, whose decoding (shared with the torch-free runtime and
the browser page, which read this table from an export's ``manifest.json``) gives the exact best caption
of the grammar; the caption always parses.
"""

from __future__ import annotations

import functools

import torch

from ..caption_grammar import SLOT, CaptionGrammar
from .captions import _SIZE_WORDS, _TEMPLATES, _WHERE
from .world import COLORS, SHAPES

NAME = "shapes"
# The slot word classes, in the order of an object's phrase after "a".
_SLOT_WORDS: tuple[tuple[str, ...], ...] = (
    tuple(w for ws in _SIZE_WORDS.values() for w in ws), tuple(COLORS), SHAPES)
_OBJECT = f"a {SLOT} {SLOT} {SLOT}"


def skeletons() -> list[tuple[str, list[int]]]:
    """Every (template, where-phrase) of the world as caption text with ``{}`` per slot word, and each slot's class."""
    out = []
    for (n, kind), templates in _TEMPLATES.items():
        wheres = [p for ps in _WHERE.values() for p in ps] if kind == "cell" else [""]
        for template in templates:
            for where in wheres:
                out.append((template.format(*[_OBJECT] * n, w=where), [0, 1, 2] * n))
    return out


@functools.lru_cache(maxsize=4)
def shapes_grammar(encoder) -> CaptionGrammar:
    """The shapes world's grammar table for ``encoder``'s tokens (:class:`ConfigError` if it cannot hold it)."""
    def tokenize(rows: list[str]):
        ids, mask = encoder.tokenize(rows)
        return ids.numpy(), mask.numpy()

    return CaptionGrammar.build(NAME, skeletons(), _SLOT_WORDS, encoder._content_ids, tokenize)


@torch.no_grad()
def grammar_decode_logits(logits: torch.Tensor, encoder) -> list[str]:
    """The best caption of the grammar for each row of decoder logits ``[B, L, V]``."""
    grammar = shapes_grammar(encoder)
    vocab = torch.from_numpy(grammar.vocab).to(logits.device)
    return grammar.decode_scores(logits[..., vocab].float().cpu().numpy())


def grammar_decode(decoder, z: torch.Tensor, encoder) -> list[str]:
    """Captions of the text latents ``z`` ``[B, K, C]``, each the decoder's best caption of the grammar."""
    with torch.no_grad():
        return grammar_decode_logits(decoder(z), encoder)
