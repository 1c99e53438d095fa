"""Training sets for the recipes, built at run time from material already on the machine.

The built-in `python-docstrings` set is made of questions about Python's standard
library, answered from the library's own docstrings:

- "What does `json.dumps` do in Python?" -> the first paragraph of `json.dumps.__doc__`;
- "Which module provides `dumps`?" -> the module's name and the docstring's first sentence;
- "How do I call `json.dumps`?" -> the signature from `inspect.signature` and the first sentence;
- "What is the Python `json` module for?" -> the first paragraph of the module docstring.

Provenance: the docstrings are read with `inspect` from the modules of the running
interpreter, so nothing is downloaded. They are part of CPython and are distributed
under the Python Software Foundation License Version 2. Every answer is one or two
sentences long (at most `MAX_SUMMARY_CHARS` characters), a short and uniform style that
a model picks up within a few hundred steps.

The set is deterministic for a given seed and Python version. Docstrings change between
Python releases, so another interpreter gives other examples and possibly another count.

A recipe may instead point at the user's own JSONL file (`dataset: {path: ...}`), in
TRL's conversational format (`{"messages": [...]}`) or prompt/completion format.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from canopy_monitor.recipe import DatasetConfig, RecipeError

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


def build_training_dataset(config: DatasetConfig) -> Dataset:
    """Build the training set a recipe's `dataset` section describes.

    Args:
        config (`DatasetConfig`): the recipe's `dataset` section.

    Returns:
        `datasets.Dataset`: TRL conversational rows (`messages`), or the rows of the
        user's file, shuffled with `config.seed` and cut to `config.num_examples`.

    Raises:
        RecipeError: the name is unknown, the file is missing or malformed, or fewer
            examples exist than `num_examples` requests.
    """
    if config.path is not None:
        if config.name != DatasetConfig.name:
            logger.info("dataset.path is set, so dataset.name %r is ignored.", config.name)
        rows = read_jsonl_examples(Path(config.path))
        source = f"dataset file {config.path}"
    else:
        builder = DATASET_BUILDERS.get(config.name)
        if builder is None:
            known = ", ".join(sorted(DATASET_BUILDERS))
            raise RecipeError(f"Unknown dataset.name {config.name!r}. Built-in data sets: {known}.")
        rows = builder(config.seed)
        source = f"data set {config.name!r}"

    random.Random(config.seed).shuffle(rows)
    if config.num_examples is not None:
        if config.num_examples > len(rows):
            raise RecipeError(
                f"dataset.num_examples is {config.num_examples}, but the {source} has only {len(rows)} examples."
            )
        rows = rows[: config.num_examples]

    logger.info("Training set: %d examples from the %s.", len(rows), source)
    return Dataset.from_list(rows)


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


DATASET_BUILDERS: dict[str, Callable[[int], list[dict[str, Any]]]] = {
    "python-docstrings": build_python_docstring_examples,
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


def _documented_objects() -> Iterator[DocumentedObject]:
    """Yield each documented public object once, under the first name found for it."""
    seen_ids: set[int] = set()
    for value, item in _candidate_objects():
        if id(value) in seen_ids:
            continue
        seen_ids.add(id(value))
        yield item


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
    """Read a JSONL file of training examples in TRL's conversational or prompt/completion format.

    Every line must be a JSON object with a `messages` list of `{"role", "content"}`
    turns, or with `prompt` and `completion` (both strings, or both lists of turns).
    All lines must use the same format. Other fields are dropped.

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

        if "messages" in record:
            _check_turns(where, "messages", record["messages"])
            rows.append({"messages": record["messages"]})
            formats.add("messages")
        elif "prompt" in record and "completion" in record:
            prompt, completion = record["prompt"], record["completion"]
            if isinstance(prompt, str) and isinstance(completion, str):
                formats.add("prompt/completion text")
            else:
                _check_turns(where, "prompt", prompt)
                _check_turns(where, "completion", completion)
                formats.add("prompt/completion conversations")
            rows.append({"prompt": prompt, "completion": completion})
        else:
            raise RecipeError(f"{where} needs a `messages` field or `prompt` and `completion` fields.")

        if len(formats) > 1:
            raise RecipeError(f"{where} mixes formats ({', '.join(sorted(formats))}). Use one format per file.")

    if not rows:
        raise RecipeError(f"Dataset file {path} contains no examples.")
    return rows


def _check_turns(where: str, field_name: str, turns: Any) -> None:
    if not isinstance(turns, list) or not turns:
        raise RecipeError(f"{where}: `{field_name}` must be a non-empty list of {{'role', 'content'}} turns.")
    for turn in turns:
        valid = isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)
        if not valid:
            raise RecipeError(f"{where}: every turn in `{field_name}` needs string `role` and `content`, got {turn!r}.")
