"""`canopy-monitor train`: LoRA fine-tuning with TRL's `SFTTrainer`, monitored by `CanopyMonitorCallback`."""

from __future__ import annotations

import argparse
import importlib.resources
import logging
import math
import netrc
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from canopy_monitor.callback import CanopyMonitorCallback
from canopy_monitor.config import SamplingConfig
from canopy_monitor.models import load_model_and_tokenizer
from canopy_monitor.prompts import load_prompts
from canopy_monitor.recipe import Recipe, RecipeError, load_recipe
from canopy_monitor.semantic import check_embedding_packages
from canopy_monitor.sinks import read_history
from canopy_monitor.sinks.units import is_entropy_valued
from canopy_monitor.training_data import build_training_dataset

logger = logging.getLogger(__name__)

HELDOUT_PROMPTS = "heldout"
WANDB_DEFAULT_PROJECT = "canopy-monitor"
WANDB_HOST = "api.wandb.ai"
SUMMARY_METRICS = ("canopy/ce_star", "canopy/rho_length_rate")
# Shown in the closing message only when the run measured them.
SEMANTIC_SUMMARY_METRICS = ("canopy/semantic/diversity", "canopy/semantic/rho_rate_diversity_given_length")

OVERRIDE_HELP = """\
Any recipe field can be overridden after the recipe path, as in TRL's scripts:
  --max_steps 4 --output_dir runs/x    a bare field name, looked up across all sections
  --monitor.seed 3                     section.field, needed when a name is in several sections
  --use_cpu                            a boolean flag alone sets it to true
  --report_to wandb,tensorboard        lists are comma-separated
  --num_examples null                  null sets an optional field to None
Sections: model, dataset, peft, monitor, and training (every trl.SFTConfig field).

W&B: with `wandb` in report_to and no W&B login (no WANDB_MODE, no WANDB_API_KEY, no
api.wandb.ai entry in ~/.netrc), the run is logged offline. W&B files go under the
output directory unless WANDB_DIR is set, and WANDB_PROJECT defaults to canopy-monitor.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `train` subcommand to a CLI's subparsers and return its parser."""
    parser = subparsers.add_parser(
        "train",
        help="Fine-tune a model with LoRA (TRL SFTTrainer) while monitoring canopy entropy.",
        description="Fine-tune a model with LoRA using TRL's SFTTrainer and monitor its canopy entropy "
        "on held-out prompts, as a recipe file describes.",
        epilog=OVERRIDE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="Path to a recipe YAML file, e.g. recipes/sft-smollm2-cpu.yaml.")
    return parser


def run(args: argparse.Namespace, extra_argv: Sequence[str]) -> int:
    """Fine-tune the model a recipe describes, print where the results are and return the exit code.

    Every input is checked before training starts: the recipe and its overrides, the
    `SFTConfig` arguments, the monitor settings, the prompts, the training set and the
    model.

    Raises:
        RecipeError, PromptError, ModelNotFoundError, ValueError: an input is invalid.
    """
    recipe = load_recipe(args.recipe, extra_argv)

    # Check the cheap inputs first, because loading the model takes far longer.
    SamplingConfig(**_sampling_settings(recipe))
    prompts = load_prompts(resolve_prompts_source(recipe.monitor.prompts), limit=recipe.monitor.num_prompts)
    if recipe.monitor.semantic_every_n_points > 0:
        check_embedding_packages(recipe.monitor.embedding_model)

    train_dataset = build_training_dataset(recipe.dataset)

    training_args = _build_training_args(recipe)
    _check_output_dir(Path(training_args.output_dir))

    model, tokenizer = load_model_and_tokenizer(recipe.model)
    trainer = _build_trainer(recipe, training_args, model, tokenizer, train_dataset)

    monitor = CanopyMonitorCallback(
        trainer,
        prompts,
        every_n_steps=recipe.monitor.every_n_steps,
        log_rollout_table=recipe.monitor.log_rollout_table,
        strict=recipe.monitor.strict,
        units=recipe.monitor.units,
        bootstrap_samples=recipe.monitor.bootstrap_samples,
        confidence=recipe.monitor.confidence,
        running_positions=recipe.monitor.running_positions,
        truncation_warning=recipe.monitor.truncation_warning,
        semantic_every_n_points=recipe.monitor.semantic_every_n_points,
        embedding_model=recipe.monitor.embedding_model,
        embedding_batch_size=recipe.monitor.embedding_batch_size,
        free_embedding_model=recipe.monitor.free_embedding_model,
        **_sampling_settings(recipe),
    )
    trainer.add_callback(monitor)
    if monitor.embedder is not None:
        # A missing or broken embedding model is an input error, found before training.
        monitor.embedder.load(next(model.parameters()).device)

    # The trainer opens the W&B run when training starts, so the environment is read then.
    output_dir = Path(training_args.output_dir)
    wandb_offline = "wandb" in training_args.report_to and configure_wandb_environment(output_dir)
    _save_resolved_recipe(recipe, output_dir)

    # From here on an exception is a failure of training, not of the inputs, and the
    # CLI shows it with its traceback.
    args.training_started = True
    trainer.train()

    wandb_run_dir = _finish_wandb_run()
    print(format_summary(monitor.history_path, wandb_run_dir, wandb_offline))
    return 0


def resolve_prompts_source(prompts: str) -> str | Path:
    """Return the prompts file a recipe names: the packaged held-out set for `"heldout"`, else the path itself."""
    if prompts != HELDOUT_PROMPTS:
        return prompts
    resource = importlib.resources.files("canopy_monitor").joinpath("data", "heldout_prompts.jsonl")
    # NOTE: this assumes package data installed as plain files. A zipped install would need
    # `importlib.resources.as_file` to extract the file first.
    return Path(str(resource))


def configure_wandb_environment(output_dir: Path, environ: dict[str, str] | None = None) -> bool:
    """Set W&B environment defaults for a run that reports to W&B, and return whether it runs offline.

    Without any W&B configuration (no `WANDB_MODE`, no `WANDB_API_KEY` and no
    `api.wandb.ai` entry in `~/.netrc`) the run is logged offline instead of prompting
    for a login. W&B files go under `output_dir` unless `WANDB_DIR` is set, and
    `WANDB_PROJECT` defaults to `"canopy-monitor"`.

    Args:
        output_dir (`Path`): the trainer's output directory.
        environ (`dict[str, str]`, *optional*): environment to change; defaults to `os.environ`.
    """
    environ = os.environ if environ is None else environ

    if "WANDB_MODE" not in environ and "WANDB_API_KEY" not in environ and not _netrc_has_wandb_login():
        environ["WANDB_MODE"] = "offline"
        logger.info("No W&B login found, so the W&B run is logged offline. Run `wandb login` to log online.")

    if "WANDB_DIR" not in environ:
        output_dir.mkdir(parents=True, exist_ok=True)
        environ["WANDB_DIR"] = str(output_dir.resolve())
    environ.setdefault("WANDB_PROJECT", WANDB_DEFAULT_PROJECT)
    return environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun")


def _netrc_has_wandb_login() -> bool:
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def format_summary(history_path: Path, wandb_run_dir: Path | None, wandb_offline: bool) -> str:
    """Return the closing message of a training run: where its results are and how the headline figures moved."""
    lines = [f"Monitoring history: {history_path}"]
    if wandb_run_dir is not None:
        lines.append(f"W&B run folder: {wandb_run_dir}")
        if wandb_offline:
            lines.append(f"Upload it with: wandb sync {wandb_run_dir}")

    records = read_history(history_path)
    if not records:
        lines.append("No monitoring point was recorded; see the warnings above.")
        return "\n".join(lines)

    first, last = records[0], records[-1]
    units = last.get("units", "nats")
    names = list(SUMMARY_METRICS)
    names += [name for name in SEMANTIC_SUMMARY_METRICS if any(name in r.get("metrics", {}) for r in (first, last))]
    for name in names:
        before = _format_metric(first, name)
        after = _format_metric(last, name)
        unit = f" {units}" if is_entropy_valued(name) else ""
        lines.append(f"{name}: {before}{unit} at step {first.get('step')} -> {after}{unit} at step {last.get('step')}")
    return "\n".join(lines)


def _format_metric(record: dict[str, Any], name: str) -> str:
    metrics = record.get("metrics", {})
    if name not in metrics:
        return "missing"
    value = metrics[name]
    # The history file stores an undefined figure (NaN) as null.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "NaN"
    return f"{value:.3f}"


def _sampling_settings(recipe: Recipe) -> dict[str, Any]:
    monitor = recipe.monitor
    return {
        "num_rollouts": monitor.num_rollouts,
        "max_new_tokens": monitor.max_new_tokens,
        "temperature": monitor.temperature,
        "top_k": monitor.top_k,
        "top_p": monitor.top_p,
        "seed": monitor.seed,
        "use_chat_template": monitor.use_chat_template,
        "batch_size": monitor.batch_size,
    }


def _build_training_args(recipe: Recipe) -> Any:
    from trl import SFTConfig

    if "output_dir" not in recipe.training:
        raise RecipeError("The recipe must set training.output_dir (or pass --output_dir).")
    try:
        return SFTConfig(**recipe.training)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"Invalid training settings: {error}") from None


def _check_output_dir(output_dir: Path) -> None:
    """Raise `RecipeError` unless `output_dir` is, or can become, a writable folder."""
    if output_dir.exists() and not output_dir.is_dir():
        raise RecipeError(f"training.output_dir {str(output_dir)!r} exists and is not a directory.")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise RecipeError(f"training.output_dir {str(output_dir)!r} cannot be written: {error.strerror or error}.") from None


def _build_trainer(recipe: Recipe, training_args: Any, model: Any, tokenizer: Any, train_dataset: Any) -> Any:
    from peft import LoraConfig
    from trl import SFTTrainer

    peft_config = LoraConfig(
        r=recipe.peft.r,
        lora_alpha=recipe.peft.lora_alpha,
        lora_dropout=recipe.peft.lora_dropout,
        target_modules=recipe.peft.target_modules,
        task_type="CAUSAL_LM",
    )
    return SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def _save_resolved_recipe(recipe: Recipe, output_dir: Path) -> None:
    """Write the recipe with its overrides applied, so the run can be repeated."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
    logger.info("Recipe with overrides written to %s", path)


def _finish_wandb_run() -> Path | None:
    """Close the W&B run the trainer opened and return its folder, or `None` without one."""
    try:
        import wandb
    except ImportError:
        return None
    if wandb.run is None:
        return None

    # `run.dir` is the run's `files` folder, and `wandb sync` takes the folder above it.
    # A disabled run (WANDB_MODE=disabled) writes nothing worth pointing to.
    disabled = os.environ.get("WANDB_MODE", "").lower() == "disabled"
    run_dir = None if disabled else Path(wandb.run.dir).parent
    wandb.finish()
    return run_dir
