"""Paired comparison of two models, or of saved `evaluate` results, on the same prompts."""

from .paired import Comparison, ComparisonSide, GroupComparison, compare_sides, comparison_report
from .saved import SAMPLING_FIELDS, SavedResult, check_saved_prompts, embed_saved_rollouts, is_saved_result, read_saved_result
from .tables import HEADLINE_FIGURES, comparison_tables

__all__ = [
    "HEADLINE_FIGURES",
    "SAMPLING_FIELDS",
    "Comparison",
    "ComparisonSide",
    "GroupComparison",
    "SavedResult",
    "check_saved_prompts",
    "compare_sides",
    "comparison_report",
    "comparison_tables",
    "embed_saved_rollouts",
    "is_saved_result",
    "read_saved_result",
]
