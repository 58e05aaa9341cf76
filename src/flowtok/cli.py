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

from .errors import FlowTokError, missing_dependency

# Modules that add sub-commands, each with ``register(subparsers) -> None``, and the commands they add
# (listed here so that a group whose module needs a missing optional dependency still answers by name).
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "flowtok.commands": ("generate", "caption", "showcase", "assemble", "demo"),
    "flowtok.data.cli": ("data",),
    "flowtok.training.cli": ("train", "pretokenize"),
    "flowtok.eval.cli": ("eval",),
    "flowtok.convert": ("convert",),
    "flowtok.export.cli": ("export",),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line + exit 2, as argparse does, without usage spam
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flowtok", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, commands in COMMAND_MODULES.items():
        try:
            importlib.import_module(name).register(sub)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that command group is not built yet
                continue
            if missing_dependency(exc, "") is None:
                raise
            for command in commands:  # e.g. `train` where torch is not installed: say so when it is run
                if command not in sub.choices:
                    p = sub.add_parser(command, help=f"({missing_dependency(exc, 'it')})", add_help=False, prefix_chars="\0")
                    p.add_argument("rest", nargs=argparse.REMAINDER)
                    p.set_defaults(func=_missing(exc))
    return parser


def _missing(exc: ModuleNotFoundError):
    def run(args: argparse.Namespace) -> int:
        raise exc
    return run


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
    except ModuleNotFoundError as exc:  # an optional dependency this command needs (torch for most)
        message = missing_dependency(exc, f"`flowtok {args.command}`")
        if message is None:
            raise
        print(f"flowtok: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowtok: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
