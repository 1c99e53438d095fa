"""The comparison as tables: plain text for the terminal, and Markdown."""

from __future__ import annotations

import math
from typing import Sequence

from ..estimators import FigureChange
from ..measurement import format_share
from ..sinks.units import is_entropy_valued, unit_factor
from .paired import Comparison, GroupComparison

# Rows of every table: (flat figure name, label). `{u}` becomes the entropy unit.
HEADLINE_FIGURES = (
    ("ce_star", "CE* ({u})"),
    ("entropy_rate", "entropy rate ({u}/token)"),
    ("mean_length", "mean length (tokens)"),
    ("rho_length_rate", "rho(N, r)"),
    ("length_driven", "length-driven E[N]E[r] ({u})"),
    ("conveyance", "conveyance Cov(N, r) ({u})"),
    ("truncation_rate", "truncation rate"),
    ("semantic/diversity", "semantic diversity"),
    ("semantic/vendi_score", "Vendi score"),
)
MISSING = "n/a"


def comparison_tables(comparison: Comparison, *, units: str = "nats", markdown: bool = False) -> str:
    """Format one table per prompt set (when there are several) and one over all prompts.

    Each row is a headline figure that both sides define. The columns are the base and
    tuned values, their difference with its paired bootstrap interval, and the relative
    change `delta / |base|` with its interval from the same resamples.
    """
    groups: list[tuple[str, GroupComparison]] = []
    if len(comparison.prompt_sets) > 1:
        groups += [(f"prompt set {group.name}", group) for group in comparison.prompt_sets]
    groups.append(("all prompts", comparison.overall))
    bootstrap = comparison.bootstrap
    interval = f"{format_share(bootstrap.confidence)} CI" if bootstrap.samples > 0 else "no CI"
    header = ["figure", "base", "tuned", f"delta [{interval}]", f"relative change [{interval}]"]

    blocks = []
    for title, group in groups:
        rows = [_row(label.format(u=units), group.changes[name], is_entropy_valued(name), units)
                for name, label in HEADLINE_FIGURES if name in group.changes]
        heading = f"{title} ({len(group.prompt_indices)} prompts)"
        if markdown:
            blocks.append(f"### {heading}\n\n" + _markdown_table(header, rows))
        else:
            blocks.append(f"{heading}\n" + _text_table(header, rows))
    return "\n\n".join(blocks) + "\n"


def _row(label: str, change: FigureChange, entropy_valued: bool, units: str) -> list[str]:
    factor = unit_factor(units) if entropy_valued else 1.0
    delta = _signed(change.delta * factor)
    if not (math.isnan(change.ci_low) or math.isnan(change.ci_high)):
        delta += f" [{_signed(change.ci_low * factor)}, {_signed(change.ci_high * factor)}]"
    relative = _percent(change.relative_change)
    if not (math.isnan(change.relative_ci_low) or math.isnan(change.relative_ci_high)):
        relative += f" [{_percent(change.relative_ci_low)}, {_percent(change.relative_ci_high)}]"
    return [label, _plain(change.before * factor), _plain(change.after * factor), delta, relative]


def _digits(value: float) -> int:
    magnitude = abs(value)
    if magnitude >= 100:
        return 1
    if magnitude >= 10:
        return 2
    return 3


def _plain(value: float) -> str:
    return MISSING if not math.isfinite(value) else f"{value:.{_digits(value)}f}"


def _signed(value: float) -> str:
    return MISSING if not math.isfinite(value) else f"{value:+.{_digits(value)}f}"


def _percent(value: float) -> str:
    return MISSING if not math.isfinite(value) else f"{value * 100:+.1f}%"


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(line[column]) for line in [header, *rows]) for column in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)
