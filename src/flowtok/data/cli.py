"""``flowtok data ...``: dataset tools (``flowtok data shapes`` writes the captioned-shapes world;
``flowtok data merge`` joins pre-tokenised folders into one training set)."""

from __future__ import annotations

import argparse
import logging
import time

logger = logging.getLogger(__name__)


def _shapes(args: argparse.Namespace) -> int:
    from ..shapes import export_shapes

    start = time.perf_counter()
    out = export_shapes(args.out, args.n, seed=args.seed, size=args.size, split=args.split,
                        num_objects=args.objects, shards=args.shards, shard_size=args.shard_size,
                        progress=not args.no_progress, world=args.world)
    form = "tar shards" if args.shards else "images + captions.jsonl"
    print(f"wrote {args.n} samples ({form}) to {out} in {time.perf_counter() - start:.1f}s")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .tokens import merge

    meta = merge(args.folders, args.out, copy=args.copy)
    mix = meta.get("worlds") or meta.get("world") or "-"
    print(f"merged {len(args.folders)} folders into {args.out}: {meta['n']} samples in {len(meta['shards'])} "
          f"shards (source {meta['source']}, world {mix})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="dataset tools")
    sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", parser_class=type(data))
    data.set_defaults(func=lambda _args: data.print_help() or 2)

    p = sub.add_parser("shapes", help="write captioned-shapes images as a folder or webdataset shards")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="stream seed; sample i depends only on (seed, i)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (64 to 512)")
    p.add_argument("--split", choices=("train", "test", "any"), default="train",
                   help="held-out rule: train prompts, test-only prompts, or both")
    p.add_argument("--objects", type=int, choices=(1, 2, 3), default=None,
                   help="objects per scene (default: 1 to 3 at random)")
    p.add_argument("--world", choices=("v1", "v2"), default="v2",
                   help="v2: positions, sizes, rotations, shades, backgrounds and styles vary (default); "
                        "v1: the original canonical drawings")
    p.add_argument("--shards", action="store_true", help="write webdataset tar shards instead of a folder")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_shapes)

    p = sub.add_parser("merge",
                       help="join pre-tokenised folders (same tokenizer and text encoder) into one set")
    p.add_argument("folders", nargs="+", help="folders written by 'flowtok pretokenize'")
    p.add_argument("--out", required=True,
                   help="new folder: shards are hard-linked in, meta.json written last")
    p.add_argument("--copy", action="store_true", help="copy the shards instead of hard-linking them")
    p.set_defaults(func=_merge)
