"""Stateless ODE solvers for the flow dx/dt = v(x, t), shared by text-to-image and image-to-text.

``model`` is any callable ``model(x [B, ...], t [B] float, null_indicator [B] bool) -> v [B, ...]``:
a :class:`~flowtok.flow.FlowTransformer`, a distilled student, or an analytic field in a test.
Integration runs from ``x0`` at t = 0 (the text latent for T2I, the image latent for I2T) to t = 1
on the grid t_i = i / N, or on a sub-interval ``[t_start, t_end]``, or on any strictly monotonic
``timesteps`` grid (for few-step samplers).

Classifier-free guidance (CrossFlow style, null_indicator = 1 is the "null" branch)::

    v = v_null + s * (v_cond - v_null)

computed with ONE forward on the concatenated batch [x ; x] when s != 1, and a plain conditional
forward when s == 1. The loop never reads a tensor value on the host, so a CUDA run queues all its
kernels without stalling.

There is no noise source here: FlowTok starts from the text latent, not from Gaussian noise, so the
result is a deterministic function of ``x0`` (bitwise identical across calls on the same device and
dtype). Randomness, and so a ``generator``, only enters where the caller *samples* x0, e.g. the
text projector's reparameterised latent.

Note on upstream: the FlowTok release's Euler solver evaluates the model at
``linspace(0, 1 - 1e-5, N)`` (N points, so the last evaluation is at t ~= 1) while stepping by
``(1 - 1e-5) / N``; here evaluations are at the left end of each step, t_i = i / N, the standard Euler
method. ``method="euler-upstream"`` (:func:`upstream_euler_sample`) reproduces upstream's loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from tqdm.auto import tqdm

from .errors import InvalidInputError

VelocityModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Grid = Sequence[float] | torch.Tensor


def time_grid(num_steps: int = 20, t_start: float = 0.0, t_end: float = 1.0, timesteps: Grid | None = None,
              device: torch.device | str | None = None) -> torch.Tensor:
    """The [N + 1] float32 integration grid: ``timesteps`` if given, else t_start + (t_end - t_start) i / N."""
    if timesteps is not None:
        grid = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
        if grid.numel() < 2:
            raise InvalidInputError(f"timesteps needs at least 2 entries, got {grid.numel()}")
        steps = grid.diff()
        if not (bool((steps > 0).all()) or bool((steps < 0).all())):
            raise InvalidInputError("timesteps must be strictly increasing or strictly decreasing")
        return grid.to(device=device, dtype=torch.float32)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise InvalidInputError(f"num_steps must be a positive integer, got {num_steps!r}")
    if t_start == t_end:
        raise InvalidInputError(f"t_start and t_end are both {t_start}: an empty interval")
    # float64 then float32, so that the default grid is exactly i / N rounded once; built on the device
    # itself because a host-to-device copy would be a synchronisation.
    frac = torch.arange(num_steps + 1, dtype=torch.float64, device=device) / num_steps
    return (t_start + (t_end - t_start) * frac).float()


def _guided(model: VelocityModel, guidance_scale: float, batch: int,
            device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """v(x, t) with CFG folded in; t is a 0-dim tensor. Indicators are built once, outside the loop.

    A model with ``grouped_condition`` set (a FlowTransformer with fused inference enabled) is told instead
    that the batch is one (or, guided, two) groups sharing t and a null indicator: ``forward_grouped``."""
    grouped = getattr(model, "grouped_condition", False)
    if guidance_scale == 1.0:
        if grouped:
            return lambda x, t: model.forward_grouped(x, t, (0,))  # type: ignore[attr-defined]
        cond = torch.zeros(batch, dtype=torch.bool, device=device)
        return lambda x, t: model(x, t.expand(batch), cond)

    if grouped:  # the conditional half, then the null half, each sharing t and its indicator
        def both_halves(x2: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model.forward_grouped(x2, t, (0, 1))  # type: ignore[attr-defined]
    else:
        both = torch.cat([torch.zeros(batch, dtype=torch.bool, device=device),
                          torch.ones(batch, dtype=torch.bool, device=device)])

        def both_halves(x2: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model(x2, t.expand(2 * batch), both)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_cond, v_null = both_halves(torch.cat([x, x]), t).chunk(2)
        return v_null + guidance_scale * (v_cond - v_null)

    return guided


def _check(x0: torch.Tensor, guidance_scale: float) -> None:
    if not isinstance(x0, torch.Tensor) or x0.dim() < 2:
        raise InvalidInputError("x0 must be a batched tensor [B, ...]")
    if isinstance(guidance_scale, torch.Tensor):
        raise InvalidInputError("guidance_scale must be a Python number, not a tensor")


def _finish(x: torch.Tensor, trajectory: list[torch.Tensor] | None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    return (x, torch.stack(trajectory)) if trajectory is not None else x


@torch.no_grad()
def euler_sample(model: VelocityModel, x0: torch.Tensor, num_steps: int = 20, guidance_scale: float = 1.0,
                 t_start: float = 0.0, t_end: float = 1.0, timesteps: Grid | None = None,
                 return_trajectory: bool = False,
                 progress: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Integrate from ``x0`` at the grid's first time to its last with the explicit Euler method.

    One model evaluation (two samples' worth when guided) per step. ``timesteps`` overrides
    ``num_steps`` / ``t_start`` / ``t_end``. Returns x at the end, or ``(x, trajectory)`` with the
    trajectory [N + 1, B, ...] including x0 when ``return_trajectory``.
    """
    _check(x0, guidance_scale)
    grid = time_grid(num_steps, t_start, t_end, timesteps, device=x0.device)
    velocity = _guided(model, guidance_scale, x0.shape[0], x0.device)
    x = x0
    trajectory = [x0] if return_trajectory else None
    for i in tqdm(range(grid.numel() - 1), disable=not progress, desc="euler"):
        x = x + (grid[i + 1] - grid[i]) * velocity(x, grid[i])
        if trajectory is not None:
            trajectory.append(x)
    return _finish(x, trajectory)


@torch.no_grad()
def heun_sample(model: VelocityModel, x0: torch.Tensor, num_steps: int = 20, guidance_scale: float = 1.0,
                t_start: float = 0.0, t_end: float = 1.0, timesteps: Grid | None = None,
                return_trajectory: bool = False,
                progress: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Heun's method (explicit trapezoid): second order, two model evaluations per step.

    Same arguments and return value as :func:`euler_sample`. At equal evaluations Heun with N/2
    steps usually beats Euler with N on the curved paths CFG produces.
    """
    _check(x0, guidance_scale)
    grid = time_grid(num_steps, t_start, t_end, timesteps, device=x0.device)
    velocity = _guided(model, guidance_scale, x0.shape[0], x0.device)
    x = x0
    trajectory = [x0] if return_trajectory else None
    for i in tqdm(range(grid.numel() - 1), disable=not progress, desc="heun"):
        dt = grid[i + 1] - grid[i]
        v = velocity(x, grid[i])
        v_next = velocity(x + dt * v, grid[i + 1])
        x = x + 0.5 * dt * (v + v_next)
        if trajectory is not None:
            trajectory.append(x)
    return _finish(x, trajectory)


UPSTREAM_T_MAX = 1 - 1e-5


@torch.no_grad()
def upstream_euler_sample(model: VelocityModel, x0: torch.Tensor, num_steps: int = 20, guidance_scale: float = 1.0,
                          t_start: float = 0.0, t_end: float = 1.0, timesteps: Grid | None = None,
                          return_trajectory: bool = False,
                          progress: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The FlowTok release's Euler loop, for reproducing the authors' samples with converted weights.

    It evaluates the model at ``linspace(0, 1 - 1e-5, N)`` (N points: the last one at t ~= 1) but steps
    by ``(1 - 1e-5) / N``, so its evaluation times are not the left ends of its steps and no
    ``timesteps`` grid of :func:`euler_sample` reproduces it. Only the full interval is offered.
    """
    if timesteps is not None or (t_start, t_end) != (0.0, 1.0):
        raise InvalidInputError("the upstream grid covers [0, 1 - 1e-5] only; timesteps, t_start, t_end are not used")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise InvalidInputError(f"num_steps must be a positive integer, got {num_steps!r}")
    _check(x0, guidance_scale)
    times = torch.linspace(0, UPSTREAM_T_MAX, num_steps, dtype=torch.float64, device=x0.device).float()
    dt = UPSTREAM_T_MAX / num_steps
    velocity = _guided(model, guidance_scale, x0.shape[0], x0.device)
    x = x0
    trajectory = [x0] if return_trajectory else None
    for i in tqdm(range(num_steps), disable=not progress, desc="euler (upstream grid)"):
        x = x + dt * velocity(x, times[i])
        if trajectory is not None:
            trajectory.append(x)
    return _finish(x, trajectory)


SAMPLERS: dict[str, Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]] = {
    "euler": euler_sample,
    "heun": heun_sample,
    "euler-upstream": upstream_euler_sample,
}


def sample(model: VelocityModel, x0: torch.Tensor, method: Literal["euler", "heun", "euler-upstream"] = "euler",
           num_steps: int = 20,
           guidance_scale: float = 1.0, t_start: float = 0.0, t_end: float = 1.0, timesteps: Grid | None = None,
           return_trajectory: bool = False,
           progress: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to the solver named ``method`` (see :data:`SAMPLERS`)."""
    if method not in SAMPLERS:
        raise InvalidInputError(f"unknown sampling method '{method}' (known: {', '.join(SAMPLERS)})")
    return SAMPLERS[method](model, x0, num_steps=num_steps, guidance_scale=guidance_scale, t_start=t_start,
                            t_end=t_end, timesteps=timesteps, return_trajectory=return_trajectory,
                            progress=progress)


class CudaGraphed:
    """``fn(*tensors) -> tensor`` replayed from a CUDA graph captured once per input shape and dtype.

    A sampling loop at a fixed batch size issues the same kernels every call; on a GPU the launch
    gaps between them (20 steps x every layer's kernels) cost as much as the arithmetic at small
    batches. Capturing the whole loop as one graph removes them. ``fn`` must be sync-free (no
    ``.item()``, no host-dependent branching on tensor values), as every solver here is.

    The first call for a shape runs ``fn`` ``warmup`` times on a side stream (so lazy initialisation,
    cuBLAS handles and ``torch.compile`` happen outside the capture), then captures it. Later calls copy
    the inputs into the captured buffers and replay. Returns a fresh tensor each call. On a device
    other than CUDA this is a plain call of ``fn``. Holds the captured buffers until :meth:`reset`.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], warmup: int = 2) -> None:
        self.fn = fn
        self.warmup = warmup
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}

    def reset(self) -> None:
        """Drop every captured graph and its buffers (e.g. after changing the model's weights' storage)."""
        self._graphs.clear()

    def _capture(self, args: tuple[torch.Tensor, ...]) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]:
        static = [a.clone() for a in args]
        side = torch.cuda.Stream(device=args[0].device)
        side.wait_stream(torch.cuda.current_stream(args[0].device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static)
        torch.cuda.current_stream(args[0].device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.fn(*static)
        return graph, static, out

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if not args or args[0].device.type != "cuda":
            return self.fn(*args)
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        if key not in self._graphs:
            self._graphs[key] = self._capture(args)
        graph, static, out = self._graphs[key]
        for buf, a in zip(static, args, strict=True):
            buf.copy_(a)
        graph.replay()
        return out.clone()


class GraphedSampler(CudaGraphed):
    """The fixed-shape sampling loop as one CUDA graph: ``GraphedSampler(model, num_steps=20)(x0)``.

    Same numbers as :func:`sample` with the same arguments (the graph replays the same kernels);
    worth it when the same model samples many batches of one size, as a server or an evaluation does.
    Combine with :meth:`flowtok.flow.FlowTransformer.compile_blocks` for fused kernels inside the graph.

    Only the uniform grid (``num_steps``, ``t_start``, ``t_end``) is offered: a custom ``timesteps``
    grid is validated on the host, a synchronisation that a capture cannot contain.
    """

    def __init__(self, model: VelocityModel, method: Literal["euler", "heun"] = "euler", num_steps: int = 20,
                 guidance_scale: float = 1.0, t_start: float = 0.0, t_end: float = 1.0, warmup: int = 2) -> None:
        if method not in SAMPLERS:
            raise InvalidInputError(f"unknown sampling method '{method}' (known: {', '.join(SAMPLERS)})")
        if isinstance(guidance_scale, torch.Tensor):
            raise InvalidInputError("guidance_scale must be a Python number, not a tensor")
        time_grid(num_steps, t_start, t_end)  # a bad setting fails here, not in the middle of a capture
        solver = SAMPLERS[method]

        def run(x0: torch.Tensor) -> torch.Tensor:
            return solver(model, x0, num_steps=num_steps, guidance_scale=guidance_scale, t_start=t_start,
                          t_end=t_end)  # type: ignore[return-value]

        super().__init__(run, warmup=warmup)
