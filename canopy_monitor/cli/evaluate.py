"""`canopy-monitor evaluate`: measure one model with the monitor's engine."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from ..config import SamplingConfig
from ..measurement import measure
from ..models import DEFAULT_MODEL, load_model_and_tokenizer
from ..prompts import load_prompts
from ..sinks.json_report import measurement_report

logger = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    defaults = SamplingConfig()
    parser = subparsers.add_parser(
        "evaluate",
        help="Measure canopy entropy and the length-rate correlation of one model.",
        description="Sample rollouts of held-out prompts from one model and write every figure as JSON.",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Local directory, hub id, or the alias {DEFAULT_MODEL} (default).",
    )
    parser.add_argument("--prompts", required=True, help="JSON or JSONL file whose objects have a `prompt` field.")
    parser.add_argument("--num-prompts", type=int, default=None, help="Use the first P prompts (default: all).")
    parser.add_argument("--rollouts", type=int, default=defaults.num_rollouts, help="Rollouts per prompt, at least 2 (default: %(default)s).")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="Length cap T in tokens (default: %(default)s).")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="Sampling temperature (default: %(default)s).")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="Top-k filter; 0 disables it (default: %(default)s).")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="Nucleus filter; 1.0 disables it (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="Seed of the sampler's random stream (default: %(default)s).")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="Maximum rollouts generated together (default: %(default)s).")
    parser.add_argument("--no-chat-template", action="store_true", help="Feed prompts as plain text, without the chat template.")
    parser.add_argument("--device", default=None, help="Torch device, e.g. cpu or cuda:0 (default: cuda if available, else cpu).")
    parser.add_argument("--dtype", default=None, help="Model dtype, e.g. float32 or bfloat16 (default: as stored).")
    parser.add_argument("--output", required=True, help="Path of the JSON file to write.")
    return parser


def run(args: argparse.Namespace) -> int:
    """Check every input, measure, write the JSON and print a summary. Returns the exit code."""
    config = SamplingConfig(
        num_rollouts=args.rollouts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        use_chat_template=not args.no_chat_template,
        batch_size=args.batch_size,
    )
    prompts = load_prompts(args.prompts, limit=args.num_prompts)
    output = Path(args.output)
    if output.parent and not output.parent.exists():
        output.parent.mkdir(parents=True, exist_ok=True)

    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=device)
    logger.info(
        "evaluating %s on %d prompts x %d rollouts, cap %d tokens", args.model, len(prompts), config.num_rollouts, config.max_new_tokens
    )

    measurement = measure(model, tokenizer, prompts, config, show_progress=True)
    for reason, count in measurement.pooled.undefined.items():
        logger.warning("NaN in %d prompt(s): %s", count, reason)

    report = measurement_report(measurement, model=args.model, prompts_file=os.fspath(args.prompts))
    output.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")

    pooled = measurement.pooled
    print(
        f"CE* = {pooled.ce_star:.3f} ± {pooled.ce_star_se:.3f} nats (Monte Carlo {pooled.ce_star_mc:.3f}), "
        f"entropy rate = {pooled.entropy_rate:.3f} nats/token, mean length = {pooled.mean_length:.1f}, "
        f"rho(N, r) = {pooled.rho_length_rate:.3f}, truncation = {pooled.truncation_rate:.2f} "
        f"({measurement.seconds:.1f} s)"
    )
    print(f"wrote {output}")
    return 0
