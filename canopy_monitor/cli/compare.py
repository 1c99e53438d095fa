"""`canopy-monitor compare`: what fine-tuning did to a model's generation space.

Both sides are sampled on the same prompts with the same decoding policy, rollout count,
cap and seed, one model after the other, and every difference gets a paired bootstrap
interval over prompts. Either side may instead be a saved `evaluate` result, whose
sampling settings must then match.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..comparison import (
    SAMPLING_FIELDS,
    ComparisonSide,
    SavedResult,
    check_saved_prompts,
    compare_sides,
    comparison_report,
    comparison_tables,
    embed_saved_rollouts,
    is_saved_result,
    read_saved_result,
)
from ..config import SamplingConfig
from ..estimators import default_running_positions, pool_prompts
from ..measurement import Measurement, check_truncation_threshold, format_share, measure
from ..models import ModelNotFoundError, check_model_config, is_adapter_directory, load_model_and_tokenizer, resolve_model_path
from ..prompts import Prompt
from ..semantic import SentenceEmbedder
from ..sinks.json_report import measurement_report
from .evaluate import (
    add_estimation_arguments,
    add_sampling_arguments,
    add_semantic_arguments,
    bootstrap_config,
    load_prompt_sets,
    parse_running_positions,
    prepare_output,
    resolve_device,
    sampling_config,
    semantic_embedder,
    write_atomically,
)

logger = logging.getLogger(__name__)

SIDES = ("base", "tuned")
# The option that sets each `SamplingConfig` field of `SAMPLING_FIELDS`.
_OPTIONS = {
    "num_rollouts": "--rollouts",
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "seed": "--seed",
    "use_chat_template": "--no-chat-template",
}
_SOURCE_HELP = (
    "Local model directory, PEFT adapter directory (such as a LoRA run's output_dir or checkpoint-<step>), "
    "hub id, the alias smollm2-135m-instruct, or the JSON result of canopy-monitor evaluate."
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compare",
        help="Compare a base and a fine-tuned model on the same prompts, with paired bootstrap intervals.",
        description="Sample both models with the same prompts, decoding policy, rollout count, cap and seed, "
        "and report each figure of both, their difference and relative change, with paired bootstrap intervals "
        "over prompts, per prompt set and overall.",
    )
    parser.add_argument("--base", required=True, metavar="MODEL_OR_JSON", help=f"The reference side. {_SOURCE_HELP}")
    parser.add_argument("--tuned", required=True, metavar="MODEL_OR_JSON", help=f"The fine-tuned side. {_SOURCE_HELP}")
    add_sampling_arguments(parser, from_saved_results=True)
    add_estimation_arguments(parser)
    add_semantic_arguments(parser)
    parser.add_argument("--output", default=None, metavar="OUT.json", help="Path of the JSON file to write (default: none).")
    parser.add_argument("--markdown", default=None, metavar="FILE", help="Also write the tables as Markdown to FILE.")
    parser.add_argument(
        "--save-results",
        default=None,
        metavar="DIR",
        help="Write each side sampled here as an evaluate result, DIR/base.json and DIR/tuned.json, "
        "which later comparisons can take as --base or --tuned.",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Check every input, measure or read both sides, compare, write and print. Returns the exit code."""
    saved = {
        side: read_saved_result(getattr(args, side), f"--{side}")
        for side in SIDES
        if is_saved_result(getattr(args, side))
    }
    config = _resolve_sampling(args, saved)
    running_positions = _resolve_running_positions(args, saved, config.max_new_tokens)
    bootstrap = bootstrap_config(args, seed=config.seed)
    check_truncation_threshold(args.truncation_warning, "--truncation-warning")
    embedder = semantic_embedder(args)
    prompts, prompt_sets = load_prompt_sets(args.prompts, args.num_prompts)
    for side, result in saved.items():
        check_saved_prompts(result, prompts, f"--{side}")
    # A missing model or adapter base fails here, before any sampling time is spent.
    descriptions = {}
    for side in SIDES:
        if side in saved:
            continue
        try:
            descriptions[side] = _describe_model(getattr(args, side))
        except ModelNotFoundError as error:
            # Name the option, because both sides take the same kinds of reference.
            raise ModelNotFoundError(
                f"--{side}: {error} It may also be the .json result of canopy-monitor evaluate."
            ) from None
    device = resolve_device(args.device)
    outputs = _prepare_outputs(args)
    if embedder is not None and any(
        side not in saved or not _reusable_semantic(saved[side], args.embedding_model) for side in SIDES
    ):
        # Before sampling, so that a bad embedding model costs no sampling time.
        embedder.load(device)

    sides: dict[str, ComparisonSide] = {}
    seconds: dict[str, float] = {}
    warnings: list[str] = []
    for side in SIDES:
        if side in saved:
            sides[side] = _saved_side(saved[side], embedder, device)
        else:
            measurement = _measure_model(
                getattr(args, side), side, args, prompts, prompt_sets, config, bootstrap, running_positions, embedder, device
            )
            seconds[side] = measurement.seconds
            sides[side] = ComparisonSide(
                source=getattr(args, side),
                description=descriptions[side],
                estimates=measurement.estimates,
                semantic=measurement.semantic.prompts if measurement.semantic is not None else None,
            )
            if "results" in outputs:
                _save_result(measurement, side, args, outputs["results"] / f"{side}.json")
        warning = _truncation_warning(side, sides[side], config, args.truncation_warning)
        if warning is not None:
            logger.warning(warning)
            warnings.append(warning)

    started = time.perf_counter()
    comparison = compare_sides(sides["base"], sides["tuned"], prompt_sets=prompt_sets, bootstrap=bootstrap)
    seconds["comparison"] = time.perf_counter() - started

    heading = _settings_line(config, len(prompts), bootstrap.samples)
    print(f"base:  {args.base}\ntuned: {args.tuned}\n{heading}\n")
    print(comparison_tables(comparison, units=args.units), end="")
    if "output" in outputs:
        settings = {
            "prompts_file": _prompts_files(args),
            **{name: getattr(config, name) for name in SAMPLING_FIELDS},
            "running_positions": list(running_positions),
        }
        if args.semantic:
            settings["embedding_model"] = args.embedding_model
        document = comparison_report(
            comparison,
            sides["base"],
            sides["tuned"],
            prompts=prompts,
            units=args.units,
            config=settings,
            warnings=warnings,
            seconds=seconds,
        )
        write_atomically(outputs["output"], json.dumps(document, indent=2, allow_nan=False) + "\n")
        print(f"wrote {outputs['output']}")
    if "markdown" in outputs:
        markdown = f"Base: `{args.base}`  \nTuned: `{args.tuned}`  \n{heading}\n\n"
        markdown += comparison_tables(comparison, units=args.units, markdown=True)
        write_atomically(outputs["markdown"], markdown, option="--markdown")
        print(f"wrote {outputs['markdown']}")
    return 0


def _prompts_files(args: argparse.Namespace) -> str | list[str]:
    files = [os.fspath(path) for path in args.prompts]
    return files[0] if len(files) == 1 else files


def _save_result(measurement: Measurement, side: str, args: argparse.Namespace, path: Path) -> None:
    """Write one sampled side as an `evaluate` result, for reuse as `--base` or `--tuned`."""
    report = measurement_report(measurement, units=args.units, model=getattr(args, side), prompts_file=_prompts_files(args))
    write_atomically(path, json.dumps(report, indent=2, allow_nan=False) + "\n", option="--save-results")
    logger.info("wrote the %s side's result to %s", side, path)


def _resolve_sampling(args: argparse.Namespace, saved: dict[str, SavedResult]) -> SamplingConfig:
    """Return the sampling settings of both sides: an option given, else a saved result's, else the default.

    Raises:
        `ValueError`: an option and a saved result, or the two saved results, disagree.
    """
    requested = {
        "num_rollouts": args.rollouts,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "use_chat_template": None if args.no_chat_template is None else not args.no_chat_template,
    }
    fallback = {}
    for name in SAMPLING_FIELDS:
        sources = []
        if requested[name] is not None:
            sources.append((f"{_OPTIONS[name]} gives", requested[name]))
        sources += [(f"--{side} {result.path!r} was sampled with", result.settings[name]) for side, result in saved.items()]
        if not sources:
            continue
        first_source, first_value = sources[0]
        for source, value in sources[1:]:
            if value != first_value:
                raise ValueError(
                    f"The sampling settings differ: {first_source} {name} = {first_value!r}, but {source} "
                    f"{name} = {value!r}. Both sides must be sampled alike, so pass the saved result's "
                    "settings, or sample the model again."
                )
        fallback[name] = first_value
    return sampling_config(args, **fallback)


def _resolve_running_positions(
    args: argparse.Namespace, saved: dict[str, SavedResult], max_new_tokens: int
) -> tuple[int, ...]:
    """Return the running positions to measure: `--running-positions`, else a saved result's, else the default."""
    positions = parse_running_positions(args.running_positions, max_new_tokens)
    if positions is None:
        for result in saved.values():
            return result.running_positions
        return default_running_positions(max_new_tokens)
    for side, result in saved.items():
        missing = sorted(set(positions) - set(result.running_positions))
        if missing:
            logger.warning(
                "--%s %s has no running entropy rate at position(s) %s, so the comparison leaves them out.",
                side,
                result.path,
                missing,
            )
    return positions


def _reusable_semantic(result: SavedResult, embedding_model: str) -> bool:
    return result.semantic is not None and result.embedding_model == embedding_model


def _saved_side(result: SavedResult, embedder: SentenceEmbedder | None, device: str) -> ComparisonSide:
    """Turn a saved result into a side. With an embedder, its semantic estimates are reused or computed."""
    semantic = None
    if embedder is not None:
        if _reusable_semantic(result, embedder.model_name):
            semantic = result.semantic
        else:
            logger.info("embedding the saved rollouts of %s with %s", result.path, embedder.model_name)
            semantic, _ = embed_saved_rollouts(result, embedder, device)
    description = {"kind": "saved result", "model": result.model, "units": result.units}
    return ComparisonSide(source=result.path, description=description, estimates=result.estimates, semantic=semantic)


def _describe_model(reference: str) -> dict[str, Any]:
    """Describe a model reference for the JSON's config.

    Raises:
        `ModelNotFoundError`: the reference, or an adapter's base model, resolves to no model.
    """
    base = check_model_config(reference)
    if is_adapter_directory(resolve_model_path(reference)):
        return {"kind": "adapter", "model": reference, "adapter_base_model": base}
    return {"kind": "model", "model": reference}


def _measure_model(
    reference: str,
    side: str,
    args: argparse.Namespace,
    prompts: list[Prompt],
    prompt_sets: list[str],
    config: SamplingConfig,
    bootstrap,
    running_positions,
    embedder: SentenceEmbedder | None,
    device: str,
) -> Measurement:
    """Load one model, measure it and free it again, so that only one model is in memory at a time."""
    model, tokenizer = load_model_and_tokenizer(reference, dtype=args.dtype, device=device)
    logger.info(
        "sampling the %s side, %s, on %d prompts x %d rollouts, cap %d tokens",
        side,
        reference,
        len(prompts),
        config.num_rollouts,
        config.max_new_tokens,
    )
    try:
        return measure(
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
    finally:
        del model, tokenizer
        gc.collect()
        _empty_device_cache(device)


def _empty_device_cache(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _prepare_outputs(args: argparse.Namespace) -> dict[str, Path]:
    """Check every output path before any sampling time is spent."""
    outputs = {}
    if args.output is not None:
        outputs["output"] = prepare_output(Path(args.output))
    if args.markdown is not None:
        outputs["markdown"] = prepare_output(Path(args.markdown), option="--markdown")
    if args.save_results is not None:
        folder = Path(args.save_results)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--save-results {str(folder)!r} exists and is not a directory.")
        for side in SIDES:
            if not is_saved_result(getattr(args, side)):
                prepare_output(folder / f"{side}.json", option="--save-results")
        outputs["results"] = folder
    _check_distinct_paths(args, outputs)
    return outputs


def _check_distinct_paths(args: argparse.Namespace, outputs: dict[str, Path]) -> None:
    """Raise `ValueError` when two outputs are one file, or an output is a saved result read as input."""
    claimed_paths = {
        Path(getattr(args, side)).expanduser().resolve(): f"--{side} {getattr(args, side)!r}"
        for side in SIDES
        if is_saved_result(getattr(args, side))
    }
    written = [(f"--{option}", outputs[option]) for option in ("output", "markdown") if option in outputs]
    if "results" in outputs:
        written += [
            ("--save-results", outputs["results"] / f"{side}.json")
            for side in SIDES
            if not is_saved_result(getattr(args, side))
        ]
    for option, path in written:
        key = path.expanduser().resolve()
        if key in claimed_paths:
            raise ValueError(
                f"{option} {str(path)!r} is the same file as {claimed_paths[key]}. Give each output its own path, "
                "apart from the saved results read as input."
            )
        claimed_paths[key] = f"{option} {str(path)!r}"


def _truncation_warning(side: str, result: ComparisonSide, config: SamplingConfig, threshold: float) -> str | None:
    rate = pool_prompts(result.estimates).truncation_rate
    if not rate > threshold:
        return None
    return (
        f"{side}: {format_share(rate)} of the rollouts reached the length cap of {config.max_new_tokens} tokens "
        f"(warning threshold {format_share(threshold)}), so the cap, not the model, sets part of that side's "
        "length. Raise --max-new-tokens, or read the completed/ figures in the JSON."
    )


def _settings_line(config: SamplingConfig, num_prompts: int, samples: int) -> str:
    template = "chat template" if config.use_chat_template else "no chat template"
    bootstrap = f"paired bootstrap over prompts, {samples} resamples" if samples > 0 else "no bootstrap intervals"
    return (
        f"{num_prompts} prompts x {config.num_rollouts} rollouts, cap {config.max_new_tokens} tokens, "
        f"temperature {config.temperature}, top-k {config.top_k}, top-p {config.top_p}, seed {config.seed}, "
        f"{template}; {bootstrap}"
    )
