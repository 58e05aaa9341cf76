"""``flowtok train`` and ``flowtok pretokenize``."""

from __future__ import annotations

import argparse


def _train(args: argparse.Namespace) -> int:
    from ..commands import check_device
    from .run import build_run

    trainer = build_run(args.config, args.overrides, device=check_device(args.device), resume=args.resume)
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
    import os

    import torch
    import torch.distributed as dist

    from ..commands import check_device
    from ..config import from_dict
    from ..text import TextEncoderSpec, load_text_encoder
    from ..tokenizer import ImageTokenizer
    from .data import DataConfig
    from .pretokenize import pretokenize

    # Under torchrun every rank encodes its share of the shards; gloo is enough for the one barrier.
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(check_device(args.device) or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tok = ImageTokenizer.from_pretrained(args.tokenizer, device=device).eval()
    data = from_dict(DataConfig, {"kind": args.data, "path": args.path, "size": tok.config.image_size,
                                  "split": args.split, "num_objects": args.objects, "on_error": args.on_error,
                                  "world": args.world},
                     "data")
    # Only the text encoder's tokenizer is used here (its network runs in the training step); a CPU copy.
    encoder = load_text_encoder(TextEncoderSpec.parse(args.text_encoder), max_length=tok.config.num_latent_tokens,
                                device="cpu")
    out = pretokenize(data, args.out, tok, encoder, n=args.n, batch_size=args.batch_size,
                      shard_size=args.shard_size, seed=args.seed, workers=args.workers, rank=rank, world=world,
                      progress=not args.no_progress)
    if world > 1:
        dist.destroy_process_group()
    if rank == 0:
        print(out)
    return 0


def register_pretokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretokenize", help="encode a dataset once into compact token shards (posterior + caption ids)",
                       description="Then train a flow stage on them with data.kind=tokens data.path=OUT. On several "
                                   "GPUs: torchrun --nproc_per_node N -m flowtok.cli pretokenize ...; a killed run "
                                   "resumes (finished shards are skipped).")
    p.add_argument("--tokenizer", required=True, help="trained tokenizer folder")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=None,
                   help="number of samples (required for shapes; folders stop at their end; not for webdataset)")
    p.add_argument("--data", choices=["shapes", "folder", "webdataset"], default="shapes")
    p.add_argument("--path", default=None, help="image folder or shard directory / brace pattern (not for shapes)")
    p.add_argument("--split", choices=["train", "test", "any"], default="train")
    p.add_argument("--objects", type=int, default=None, help="shapes: fixed number of objects")
    p.add_argument("--world", choices=["v1", "v2"], default="v2",
                   help="shapes: v2 varies the drawings (default); v1 is the original canonical drawing")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise")
    p.add_argument("--text-encoder", default="minilm",
                   help='text encoder: a name (minilm) or a JSON spec, e.g. \'{"name": "clip", "path": "..."}\'; '
                        "its tokenizer makes the stored ids, and the training config must name the same encoder")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=50_000)
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes for decoding and tokenising")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_pretokenize)
