"""Training recipes: a YAML file of typed sections, overridable from the command line.

A recipe names the model to fine-tune, the TRL trainer, its training set, the LoRA
adapter (or `peft: null` to train all weights), the monitor settings and the arguments
of the trainer's config class:

```yaml
model: smollm2-135m-instruct
trainer: sft               # sft, dpo, grpo or rloo
dataset: {name: python-docstrings, num_examples: 960, seed: 0}
peft: {r: 16, lora_alpha: 32, lora_dropout: 0.05}
monitor: {prompts: heldout, every_n_steps: 30, num_rollouts: 8, max_new_tokens: 96, semantic_every_n_points: 1}
training: {output_dir: runs/sft, max_steps: 120, learning_rate: 2.0e-4, report_to: [wandb]}
```

GRPO and RLOO recipes also name their reward functions (`rewards: [exact_answer]`, see
`canopy_monitor.rewards`). Every field can be overridden with TRL-style arguments (see
[`apply_overrides`]): `--max_steps 4`, `--monitor.seed 3`, `--use_cpu` (a boolean flag),
`--report_to wandb,tensorboard`, `--peft null`.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .alerts import check_alert_threshold
from .estimators import check_confidence, check_running_positions, check_samples
from .measurement import check_truncation_threshold
from .rewards import REWARD_FUNCTIONS
from .sinks.rollout_records import DEFAULT_KEEP_POINTS, check_keep_points
from .semantic import (
    DEFAULT_EMBEDDING_BATCH_SIZE,
    DEFAULT_EMBEDDING_MODEL,
    check_embedding_settings,
    check_semantic_every_n_points,
)


class RecipeError(ValueError):
    """A recipe file or a command-line override that cannot be used."""


# TRL trainer of each `trainer` value, and the config class its `training` section fills.
TRAINERS: dict[str, tuple[str, str]] = {
    "sft": ("SFTTrainer", "SFTConfig"),
    "dpo": ("DPOTrainer", "DPOConfig"),
    "grpo": ("GRPOTrainer", "GRPOConfig"),
    "rloo": ("RLOOTrainer", "RLOOConfig"),
}
TrainerName = Literal["sft", "dpo", "grpo", "rloo"]
DEFAULT_TRAINER = "sft"
# Trainers that generate completions during training and score them with reward functions.
REWARD_TRAINERS = ("grpo", "rloo")

HELDOUT_PROMPTS = "heldout"
DATASET_PROMPTS = "dataset"


@dataclass
class DatasetConfig:
    """Training set of a recipe.

    Args:
        name (`str`, *optional*, defaults to `"python-docstrings"`):
            Built-in data set, built at run time (see `canopy_monitor.training_data`).
        path (`str` or `None`, *optional*, defaults to `None`):
            JSONL file of the user's own examples in one of TRL's data set types
            (`messages`, `prompt`/`completion`, `chosen`/`rejected` or `prompt` rows).
            When set, it replaces `name`.
        hub (`str` or `None`, *optional*, defaults to `None`):
            Data set on the Hugging Face Hub (such as `openai/gsm8k`), or a local folder in
            the same layout, loaded with `datasets.load_dataset`. When set, it replaces `name`.
        config_name (`str` or `None`, *optional*, defaults to `None`):
            Configuration (subset) of the `hub` data set, such as `main` for GSM8K.
        split (`str`, *optional*, defaults to `"train"`):
            Split of the `hub` data set.
        format (`str` or `None`, *optional*, defaults to `None`):
            Conversion of `hub` rows into one of TRL's data set types, such as `gsm8k`
            (see `canopy_monitor.hub_datasets`). `None` uses the rows as they are.
        num_examples (`int` or `None`, *optional*, defaults to `None`):
            Number of examples to keep after a seeded shuffle. `None` keeps them all.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the shuffle and of any random choice made while building the examples.
    """

    name: str = "python-docstrings"
    path: str | None = None
    hub: str | None = None
    config_name: str | None = None
    split: str = "train"
    format: str | None = None
    num_examples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_examples is not None and self.num_examples < 1:
            raise RecipeError(f"dataset.num_examples must be a positive integer or null, got {self.num_examples}.")
        if self.path is not None and self.hub is not None:
            raise RecipeError("dataset.path and dataset.hub are both set. Set one of them.")
        if self.hub is None:
            for key in ("config_name", "format"):
                if getattr(self, key) is not None:
                    raise RecipeError(f"dataset.{key} applies to a dataset.hub data set, but dataset.hub is not set.")

    def source_label(self) -> str:
        """Return the recipe field that names the data set and its value, for messages."""
        if self.path is not None:
            return f"dataset.path {self.path!r}"
        if self.hub is not None:
            return f"dataset.hub {self.hub!r}"
        return f"dataset.name {self.name!r}"


@dataclass
class LoraSettings:
    """LoRA adapter trained in place of the full weights (the recipe's `peft` section).

    Args:
        r (`int`, *optional*, defaults to `16`):
            Rank of the update matrices.
        lora_alpha (`int`, *optional*, defaults to `32`):
            Scaling numerator: the update is scaled by `lora_alpha / r`.
        lora_dropout (`float`, *optional*, defaults to `0.05`):
            Dropout on the adapter's input.
        target_modules (`list[str]` or `None`, *optional*, defaults to `None`):
            Names of the modules to adapt. `None` lets peft choose its default for the
            model's architecture (the attention query and value projections for Llama).
    """

    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise RecipeError(f"peft.r must be a positive integer, got {self.r}.")
        if not 0 <= self.lora_dropout < 1:
            raise RecipeError(f"peft.lora_dropout must be in [0, 1), got {self.lora_dropout}.")


@dataclass
class MonitorConfig:
    """Settings of the canopy monitor, passed to `CanopyMonitorCallback`.

    The callback validates them, and its docstring gives the meaning of each field.

    Args:
        prompts (`str`, *optional*, defaults to `"heldout"`):
            Held-out prompts: `"heldout"` for the packaged set, `"dataset"` for prompts of
            the training set's source that training does not use (this needs
            `dataset.num_examples` and `monitor.num_prompts`), or a path to a prompts file.
        num_prompts (`int` or `None`, *optional*, defaults to `None`):
            Use only the first `num_prompts` prompts. `None` uses them all.
    """

    prompts: str = HELDOUT_PROMPTS
    num_prompts: int | None = None
    every_n_steps: int = 50
    num_rollouts: int = 8
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    use_chat_template: bool = True
    batch_size: int | None = None
    log_rollout_table: bool = True
    max_table_rollouts_per_prompt: int = 4
    rollout_record_points: int = DEFAULT_KEEP_POINTS
    alert_ce_star_change: float | None = None
    alert_rho_change: float | None = None
    strict: bool = False
    units: Literal["nats", "bits"] = "nats"
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    running_positions: list[int] | None = None
    truncation_warning: float = 0.2
    semantic_every_n_points: int = 0
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    embedding_batch_size: int = DEFAULT_EMBEDDING_BATCH_SIZE
    free_embedding_model: bool | None = None

    def __post_init__(self) -> None:
        # The callback checks these too, but only once the model is loaded.
        if self.every_n_steps < 1:
            raise RecipeError(f"monitor.every_n_steps must be a positive integer, got {self.every_n_steps}.")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise RecipeError(f"monitor.num_prompts must be a positive integer or null, got {self.num_prompts}.")
        if self.batch_size is not None and self.batch_size < 1:
            raise RecipeError(
                f"monitor.batch_size must be a positive integer, or null to choose it from the free memory, "
                f"got {self.batch_size}."
            )
        try:
            check_samples(self.bootstrap_samples, "monitor.bootstrap_samples")
            check_confidence(self.confidence, "monitor.confidence")
            check_truncation_threshold(self.truncation_warning, "monitor.truncation_warning")
            if isinstance(self.max_new_tokens, int):
                check_running_positions(self.running_positions, self.max_new_tokens, "monitor.running_positions")
            check_semantic_every_n_points(self.semantic_every_n_points, "monitor.semantic_every_n_points")
            check_keep_points(self.rollout_record_points, "monitor.rollout_record_points")
            check_alert_threshold(self.alert_ce_star_change, "monitor.alert_ce_star_change")
            check_alert_threshold(self.alert_rho_change, "monitor.alert_rho_change")
            check_embedding_settings(
                self.embedding_model, self.embedding_batch_size, self.free_embedding_model, prefix="monitor."
            )
        except ValueError as error:
            raise RecipeError(str(error)) from None


# Sections given by a dataclass. `training` is checked against the trainer's config class instead.
SECTIONS: dict[str, type] = {"dataset": DatasetConfig, "peft": LoraSettings, "monitor": MonitorConfig}
TRAINING_SECTION = "training"
PEFT_SECTION = "peft"
TOP_LEVEL_FIELDS: dict[str, Any] = {"model": str, "trainer": TrainerName, "rewards": list[str]}


@dataclass
class Recipe:
    """A loaded recipe.

    Args:
        model (`str`):
            Model alias, local path or Hub id, as accepted by
            `canopy_monitor.models.load_model_and_tokenizer`.
        trainer (`str`, *optional*, defaults to `"sft"`):
            TRL trainer: `"sft"` (SFTTrainer), `"dpo"` (DPOTrainer), `"grpo"` (GRPOTrainer)
            or `"rloo"` (RLOOTrainer).
        rewards (`list[str]`, *optional*):
            Reward functions of a GRPO or RLOO recipe, by their names in
            `canopy_monitor.rewards.REWARD_FUNCTIONS`. Empty for the other trainers.
        dataset (`DatasetConfig`): training set.
        peft (`LoraSettings` or `None`): LoRA adapter, or `None` to train all weights.
        monitor (`MonitorConfig`): monitor settings.
        training (`dict[str, Any]`):
            Keyword arguments of the trainer's config class (`trl.SFTConfig`, `DPOConfig`,
            `GRPOConfig` or `RLOOConfig`), type-checked against its fields.
        source (`Path` or `None`): the file the recipe was read from.
    """

    model: str
    trainer: str = DEFAULT_TRAINER
    rewards: list[str] = field(default_factory=list)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    peft: LoraSettings | None = field(default_factory=LoraSettings)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    training: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the recipe as plain data, in the layout of a recipe file."""
        return {
            "model": self.model,
            "trainer": self.trainer,
            "rewards": list(self.rewards),
            "dataset": dataclasses.asdict(self.dataset),
            "peft": None if self.peft is None else dataclasses.asdict(self.peft),
            "monitor": dataclasses.asdict(self.monitor),
            "training": dict(self.training),
        }


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe file, apply command-line overrides and check every value.

    Args:
        path (`str` or `Path`): YAML recipe file.
        overrides (`Sequence[str]`, *optional*): arguments such as `["--max_steps", "4"]`,
            applied with [`apply_overrides`].

    Raises:
        RecipeError: the file is missing or is not valid YAML, or a section, key, value
            or override is invalid. The message names the offending input.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"Recipe file not found: {path}") from None
    except UnicodeDecodeError as error:
        raise RecipeError(f"Recipe file {path} is not valid UTF-8: {error.reason} at byte {error.start}.") from None
    except OSError as error:
        raise RecipeError(f"Failed to read recipe file {path}: {error.strerror}") from None

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RecipeError(f"Recipe file {path} is not valid YAML: {_yaml_problem(error)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"Recipe file {path} must contain a mapping of sections, got {type(raw).__name__}.")

    raw = apply_overrides(raw, overrides)
    recipe = recipe_from_dict(raw)
    recipe.source = path
    return recipe


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Describe a YAML error on one line: the problem and where it is."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return problem
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    """Build a `Recipe` from plain data, checking every section, key and value type.

    Beyond the types, it checks that the trainer, the reward functions, the training
    set and the monitor's prompt source fit together, so that a DPO recipe with a
    supervised data set fails here and not once the model is loaded. A data set read
    from a file or the Hub is checked when it is loaded, because its columns are
    unknown until then.
    """
    known = [*TOP_LEVEL_FIELDS, *SECTIONS, TRAINING_SECTION]
    for key in raw:
        if key not in known:
            raise RecipeError(_unknown_message(f"recipe section {key!r}", key, known))
    if raw.get("model") is None:
        raise RecipeError("The recipe must name a model, e.g. `model: smollm2-135m-instruct`, or pass --model.")

    model = _check_value("model", raw["model"], str)
    trainer = _check_value("trainer", raw.get("trainer", DEFAULT_TRAINER), TrainerName)
    rewards = _check_value("rewards", raw.get("rewards") or [], list[str])
    sections = {name: _build_section(name, cls, raw.get(name)) for name, cls in SECTIONS.items()}
    if PEFT_SECTION in raw and raw[PEFT_SECTION] is None:
        sections[PEFT_SECTION] = None

    training = raw.get(TRAINING_SECTION) or {}
    if not isinstance(training, dict):
        raise RecipeError(f"Recipe section 'training' must be a mapping, got {type(training).__name__}.")
    training_types = trainer_config_field_types(trainer)
    config_name = TRAINERS[trainer][1]
    checked_training = {}
    for key, value in training.items():
        if key not in training_types:
            subject = f"key 'training.{key}' (not a trl.{config_name} field, which trainer {trainer!r} uses)"
            raise RecipeError(_unknown_message(subject, key, list(training_types)))
        checked_training[key] = _check_value(f"training.{key}", value, training_types[key])

    recipe = Recipe(model=model, trainer=trainer, rewards=rewards, training=checked_training, **sections)
    _check_trainer_fit(recipe)
    return recipe


def _check_trainer_fit(recipe: Recipe) -> None:
    """Raise `RecipeError` unless the trainer, rewards, data set and monitor prompts fit together."""
    available = ", ".join(sorted(REWARD_FUNCTIONS))
    if recipe.trainer in REWARD_TRAINERS:
        if not recipe.rewards:
            raise RecipeError(
                f"trainer {recipe.trainer!r} needs reward functions: set `rewards`, e.g. `rewards: [exact_answer]`. "
                f"Available: {available}."
            )
        for name in recipe.rewards:
            if name not in REWARD_FUNCTIONS:
                raise RecipeError(_unknown_message(f"reward function {name!r} in rewards", name, list(REWARD_FUNCTIONS)))
    elif recipe.rewards:
        raise RecipeError(
            f"rewards is set, but trainer {recipe.trainer!r} uses no reward functions. Only "
            f"{' and '.join(REWARD_TRAINERS)} do: remove `rewards` or change `trainer`."
        )

    if recipe.monitor.prompts == DATASET_PROMPTS:
        if recipe.monitor.num_prompts is None:
            raise RecipeError("monitor.prompts 'dataset' needs monitor.num_prompts, the number of held-out prompts.")
        if recipe.dataset.num_examples is None:
            raise RecipeError(
                "monitor.prompts 'dataset' takes prompts that training does not use, so it needs "
                "dataset.num_examples below the size of the data set."
            )

    if recipe.dataset.path is None and recipe.dataset.hub is None:
        # A built-in data set's columns are known without building it. The import is
        # here because training_data imports this module.
        from .training_data import check_builtin_dataset

        check_builtin_dataset(recipe.dataset.name, recipe.trainer, recipe.rewards)


def _build_section(name: str, cls: type, values: Any) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(f"Recipe section {name!r} must be a mapping, got {type(values).__name__}.")

    field_types = dataclass_field_types(cls)
    checked = {}
    for key, value in values.items():
        if key not in field_types:
            raise RecipeError(_unknown_message(f"key '{name}.{key}'", key, list(field_types)))
        checked[key] = _check_value(f"{name}.{key}", value, field_types[key])
    return cls(**checked)


@functools.cache
def dataclass_field_types(cls: type) -> dict[str, Any]:
    """Return the resolved type annotation of each field of a dataclass, by field name."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def trainer_config_class(trainer: str) -> type:
    """Return the TRL config class of a trainer name: `trl.SFTConfig` for `"sft"`, and so on."""
    import trl

    return getattr(trl, TRAINERS[trainer][1])


def trainer_config_field_types(trainer: str) -> dict[str, Any]:
    """Return the type annotation of each field of the trainer's TRL config class, by field name."""
    return dataclass_field_types(trainer_config_class(trainer))


# Overrides


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of the recipe data with command-line overrides applied.

    The syntax follows TRL's scripts:

    - `--field value` or `--field=value`. A bare field name is looked up across all
      sections and must name exactly one field; `--section.field value` names it fully
      (`--monitor.seed 3`). Dashes in names count as underscores.
    - `--flag` with no value sets a boolean field to true; `--flag false` clears it.
    - Values are converted to the field's type. A list is written comma-separated
      (`--target_modules q_proj,v_proj`), and `null` sets an optional field to `None`.
    - `--peft null` trains all weights instead of a LoRA adapter.
    - `training` fields are those of the trainer's config class (`trl.SFTConfig` for
      `trainer: sft`, `trl.DPOConfig` for `dpo`, ...). The trainer is the one that
      `--trainer` sets, else the recipe's.

    Raises:
        RecipeError: an argument is not an option, names no field or more than one, or
            its value cannot be converted. Unknown names come with close matches.
    """
    result = {key: (dict(value) if isinstance(value, dict) else value) for key, value in raw.items()}
    index = _override_index(_overridden_trainer(raw, overrides))

    position = 0
    while position < len(overrides):
        argument = overrides[position]
        position += 1
        if not argument.startswith("--") or len(argument) == 2:
            raise RecipeError(f"Unexpected argument {argument!r}: overrides must look like `--field value`.")

        name, has_equals, text = argument[2:].partition("=")
        name = name.replace("-", "_")
        section, key, field_type = _resolve_override(name, index)

        if not has_equals:
            takes_value = position < len(overrides) and not overrides[position].startswith("--")
            if takes_value:
                text = overrides[position]
                position += 1
            elif _allows(field_type, bool):
                text = "true"
            else:
                raise RecipeError(f"Override --{name} needs a value (expected {_type_name(field_type)}).")

        value = _convert_text(f"--{name}", text, field_type)
        if section is None:
            result[key] = value
        else:
            target = result.get(section)
            if not isinstance(target, dict):
                target = {}
            target[key] = value
            result[section] = target
    return result


def _overridden_trainer(raw: dict[str, Any], overrides: Sequence[str]) -> str:
    """Return the trainer that the recipe data and the overrides name, the last `--trainer` winning.

    An invalid name gives the default trainer here: the override's conversion or the
    recipe's type check rejects it with a message that names the input.
    """
    trainer = raw.get("trainer", DEFAULT_TRAINER)
    for position, argument in enumerate(overrides):
        name, has_equals, text = argument.partition("=")
        if name != "--trainer":
            continue
        if has_equals:
            trainer = text
        elif position + 1 < len(overrides):
            trainer = overrides[position + 1]
    return trainer if trainer in TRAINERS else DEFAULT_TRAINER


def _override_index(trainer: str) -> dict[str, list[tuple[str | None, str, Any]]]:
    """Map every accepted override name, bare and dotted, to the fields it may mean."""
    index: dict[str, list[tuple[str | None, str, Any]]] = {}
    for key, field_type in TOP_LEVEL_FIELDS.items():
        index.setdefault(key, []).append((None, key, field_type))
    # `--peft null` replaces the whole section, so it is the one override that takes only null.
    index.setdefault(PEFT_SECTION, []).append((None, PEFT_SECTION, type(None)))

    all_sections = {name: dataclass_field_types(cls) for name, cls in SECTIONS.items()}
    all_sections[TRAINING_SECTION] = trainer_config_field_types(trainer)
    for section, field_types in all_sections.items():
        for key, field_type in field_types.items():
            entry = (section, key, field_type)
            index.setdefault(key, []).append(entry)
            index[f"{section}.{key}"] = [entry]
    return index


def _resolve_override(name: str, index: dict[str, list]) -> tuple[str | None, str, Any]:
    candidates = index.get(name)
    if not candidates:
        raise RecipeError(_unknown_message(f"override --{name}", name, list(index), prefix="--"))
    if len(candidates) > 1:
        full_names = ", ".join(f"--{section}.{key}" for section, key, _ in candidates)
        raise RecipeError(f"Override --{name} is ambiguous: it matches {full_names}. Use one of those names.")
    return candidates[0]


def _unknown_message(subject: str, name: str, known: Sequence[str], prefix: str = "") -> str:
    matches = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    message = f"Unknown {subject}."
    if matches:
        message += " Did you mean " + " or ".join(f"{prefix}{match}" for match in matches) + "?"
    return message


# Type checks and conversions


def _members(field_type: Any) -> tuple[Any, ...]:
    """Return the members of a union type, or the type itself as a one-member tuple."""
    if typing.get_origin(field_type) in (typing.Union, types.UnionType):
        return typing.get_args(field_type)
    return (field_type,)


def _allows(field_type: Any, expected: type) -> bool:
    return any(member is expected for member in _members(field_type))


def _type_name(field_type: Any) -> str:
    names = []
    for member in _members(field_type):
        if member is type(None):
            names.append("null")
        elif typing.get_origin(member) is typing.Literal:
            names.extend(repr(arg) for arg in typing.get_args(member))
        elif typing.get_origin(member) is not None:
            names.append(str(member).replace("typing.", ""))
        else:
            names.append(getattr(member, "__name__", str(member)))
    return " or ".join(names)


_NO_MATCH = object()


def _check_value(label: str, value: Any, field_type: Any) -> Any:
    """Return `value` if it fits `field_type` (ints are accepted and converted where floats are)."""
    for member in _members(field_type):
        checked = _match(value, member)
        if checked is not _NO_MATCH:
            return checked
    raise RecipeError(f"{label} must be {_type_name(field_type)}, got {value!r} ({type(value).__name__}).")


def _match(value: Any, member: Any) -> Any:
    origin = typing.get_origin(member)
    if member is Any:
        return value
    if member is type(None):
        return None if value is None else _NO_MATCH
    if origin is typing.Literal:
        return value if value in typing.get_args(member) else _NO_MATCH
    if member is bool:
        return value if isinstance(value, bool) else _NO_MATCH
    if member is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO_MATCH
    if member is float:
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if is_number else _NO_MATCH
    if member is str:
        return value if isinstance(value, str) else _NO_MATCH
    if isinstance(member, type) and issubclass(member, enum.Enum):
        return value if isinstance(value, (str, member)) else _NO_MATCH
    if member is list or origin is list:
        if not isinstance(value, list):
            return _NO_MATCH
        (item_type,) = typing.get_args(member) or (Any,)
        items = [_match(item, item_type) for item in value]
        return _NO_MATCH if any(item is _NO_MATCH for item in items) else items
    if member is dict or origin is dict:
        return value if isinstance(value, dict) else _NO_MATCH
    return value if isinstance(member, type) and isinstance(value, member) else _NO_MATCH


_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


def _convert_text(label: str, text: str, field_type: Any) -> Any:
    """Convert command-line text to a value of `field_type`.

    Union members are tried from the most specific to the least (null, booleans,
    numbers, lists, mappings, strings), so `--report_to wandb` stays a string and
    `--report_to wandb,tensorboard` becomes a list.
    """
    members = _members(field_type)
    lowered = text.strip().lower()
    if type(None) in members and (lowered == "null" or (lowered == "none" and str not in members)):
        return None

    def rank(member: Any) -> int:
        origin = typing.get_origin(member)
        if member is bool or origin is typing.Literal:
            return 0
        if member in (int, float):
            return 1
        if member is list or origin is list:
            return 2 if "," in text or str not in members else 6
        if member is dict or origin is dict:
            return 3
        return 5

    for member in sorted((m for m in members if m is not type(None)), key=rank):
        value = _convert_member(text, member)
        if value is not _NO_MATCH:
            return value
    raise RecipeError(f"Invalid value for {label}: {text!r} is not {_type_name(field_type)}.")


def _convert_member(text: str, member: Any) -> Any:
    origin = typing.get_origin(member)
    lowered = text.strip().lower()
    if member is bool:
        if lowered in _TRUE_WORDS:
            return True
        if lowered in _FALSE_WORDS:
            return False
        return _NO_MATCH
    if origin is typing.Literal:
        for choice in typing.get_args(member):
            if isinstance(choice, bool) and _convert_member(text, bool) is choice:
                return choice
            if str(choice) == text:
                return choice
        return _NO_MATCH
    if member is int:
        try:
            return int(text)
        except ValueError:
            return _NO_MATCH
    if member is float:
        try:
            return float(text)
        except ValueError:
            return _NO_MATCH
    if member is list or origin is list:
        (item_type,) = typing.get_args(member) or (str,)
        items = [_convert_member(item.strip(), item_type) for item in text.split(",") if item.strip()]
        return _NO_MATCH if any(item is _NO_MATCH for item in items) else items
    if member is dict or origin is dict:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return _NO_MATCH
        return value if isinstance(value, dict) else _NO_MATCH
    if member is str or member is Any or (isinstance(member, type) and issubclass(member, enum.Enum)):
        return text
    return _NO_MATCH
