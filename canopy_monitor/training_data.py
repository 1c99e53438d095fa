"""Training sets for the recipes, built at run time from material already on the machine.

Built-in data sets, by their `dataset.name` in a recipe:

- `python-docstrings` (SFT, TRL's conversational language modeling type): questions
  about Python's standard library, answered from the library's own docstrings:

  - "What does `json.dumps` do in Python?" -> the first paragraph of `json.dumps.__doc__`;
  - "Which module provides `dumps`?" -> the module's name and the docstring's first sentence;
  - "How do I call `json.dumps`?" -> the signature from `inspect.signature` and the first sentence;
  - "What is the Python `json` module for?" -> the first paragraph of the module docstring.

- `python-docstrings-preferences` (DPO, conversational preference type with an explicit
  prompt): the same questions, with that answer as `chosen` and a wrong or rambling
  answer built from other docstrings as `rejected` (see
  [`build_python_docstring_preferences`]).
- `arithmetic-word-problems` (GRPO and RLOO, conversational prompt-only type with an
  `answer` column): see `canopy_monitor.arithmetic_problems`.

Provenance of the docstring sets: the docstrings are read with `inspect` from the
modules of the running interpreter, so nothing is downloaded. They are part of CPython
and are distributed under the Python Software Foundation License Version 2. Every
answer is one or two sentences long (at most `MAX_SUMMARY_CHARS` characters), a short
and uniform style that a model picks up within a few hundred steps.

The sets are deterministic for a given seed and Python version. Docstrings change
between Python releases, so another interpreter gives other examples and possibly
another count.

A recipe may instead point at the user's own JSONL file (`dataset: {path: ...}`) or at
a Hub data set (`dataset: {hub: ...}`, see `canopy_monitor.hub_datasets`), in any of
TRL's data set types that the recipe's trainer reads (see `canopy_monitor.data_formats`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset

from canopy_monitor.arithmetic_problems import build_arithmetic_problems
from canopy_monitor.data_formats import check_trainer_columns, row_prompt
from canopy_monitor.recipe import DatasetConfig, RecipeError
from canopy_monitor.rewards import COLUMN_CHECKS, get_reward_functions, required_columns

logger = logging.getLogger(__name__)

# Stdlib modules whose docstrings are mostly plain prose. Modules that an interpreter
# build may lack (e.g. `sqlite3`) are skipped when they fail to import.
STDLIB_MODULES = (
    "abc", "argparse", "array", "base64", "bisect", "calendar", "collections", "colorsys",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum",
    "filecmp", "fnmatch", "fractions", "functools", "getpass", "glob", "gzip", "hashlib",
    "heapq", "hmac", "html", "http.client", "inspect", "io", "ipaddress", "itertools", "json",
    "keyword", "linecache", "locale", "logging", "math", "mimetypes", "operator", "os",
    "os.path", "pathlib", "pickle", "platform", "pprint", "queue", "random", "re", "secrets",
    "shlex", "shutil", "socket", "sqlite3", "statistics", "string", "struct", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize",
    "traceback", "types", "typing", "unicodedata", "urllib.parse", "urllib.request", "uuid",
    "warnings", "weakref", "zipfile", "zlib",
)

# Built-in types whose methods join the built-in functions.
BUILTIN_TYPES = (str, bytes, list, tuple, dict, set, frozenset, int, float, complex, range)

MIN_SUMMARY_CHARS = 20
MAX_SUMMARY_CHARS = 280
MAX_SIGNATURE_CHARS = 80

DESCRIBE_QUESTIONS = (
    "What does `{name}` do in Python?",
    "Explain `{name}` from the Python standard library.",
    "What is `{name}` used for?",
)

_SIGNATURE_LINE = re.compile(r"^\s*[\w.]+\(.*\)\s*(->.*)?$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`(])")


@dataclass(frozen=True)
class DocumentedObject:
    """A documented function, class or method of the standard library.

    Args:
        name (`str`): dotted name a user would write, such as `json.dumps` or `str.split`.
        owner (`str`): module or class that provides it, such as `json` or `str`.
        owner_kind (`str`): `"module"`, `"class"` or `"builtins"`.
        summary (`str`): first paragraph of the docstring, one or two sentences.
        signature (`str` or `None`): call signature without `self`, such as `(obj, *, skipkeys=False)`.
    """

    name: str
    owner: str
    owner_kind: str
    summary: str
    signature: str | None


@dataclass
class TrainingData:
    """The training set of a recipe, and prompts from the same source that training does not use.

    Args:
        train_dataset (`datasets.Dataset`): rows in one of TRL's data set types.
        heldout_prompts (`list`): prompts (text or message lists) of rows left out of
            `train_dataset`, for the monitor. Empty unless requested.
    """

    train_dataset: Dataset
    heldout_prompts: list[Any] = field(default_factory=list)


def load_training_data(
    config: DatasetConfig,
    *,
    trainer: str | None = None,
    rewards: Sequence[str] = (),
    num_heldout_prompts: int = 0,
) -> TrainingData:
    """Build the training set a recipe's `dataset` section describes, and check it against the trainer.

    The rows are shuffled with `config.seed` and cut to `config.num_examples`. Held-out
    prompts come from the rows right after that cut, so they never appear in training.

    Args:
        config (`DatasetConfig`): the recipe's `dataset` section.
        trainer (`str`, *optional*): `"sft"`, `"dpo"`, `"grpo"` or `"rloo"`. When given,
            the data set must have the columns that trainer and `rewards` read.
        rewards (`Sequence[str]`, *optional*): names of the reward functions.
        num_heldout_prompts (`int`, *optional*, defaults to 0): number of held-out prompts to return.

    Raises:
        RecipeError: the name is unknown, the file or Hub data set is missing or malformed,
            its columns do not fit the trainer or a reward function, a reward column has
            an invalid value, or fewer examples exist than `num_examples` and
            `num_heldout_prompts` request.
    """
    rows, source = _read_rows(config)

    columns = rows.column_names if isinstance(rows, Dataset) else _row_columns(rows)
    if trainer is not None:
        check_trainer_columns(trainer, columns, config.source_label(), rewards)

    total = len(rows)
    num_train = total if config.num_examples is None else config.num_examples
    if num_train + num_heldout_prompts > total:
        requested = f"dataset.num_examples is {num_train}"
        if num_heldout_prompts:
            requested += f" and the monitor takes {num_heldout_prompts} held-out prompts from the rest"
        raise RecipeError(f"{requested}, but the {source} has only {total} examples.")

    order = list(range(total))
    random.Random(config.seed).shuffle(order)
    train_rows = _select(rows, order[:num_train])
    heldout_rows = _select(rows, order[num_train : num_train + num_heldout_prompts])

    train_dataset = train_rows if isinstance(train_rows, Dataset) else Dataset.from_list(train_rows)
    _check_reward_columns(train_dataset, rewards, source)
    heldout_prompts = [_heldout_prompt(row, source) for row in heldout_rows]

    logger.info("Training set: %d examples from the %s.", len(train_dataset), source)
    return TrainingData(train_dataset, heldout_prompts)


def build_training_dataset(config: DatasetConfig, *, trainer: str | None = None, rewards: Sequence[str] = ()) -> Dataset:
    """Build the training set a recipe's `dataset` section describes, without held-out prompts.

    See [`load_training_data`] for the arguments and the errors.

    Returns:
        `datasets.Dataset`: the rows of the built-in set, the user's file or the Hub data
        set, shuffled with `config.seed` and cut to `config.num_examples`.
    """
    return load_training_data(config, trainer=trainer, rewards=rewards).train_dataset


def check_builtin_dataset(name: str, trainer: str, rewards: Sequence[str] = ()) -> None:
    """Raise `RecipeError` unless `name` is a built-in data set whose columns fit `trainer` and `rewards`."""
    builtin = BUILTIN_DATASETS.get(name)
    if builtin is None:
        known = ", ".join(sorted(BUILTIN_DATASETS))
        raise RecipeError(f"Unknown dataset.name {name!r}. Built-in data sets: {known}.")
    try:
        check_trainer_columns(trainer, builtin.columns, f"dataset.name {name!r}", rewards)
    except RecipeError as error:
        fitting = [other for other, data in BUILTIN_DATASETS.items() if _fits(data.columns, trainer, rewards)]
        hint = f" Built-in data sets for trainer {trainer!r}: {', '.join(fitting)}." if fitting else ""
        raise RecipeError(f"{error}{hint}") from None


def _fits(columns: Sequence[str], trainer: str, rewards: Sequence[str]) -> bool:
    try:
        check_trainer_columns(trainer, columns, "", rewards)
    except RecipeError:
        return False
    return True


def _read_rows(config: DatasetConfig) -> tuple[list[dict[str, Any]] | Dataset, str]:
    """Return every row of the configured source in its own order, and a description of the source."""
    if config.path is not None:
        if config.name != DatasetConfig.name:
            logger.info("dataset.path is set, so dataset.name %r is ignored.", config.name)
        return read_jsonl_examples(Path(config.path)), f"dataset file {config.path}"

    if config.hub is not None:
        if config.name != DatasetConfig.name:
            logger.info("dataset.hub is set, so dataset.name %r is ignored.", config.name)
        from canopy_monitor.hub_datasets import load_hub_dataset

        return load_hub_dataset(config), f"data set {config.hub!r}"

    builtin = BUILTIN_DATASETS.get(config.name)
    if builtin is None:
        known = ", ".join(sorted(BUILTIN_DATASETS))
        raise RecipeError(f"Unknown dataset.name {config.name!r}. Built-in data sets: {known}.")
    return builtin.build(config.seed), f"data set {config.name!r}"


def _row_columns(rows: list[dict[str, Any]]) -> list[str]:
    return list(rows[0]) if rows else []


def _select(rows: list[dict[str, Any]] | Dataset, indices: list[int]) -> list[dict[str, Any]] | Dataset:
    if isinstance(rows, Dataset):
        return rows.select(indices)
    return [rows[index] for index in indices]


def _check_reward_columns(dataset: Dataset, rewards: Sequence[str], source: str) -> None:
    """Raise `RecipeError` when a column that a reward function reads contains a value it cannot use."""
    for function in get_reward_functions(rewards):
        for column in required_columns(function):
            check = COLUMN_CHECKS.get(column)
            if check is None:
                continue
            for index, value in enumerate(dataset[column]):
                try:
                    check(value)
                except ValueError as error:
                    raise RecipeError(f"Row {index} of the {source}, column `{column}`: {error}") from None


def _heldout_prompt(row: dict[str, Any], source: str) -> Any:
    try:
        return row_prompt(row)
    except ValueError as error:
        raise RecipeError(f"monitor.prompts 'dataset' needs a prompt in every row of the {source}, but {error}.") from None


def build_python_docstring_examples(seed: int) -> list[dict[str, Any]]:
    """Return question/answer conversations about the standard library, in a fixed order.

    `seed` picks the wording of each "what does it do" question.
    """
    rng = random.Random(seed)
    rows = []
    for module_name, module_summary in _module_summaries():
        rows.append(_conversation(f"What is the Python `{module_name}` module for?", module_summary))

    items = list(_documented_objects())
    # "Which module provides `open`?" has several right answers, so only names that one
    # module provides get that question.
    module_counts = Counter(_short_name(item) for item in items if item.owner_kind == "module")

    for item in items:
        question = rng.choice(DESCRIBE_QUESTIONS).format(name=item.name)
        rows.append(_conversation(question, f"`{item.name}`: {item.summary}"))

        short_name = _short_name(item)
        first_sentence = _first_sentence(item.summary)
        if item.owner_kind == "module" and module_counts[short_name] == 1:
            answer = f"`{short_name}` is provided by the `{item.owner}` module. {first_sentence}"
            rows.append(_conversation(f"Which Python module provides `{short_name}`?", answer))

        if item.signature is not None:
            answer = f"Call it as `{item.name}{item.signature}`. {first_sentence}"
            rows.append(_conversation(f"How do I call `{item.name}`?", answer))
    return rows


def build_python_docstring_preferences(seed: int) -> list[dict[str, Any]]:
    """Return preference pairs about the standard library: a right short answer against a wrong or rambling one.

    The questions and the `chosen` answers are those of [`build_python_docstring_examples`].
    Each `rejected` answer is plausible but worse:

    - "What does `X` do?": half of the time (drawn with `seed`) the summary of another
      object of the same module or class, presented as X's, so it is wrong. Otherwise
      the right summary followed by the first sentences of three unrelated objects, so
      it rambles and is about three times as long.
    - "What is the `m` module for?": another module's summary.
    - "Which module provides `f`?": the same sentence naming another module.
    - "How do I call `X`?": the signature of another callable of the same owner.

    Rows are in TRL's conversational preference type with an explicit prompt:
    `{"prompt": [user turn], "chosen": [assistant turn], "rejected": [assistant turn]}`.
    """
    rng = random.Random(seed)
    rows = []

    modules = list(_module_summaries())
    for module_name, summary in modules:
        other_summary = _pick_other(rng, [other for _, other in modules], summary)
        rows.append(_preference(f"What is the Python `{module_name}` module for?", summary, other_summary))

    items = list(_documented_objects())
    by_owner: dict[str, list[DocumentedObject]] = defaultdict(list)
    for item in items:
        by_owner[item.owner].append(item)
    module_counts = Counter(_short_name(item) for item in items if item.owner_kind == "module")
    module_names = sorted({item.owner for item in items if item.owner_kind == "module"})

    for item in items:
        question = rng.choice(DESCRIBE_QUESTIONS).format(name=item.name)
        chosen = f"`{item.name}`: {item.summary}"
        if rng.random() < 0.5:
            neighbours = [other.summary for other in by_owner[item.owner]]
            all_summaries = [other.summary for other in items]
            rejected = f"`{item.name}`: {_pick_other(rng, neighbours, item.summary, fallback=all_summaries)}"
        else:
            unrelated = [other for other in rng.sample(items, 4) if other is not item][:3]
            rejected = " ".join([chosen, *(_first_sentence(other.summary) for other in unrelated)])
        rows.append(_preference(question, chosen, rejected))

        short_name = _short_name(item)
        first_sentence = _first_sentence(item.summary)
        if item.owner_kind == "module" and module_counts[short_name] == 1:
            wrong_module = _pick_other(rng, module_names, item.owner)
            chosen = f"`{short_name}` is provided by the `{item.owner}` module. {first_sentence}"
            rejected = f"`{short_name}` is provided by the `{wrong_module}` module. {first_sentence}"
            rows.append(_preference(f"Which Python module provides `{short_name}`?", chosen, rejected))

        if item.signature is not None:
            signatures = [other.signature for other in by_owner[item.owner] if other.signature is not None]
            all_signatures = [other.signature for other in items if other.signature is not None]
            wrong_signature = _pick_other(rng, signatures, item.signature, fallback=all_signatures)
            chosen = f"Call it as `{item.name}{item.signature}`. {first_sentence}"
            rejected = f"Call it as `{item.name}{wrong_signature}`. {first_sentence}"
            rows.append(_preference(f"How do I call `{item.name}`?", chosen, rejected))
    return rows


@dataclass(frozen=True)
class BuiltinDataset:
    """A data set built at run time: its builder, which takes the seed, and the columns of its rows."""

    build: Callable[[int], list[dict[str, Any]]]
    columns: tuple[str, ...]


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "python-docstrings": BuiltinDataset(build_python_docstring_examples, ("messages",)),
    "python-docstrings-preferences": BuiltinDataset(build_python_docstring_preferences, ("prompt", "chosen", "rejected")),
    "arithmetic-word-problems": BuiltinDataset(build_arithmetic_problems, ("prompt", "answer")),
}


def _pick_other(rng: random.Random, candidates: Sequence[str], current: str, fallback: Sequence[str] = ()) -> str:
    """Draw a candidate that differs from `current`, from `candidates` or else from `fallback`."""
    for pool in (candidates, fallback):
        others = [candidate for candidate in pool if candidate != current]
        if others:
            return rng.choice(others)
    raise ValueError(f"No alternative to {current!r} to draw from.")


def _preference(question: str, chosen: str, rejected: str) -> dict[str, Any]:
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def _short_name(item: DocumentedObject) -> str:
    return item.name.rsplit(".", 1)[-1]


def _conversation(question: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _module_summaries() -> Iterator[tuple[str, str]]:
    for module_name in STDLIB_MODULES:
        module = _import_or_none(module_name)
        if module is None:
            continue
        summary = summarize_docstring(module.__doc__)
        if summary is not None:
            yield module_name, summary


@functools.cache
def _documented_objects() -> tuple[DocumentedObject, ...]:
    """Return each documented public object once, under the first name found for it.

    The result is cached because both docstring sets read it, and reading every
    docstring takes seconds.
    """
    seen_ids: set[int] = set()
    items = []
    for value, item in _candidate_objects():
        if id(value) in seen_ids:
            continue
        seen_ids.add(id(value))
        items.append(item)
    return tuple(items)


def _candidate_objects() -> Iterator[tuple[Any, DocumentedObject]]:
    import builtins

    for name in sorted(vars(builtins)):
        value = getattr(builtins, name)
        if not name.startswith("_") and inspect.isbuiltin(value):
            yield from _describe(value, name, "builtins", "builtins")
    for cls in BUILTIN_TYPES:
        yield from _describe_methods(cls, cls.__name__)

    for module_name in STDLIB_MODULES:
        module = _import_or_none(module_name)
        if module is None:
            continue
        for name in sorted(vars(module)):
            value = getattr(module, name)
            # An alias such as `array.ArrayType` would repeat `array.array` under another name.
            is_alias = getattr(value, "__name__", name) != name
            if name.startswith("_") or is_alias or not _defined_in(value, module):
                continue
            if inspect.isclass(value):
                yield from _describe(value, f"{module_name}.{name}", module_name, "module")
                yield from _describe_methods(value, f"{module_name}.{name}")
            elif inspect.isroutine(value):
                yield from _describe(value, f"{module_name}.{name}", module_name, "module")


def _describe_methods(cls: type, class_name: str) -> Iterator[tuple[Any, DocumentedObject]]:
    for name in sorted(vars(cls)):
        value = vars(cls)[name]
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if not name.startswith("_") and inspect.isroutine(value):
            yield from _describe(value, f"{class_name}.{name}", class_name, "class")


def _describe(value: Any, name: str, owner: str, owner_kind: str) -> Iterator[tuple[Any, DocumentedObject]]:
    # `__doc__` rather than `inspect.getdoc`, which falls back to a parent class's docstring.
    doc = value.__doc__ if isinstance(getattr(value, "__doc__", None), str) else None
    summary = summarize_docstring(doc)
    if summary is not None:
        yield value, DocumentedObject(name, owner, owner_kind, summary, _signature_text(value, owner_kind))


def _defined_in(value: Any, module: Any) -> bool:
    """Return whether `value` belongs to `module` rather than being imported into it.

    A C accelerator such as `_heapq` counts as part of `heapq`.
    """
    owner = getattr(value, "__module__", None)
    if not isinstance(owner, str):
        return False
    base_name = module.__name__.rsplit(".", 1)[-1]
    return owner in (module.__name__, f"_{base_name}") or (module.__name__ == "os.path" and owner == "posixpath")


def _signature_text(value: Any, owner_kind: str) -> str | None:
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):
        return None

    parameters = list(signature.parameters.values())
    if owner_kind == "class" and parameters and parameters[0].name in ("self", "cls"):
        signature = signature.replace(parameters=parameters[1:])
    text = str(signature.replace(return_annotation=inspect.Signature.empty))
    # Defaults printed as reprs (`<object object at 0x...>`, `<class ...>`) read badly and may change between runs.
    if "<" in text or len(text) > MAX_SIGNATURE_CHARS:
        return None
    return text


def summarize_docstring(doc: str | None) -> str | None:
    """Return the first prose paragraph of a docstring, cut to whole sentences.

    Leading signature lines (`loads(s) -> obj`) are skipped, whitespace is collapsed
    and reST literals (``` ``x`` ```) become Markdown code. Returns `None` when the
    paragraph is missing, too short, contains a doctest or a list, or its first
    sentence alone exceeds `MAX_SUMMARY_CHARS`.
    """
    if not doc:
        return None
    lines = inspect.cleandoc(doc).splitlines()
    while lines and (_SIGNATURE_LINE.match(lines[0]) or not lines[0].strip() or set(lines[0].strip()) == {"-"}):
        lines.pop(0)
    paragraph = re.split(r"\n\s*\n", "\n".join(lines), maxsplit=1)[0]

    text = " ".join(paragraph.split())
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    if len(text) < MIN_SUMMARY_CHARS or ">>>" in text or text.endswith(":") or not text[0].isupper():
        return None

    summary = ""
    for sentence in _SENTENCE_END.split(text):
        candidate = f"{summary} {sentence}".strip()
        if len(candidate) > MAX_SUMMARY_CHARS:
            break
        summary = candidate
    if not summary:
        return None
    if summary[-1] not in ".!?":
        summary += "."
    return summary


def _first_sentence(summary: str) -> str:
    return _SENTENCE_END.split(summary, maxsplit=1)[0]


def _import_or_none(module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError:
        logger.debug("Standard-library module %s is not available; its docstrings are skipped.", module_name)
        return None


# User data


def read_jsonl_examples(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file of training examples in one of TRL's data set types.

    Every line must be a JSON object in one of these layouts, all lines in the same one:

    - `messages`: a list of `{"role", "content"}` turns (language modeling, for SFT);
    - `prompt` and `completion`: both strings, or both lists of turns (prompt-completion, for SFT);
    - `chosen` and `rejected`, with or without `prompt`: all strings, or all lists of
      turns (preference, for DPO);
    - `prompt` alone: a string or a list of turns (prompt-only, for GRPO and RLOO). The
      other fields are kept, because reward functions read them (such as `answer`),
      and every line must have the same ones.

    Fields that the layout does not use are dropped, except in the prompt-only layout.

    Raises:
        RecipeError: the file is missing, empty or a line is malformed. The message
            gives the path and line number.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise RecipeError(f"Dataset file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"Failed to read dataset file {path}: {error}") from None

    rows = []
    formats = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise RecipeError(f"{where} is not valid JSON: {error.msg}.") from None
        if not isinstance(record, dict):
            raise RecipeError(f"{where} must be a JSON object, got {type(record).__name__}.")

        row, row_format = _parse_example(where, record)
        rows.append(row)
        formats.add(row_format)
        if len(formats) > 1:
            raise RecipeError(f"{where} mixes formats ({', '.join(sorted(formats))}). Use one format per file.")

    if not rows:
        raise RecipeError(f"Dataset file {path} contains no examples.")
    return rows


def _parse_example(where: str, record: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Return the row that one JSONL record gives, and a label of its layout."""
    if "messages" in record:
        _check_turns(where, "messages", record["messages"])
        return {"messages": record["messages"]}, "messages"

    if "chosen" in record and "rejected" in record:
        keys = [key for key in ("prompt", "chosen", "rejected") if key in record]
        form = _text_or_turns(where, {key: record[key] for key in keys})
        prompt_kind = "explicit prompt" if "prompt" in record else "implicit prompt"
        return {key: record[key] for key in keys}, f"preference {form}, {prompt_kind}"

    if "prompt" in record and "completion" in record:
        form = _text_or_turns(where, {"prompt": record["prompt"], "completion": record["completion"]})
        label = "prompt/completion text" if form == "text" else "prompt/completion conversations"
        return {"prompt": record["prompt"], "completion": record["completion"]}, label

    if "prompt" in record:
        form = _text_or_turns(where, {"prompt": record["prompt"]})
        extra = sorted(key for key in record if key != "prompt")
        label = f"prompt-only {form}" + (f" with {', '.join(extra)}" if extra else "")
        return dict(record), label

    raise RecipeError(
        f"{where} needs a `messages` field, `prompt` and `completion` fields, `chosen` and `rejected` "
        "fields, or a `prompt` field alone."
    )


def _text_or_turns(where: str, fields: dict[str, Any]) -> str:
    """Return `"text"` when every field is a string, else `"conversations"` after checking that each is a list of turns."""
    if all(isinstance(value, str) for value in fields.values()):
        return "text"
    for name, value in fields.items():
        _check_turns(where, name, value)
    return "conversations"


def _check_turns(where: str, field_name: str, turns: Any) -> None:
    if not isinstance(turns, list) or not turns:
        raise RecipeError(f"{where}: `{field_name}` must be a non-empty list of {{'role', 'content'}} turns.")
    for turn in turns:
        valid = isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)
        if not valid:
            raise RecipeError(f"{where}: every turn in `{field_name}` needs string `role` and `content`, got {turn!r}.")
