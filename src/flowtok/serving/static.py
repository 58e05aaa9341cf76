"""``flowtok demo --static``: the bundled model in the browser, no inference on the server.

The site is plain files: the page (``serving/web``), onnxruntime-web's WebAssembly build (from npm:
``make web`` installs it into ``build/web``, which git ignores) and an ONNX export of the model
(``flowtok export onnx``), of which only one precision's graphs are copied. Any static file server
can host it; :func:`serve` adds the two headers that let onnxruntime-web use threads
(cross-origin isolation) and the MIME types of ``.mjs`` and ``.wasm``.

Nothing here imports torch unless the model has to be exported first.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import threading
from pathlib import Path

from ..config import atomic_write_text
from ..errors import CheckpointError, InvalidInputError
from ..export.manifest import MANIFEST, PRECISIONS

WEB = Path(__file__).parent / "web"
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
_REPO = Path(__file__).resolve().parents[3]
ORT_DIST_DEFAULT = _REPO / "build" / "web" / "node_modules" / "onnxruntime-web" / "dist"


def find_onnxruntime_web(dist: str | os.PathLike | None = None) -> Path:
    """onnxruntime-web's ``dist`` folder: ``dist``, $FLOWTOK_ORT_WEB, or the one ``make web`` installs."""
    folder = Path(dist or os.environ.get("FLOWTOK_ORT_WEB") or ORT_DIST_DEFAULT)
    missing = [f for f in ORT_FILES if not (folder / f).is_file()]
    if missing:
        raise InvalidInputError(f"onnxruntime-web not found in {folder} (no {missing[0]}); run `make web` "
                                "(npm install onnxruntime-web into build/web) or pass --ort-web DIST")
    return folder


def copy_export(src: str | os.PathLike, dst: str | os.PathLike, precision: str = "fp16") -> Path:
    """Copy an exported folder keeping only ``precision``'s graph files (the next lower one where a graph
    has none): what the page downloads, and nothing else."""
    if precision not in PRECISIONS:
        raise InvalidInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    src, dst = Path(src), Path(dst)
    if not (src / MANIFEST).is_file():
        raise CheckpointError(f"{src} is not an exported flowtok folder (no {MANIFEST})")
    manifest = json.loads((src / MANIFEST).read_text())
    order = PRECISIONS[: PRECISIONS.index(precision) + 1][::-1]
    dst.mkdir(parents=True, exist_ok=True)
    for entry in manifest["graphs"].values():
        chosen = next(p for p in order if p in entry["files"])
        file = entry["files"][chosen]
        entry["files"] = {chosen: file}
        shutil.copy2(src / file, dst / file)
    shutil.copy2(src / manifest["text"]["tokenizer"], dst / manifest["text"]["tokenizer"])
    atomic_write_text(dst / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return dst


def build_site(export_dir: str | os.PathLike, out: str | os.PathLike, precision: str = "fp16",
               ort_dist: str | os.PathLike | None = None) -> Path:
    """Lay out the static site in ``out``: index.html, the page's modules, ort/, model/."""
    dist = find_onnxruntime_web(ort_dist)
    site = Path(out)
    if site.exists():
        shutil.rmtree(site / "model", ignore_errors=True)
    (site / "ort").mkdir(parents=True, exist_ok=True)
    for file in WEB.iterdir():
        if file.suffix in (".html", ".js"):
            shutil.copy2(file, site / file.name)
    for name in ORT_FILES:
        shutil.copy2(dist / name, site / "ort" / name)
    licence = dist.parent / "LICENSE"
    if licence.is_file():  # onnxruntime-web is MIT-licensed; its licence travels with its files
        shutil.copy2(licence, site / "ort" / "LICENSE")
    copy_export(export_dir, site / "model", precision)
    return site


class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".js": "text/javascript", ".wasm": "application/wasm", ".onnx": "application/octet-stream",
                      ".json": "application/json"}

    def end_headers(self) -> None:
        # Cross-origin isolation: SharedArrayBuffer, hence onnxruntime-web's threads.
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


def make_server(site: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(_Handler, directory=str(site))
    try:
        return http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise InvalidInputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(site: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
          block: bool = True) -> http.server.ThreadingHTTPServer:
    """Serve ``site``; with ``block=False`` return the running server (stop it with ``shutdown()``)."""
    server = make_server(site, host, port)
    if block:
        print(f"serving {site} on http://{host}:{server.server_port}/ (Ctrl-C stops)")
        try:
            server.serve_forever()
        finally:
            server.server_close()
    else:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def launch_static(model: str | None, onnx_dir: str | None, site: str, host: str, port: int,
                  precision: str = "fp16", ort_dist: str | None = None) -> None:
    """Export ``model`` unless ``onnx_dir`` is given (an earlier export in ``site``/../ is reused), build, serve."""
    find_onnxruntime_web(ort_dist)  # fail before a minutes-long export
    if onnx_dir is None:
        from ..pipelines import resolve_model_path

        root = resolve_model_path(model)
        cached = Path(site).with_name(Path(site).name + "-export") / root.name
        if not (cached / MANIFEST).is_file() or (cached / MANIFEST).stat().st_mtime < (root / "pipeline.json").stat().st_mtime:
            from ..export.onnx import export_onnx

            print(f"exporting {root} to {cached} (once; a minute or more)")
            export_onnx(root, cached, precisions=("fp32", precision) if precision != "fp32" else ("fp32",))
        onnx_dir = str(cached)
    built = build_site(onnx_dir, site, precision, ort_dist)
    serve(built, host, port)
