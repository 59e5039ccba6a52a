"""Command-line interface: ``artifactqc <subcommand>``. Argument parsing only; logic lives in the modules."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="artifactqc", description=__doc__)
    parser.add_argument("--version", action="version", version=f"artifactqc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    # --- subcommands: each block adds one parser and sets func=_cmd_<name> ---
    # (add new subcommands above this line)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
