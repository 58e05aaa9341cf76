"""``flowtok export onnx``: a pipeline folder as ONNX graphs plus ``manifest.json``."""

from __future__ import annotations

import argparse
import json

from .manifest import INT8_GRAPHS, PRECISIONS


def _export_onnx(args: argparse.Namespace) -> int:
    from .onnx import export_onnx

    manifest = export_onnx(args.model, args.out, precisions=args.precision, verify=not args.no_verify)
    graphs = json.loads(manifest.read_text())["graphs"]
    for name, entry in graphs.items():
        sizes = ", ".join(f"{p} {entry['bytes'][p] / 2**20:.1f} MiB" for p in entry["files"])
        diffs = entry.get("max_abs_diff")
        check = "" if diffs is None else "; max |onnx - torch| " + ", ".join(f"{p} {d:.2g}" for p, d in diffs.items())
        print(f"{name}: {sizes}{check}")
    print(manifest)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a pipeline for deployment (ONNX)")
    kinds = p.add_subparsers(dest="export_kind", metavar="FORMAT", parser_class=type(p))
    o = kinds.add_parser("onnx", help="every network as an ONNX graph, plus manifest.json",
                         description="Export every network of a pipeline folder as ONNX graphs (dynamic batch) "
                                     "and a manifest.json that the torch-free runtime and the browser page read.")
    o.add_argument("--model", default=None, help="pipeline folder or Hub id (default: the bundled flowtok-shapes)")
    o.add_argument("--out", required=True, help="output folder")
    o.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                   help=f"graph files to write (fp32 always; int8 only for {', '.join(INT8_GRAPHS)})")
    o.add_argument("--no-verify", action="store_true", help="skip running each graph against PyTorch")
    o.set_defaults(func=_export_onnx)
