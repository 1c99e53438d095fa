"""Paired comparison of two models (or saved results) on the same prompts.

Both sides are measured on the same prompts with the same decoding policy, rollout
count, cap and seed, so rollout `j` of prompt `i` draws from the same uniforms on both
sides (common random numbers). Every interval comes from one paired percentile
bootstrap: each resample draws one set of prompt indices and pools both sides over it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ..estimators import BootstrapConfig, FigureChange, PromptEstimates, SemanticPromptEstimates
from ..estimators.change import paired_change, paired_semantic_change
from ..prompts import Prompt
from ..sinks.metrics import SEMANTIC_PREFIX, json_safe
from ..sinks.units import check_units, convert_flat, convert_nested


@dataclass(frozen=True)
class ComparisonSide:
    """One side of a comparison: the per-prompt estimates of a model or of a saved result, in nats.

    Attributes:
        source: the model reference or the saved result's path, as given.
        description: the source's entry in the JSON's `config` (its kind, the model, an
            adapter's base model, ...).
        estimates: per prompt, in prompt order.
        semantic: per prompt semantic estimates, when semantic diversity was measured.
    """

    source: str
    description: dict[str, Any]
    estimates: list[PromptEstimates]
    semantic: list[SemanticPromptEstimates] | None = None


@dataclass(frozen=True)
class GroupComparison:
    """The change of every pooled figure over one group of prompts (all of them, or one prompt set).

    Attributes:
        name: `"overall"` or the prompt set's name.
        prompt_indices: positions of the group's prompts in the full prompt list.
        changes: `{figure: FigureChange}` by flat figure name, semantic figures prefixed
            with `semantic/`. Only figures that both sides define are present.
    """

    name: str
    prompt_indices: tuple[int, ...]
    changes: dict[str, FigureChange] = field(default_factory=dict)


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of two sides.

    Attributes:
        overall: over every prompt.
        prompt_sets: one per prompt set, in the order the sets first appear.
        prompt_set_of: the set of each prompt.
        bootstrap: the paired bootstrap behind every interval.
    """

    overall: GroupComparison
    prompt_sets: list[GroupComparison]
    prompt_set_of: tuple[str, ...]
    bootstrap: BootstrapConfig


def compare_sides(
    base: ComparisonSide,
    tuned: ComparisonSide,
    *,
    prompt_sets: Sequence[str] | None = None,
    bootstrap: BootstrapConfig = BootstrapConfig(),
) -> Comparison:
    """Compare two sides over all prompts and over each prompt set, with paired bootstrap intervals.

    The semantic figures are compared when both sides have them. Within a prompt set the
    across-prompt slope of diversity on entropy rate has no prompt-set control.

    Raises:
        `ValueError`: the sides, or `prompt_sets`, differ in their number of prompts.
    """
    num_prompts = len(base.estimates)
    if len(tuned.estimates) != num_prompts:
        raise ValueError(
            f"both sides need the same prompts, got {num_prompts} and {len(tuned.estimates)} prompts"
        )
    sets = tuple(prompt_sets) if prompt_sets is not None else ("",) * num_prompts
    if len(sets) != num_prompts:
        raise ValueError(f"prompt_sets needs one name per prompt ({num_prompts}), got {len(sets)}")

    overall = _compare_group("overall", tuple(range(num_prompts)), base, tuned, sets, bootstrap)
    groups = []
    for name in dict.fromkeys(sets):
        indices = tuple(index for index, set_name in enumerate(sets) if set_name == name)
        groups.append(_compare_group(name, indices, base, tuned, sets, bootstrap))
    return Comparison(overall=overall, prompt_sets=groups, prompt_set_of=sets, bootstrap=bootstrap)


def _compare_group(
    name: str,
    indices: tuple[int, ...],
    base: ComparisonSide,
    tuned: ComparisonSide,
    sets: tuple[str, ...],
    bootstrap: BootstrapConfig,
) -> GroupComparison:
    before = [base.estimates[index] for index in indices]
    after = [tuned.estimates[index] for index in indices]
    changes = dict(paired_change(before, after, bootstrap))
    if base.semantic is not None and tuned.semantic is not None:
        semantic = paired_semantic_change(
            [base.semantic[index] for index in indices],
            [tuned.semantic[index] for index in indices],
            before_estimates=before,
            after_estimates=after,
            prompt_sets=[sets[index] for index in indices],
            bootstrap=bootstrap,
        )
        changes.update({SEMANTIC_PREFIX + figure: change for figure, change in semantic.items()})
    return GroupComparison(name=name, prompt_indices=indices, changes=changes)


def comparison_report(
    comparison: Comparison,
    base: ComparisonSide,
    tuned: ComparisonSide,
    *,
    prompts: Sequence[Prompt],
    units: str = "nats",
    config: dict[str, Any] | None = None,
    warnings: Sequence[str] = (),
    seconds: dict[str, float] | None = None,
) -> dict:
    """Build the JSON document of a comparison.

    The top level has `config` (both sources, the settings passed in `config`, `units`
    and the bootstrap) and the figures over all prompts: `num_prompts`, `base` and
    `tuned` (`{figure: value}`), `delta` and `relative_delta` (`{figure: {"value",
    "ci_low", "ci_high"}}`). `prompt_sets` maps each set's name to the same five entries.
    Each entry of `prompts` has the prompt's text and set, each side's figures, and the
    `delta` of each scalar figure. Entropy-valued figures and their differences are in `units`; relative
    differences have no unit. NaN becomes `null`.
    """
    check_units(units)
    document = {
        "config": {
            **(config or {}),
            "base": {"source": base.source, **base.description},
            "tuned": {"source": tuned.source, **tuned.description},
            "num_prompts": len(comparison.overall.prompt_indices),
            "units": units,
            "bootstrap": {**comparison.bootstrap.to_dict(), "paired": True},
        },
        **_group_document(comparison.overall, units),
        "prompt_sets": {group.name: _group_document(group, units) for group in comparison.prompt_sets},
        "prompts": [
            _prompt_document(index, prompt, base, tuned, comparison.prompt_set_of[index], units)
            for index, prompt in enumerate(prompts)
        ],
        "warnings": list(warnings),
        "seconds": dict(seconds or {}),
    }
    return json_safe(document)


def _group_document(group: GroupComparison, units: str) -> dict:
    changes = group.changes

    def converted(read) -> dict[str, float]:
        return convert_flat({name: read(change) for name, change in changes.items()}, units)

    values = converted(lambda change: change.delta)
    lows = converted(lambda change: change.ci_low)
    highs = converted(lambda change: change.ci_high)
    return {
        "num_prompts": len(group.prompt_indices),
        "base": converted(lambda change: change.before),
        "tuned": converted(lambda change: change.after),
        "delta": {name: {"value": values[name], "ci_low": lows[name], "ci_high": highs[name]} for name in changes},
        "relative_delta": {
            name: {"value": change.relative_change, "ci_low": change.relative_ci_low, "ci_high": change.relative_ci_high}
            for name, change in changes.items()
        },
    }


def _prompt_document(
    index: int, prompt: Prompt, base: ComparisonSide, tuned: ComparisonSide, prompt_set: str, units: str
) -> dict:
    sides = {}
    scalars = {}
    for label, side in (("base", base), ("tuned", tuned)):
        figures = side.estimates[index].to_dict()
        flat = {name: value for name, value in figures.items() if isinstance(value, float)}
        if side.semantic is not None:
            semantic = side.semantic[index].to_dict()
            semantic.pop("rollout_diversity")
            figures["semantic"] = semantic
            flat.update(
                {SEMANTIC_PREFIX + name: value for name, value in semantic.items() if isinstance(value, float)}
            )
        sides[label] = convert_nested(figures, units)
        scalars[label] = flat
    delta = {name: scalars["tuned"][name] - value for name, value in scalars["base"].items() if name in scalars["tuned"]}
    entry: dict[str, Any] = {"prompt": prompt.display}
    if prompt.messages is not None:
        entry["messages"] = [dict(message) for message in prompt.messages]
    entry.update(
        {"prompt_set": prompt_set, "base": sides["base"], "tuned": sides["tuned"], "delta": convert_flat(delta, units)}
    )
    return entry
