"""Throughput and memory of three ways to sample rollouts with their entropies.

On the same model, prompts, rollout count, cap and seed, it runs

  (a) plain: a loop of `model.generate` per prompt with `num_return_sequences`, no entropy;
  (b) scores: the same loop with `output_scores=True`, entropies computed afterwards
      from the stored `[T, M, V]` scores;
  (c) canopy: `canopy_monitor.sampling.sample_rollouts`, entropies recorded while
      generating.

Each variant runs in a fresh child process, so that its peak memory is its own: the
resident set's high-water mark on CPU (reset after the model is loaded) or the peak
allocated CUDA memory on a GPU. Generated tokens count every rollout up to and
including its end-of-sequence token, or up to the cap. Timing covers sampling only,
after one short warm-up generation.

Usage:
    python benchmarks/sampler.py                      # the defaults below
    python benchmarks/sampler.py --max-new-tokens 1024 --output cap1024.json
    python benchmarks/sampler.py --variants a,c --batch-size 16

Defaults: the bundled model `smollm2-135m-instruct`, the first 8 prompts of
`../shared/data/prompts/stories.jsonl` (next to this repository), 8 rollouts, cap 256,
seed 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
DEFAULT_PROMPTS = REPOSITORY.parent / "shared" / "data" / "prompts" / "stories.jsonl"
VARIANTS = {
    "a": "plain generate, no entropy",
    "b": "generate with output_scores",
    "c": "canopy-monitor sampler",
}


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Model directory, hub id or alias.")
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="JSONL file of prompts (default: %(default)s).")
    parser.add_argument("--num-prompts", type=int, default=8, help="Prompts used (default: %(default)s).")
    parser.add_argument("--rollouts", type=int, default=8, help="Rollouts per prompt (default: %(default)s).")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="Length cap in tokens (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed (default: %(default)s).")
    parser.add_argument("--device", default=None, help="Torch device (default: cuda if available, else cpu).")
    parser.add_argument("--dtype", default=None, help="Model dtype, e.g. bfloat16 (default: as stored).")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="Rollouts generated together by the canopy sampler (default: the sampler's own default).",
    )
    parser.add_argument("--variants", default="a,b,c", help="Comma-separated variants to run (default: %(default)s).")
    parser.add_argument("--output", default=None, help="Also write the results as JSON to this path.")
    parser.add_argument("--worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# The child process: one variant


def _resident_set_mb(field: str) -> float:
    """Read `VmRSS` or `VmHWM` (the peak) of this process from /proc, in MiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} is missing from /proc/self/status")


def _reset_peak_resident_set() -> bool:
    """Reset the resident set's high-water mark (Linux 4.0 and newer); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _rollout_lengths(generated, eos_token_ids, max_new_tokens):
    from canopy_monitor.sampling import rollout_lengths

    return rollout_lengths(generated, eos_token_ids, max_new_tokens)


def run_worker(args: argparse.Namespace) -> dict:
    import torch

    from canopy_monitor import SamplingConfig, load_model_and_tokenizer
    from canopy_monitor.prompts import load_prompts
    from canopy_monitor.sampling import PolicyGeneration, sample_rollouts

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=device)
    prompts = load_prompts(args.prompts, limit=args.num_prompts)
    settings = dict(num_rollouts=args.rollouts, max_new_tokens=args.max_new_tokens, seed=args.seed)
    if args.batch_size is not None:
        settings["batch_size"] = args.batch_size
    config = SamplingConfig(**settings)
    policy = PolicyGeneration.build(model, tokenizer, config)
    encoded = policy.encode(model, tokenizer, prompts)
    on_gpu = torch.device(device).type == "cuda"

    def plain_generate(ids, max_new_tokens, **options):
        from transformers import GenerationConfig

        input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)
        generation_config = GenerationConfig(
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=config.num_rollouts,
            eos_token_id=policy.eos_token_ids,
            pad_token_id=policy.pad_token_id,
            **options,
        )
        return model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=generation_config
        )

    model.eval()
    with torch.no_grad():
        # A short warm-up on a few prompt tokens, so that the memory after loading
        # is not already raised by a full prompt's prefill.
        plain_generate(encoded[0][:8], 4)
    rss_after_load = _resident_set_mb("VmRSS")
    peak_reset = _reset_peak_resident_set()
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocated_after_load = torch.cuda.memory_allocated() / 2**20

    chosen_rows = None
    if args.worker == "c" and config.batch_size is None:
        from canopy_monitor.sampling.memory import batch_rows

        # What the sampler will choose from the memory free now, and use at most.
        chosen_rows = min(len(encoded) * config.num_rollouts, batch_rows(
            model,
            num_rollouts=config.num_rollouts,
            prompt_width=max(len(ids) for ids in encoded),
            max_new_tokens=config.max_new_tokens,
            device=torch.device(device),
        ))

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    tokens = 0
    with torch.no_grad():
        if args.worker == "c":
            for result in sample_rollouts(model, tokenizer, prompts, config):
                tokens += int(result.stats.lengths.sum())
        else:
            for ids in encoded:
                if args.worker == "a":
                    sequences = plain_generate(ids, config.max_new_tokens)
                    generated = sequences[:, len(ids) :]
                    lengths, _ = _rollout_lengths(generated, policy.eos_token_ids, config.max_new_tokens)
                else:
                    output = plain_generate(ids, config.max_new_tokens, output_scores=True, return_dict_in_generate=True)
                    generated = output.sequences[:, len(ids) :]
                    lengths, _ = _rollout_lengths(generated, policy.eos_token_ids, config.max_new_tokens)
                    scores = torch.stack(output.scores, dim=1).float()  # [M, K, V]
                    logprobs = torch.log_softmax(scores, dim=-1)
                    step_entropies = -(logprobs.exp() * logprobs).nan_to_num().sum(dim=-1)  # [M, K]
                    active = torch.arange(generated.shape[1], device=generated.device)[None, :] < lengths[:, None]
                    entropy_sums = torch.where(active, step_entropies, 0.0).sum(dim=1)  # [M]
                    sampled = logprobs.gather(2, generated[:, :, None]).squeeze(2)  # [M, K]
                    surprisal_sums = -torch.where(active, sampled, 0.0).sum(dim=1)  # [M]
                    del output, scores, logprobs, step_entropies, entropy_sums, surprisal_sums
                tokens += int(lengths.sum())
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started

    result = {
        "variant": args.worker,
        "description": VARIANTS[args.worker],
        "device": device,
        "seconds": seconds,
        "generated_tokens": tokens,
        "tokens_per_second": tokens / seconds,
        "batch_size": config.batch_size,
    }
    if chosen_rows is not None:
        result.update(batch_size=chosen_rows, batch_size_chosen_from_memory=True)
    if on_gpu:
        peak = torch.cuda.max_memory_allocated() / 2**20
        result.update(peak_memory_mb=peak, memory_after_load_mb=allocated_after_load, memory_kind="CUDA allocated")
    else:
        # Without a reset the high-water mark may still be that of loading the model.
        peak = _resident_set_mb("VmHWM") if peak_reset else max(_resident_set_mb("VmHWM"), rss_after_load)
        result.update(
            peak_memory_mb=peak,
            memory_after_load_mb=rss_after_load,
            memory_kind="resident set" if peak_reset else "resident set (peak not reset, includes loading)",
        )
    result["extra_memory_mb"] = result["peak_memory_mb"] - result["memory_after_load_mb"]
    return result


# The parent process: run each variant, then compare


def run_variant(variant: str, argv: list[str]) -> dict:
    command = [sys.executable, os.fspath(Path(__file__).resolve()), *argv, "--worker", variant]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"variant {variant} failed (exit code {completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def format_report(results: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        f"model {args.model}, {args.num_prompts} prompts from {args.prompts}, {args.rollouts} rollouts, "
        f"cap {args.max_new_tokens}, seed {args.seed}, device {next(iter(results.values()))['device']}",
        "",
        f"{'variant':<36} {'wall s':>8} {'tokens':>8} {'tokens/s':>9} {'peak MB':>9} {'extra MB':>9}",
    ]
    for key, result in results.items():
        lines.append(
            f"({key}) {result['description']:<32} {result['seconds']:>8.1f} {result['generated_tokens']:>8d} "
            f"{result['tokens_per_second']:>9.1f} {result['peak_memory_mb']:>9.0f} {result['extra_memory_mb']:>9.0f}"
        )
    kind = next(iter(results.values()))["memory_kind"]
    lines.append(f"peak: {kind}; extra: peak minus the memory after loading the model")
    if "c" in results:
        canopy = results["c"]
        chosen = "chosen from the free memory" if canopy.get("batch_size_chosen_from_memory") else "set"
        lines.append(f"(c) batch size: {canopy['batch_size']} rollouts ({chosen})")
        lines.append("")
        for key in ("a", "b"):
            if key in results:
                other = results[key]
                lines.append(
                    f"(c)/({key}): tokens/s x{canopy['tokens_per_second'] / other['tokens_per_second']:.2f}, "
                    f"peak memory x{canopy['peak_memory_mb'] / other['peak_memory_mb']:.2f}, "
                    f"extra memory x{canopy['extra_memory_mb'] / max(other['extra_memory_mb'], 1e-9):.2f}"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_arguments(argv)
    if args.worker is not None:
        print(json.dumps(run_worker(args)))
        return 0

    if not Path(args.prompts).is_file():
        raise SystemExit(f"--prompts {args.prompts!r} was not found; pass a JSONL file of prompts.")
    variants = [variant.strip() for variant in args.variants.split(",") if variant.strip()]
    unknown = [variant for variant in variants if variant not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown variant(s) {unknown}; choose from a, b and c.")

    results = {}
    for variant in variants:
        print(f"running ({variant}) {VARIANTS[variant]} ...", file=sys.stderr, flush=True)
        results[variant] = run_variant(variant, argv)
    print(format_report(results, args))
    if args.output:
        Path(args.output).write_text(json.dumps({"arguments": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
