"""``flowtok train`` and ``flowtok pretokenize``."""

from __future__ import annotations

import argparse


def _train(args: argparse.Namespace) -> int:
    from .run import build_run

    trainer = build_run(args.config, args.overrides, device=args.device)
    out = trainer.fit(resume=args.resume)
    if trainer.is_main:
        print(f"exported to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a stage (tokenizer, t2i, text_decoder, i2t) from a YAML config",
                       description="Train one stage. Example: flowtok train configs/shapes/tokenizer.yaml "
                                   "train.steps=2000 run_dir=runs/tok --resume latest")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4 data.size=64")
    p.add_argument("--resume", default=None,
                   help="'latest' (newest intact checkpoint in the run folder) or a checkpoint folder")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.set_defaults(func=_train)
