"""Drawing scenes: torch, signed-distance anti-aliasing, batched, any size from 64 to 512, CPU or GPU.

Signed distances are in units of the object radius.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InvalidInputError
from .world import MAX_SIZE, MIN_SIZE, SHAPES, STYLES, Drawing, Scene, canonical_drawing


def _sd_box(x: torch.Tensor, y: torch.Tensor, hx: float, hy: float) -> torch.Tensor:
    dx, dy = x.abs() - hx, y.abs() - hy
    outside = torch.sqrt(dx.clamp(min=0) ** 2 + dy.clamp(min=0) ** 2)
    return outside + torch.maximum(dx, dy).clamp(max=0)


def _sd_convex(x: torch.Tensor, y: torch.Tensor, verts: Sequence[tuple[float, float]]) -> torch.Tensor:
    # Inside a convex polygon the distance to the boundary is the largest (least negative) edge
    # half-plane distance; outside it is the distance to the nearest edge segment.
    halfplane, seg = [], []
    m = len(verts)
    area2 = sum(verts[i][0] * verts[(i + 1) % m][1] - verts[(i + 1) % m][0] * verts[i][1] for i in range(m))
    orient = 1.0 if area2 > 0 else -1.0
    for i in range(m):
        (ax, ay), (bx, by) = verts[i], verts[(i + 1) % m]
        ex, ey = bx - ax, by - ay
        length = math.hypot(ex, ey)
        nx, ny = orient * ey / length, -orient * ex / length  # outward normal
        px, py = x - ax, y - ay
        halfplane.append(px * nx + py * ny)
        t = ((px * ex + py * ey) / (length * length)).clamp(0, 1)
        seg.append(torch.sqrt((px - t * ex) ** 2 + (py - t * ey) ** 2))
    inside_d = torch.stack(halfplane).amax(0)
    outside_d = torch.stack(seg).amin(0)
    return torch.where(inside_d <= 0, inside_d, outside_d)


def _sd_star(x: torch.Tensor, y: torch.Tensor, radius: float, inner: float) -> torch.Tensor:
    # Five-pointed star, point up: fold the plane into one tenth of the star by mirror symmetry and
    # measure the distance to a single edge there (the classic 2D star distance construction).
    k1x, k1y = 0.809016994375, -0.587785252292
    k2x, k2y = -k1x, k1y
    px, py = x.abs(), -y  # y points down in images; the construction wants y up
    d = (k1x * px + k1y * py).clamp(min=0)
    px, py = px - 2 * d * k1x, py - 2 * d * k1y
    d = (k2x * px + k2y * py).clamp(min=0)
    px, py = px - 2 * d * k2x, py - 2 * d * k2y
    px = px.abs()
    py = py - radius
    bax, bay = inner * -k1y, inner * k1x - 1.0
    h = ((px * bax + py * bay) / (bax * bax + bay * bay)).clamp(0, radius)
    dist = torch.sqrt((px - bax * h) ** 2 + (py - bay * h) ** 2)
    return dist * torch.sign(py * bax - px * bay)


def shape_sdf(shape: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) for a shape of unit radius, at coordinates in units of radius."""
    if shape == "circle":
        return torch.sqrt(x * x + y * y) - 1.0
    if shape == "square":
        return _sd_box(x, y, 0.85, 0.85)
    if shape == "triangle":
        return _sd_convex(x, y, [(0.0, -0.95), (1.0, 0.8), (-1.0, 0.8)])
    if shape == "diamond":
        return _sd_convex(x, y, [(0.0, -1.05), (0.8, 0.0), (0.0, 1.05), (-0.8, 0.0)])
    if shape == "star":
        return _sd_star(x, y + 0.1, 1.1, 0.45)  # +0.1 centres the star's bounding box
    if shape == "cross":
        return torch.minimum(_sd_box(x, y, 0.95, 0.32), _sd_box(x, y, 0.32, 0.95))
    raise InvalidInputError(f"unknown shape {shape!r}")


def check_size(size: int) -> None:
    if not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise InvalidInputError(f"image size must be an integer from {MIN_SIZE} to {MAX_SIZE}, got {size!r}")


_EXTENT = 1.3  # every shape, at any rotation, lies within this many radii of its centre (world.SHAPE_EXTENT)
# Per-pixel noise is a hash of (noise seed, pixel), so a drawing looks the same on any device and in
# any batch, with no generator state to carry; the texture is the same hash on a coarse grid.
_TEXTURE_GRID = 6
_OUTLINE_DARKEN = 0.35


def _hash_uniform(seeds: torch.Tensor, count: int, salt: int) -> torch.Tensor:
    """``[B, count]`` values uniform in [-1, 1), a pure function of (seed, position, salt)."""
    mask = 0xFFFFFFFF
    x = (seeds.view(-1, 1) * 0x9E3779B1 + torch.arange(count, device=seeds.device) * 0x85EBCA77 + salt) & mask
    # Two rounds of a 32-bit integer mixer; int64 products wrap, and the low 32 bits are exact.
    for mult in (0x7FEB352D, 0x846CA68B):
        x = x ^ (x >> 16)
        x = (x * mult) & mask
    x = x ^ (x >> 15)
    return x.float() / 2**31 - 1.0


# Objects are drawn grouped by (slot, shape name), in sorted order: a group's objects lie in different images.
_RANKED_SHAPES = sorted(SHAPES)
_SHAPE_RANK = {name: rank for rank, name in enumerate(_RANKED_SHAPES)}


@dataclass(frozen=True)
class PackedDrawings:
    """A batch of drawn scenes as the few flat arrays :func:`render_packed` reads (:func:`pack_drawings`).

    Cheap to pass between processes (the shapes loader workers send these, not one object per placement)
    and to copy to a device: ``image`` ``[B, 5]`` float32 (background r, g, b, texture, noise), ``noise_seed``
    ``[B]`` int64, ``objects`` ``[7, M]`` float32 (radius, x, y, angle in radians, fill r, g, b), ``outline``
    ``[M]`` float64 (the drawing's outline width at 128 px), ``meta`` ``[3, M]`` int64 (image index, style
    index, draw-group key), objects in scene order.
    """

    image: np.ndarray
    noise_seed: np.ndarray
    objects: np.ndarray
    outline: np.ndarray
    meta: np.ndarray

    def __len__(self) -> int:
        return int(self.image.shape[0])


def pack_drawings(scenes: Sequence[Scene], drawings: Sequence[Drawing] | None = None) -> PackedDrawings:
    """The arrays :func:`render_packed` draws ``scenes`` from (``drawings`` as in :func:`render_batch`)."""
    if drawings is None:
        drawings = [canonical_drawing(s) for s in scenes]
    if len(drawings) != len(scenes):
        raise InvalidInputError(f"{len(scenes)} scenes but {len(drawings)} drawings")
    image = [(*d.background, d.texture, d.noise) for d in drawings]
    objects: list[tuple[float, ...]] = []
    outline: list[float] = []
    meta: list[tuple[int, int, int]] = []
    for i, (scene, drawing) in enumerate(zip(scenes, drawings)):
        if len(drawing.placements) != scene.num_objects:
            raise InvalidInputError(f"scene {i} has {scene.num_objects} objects but its drawing {len(drawing.placements)}")
        style = STYLES.index(drawing.style)
        for slot, (obj, p) in enumerate(zip(scene.objects, drawing.placements)):
            objects.append((p.radius, p.x, p.y, math.radians(p.angle), *p.rgb))
            outline.append(drawing.outline)
            meta.append((i, style, slot * len(SHAPES) + _SHAPE_RANK[obj.shape]))
    return PackedDrawings(
        image=np.array(image, dtype=np.float32).reshape(len(drawings), 5),
        noise_seed=np.array([d.noise_seed for d in drawings], dtype=np.int64),
        objects=np.array(objects, dtype=np.float32).reshape(-1, 7).T.copy(),
        outline=np.array(outline, dtype=np.float64),
        meta=np.array(meta, dtype=np.int64).reshape(-1, 3).T.copy())


def concat_packed(parts: Sequence[PackedDrawings]) -> PackedDrawings:
    """Several packed batches as one, images in the order given."""
    offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
    meta = [p.meta.copy() for p in parts]
    for m, off in zip(meta, offsets):
        m[0] += off
    return PackedDrawings(image=np.concatenate([p.image for p in parts]),
                          noise_seed=np.concatenate([p.noise_seed for p in parts]),
                          objects=np.concatenate([p.objects for p in parts], axis=1),
                          outline=np.concatenate([p.outline for p in parts]), meta=np.concatenate(meta, axis=1))


def _backgrounds(image: torch.Tensor, seeds: torch.Tensor, textured: bool, size: int) -> torch.Tensor:
    b = image.shape[0]
    out = image[:, :3].reshape(b, 3, 1, 1).expand(b, 3, size, size).clone()
    if textured:
        g = _TEXTURE_GRID
        coarse = _hash_uniform(seeds, g * g, salt=1).view(b, 1, g, g) * math.sqrt(3)  # unit variance
        smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        out = out + smooth * image[:, 3].reshape(b, 1, 1, 1)
    return out


def render_batch(scenes: Sequence[Scene], size: int = 128, device: str | torch.device = "cpu",
                 drawings: Sequence[Drawing] | None = None) -> torch.Tensor:
    """Draw scenes as a float tensor ``[B, 3, size, size]`` in [0, 1].

    ``drawings`` says where and how each scene is drawn (:func:`~flowtok.shapes.world.sample_drawing`);
    without it every scene gets the v1 world's canonical drawing. Styles: ``smooth`` is an
    anti-aliased fill, whose coverage ``clamp(0.5 - signed_distance_in_pixels, 0, 1)`` is a
    box-filter estimate exact for straight edges; ``hard`` is the same fill without anti-aliasing
    (each pixel in or out by its centre, as a plain polygon fill draws it); ``outlined`` is the
    smooth fill with a darker band of the drawing's outline width along the inside of its edge.
    Objects are grouped by (slot, shape), and each group is drawn in one vectorised step on a
    window around each object, so the cost is a handful of kernels whatever the batch size.
    Equals ``render_packed(pack_drawings(scenes, drawings), size, device)``.
    """
    check_size(size)
    return render_packed(pack_drawings(scenes, drawings), size, device)


def render_packed(packed: PackedDrawings, size: int = 128, device: str | torch.device = "cpu") -> torch.Tensor:
    """:func:`render_batch` from packed drawings (the same pixels): the arrays go to ``device`` in four
    copies, and issuing the kernels reads nothing back from the device."""
    check_size(size)
    device = torch.device(device)
    order = np.argsort(packed.meta[2], kind="stable")  # by draw group, each in image order
    keys = packed.meta[2][order]
    sorted_objects = packed.objects[:, order]
    radius = sorted_objects[0]
    objects = torch.from_numpy(np.concatenate(
        [sorted_objects, (packed.outline[order] * size / 128).astype(np.float32)[None]])).to(device)
    meta = torch.from_numpy(packed.meta[:2, order]).to(device)
    image = torch.from_numpy(packed.image).to(device)
    seeds = torch.from_numpy(packed.noise_seed).to(device)
    canvas = _backgrounds(image, seeds, bool((packed.image[:, 3] > 0).any()), size)
    channels = torch.arange(3, device=device).view(1, 3, 1, 1)
    bounds = [0, *(np.flatnonzero(np.diff(keys)) + 1).tolist(), len(keys)]
    # Objects of one slot belong to different images, so a group's windows never collide.
    for start, end in zip(bounds[:-1], bounds[1:]):
        if start == end:
            continue
        shape = _RANKED_SHAPES[int(keys[start]) % len(SHAPES)]
        part = objects[:, start:end]
        r = part[0].view(-1, 1, 1)
        win = min(size, math.ceil(2 * _EXTENT * float(radius[start:end].max()) * size) + 4)
        idx = meta[0, start:end]
        centre = torch.stack((part[1], part[2]), 1) * size
        corner = (centre - win / 2).round().clamp(0, size - win).long()  # [n, 2] as (x0, y0)
        steps = torch.arange(win, device=device)
        cols, rows = corner[:, :1] + steps, corner[:, 1:] + steps  # [n, win] each
        dx = ((cols.float() + 0.5) - centre[:, :1])[:, None, :] / (r * size)
        dy = ((rows.float() + 0.5) - centre[:, 1:])[:, :, None] / (r * size)
        # Sample the upright shape at coordinates turned back by the object's angle.
        theta = part[3].view(-1, 1, 1)
        cos, sin = torch.cos(theta), torch.sin(theta)
        sd_px = shape_sdf(shape, cos * dx + sin * dy, -sin * dx + cos * dy) * r * size
        smooth = (0.5 - sd_px).clamp(0, 1)
        style = meta[1, start:end].view(-1, 1, 1)
        alpha = torch.where(style == STYLES.index("hard"), (sd_px < 0).float(), smooth)[:, None]
        fill = part[4:7].t().reshape(-1, 3, 1, 1)
        # Outlined: the part of the shape more than `width` pixels inside its edge keeps the fill.
        width = part[7].view(-1, 1, 1)
        inner = torch.where(style == STYLES.index("outlined"), (0.5 - sd_px - width).clamp(0, 1), smooth)[:, None]
        rgb = fill * inner + fill * (1 - _OUTLINE_DARKEN) * (alpha - inner).clamp(min=0)
        where = (idx.view(-1, 1, 1, 1), channels, rows[:, None, :, None], cols[:, None, None, :])
        canvas[where] = canvas[where] * (1 - alpha) + rgb
    if bool((packed.image[:, 4] > 0).any()):
        grain = _hash_uniform(seeds, 3 * size * size, salt=2).view(-1, 3, size, size) * math.sqrt(3)
        canvas = canvas + grain * image[:, 4].reshape(-1, 1, 1, 1)
    return canvas.clamp(0, 1)


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """A ``[3, H, W]`` tensor in [0, 1] as an RGB PIL image."""
    arr = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


def render(scene: Scene, size: int = 128, drawing: Drawing | None = None) -> Image.Image:
    """Draw one scene as an RGB PIL image of ``size`` x ``size`` pixels (64 to 512); v1's drawing by default."""
    return tensor_to_pil(render_batch([scene], size, drawings=None if drawing is None else [drawing])[0])
