"""Load test of the web demo: a burst of concurrent requests of both kinds against ``flowtok demo``.

    python benchmarks/demo_load.py --untrained tiny          # tiny untrained pipeline, CPU, ~15 s
    python benchmarks/demo_load.py --untrained shapes        # the shapes model's size
    python benchmarks/demo_load.py --model path/to/pipeline --requests 200 --queue-size 32

The server runs as its own process (``python -m flowtok.cli demo``) on 127.0.0.1 only, so its memory
can be measured apart from the client's. The client sends ``--requests`` requests at once over plain
HTTP (gradio's ``/gradio_api/call/<api_name>`` routes): text -> image, image -> text with a small PNG,
uploads larger than the limit, and files that are not images. Every outcome must be one of

    served      the result came back
    busy        refused at once: HTTP 503 "Queue is full ..."
    too_large   refused at once: HTTP 413 "File size exceeded maximum allowed size ..."
    rejected    a one-line error message from the demo (e.g. "Not an image the demo can read: ...")

Anything else (a dropped connection, a timeout, an error without a message) counts as ``failed``.
After the burst one more request must be served. The peak resident memory (RSS) of the server
process and its children is sampled every 20 ms. Prints a JSON summary; ``--out`` also writes it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

HOST = "127.0.0.1"  # the load never leaves this machine
KINDS = ("text_to_image", "image_to_text", "oversized_upload", "not_an_image")
# --hostile adds what an attacker sends: decompression and aspect-ratio bombs, an EPS named .png (which must
# never reach Ghostscript), and API calls gradio cannot hand to a handler (a path never uploaded, a bare
# string for a file, too few inputs).
HOSTILE_KINDS = ("bomb_upload", "thin_upload", "eps_upload", "never_uploaded", "bare_string", "too_few_inputs")


def build_untrained_pipeline(folder: str | os.PathLike, size: str = "tiny") -> Path:
    """An untrained pipeline: ``tiny`` (32 px images, 4 x 4 latents; fast, and enough to exercise every
    code path of the demo) or ``shapes`` (the presets of the shapes model: 128 px, 32 x 16 latents; the
    compute and memory of the real model). Outputs are noise-like images and random words."""
    from dataclasses import replace

    import torch

    from flowtok.config import preset
    from flowtok.flow import FLOW_PRESETS, FlowTransformer
    from flowtok.pipelines import assemble_pipeline
    from flowtok.text import DECODER_PRESETS, PROJECTOR_PRESETS, TextDecoder, TextProjector
    from flowtok.tokenizer import TOKENIZER_PRESETS, ImageTokenizer

    torch.manual_seed(0)
    tok_cfg = replace(TOKENIZER_PRESETS["tiny"], text_dim=0) if size == "tiny" else TOKENIZER_PRESETS["shapes-128"]
    k, c = tok_cfg.latent_shape
    parts = {
        "tokenizer": ImageTokenizer(tok_cfg),
        "text_projector": TextProjector(preset(PROJECTOR_PRESETS, size, latent_channels=c)),
        "t2i_flow": FlowTransformer(preset(FLOW_PRESETS, size, num_tokens=k, in_channels=c)),
        "i2t_flow": FlowTransformer(preset(FLOW_PRESETS, size, num_tokens=k, in_channels=c)),
        "text_decoder": TextDecoder(preset(DECODER_PRESETS, size, num_tokens=k, latent_channels=c)),
    }
    root = Path(folder)
    for name, model in parts.items():
        model.save_pretrained(root / "parts" / name)
    return assemble_pipeline(root / "pipeline", {name: root / "parts" / name for name in parts},
                             defaults={"num_inference_steps": 4})


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def png_header_bomb(width: int, height: int) -> bytes:
    """A PNG of a few hundred bytes that claims width x height pixels (it decodes rows of zeros)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress((b"\x00" + b"\x00" * width) * min(height, 8_000_000 // max(width, 1)), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\nshowpage\n%%EOF\n"


def png_bytes(size: int = 48) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


class MemorySampler(threading.Thread):
    """Peak RSS of a process and its children, polled until :meth:`stop`."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop_event = threading.Event()

    def rss(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:  # a child that just exited
                pass
        return total

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.peak = max(self.peak, self.rss())
            except psutil.Error:
                return
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def start_server(model: str | os.PathLike, port: int, queue_size: int, concurrency: int, max_upload_mb: float,
                 log_file: Path, timeout: float = 180.0) -> subprocess.Popen:
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "flowtok.cli", "demo", "--model", str(model), "--host", HOST, "--port", str(port),
           "--device", "cpu", "--queue-size", str(queue_size), "--concurrency", str(concurrency),
           "--max-upload-mb", str(max_upload_mb)]
    log = open(log_file, "wb")  # noqa: SIM115 - stays open for the server's lifetime
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"demo server exited with {server.returncode}; see {log_file}")
        try:
            if httpx.get(f"http://{HOST}:{port}/config", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise RuntimeError(f"demo server not up after {timeout:.0f} s; see {log_file}")


async def _await_result(client: httpx.AsyncClient, base: str, api: str, event_id: str) -> tuple[str, str]:
    """Follow the server-sent events of one call until it completes or fails."""
    event = None
    async with client.stream("GET", f"{base}/gradio_api/call/{api}/{event_id}") as resp:
        async for line in resp.aiter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                data = line.split(":", 1)[1].strip()
                if event == "complete":
                    return "served", ""
                message = json.loads(data).get("error") if data.startswith("{") else None
                return ("rejected", message) if message else ("failed", f"error without message: {data}")
    return "failed", "stream ended without a result"


async def one_request(client: httpx.AsyncClient, base: str, kind: str, small_png: bytes,
                      big_upload: bytes) -> tuple[str, str, str]:
    """(kind, outcome, message) for one request of ``kind``; a failure's message names the step that failed."""
    step = "upload"
    try:
        if kind == "text_to_image":
            api, data = "generate", ["a large red circle in the top left", 4, 2.0, 0, 1]
        elif kind == "never_uploaded":
            api, data = "caption", [{"path": "/etc/passwd", "orig_name": "x.png", "meta": {"_type": "gradio.FileData"}}, 4]
        elif kind == "bare_string":
            api, data = "caption", ["/etc/passwd", 4]
        elif kind == "too_few_inputs":
            api, data = "generate", ["a red circle"]
        else:
            name, content = {"image_to_text": ("shape.png", small_png),
                             "oversized_upload": ("huge.png", big_upload),
                             "not_an_image": ("notes.png", b"these are notes, not pixels"),
                             "bomb_upload": ("bomb.png", png_header_bomb(20000, 20000)),
                             "thin_upload": ("thin.png", png_header_bomb(1, 8_000_000)),
                             "eps_upload": ("photo.png", EPS)}[kind]
            up = await client.post(f"{base}/gradio_api/upload", files={"files": (name, content, "image/png")})
            if up.status_code == 413:
                return kind, "too_large", up.text
            if up.status_code != 200:
                return kind, "failed", f"upload HTTP {up.status_code}: {up.text[:200]}"
            file = {"path": up.json()[0], "orig_name": name, "meta": {"_type": "gradio.FileData"}}
            api, data = "caption", [file, 4]
        step = "join"
        join = await client.post(f"{base}/gradio_api/call/{api}", json={"data": data})
        if join.status_code == 503 and "Queue is full" in join.text:
            return kind, "busy", join.json().get("detail", join.text)
        if join.status_code != 200:
            return kind, "failed", f"HTTP {join.status_code}: {join.text[:200]}"
        step = "result stream"
        outcome, message = await _await_result(client, base, api, join.json()["event_id"])
        return kind, outcome, message
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        return kind, "failed", f"{step}: {type(exc).__name__}: {exc}"


async def burst(base: str, n: int, max_upload_mb: float, timeout: float,
                kinds: tuple[str, ...] = KINDS) -> list[tuple[str, str, str]]:
    small_png = png_bytes()
    big_upload = png_bytes() + b"\0" * int((max_upload_mb + 1) * 2**20)
    # Every request gets its own connection, so all n really are in flight at once. Idle pooled connections
    # are dropped after 2 s, before uvicorn's 5 s keep-alive timeout: reusing one just as the server closes
    # it fails with "Server disconnected without sending a response" (a client-side race, seen once in CI,
    # that browsers answer by retrying), which must not count as a request the demo dropped.
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        tasks = [one_request(client, base, kinds[i % len(kinds)], small_png, big_upload) for i in range(n)]
        return await asyncio.gather(*tasks)


def run_load(model: str | os.PathLike, requests: int = 200, queue_size: int = 32, concurrency: int = 1,
             max_upload_mb: float = 1.0, timeout: float = 300.0, log_dir: str | os.PathLike | None = None,
             hostile: bool = False) -> dict[str, Any]:
    kinds = KINDS + HOSTILE_KINDS if hostile else KINDS
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="demo-load-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    t_start = time.perf_counter()
    server = start_server(model, port, queue_size, concurrency, max_upload_mb, log_dir / "server.log")
    startup_s = time.perf_counter() - t_start
    sampler = MemorySampler(server.pid)
    try:
        idle_rss = sampler.rss()
        sampler.start()
        base = f"http://{HOST}:{port}"
        t0 = time.perf_counter()
        results = asyncio.run(burst(base, requests, max_upload_mb, timeout, kinds))
        burst_s = time.perf_counter() - t0
        after = asyncio.run(burst(base, 1, max_upload_mb, timeout))[0]  # one text -> image request
        peak = sampler.stop()
        alive = server.poll() is None
    finally:
        if sampler.is_alive():
            sampler.stop()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    outcomes = Counter(outcome for _, outcome, _ in results)
    by_kind = {kind: dict(Counter(o for k, o, _ in results if k == kind)) for kind in kinds}
    log_text = (log_dir / "server.log").read_text(errors="replace")
    messages = {}
    for _, outcome, message in results:
        messages.setdefault(outcome, message)
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if __name__ == "__main__" else "run_load()",
        "requests": requests, "queue_size": queue_size, "concurrency": concurrency, "max_upload_mb": max_upload_mb,
        "served": outcomes["served"], "busy": outcomes["busy"], "too_large": outcomes["too_large"],
        "rejected": outcomes["rejected"], "failed": outcomes["failed"], "by_kind": by_kind,
        "example_messages": messages, "after_burst": after[1], "server_alive": alive,
        "startup_s": round(startup_s, 1), "burst_s": round(burst_s, 2),
        "idle_rss_mb": round(idle_rss / 2**20, 1), "peak_rss_mb": round(peak / 2**20, 1),
        "tracebacks_in_log": log_text.count("Traceback"), "hostile": hostile,
        "cpu_count": os.cpu_count(), "server_log": str(log_dir / "server.log"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="pipeline folder to serve")
    src.add_argument("--untrained", choices=["tiny", "shapes"],
                     help="serve an untrained pipeline of this size, built on the spot")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--queue-size", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--max-upload-mb", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    p.add_argument("--hostile", action="store_true", help="add bombs, an EPS and malformed API calls to the mix")
    p.add_argument("--out", default=None, help="also write the JSON summary here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="demo-load-") as tmp:
        model = build_untrained_pipeline(tmp, args.untrained) if args.untrained else args.model
        summary = run_load(model, args.requests, args.queue_size, args.concurrency, args.max_upload_mb,
                           args.timeout, log_dir=Path(tmp) / "logs", hostile=args.hostile)
        summary["model"] = f"untrained {args.untrained} pipeline" if args.untrained else str(args.model)
        summary.pop("server_log")  # it lies in the temporary folder, gone on return
        summary["server_log_tail"] = (Path(tmp) / "logs" / "server.log").read_text(errors="replace")[-2000:]
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    ok = (summary["failed"] == 0 and summary["after_burst"] == "served" and summary["server_alive"]
          and summary["tracebacks_in_log"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
