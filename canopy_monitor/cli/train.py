"""`canopy-monitor train`: fine-tuning with a TRL trainer (SFT, DPO, GRPO or RLOO), monitored by `CanopyMonitorCallback`."""

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
from canopy_monitor.recipe import (
    DATASET_PROMPTS,
    HELDOUT_PROMPTS,
    REWARD_TRAINERS,
    TRAINERS,
    Recipe,
    RecipeError,
    load_recipe,
    trainer_config_class,
)
from canopy_monitor.rewards import get_reward_functions
from canopy_monitor.semantic import check_embedding_packages
from canopy_monitor.sinks import read_history
from canopy_monitor.sinks.units import is_entropy_valued
from canopy_monitor.training_data import load_training_data

logger = logging.getLogger(__name__)

WANDB_DEFAULT_PROJECT = "canopy-monitor"
WANDB_HOST = "api.wandb.ai"
SUMMARY_METRICS = ("canopy/ce_star", "canopy/rho_length_rate")
# Shown in the closing message only when the run measured them.
SEMANTIC_SUMMARY_METRICS = ("canopy/semantic/diversity", "canopy/semantic/rho_rate_diversity_given_length")
# Mean reward of the generated completions in the trainer's log (GRPO and RLOO).
REWARD_LOG_KEY = "reward"

OVERRIDE_HELP = """\
The recipe's `trainer` field chooses the TRL trainer: sft (SFTTrainer, the default),
dpo (DPOTrainer), grpo (GRPOTrainer) or rloo (RLOOTrainer). GRPO and RLOO recipes name
their reward functions in `rewards`, e.g. `rewards: [exact_answer]`.

Any recipe field can be overridden after the recipe path, as in TRL's scripts:
  --max_steps 4 --output_dir runs/x    a bare field name, looked up across all sections
  --monitor.seed 3                     section.field, needed when a name is in several sections
  --use_cpu                            a boolean flag alone sets it to true
  --report_to wandb,tensorboard        lists are comma-separated
  --num_examples null                  null sets an optional field to None
  --peft null                          trains all weights instead of a LoRA adapter
  --trainer dpo                        changes the trainer (the data set must suit it)
Top-level fields: model, trainer, rewards. Sections: dataset, peft, monitor, and
training, whose fields are those of the trainer's config class (trl.SFTConfig,
DPOConfig, GRPOConfig or RLOOConfig).

W&B: with `wandb` in report_to and no W&B login (no WANDB_MODE, no WANDB_API_KEY, no
api.wandb.ai entry in ~/.netrc), the run is logged offline. W&B files go under the
output directory unless WANDB_DIR is set, and WANDB_PROJECT defaults to canopy-monitor.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `train` subcommand to a CLI's subparsers and return its parser."""
    parser = subparsers.add_parser(
        "train",
        help="Fine-tune a model with a TRL trainer (SFT, DPO, GRPO or RLOO) while monitoring canopy entropy.",
        description="Fine-tune a model with TRL's SFT, DPO, GRPO or RLOO trainer (the recipe's `trainer` "
        "field), with a LoRA adapter or all weights, and monitor its canopy entropy on held-out prompts, "
        "as a recipe file describes.",
        epilog=OVERRIDE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="Path to a recipe YAML file, e.g. recipes/sft-smollm2-cpu.yaml.")
    return parser


def run(args: argparse.Namespace, extra_argv: Sequence[str]) -> int:
    """Fine-tune the model a recipe describes, print where the results are and return the exit code.

    Every input is checked before training starts: the recipe and its overrides, the
    arguments of the trainer's config class, the monitor settings, the prompts, the
    training set, its fit to the trainer and the reward functions, and the model.

    Raises:
        RecipeError, PromptError, ModelNotFoundError, ValueError: an input is invalid.
    """
    recipe = load_recipe(args.recipe, extra_argv)

    # Check the cheap inputs first, because loading the model takes far longer.
    SamplingConfig(**_sampling_settings(recipe))
    prompts_from_dataset = recipe.monitor.prompts == DATASET_PROMPTS
    if not prompts_from_dataset:
        prompts = load_prompts(resolve_prompts_source(recipe.monitor.prompts), limit=recipe.monitor.num_prompts)
    if recipe.monitor.semantic_every_n_points > 0:
        check_embedding_packages(recipe.monitor.embedding_model)

    data = load_training_data(
        recipe.dataset,
        trainer=recipe.trainer,
        rewards=recipe.rewards,
        num_heldout_prompts=recipe.monitor.num_prompts if prompts_from_dataset else 0,
    )
    if prompts_from_dataset:
        prompts = load_prompts(data.heldout_prompts)

    training_args = _build_training_args(recipe)
    _check_output_dir(Path(training_args.output_dir))

    model, tokenizer = load_model_and_tokenizer(recipe.model)
    trainer = _build_trainer(recipe, training_args, model, tokenizer, data.train_dataset)

    monitor = CanopyMonitorCallback(
        trainer,
        prompts,
        every_n_steps=recipe.monitor.every_n_steps,
        log_rollout_table=recipe.monitor.log_rollout_table,
        max_table_rollouts_per_prompt=recipe.monitor.max_table_rollouts_per_prompt,
        rollout_record_points=recipe.monitor.rollout_record_points,
        alert_ce_star_change=recipe.monitor.alert_ce_star_change,
        alert_rho_change=recipe.monitor.alert_rho_change,
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
    # trainer_state.json keeps the training log, the rewards of GRPO and RLOO included,
    # also when the recipe saves no checkpoint.
    trainer.save_state()
    # The fine-tuned weights (the LoRA adapter when the recipe trains one) and the
    # tokenizer, so that `evaluate` and `compare` can load the result from output_dir.
    trainer.save_model()

    wandb_run_dir = _finish_wandb_run()
    # Under `accelerate launch` every process runs this function, but only the main
    # process wrote the history, so only it prints where the results are.
    if not trainer.is_world_process_zero():
        return 0
    summary = f"Fine-tuned model: {output_dir}\n" + format_summary(monitor.history_path, wandb_run_dir, wandb_offline)
    if recipe.trainer in REWARD_TRAINERS:
        summary += "\n" + format_reward_summary(trainer.state.log_history)
    print(summary)
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


def format_reward_summary(log_history: list[dict[str, Any]]) -> str:
    """Return a line saying how the mean reward moved from the first to the last training log entry.

    Each entry of a GRPO or RLOO log averages the rewards since the entry before, over
    `logging_steps` steps.
    """
    entries = [entry for entry in log_history if REWARD_LOG_KEY in entry]
    if not entries:
        return "reward: not logged (set training.logging_steps to at most max_steps)."
    first, last = entries[0], entries[-1]
    return (
        f"reward: {first[REWARD_LOG_KEY]:.3f} at step {first.get('step')} -> "
        f"{last[REWARD_LOG_KEY]:.3f} at step {last.get('step')} (mean over each logging window)"
    )


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
    config_class = trainer_config_class(recipe.trainer)
    if "output_dir" not in recipe.training:
        raise RecipeError("The recipe must set training.output_dir (or pass --output_dir).")
    try:
        return config_class(**recipe.training)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"Invalid training settings for trl.{config_class.__name__}: {error}") from None


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
    """Build the recipe's TRL trainer around an already loaded model.

    Without a `peft` section all weights are trained, and TRL's DPO trainer (1.16) loads
    the model a second time from the same path as its frozen reference. With LoRA the
    reference is the model with the adapter disabled.
    """
    import trl

    peft_config = None
    if recipe.peft is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=recipe.peft.r,
            lora_alpha=recipe.peft.lora_alpha,
            lora_dropout=recipe.peft.lora_dropout,
            target_modules=recipe.peft.target_modules,
            task_type="CAUSAL_LM",
        )

    trainer_class = getattr(trl, TRAINERS[recipe.trainer][0])
    extra = {}
    if recipe.trainer in REWARD_TRAINERS:
        extra["reward_funcs"] = get_reward_functions(recipe.rewards)
    return trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        **extra,
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
