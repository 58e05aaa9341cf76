"""The ``flowtok`` command line: the only place that parses argv.

Each command group lives beside the code it drives and exposes ``register(subparsers)``; this
module collects them, runs the chosen one, and turns every :class:`FlowTokError` into one line on
stderr with exit code 2 (never a traceback for a user's mistake).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import NoReturn

from .errors import FlowTokError

# Modules that add sub-commands; each has ``register(subparsers) -> None``.
COMMAND_MODULES = (
    "flowtok.commands",        # generate, caption, showcase, demo
    "flowtok.data.cli",        # data shapes
    "flowtok.training.cli",    # train, pretokenize
    "flowtok.eval.cli",        # eval t2i / i2t / recon
    "flowtok.convert",         # convert --from-official
    "flowtok.export.cli",      # export onnx
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line + exit 2, as argparse does, without usage spam
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flowtok", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that command group is not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            # `flowtok train cfg --device cpu a=b`: key=value overrides may follow the options.
            if getattr(args, "overrides", None) is not None and all("=" in e and not e.startswith("-") for e in extra):
                args.overrides.extend(extra)
            else:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # argparse's own exit (usage error or --help): a code, not an exception
        return int(exc.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except FlowTokError as exc:
        print(f"flowtok: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowtok: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
