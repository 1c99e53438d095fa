"""`canopy-monitor report`: write an offline HTML report of a monitored training run."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report",
        help="Write an HTML report, with PNG figures, of a run monitored by CanopyMonitorCallback.",
        description="Read the monitoring history and rollout records of a training run and write one "
        "self-contained HTML page, plus its figures as PNG files. The run may still be training.",
    )
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="The trainer's output_dir, which contains canopy_monitor/history.jsonl.",
    )
    parser.add_argument(
        "--output",
        metavar="DIR",
        default=None,
        help="Folder for the page (report.html) and its PNG figures (default: RUN_DIR/canopy_monitor/report).",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Write the report, print the path of its page and return the exit code."""
    # Imported here so that the other commands do not load matplotlib.
    from ..report import write_report

    page = write_report(args.run_dir, args.output)
    print(page)
    return 0
