"""`canopy-monitor evaluate`: measure one model with the monitor's engine."""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
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
    if args.num_prompts is not None and args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be a positive integer, got {args.num_prompts}.")
    prompts = load_prompts(args.prompts, limit=args.num_prompts)
    device = _resolve_device(args.device)
    output = _prepare_output(Path(args.output))
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=device)
    logger.info(
        "evaluating %s on %d prompts x %d rollouts, cap %d tokens", args.model, len(prompts), config.num_rollouts, config.max_new_tokens
    )

    measurement = measure(model, tokenizer, prompts, config, show_progress=True)
    for reason, count in measurement.pooled.undefined.items():
        logger.warning("NaN in %d prompt(s): %s", count, reason)

    report = measurement_report(measurement, model=args.model, prompts_file=os.fspath(args.prompts))
    _write_atomically(output, json.dumps(report, indent=2, allow_nan=False) + "\n")

    pooled = measurement.pooled
    print(
        f"CE* = {pooled.ce_star:.3f} ± {pooled.ce_star_se:.3f} nats (Monte Carlo {pooled.ce_star_mc:.3f}), "
        f"entropy rate = {pooled.entropy_rate:.3f} nats/token, mean length = {pooled.mean_length:.1f}, "
        f"rho(N, r) = {pooled.rho_length_rate:.3f}, truncation = {pooled.truncation_rate:.2f} "
        f"({measurement.seconds:.1f} s)"
    )
    print(f"wrote {output}")
    return 0


def _resolve_device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device; expected e.g. cpu, cuda or cuda:1.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} was requested, but this torch build has no CUDA device available.")
    return name


def _prepare_output(output: Path) -> Path:
    """Check that `output` can be written, before any time is spent measuring.

    Creates its folder when missing, and raises `ValueError` when the path is a
    folder or the folder cannot be created or written to.
    """
    if output.is_dir():
        raise ValueError(f"--output {str(output)!r} is a directory; expected a file path such as result.json.")
    if output.exists() and not output.is_file():
        # The result is renamed into place, which would replace a device or a pipe.
        raise ValueError(f"--output {str(output)!r} exists and is not a regular file.")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output.parent, prefix=f".{output.name}.", delete=True):
            pass
    except OSError as error:
        raise ValueError(f"--output {str(output)!r} cannot be written: {error.strerror or error}.") from None
    return output


def _write_atomically(output: Path, text: str) -> None:
    """Write `text` to a temporary file beside `output` and rename it into place,
    so a failed write never leaves a half-written result."""
    temporary = None
    try:
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=output.parent, prefix=f".{output.name}.", suffix=".tmp", delete=False
        ) as handle:
            temporary = Path(handle.name)
            handle.write(text)
        os.replace(temporary, output)
    except OSError as error:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        raise ValueError(f"Failed to write --output {str(output)!r}: {error.strerror or error}.") from None
