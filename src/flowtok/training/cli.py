"""``flowtok train`` and ``flowtok pretokenize``."""

from __future__ import annotations

import argparse


def _train(args: argparse.Namespace) -> int:
    from ..commands import check_device
    from .run import build_run

    trainer = build_run(args.config, args.overrides, device=check_device(args.device))
    out = trainer.fit(resume=args.resume, allow_config_change=args.allow_config_change)
    if trainer.is_main:
        print(f"exported to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from .stages import STAGES

    p = sub.add_parser("train", help=f"train a stage ({', '.join(STAGES)}) from a YAML config",
                       description="Train one stage. Example: flowtok train configs/shapes/tokenizer.yaml "
                                   "train.steps=2000 run_dir=runs/tok --resume latest")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4 data.size=64")
    p.add_argument("--resume", default=None,
                   help="'latest' (newest intact checkpoint in the run folder) or a checkpoint folder")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the seed, batch size or data differ from the run's config.yaml")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.set_defaults(func=_train)
    register_pretokenize(sub)


def _pretokenize(args: argparse.Namespace) -> int:

    import torch

    from ..commands import check_device
    from ..config import from_dict
    from ..text import TextEncoderSpec, load_text_encoder
    from ..tokenizer import ImageTokenizer
    from .data import DataConfig, build_source
    from .pretokenize import pretokenize

    device = torch.device(check_device(args.device) or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok = ImageTokenizer.from_pretrained(args.tokenizer, device=device)
    data = from_dict(DataConfig, {"kind": args.data, "path": args.path, "size": tok.config.image_size,
                                  "split": args.split, "num_objects": args.objects, "on_error": args.on_error},
                     "data")
    encoder = load_text_encoder(TextEncoderSpec.parse(args.text_encoder), max_length=tok.config.num_latent_tokens,
                                device=device)
    source = build_source(data, args.seed, device)
    out = pretokenize(source, args.n, args.out, tok, encoder, batch_size=args.batch_size,
                      shard_size=args.shard_size, progress=not args.no_progress)
    print(out)
    return 0


def register_pretokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretokenize", help="encode a dataset once into image latents + text states shards",
                       description="Then train a flow stage on them with data.kind=latents data.path=OUT.")
    p.add_argument("--tokenizer", required=True, help="trained tokenizer folder")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--data", choices=["shapes", "folder", "webdataset"], default="shapes")
    p.add_argument("--path", default=None, help="image folder or shard directory (not for shapes)")
    p.add_argument("--split", choices=["train", "test", "any"], default="train")
    p.add_argument("--objects", type=int, default=None, help="shapes: fixed number of objects")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise")
    p.add_argument("--text-encoder", default="minilm",
                   help='text encoder: a name (minilm) or a JSON spec, e.g. \'{"name": "clip", "path": "..."}\'')
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=50_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_pretokenize)
