"""Captions of a scene: several paraphrases per layout (:func:`caption`), all of them
(:func:`all_captions`), and the exact inverse, text back to a scene (:func:`parse`)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

import numpy as np

from ..errors import InvalidInputError
from .world import COLORS, SHAPES, Scene, ShapeObject

_SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
_WHERE: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "in the top left", "at the top left"),
    "top": ("at the top", "at the top center", "in the top middle"),
    "top right": ("in the top right corner", "in the top right", "at the top right"),
    "left": ("on the left", "on the left side", "at the middle left"),
    "center": ("in the center", "in the middle", "at the center"),
    "right": ("on the right", "on the right side", "at the middle right"),
    "bottom left": ("in the bottom left corner", "in the bottom left", "at the bottom left"),
    "bottom": ("at the bottom", "at the bottom center", "in the bottom middle"),
    "bottom right": ("in the bottom right corner", "in the bottom right", "at the bottom right"),
}
# {0}, {1}, {2} are the objects in canonical order; {w} is a where-phrase of the one object.
_TEMPLATES: dict[tuple[int, str], tuple[str, ...]] = {
    (1, "cell"): (
        "{0} {w}",
        "there is {0} {w}",
        "an image of {0} {w}",
        "{w} there is {0}",
        "{0} {w} on a white background",
    ),
    (2, "left of"): (
        "{0} to the left of {1}",
        "{1} to the right of {0}",
        "{0} on the left and {1} on the right",
        "{1} on the right and {0} on the left",
        "there is {0} to the left of {1}",
    ),
    (2, "above"): (
        "{0} above {1}",
        "{1} below {0}",
        "{0} at the top and {1} at the bottom",
        "{1} underneath {0}",
        "there is {0} above {1}",
    ),
    (3, "left of"): (
        "{0}, {1} and {2} in a row from left to right",
        "from left to right: {0}, {1} and {2}",
        "{0} to the left of {1}, which is to the left of {2}",
        "{2} to the right of {1}, which is to the right of {0}",
        "a row of three shapes: {0}, {1} and {2}",
    ),
    (3, "above"): (
        "{0}, {1} and {2} in a column from top to bottom",
        "from top to bottom: {0}, {1} and {2}",
        "{0} above {1}, which is above {2}",
        "{2} below {1}, which is below {0}",
        "a column of three shapes: {0}, {1} and {2}",
    ),
}


def _template_key(scene: Scene) -> tuple[int, str]:
    return (1, "cell") if scene.num_objects == 1 else (scene.num_objects, scene.layout)


def _fill(template: str, scene: Scene, size_words: Sequence[str], where: str = "") -> str:
    phrases = [o.phrase(w) for o, w in zip(scene.objects, size_words)]
    return template.format(*phrases, w=where)


def caption(scene: Scene, rng: np.random.Generator, white_background: bool = True) -> str:
    """One random paraphrase of the scene (template, where-phrase and size words vary).

    ``white_background=False`` leaves out the templates that call the background white, for a
    drawing on a tinted or textured one (:attr:`~flowtok.shapes.world.Drawing.plain_white`).
    """
    templates = _TEMPLATES[_template_key(scene)]
    if not white_background:
        templates = tuple(t for t in templates if "white" not in t)
    template = templates[rng.integers(len(templates))]
    words = [_SIZE_WORDS[o.size][rng.integers(2)] for o in scene.objects]
    where = ""
    if scene.num_objects == 1:
        options = _WHERE[scene.layout]
        where = options[rng.integers(len(options))]
    return _fill(template, scene, words, where)


def all_captions(scene: Scene) -> list[str]:
    """Every template for the scene, with each where-phrase and each choice of size words (used uniformly)."""
    out: list[str] = []
    wheres = _WHERE[scene.layout] if scene.num_objects == 1 else ("",)
    for template in _TEMPLATES[_template_key(scene)]:
        for where in wheres:
            for k in range(2):
                out.append(_fill(template, scene, [_SIZE_WORDS[o.size][k] for o in scene.objects], where))
    return list(dict.fromkeys(out))


def _alternation(words: Iterable[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


@functools.lru_cache(maxsize=1)
def _parsers() -> list[tuple[re.Pattern[str], int, str]]:
    size_alt = _alternation(w for ws in _SIZE_WORDS.values() for w in ws)
    obj = f"a ({size_alt}) ({_alternation(COLORS)}) ({_alternation(SHAPES)})"
    where_alt = _alternation(p for ps in _WHERE.values() for p in ps)
    parsers = []
    for (n, kind), templates in _TEMPLATES.items():
        for template in templates:
            # Escape the literal text and put capture groups in for the placeholders.
            pattern = re.escape(template)
            for i in range(n):
                pattern = pattern.replace(re.escape(f"{{{i}}}"), f"(?P<o{i}>{obj.replace('(', '(?:')})")
            pattern = pattern.replace(re.escape("{w}"), f"(?P<w>{where_alt})")
            parsers.append((re.compile(pattern), n, kind))
    return parsers


_OBJECT_RE = re.compile(r"a (\w+) (\w+) (\w+)")
_SIZE_OF_WORD = {w: s for s, ws in _SIZE_WORDS.items() for w in ws}
_CELL_OF_WHERE = {p: cell for cell, ps in _WHERE.items() for p in ps}


def parse(text: str) -> Scene:
    """The scene a caption describes; the exact inverse of :func:`caption` for every template.

    Case, surrounding whitespace, repeated spaces and one final period are ignored. Raises
    :class:`~flowtok.errors.InvalidInputError` on any other text.
    """
    if not isinstance(text, str):
        raise InvalidInputError(f"a caption must be a string, got {type(text).__name__}")
    norm = " ".join(text.lower().split())
    if norm.endswith("."):
        norm = norm[:-1].rstrip()
    for pattern, n, kind in _parsers():
        m = pattern.fullmatch(norm)
        if m is None:
            continue
        objects = []
        for i in range(n):
            size_word, color, shape = _OBJECT_RE.fullmatch(m.group(f"o{i}")).groups()  # type: ignore[union-attr]
            objects.append(ShapeObject(color, shape, _SIZE_OF_WORD[size_word]))
        layout = _CELL_OF_WHERE[m.group("w")] if kind == "cell" else kind
        return Scene(tuple(objects), layout)
    shown = text if len(text) <= 80 else text[:77] + "..."
    raise InvalidInputError(f"not a shapes-world caption: {shown!r}")
