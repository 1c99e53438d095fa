"""Sinks: where measurements go (the trainer's log, W&B media, JSONL, JSON reports)."""

from .history import HistoryWriter, read_history
from .metrics import METRIC_PREFIX, SEMANTIC_PREFIX, json_safe, scalar_metrics

__all__ = ["METRIC_PREFIX", "SEMANTIC_PREFIX", "HistoryWriter", "json_safe", "read_history", "scalar_metrics"]
