"""Drawing scenes: torch, signed-distance anti-aliasing, batched, any size from 64 to 512, CPU or GPU.

Signed distances are in units of the object radius.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image

from ..errors import InvalidInputError
from .world import BACKGROUND, COLORS, MAX_SIZE, MIN_SIZE, SIZE_RADIUS, Scene


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


_EXTENT = 1.25  # every shape lies within this many radii of its centre (the star reaches 1.2)


def render_batch(scenes: Sequence[Scene], size: int = 128, device: str | torch.device = "cpu") -> torch.Tensor:
    """Draw scenes as a float tensor ``[B, 3, size, size]`` in [0, 1], anti-aliased.

    Coverage is ``clamp(0.5 - signed_distance_in_pixels, 0, 1)``, a box-filter estimate that is
    exact for straight edges. Objects are grouped by (slot, shape, size), and each group is drawn
    in one vectorised step on a window around each object, so the cost is a handful of kernels
    whatever the batch size, and grows with the objects' area rather than the image's.
    """
    check_size(size)
    device = torch.device(device)
    b = len(scenes)
    bg = torch.tensor(BACKGROUND, dtype=torch.float32, device=device) / 255.0
    image = bg.view(1, 3, 1, 1).expand(b, 3, size, size).clone()
    groups: dict[tuple[int, str, str], list[tuple[int, float, float, tuple[int, int, int]]]] = {}
    for i, scene in enumerate(scenes):
        for slot, (obj, (cx, cy)) in enumerate(zip(scene.objects, scene.centers())):
            groups.setdefault((slot, obj.shape, obj.size), []).append((i, cx, cy, COLORS[obj.color]))
    channels = torch.arange(3, device=device).view(1, 3, 1, 1)
    # Objects of one slot belong to different images, so a group's windows never collide.
    for (_, shape, size_name), items in sorted(groups.items()):
        r = SIZE_RADIUS[size_name]
        win = min(size, math.ceil(2 * _EXTENT * r * size) + 4)
        idx = torch.tensor([it[0] for it in items], device=device)
        centre = torch.tensor([[it[1], it[2]] for it in items], device=device) * size
        corner = (centre - win / 2).round().clamp(0, size - win).long()  # [n, 2] as (x0, y0)
        steps = torch.arange(win, device=device)
        cols, rows = corner[:, :1] + steps, corner[:, 1:] + steps  # [n, win] each
        x = ((cols.float() + 0.5) / size - centre[:, :1] / size) / r
        y = ((rows.float() + 0.5) / size - centre[:, 1:] / size) / r
        sd_px = shape_sdf(shape, x[:, None, :], y[:, :, None]) * r * size
        alpha = (0.5 - sd_px).clamp(0, 1)[:, None]  # [n, 1, win, win]
        rgb = torch.tensor([it[3] for it in items], dtype=torch.float32, device=device).view(-1, 3, 1, 1) / 255.0
        where = (idx.view(-1, 1, 1, 1), channels, rows[:, None, :, None], cols[:, None, None, :])
        image[where] = image[where] * (1 - alpha) + rgb * alpha
    return image


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """A ``[3, H, W]`` tensor in [0, 1] as an RGB PIL image."""
    arr = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


def render(scene: Scene, size: int = 128) -> Image.Image:
    """Draw one scene as an RGB PIL image of ``size`` x ``size`` pixels (64 to 512)."""
    return tensor_to_pil(render_batch([scene], size)[0])
