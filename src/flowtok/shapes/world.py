"""The shapes world's vocabulary, its scenes, and how scenes are drawn at random.

A :class:`Scene` is what a caption says: one to three coloured shapes, each with a size word, and
their layout. A single object lies in one of nine named regions of a 3 x 3 grid; two objects are
side by side (``"left of"``) or stacked (``"above"``); three form a row or a column, in reading
order. ``Scene.objects`` is always in that order (left to right, or top to bottom).

A :class:`Drawing` is how one scene is drawn: where each object lies, how large, turned by how
much, in which shade, on which background and in which style. Two worlds share the scenes:

* ``"v1"``, the original world (:func:`canonical_drawing`): every object at its cell's centre or
  at fixed line positions, two sizes, upright, the palette's exact colours, anti-aliased fill on
  plain white. It stays reachable so that models trained on it can still be measured the same way.
* ``"v2"``, the default (:func:`sample_drawing`): every object anywhere inside its named region
  (relations follow the objects' real geometry), a continuous radius inside its size word's range
  with a gap between the words, rotated where the shape stays unambiguous, a shade of its colour,
  a tinted, textured or noisy background, and one of three drawing styles. The caption stays
  exact: nothing a caption says is left to chance, and what it does not say varies.

:func:`scene_split` holds out some colour-shape pairs and some relation combinations, which only
ever occur in test prompts, to measure compositional generalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidInputError

# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

# Saturated colours, far apart in RGB (>= 0.38 in [0, 1] units between any two, and from white)
# so that JPEG chroma loss and mild colour noise never move a shape to a neighbour's name.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 210, 30),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "purple": (130, 50, 180),
    "pink": (240, 120, 180),
    "brown": (130, 80, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

# Half-extent of an object as a fraction of the image side. The ratio (1.73) leaves the judge a
# wide margin; "large" still fits three in a row with a visible gap.
SIZE_RADIUS: dict[str, float] = {"small": 0.075, "large": 0.13}

# One object: a 3x3 grid. Centres at 0.2/0.5/0.8 keep a large star clear of the border.
CELLS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
_GRID = (0.2, 0.5, 0.8)
CELL_CENTERS: dict[str, tuple[float, float]] = {
    name: (_GRID[i % 3], _GRID[i // 3]) for i, name in enumerate(CELLS)
}
# Two or three objects: objects[i] is `relation` objects[i + 1].
RELATIONS: tuple[str, ...] = ("left of", "above")
_LINE_POSITIONS = {2: (0.27, 0.73), 3: (0.17, 0.5, 0.83)}

# The held-out rule (see scene_split). Every colour and every shape still occurs in training, only
# these particular combinations do not.
HELDOUT_COLOR_SHAPES: frozenset[tuple[str, str]] = frozenset({
    ("red", "star"), ("blue", "triangle"), ("green", "cross"),
    ("yellow", "diamond"), ("purple", "circle"), ("pink", "square"),
})
HELDOUT_RELATIONS: frozenset[tuple[str, str, str]] = frozenset({
    ("circle", "left of", "square"), ("star", "left of", "diamond"),
    ("triangle", "above", "circle"), ("square", "above", "cross"),
})

MIN_SIZE, MAX_SIZE = 64, 512

# --------------------------------------------------------------------------------------------
# The variation of the v2 world
# --------------------------------------------------------------------------------------------

WORLDS: tuple[str, ...] = ("v1", "v2")
DEFAULT_WORLD = "v2"

# Radius ranges per size word (fractions of the side). Both v1 radii lie inside, and the gap
# between the words (0.080 -> 0.105, a ratio of 1.31) is what the judge's threshold sits in.
SIZE_RANGE: dict[str, tuple[float, float]] = {"small": (0.055, 0.08), "large": (0.105, 0.145)}
# Farthest point of each shape from its centre, in radii, at any rotation: bounds the windows drawn
# and keeps every object inside the image.
SHAPE_EXTENT: dict[str, float] = {"circle": 1.0, "square": 1.21, "triangle": 1.29, "diamond": 1.05,
                                  "star": 1.2, "cross": 1.01}
# Largest rotation (degrees, either way) that leaves the shape's name beyond doubt: a square turned
# 45 degrees reads as a diamond and a cross as an "x", so those stay near upright; a star at any
# angle is a star (+-36 degrees covers all of them, it repeats every 72).
MAX_ROTATION: dict[str, float] = {"circle": 0.0, "square": 20.0, "triangle": 30.0, "diamond": 15.0,
                                  "star": 36.0, "cross": 20.0}
# Shades: darkened by up to 25% towards black or lightened by up to 20% towards white. Every two
# colours' shade ranges stay >= 0.188 apart in RGB ([0, 1] units; the closest are a light orange
# and a dark yellow), and the judge names a colour by the nearest shade range, not the nearest base.
SHADE_DARKEST, SHADE_LIGHTEST = 0.25, 0.2
STYLES: tuple[str, ...] = ("smooth", "hard", "outlined")
# Cell boundaries of the 3 x 3 grid, and the free margin around each: a single object's centre
# stays this far inside its region, so its region is never a matter of a pixel.
CELL_EDGES: tuple[float, float] = (0.35, 0.65)
_CELL_MARGIN = 0.04
_BORDER = 0.02      # an object's farthest point stays this far from the image border
_GAP = 0.04         # the smallest free space between two objects' bounding circles
# Two or three objects: the spread across the line is at most this fraction of the spread along it,
# so "left of" and "above" are never a close call.
_ACROSS_RATIO = 0.4
_OUTLINE_MAX_FRACTION = 0.15  # of the radius


def shade(color: str, amount: float) -> tuple[float, float, float]:
    """``color`` in RGB [0, 1], darkened (``amount < 0``, towards black) or lightened (``> 0``, towards white)."""
    base = [c / 255.0 for c in COLORS[color]]
    if amount < 0:
        return tuple(c * (1 + amount) for c in base)  # type: ignore[return-value]
    return tuple(c + (1 - c) * amount for c in base)  # type: ignore[return-value]


@dataclass(frozen=True)
class Placement:
    """One object as drawn: centre ``(x, y)`` and radius as fractions of the side (y down),
    rotation in degrees (clockwise on screen) and fill colour in RGB [0, 1]."""

    x: float
    y: float
    radius: float
    angle: float
    rgb: tuple[float, float, float]


@dataclass(frozen=True)
class Drawing:
    """How a scene is drawn: one :class:`Placement` per object (in ``Scene.objects`` order), the
    background colour (RGB [0, 1]), the style (:data:`STYLES`), a low-frequency texture and a
    per-pixel noise amplitude (standard deviations in [0, 1] units, drawn from ``noise_seed``) and,
    for the outlined style, the outline's width in pixels of a 128-pixel image."""

    placements: tuple[Placement, ...]
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    style: str = "smooth"
    texture: float = 0.0
    noise: float = 0.0
    noise_seed: int = 0
    outline: float = 0.0

    @property
    def plain_white(self) -> bool:
        """White and untextured: the only background a caption may call white."""
        return self.background == (1.0, 1.0, 1.0) and self.texture == 0.0


@dataclass(frozen=True)
class ShapeObject:
    """One shape: a colour from :data:`COLORS`, a shape from :data:`SHAPES`, a size from :data:`SIZES`."""

    color: str
    shape: str
    size: str

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise InvalidInputError(f"unknown colour {self.color!r}; expected one of {sorted(COLORS)}")
        if self.shape not in SHAPES:
            raise InvalidInputError(f"unknown shape {self.shape!r}; expected one of {list(SHAPES)}")
        if self.size not in SIZES:
            raise InvalidInputError(f"unknown size {self.size!r}; expected one of {list(SIZES)}")

    def phrase(self, size_word: str | None = None) -> str:
        return f"a {size_word or self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One to three objects and their layout.

    ``layout`` is a grid cell from :data:`CELLS` for one object, and a relation from
    :data:`RELATIONS` for two or three (``objects[i]`` is ``layout`` ``objects[i + 1]``, so objects
    are listed left to right or top to bottom).
    """

    objects: tuple[ShapeObject, ...]
    layout: str

    def __post_init__(self) -> None:
        if not isinstance(self.objects, tuple):
            object.__setattr__(self, "objects", tuple(self.objects))
        n = len(self.objects)
        if not 1 <= n <= 3:
            raise InvalidInputError(f"a scene has 1 to 3 objects, got {n}")
        allowed = CELLS if n == 1 else RELATIONS
        if self.layout not in allowed:
            raise InvalidInputError(f"layout {self.layout!r} is invalid for {n} object(s); expected one of {list(allowed)}")

    @property
    def num_objects(self) -> int:
        return len(self.objects)

    def centers(self) -> list[tuple[float, float]]:
        """Object centres ``(x, y)`` as fractions of the image side (y down)."""
        if self.num_objects == 1:
            return [CELL_CENTERS[self.layout]]
        line = _LINE_POSITIONS[self.num_objects]
        if self.layout == "left of":
            return [(v, 0.5) for v in line]
        return [(0.5, v) for v in line]

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [{"color": o.color, "shape": o.shape, "size": o.size} for o in self.objects],
                "layout": self.layout}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        try:
            objects = tuple(ShapeObject(o["color"], o["shape"], o["size"]) for o in data["objects"])
            return cls(objects, data["layout"])
        except (KeyError, TypeError) as exc:
            raise InvalidInputError(f"not a scene description: {data!r}") from exc


# --------------------------------------------------------------------------------------------
# Sampling and the held-out split
# --------------------------------------------------------------------------------------------

def scene_split(scene: Scene) -> str:
    """``"test"`` if the scene holds a held-out colour-shape pair or a held-out relation, else ``"train"``.

    Held out: the colour-shape pairs in :data:`HELDOUT_COLOR_SHAPES` (any object) and the
    ``(shape, relation, shape)`` triples in :data:`HELDOUT_RELATIONS` (any neighbouring pair).
    """
    if any((o.color, o.shape) in HELDOUT_COLOR_SHAPES for o in scene.objects):
        return "test"
    if scene.num_objects > 1:
        for a, b in zip(scene.objects, scene.objects[1:]):
            if (a.shape, scene.layout, b.shape) in HELDOUT_RELATIONS:
                return "test"
    return "train"


def _sample_any(rng: np.random.Generator, num_objects: int | None) -> Scene:
    n = int(rng.integers(1, 4)) if num_objects is None else num_objects
    colors = list(COLORS)
    objects = tuple(
        ShapeObject(colors[rng.integers(len(colors))], SHAPES[rng.integers(len(SHAPES))],
                    SIZES[rng.integers(len(SIZES))])
        for _ in range(n)
    )
    layouts = CELLS if n == 1 else RELATIONS
    return Scene(objects, layouts[rng.integers(len(layouts))])


def sample_scene(rng: np.random.Generator, num_objects: int | None = None, split: str = "train") -> Scene:
    """A uniformly random scene of the given split (``"train"``, ``"test"`` or ``"any"``).

    ``num_objects=None`` draws 1, 2 or 3 objects with equal probability. A split is reached by
    rejection, so the result is a pure function of the generator's state.
    """
    if split not in ("train", "test", "any"):
        raise InvalidInputError(f"split must be 'train', 'test' or 'any', got {split!r}")
    if num_objects is not None and num_objects not in (1, 2, 3):
        raise InvalidInputError(f"num_objects must be 1, 2, 3 or None, got {num_objects!r}")
    while True:
        scene = _sample_any(rng, num_objects)
        if split == "any" or scene_split(scene) == split:
            return scene


# --------------------------------------------------------------------------------------------
# Drawings: v1's canonical one and v2's random ones
# --------------------------------------------------------------------------------------------

def check_world(world: str) -> str:
    if world not in WORLDS:
        raise InvalidInputError(f"world must be one of {list(WORLDS)}, got {world!r}")
    return world


def canonical_drawing(scene: Scene) -> Drawing:
    """The v1 world's drawing: grid or line centres, two radii, upright, exact colours, white."""
    return Drawing(tuple(
        Placement(x, y, SIZE_RADIUS[o.size], 0.0, tuple(c / 255.0 for c in COLORS[o.color]))  # type: ignore[arg-type]
        for o, (x, y) in zip(scene.objects, scene.centers())))


def cell_of(x: float, y: float) -> str:
    """The named region of the 3 x 3 grid that holds the point ``(x, y)``."""
    col = sum(x >= e for e in CELL_EDGES)
    row = sum(y >= e for e in CELL_EDGES)
    return CELLS[3 * row + col]


def _cell_interval(index: int, extent: float) -> tuple[float, float]:
    """The centre coordinates allowed along one axis for an object of ``extent`` in grid slot ``index``."""
    lo = (0.0, *CELL_EDGES)[index] + (_CELL_MARGIN if index > 0 else 0.0)
    hi = (*CELL_EDGES, 1.0)[index] - (_CELL_MARGIN if index < 2 else 0.0)
    return max(lo, extent + _BORDER), min(hi, 1.0 - extent - _BORDER)


def _line_slack(extents: np.ndarray) -> float:
    """Free length along a line once the objects, their gaps and the borders are accounted for."""
    return float(1.0 - 2 * _BORDER - 2 * extents.sum() - _GAP * (len(extents) - 1))


def _line_positions(rng: np.random.Generator, extents: np.ndarray, layout: str) -> list[tuple[float, float]]:
    """Centres of 2-3 objects in reading order along the layout's axis (needs a slack >= 0)."""
    # The slack is shared at random between the gaps and the two ends; across the line each object
    # lies within a band whose width is a fraction of the line's length, itself inside the image.
    parts = rng.dirichlet(np.ones(len(extents) + 1)) * max(_line_slack(extents), 0.0)
    along, pos = [], _BORDER + parts[0]
    for i, e in enumerate(extents):
        pos += e
        along.append(pos)
        pos += e + _GAP + parts[i + 1]
    band = _ACROSS_RATIO * (along[-1] - along[0])
    lo, hi = extents + _BORDER, 1.0 - extents - _BORDER
    start = rng.uniform(lo.max(), max(lo.max(), hi.min() - band))
    across = np.clip(start + rng.uniform(0.0, band, len(extents)), lo, hi)
    pairs = zip(along, across) if layout == "left of" else zip(across, along)
    return [(float(x), float(y)) for x, y in pairs]


def sample_drawing(scene: Scene, rng: np.random.Generator) -> Drawing:
    """A random v2 drawing of ``scene``; a pure function of the generator's state.

    Positions follow the caption's layout (a single object inside its named region; several in
    reading order along a line whose spread across is at most 0.4 of its spread along, with free
    space between neighbours), and every other attribute is drawn independently. Radii are uniform
    in their size word's range, except that a line too long for the image has all its objects'
    radii pulled towards their ranges' lower ends by one common factor until it fits.
    """
    lows = np.array([SIZE_RANGE[o.size][0] for o in scene.objects])
    spans = np.array([SIZE_RANGE[o.size][1] for o in scene.objects]) - lows
    reach = np.array([SHAPE_EXTENT[o.shape] for o in scene.objects])
    u = rng.uniform(0.0, 1.0, scene.num_objects)
    if scene.num_objects > 1:
        at_low, per_u = _line_slack(lows * reach), 2 * float((spans * u * reach).sum())
        if per_u > at_low:
            u = u * at_low / per_u
    radii = lows + u * spans
    extents = radii * reach
    if scene.num_objects == 1:
        idx = CELLS.index(scene.layout)
        (x0, x1), (y0, y1) = _cell_interval(idx % 3, extents[0]), _cell_interval(idx // 3, extents[0])
        centres = [(float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1)))]
    else:
        centres = _line_positions(rng, extents, scene.layout)
    placements = []
    for o, r, (x, y) in zip(scene.objects, radii, centres):
        limit = MAX_ROTATION[o.shape]
        angle = float(rng.uniform(-limit, limit)) if limit > 0 else 0.0
        amount = float(rng.uniform(-SHADE_DARKEST, SHADE_LIGHTEST))
        placements.append(Placement(x, y, float(r), angle, shade(o.color, amount)))
    # A quarter of the drawings keep v1's plain white; the rest are tinted towards a random colour
    # and dimmed a little, far lighter than any shade of the palette.
    if rng.random() < 0.25:
        background = (1.0, 1.0, 1.0)
        texture = 0.0
    else:
        tint, strength, value = rng.uniform(0.0, 1.0, 3), float(rng.uniform(0.03, 0.15)), float(rng.uniform(0.9, 1.0))
        r, g, b = (float(value * (1 - strength * (1 - t))) for t in tint)
        background = (r, g, b)
        texture = float(rng.uniform(0.0, 0.03)) if rng.random() < 0.5 else 0.0
    noise = float(rng.uniform(0.0, 0.02)) if rng.random() < 0.5 else 0.0
    style = STYLES[int(rng.integers(len(STYLES)))]
    # The outline stays thin beside the smallest object, so its fill (the colour named) stays visible.
    thinnest = min(radii) * 128 * _OUTLINE_MAX_FRACTION
    outline = min(float(rng.uniform(1.0, 2.0)), thinnest) if style == "outlined" else 0.0
    return Drawing(tuple(placements), background, style, texture, noise, int(rng.integers(2**31)), outline)


def draw_scene(scene: Scene, world: str, rng: np.random.Generator) -> Drawing:
    """The drawing of ``scene`` in ``world``: v1's canonical one, or a random v2 one from ``rng``."""
    return canonical_drawing(scene) if check_world(world) == "v1" else sample_drawing(scene, rng)
