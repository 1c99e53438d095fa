"""Entry point of the `canopy-monitor` command."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from .. import __version__
from ..models import ModelNotFoundError
from ..prompts import PromptError
from . import compare, evaluate, report, train

logger = logging.getLogger("canopy_monitor")


class UsageError(ValueError):
    """A command-line input that cannot be used; printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canopy-monitor",
        description="Measure how a language model's uncertainty is reorganised while it fine-tunes: "
        "canopy entropy CE*, the entropy rate and the length-rate correlation.",
    )
    parser.add_argument("--version", action="version", version=f"canopy-monitor {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log debug messages.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train.add_parser(subparsers)
    evaluate.add_parser(subparsers)
    compare.add_parser(subparsers)
    report.add_parser(subparsers)
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Libraries stay at warning level so that canopy-monitor's own lines are readable.
    for name in ("httpx", "urllib3", "filelock", "datasets", "transformers", "torch"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code: 0 on success, 2 for an input that cannot be used."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _configure_logging(args.verbose)

    try:
        if args.command == "train":
            return train.run(args, extra)
        if args.command == "report":
            return report.run(args)
        if args.command == "compare":
            return compare.run(args)
        return evaluate.run(args)
    except (PromptError, ModelNotFoundError, UsageError, ValueError, FileNotFoundError) as error:
        # Inputs a user can get wrong: one line, no traceback. With --verbose the
        # traceback is logged too, for bug reports. Once training has started, an
        # exception is not an input error and keeps its traceback.
        if getattr(args, "training_started", False):
            raise
        logger.debug("input error", exc_info=True)
        print(f"canopy-monitor {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"canopy-monitor {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
