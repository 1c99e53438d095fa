"""Held-out prompts: loading them from files or lists, and encoding them for a model.

A prompt is either plain text or a chat conversation in TRL's conversational format
(a list of `{"role": ..., "content": ...}` messages). The same prompts are encoded once
and reused at every monitoring point.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Config attributes that store the maximum sequence length, in the order they are tried.
_CONTEXT_LENGTH_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")

# Number of characters of a prompt quoted in error messages.
_PREVIEW_CHARS = 60


class PromptError(ValueError):
    """A prompt source or a prompt that cannot be used: missing file, malformed content, or too long."""


@dataclass(frozen=True)
class Prompt:
    """One held-out prompt, either plain text or a chat conversation.

    Exactly one of the two fields is set.

    Args:
        text (`str`, *optional*):
            Plain-text prompt.
        messages (`tuple[dict[str, str], ...]`, *optional*):
            Chat conversation in TRL's conversational format: each message has a `role`
            and a string `content`.
    """

    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None

    def __post_init__(self) -> None:
        if (self.text is None) == (self.messages is None):
            raise PromptError("A Prompt needs exactly one of `text` and `messages`.")
        if isinstance(self.messages, list):
            object.__setattr__(self, "messages", tuple(self.messages))

    @property
    def display(self) -> str:
        """Short human-readable form: the text, or the content of the last user message."""
        if self.text is not None:
            return self.text
        for message in reversed(self.messages):
            if message["role"] == "user":
                return message["content"]
        return self.messages[-1]["content"]


def load_prompts(source: Any, *, limit: int | None = None) -> list[Prompt]:
    """Load held-out prompts from a file, a list or a dataset.

    Args:
        source (`str`, `os.PathLike`, `list` or dataset):
            One of:

            - a path to a `.json` file (a list of objects) or a `.jsonl` file (one object
              per line). Each object has a `prompt` field that is a string or a list of
              role/content messages. Blank lines in a `.jsonl` file are skipped. A `str` is
              always read as a path, never as a prompt: put literal prompts in a list.
            - a list whose items are strings, conversations (lists of role/content
              messages), objects with a `prompt` field, or `Prompt` instances.
            - a dataset with a `prompt` column, such as `datasets.Dataset`.
        limit (`int`, *optional*):
            Keep only the first `limit` prompts. Prompts after them are not validated, and
            lines after them in a `.jsonl` file are not read.

    Returns:
        `list[Prompt]`: at least one prompt.

    Raises:
        PromptError: the file is missing, empty or malformed, or a prompt is empty or has
            the wrong type. The message names the path and, for `.jsonl` files, the line.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise PromptError(f"limit must be a positive integer or None, got {limit!r}.")

    if isinstance(source, (str, os.PathLike)):
        prompts = _read_prompt_file(Path(source), limit)
        origin = f"prompts file {str(source)!r}"
    else:
        prompts = list(islice(_prompts_from_object(source), limit))
        origin = "the prompt source"

    if not prompts:
        raise PromptError(f"No prompts found in {origin}: expected at least one prompt.")
    return prompts


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    use_chat_template: bool,
    max_new_tokens: int,
    context_length: int | None,
) -> list[list[int]]:
    """Tokenize prompts into the input ids that generation starts from.

    With `use_chat_template` and a tokenizer that has a chat template, each prompt is rendered
    with `apply_chat_template(..., add_generation_prompt=True)` and then tokenized without
    adding special tokens, because the template already contains them. A plain-text prompt
    becomes a single user message. Otherwise the prompt text is tokenized with the tokenizer's
    default special tokens, and a conversation is fed as its message contents joined by
    blank lines.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Tokenizer of the monitored model.
        prompts (`Sequence[Prompt]`):
            Prompts to encode, for example from [`load_prompts`].
        use_chat_template (`bool`):
            Format prompts with the chat template when the tokenizer has one. When it has
            none, a warning is logged and plain text is used.
        max_new_tokens (`int`):
            Length cap of a rollout, reserved after each prompt within `context_length`.
        context_length (`int` or `None`):
            Maximum sequence length of the model, for example from [`model_context_length`].
            `None` skips the length check.

    Returns:
        `list[list[int]]`: one list of token ids per prompt, in the order of `prompts`.

    Raises:
        PromptError: a prompt encodes to no tokens, or its tokens plus `max_new_tokens`
            exceed `context_length`, or the chat template rejects a conversation.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise PromptError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")

    has_chat_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template and not has_chat_template:
        logger.warning(
            "use_chat_template is set but the tokenizer has no chat template, so prompts are fed as plain text."
        )

    if use_chat_template and has_chat_template:
        texts = [_render_chat(tokenizer, prompt, index) for index, prompt in enumerate(prompts)]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        texts = [_plain_text(prompt) for prompt in prompts]
        encoded = tokenizer(texts)["input_ids"]

    input_ids = [list(ids) for ids in encoded]
    for index, (prompt, ids) in enumerate(zip(prompts, input_ids)):
        _check_length(index, prompt, len(ids), max_new_tokens, context_length)
    return input_ids


def model_context_length(model_or_config: Any) -> int | None:
    """Return the maximum sequence length of a model, or `None` when its config does not state one.

    Args:
        model_or_config ([`~transformers.PreTrainedModel`], PEFT model or [`~transformers.PretrainedConfig`]):
            The model (wrapped or not) or its config. For a multimodal config, the text
            config is read.
    """
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()

    for attribute in _CONTEXT_LENGTH_ATTRIBUTES:
        value = getattr(config, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _read_prompt_file(path: Path, limit: int | None) -> list[Prompt]:
    if not path.exists():
        raise PromptError(
            f"Prompts file {str(path)!r} was not found. A string is read as a path to a .json "
            "or .jsonl file; pass literal prompts as a list of strings."
        )
    if not path.is_file():
        raise PromptError(f"Prompts path {str(path)!r} is not a file: expected a .json or .jsonl file.")

    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise PromptError(f"Prompts file {str(path)!r} has an unsupported extension: expected .json or .jsonl.")

    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise PromptError(f"Prompts file {str(path)!r} is not valid UTF-8: {error}.") from error
    except OSError as error:
        raise PromptError(f"Failed to read prompts file {str(path)!r}: {error.strerror or error}.") from error
    if not content.strip():
        raise PromptError(f"Prompts file {str(path)!r} is empty: expected at least one prompt.")

    if suffix == ".jsonl":
        return list(islice(_parse_jsonl(path, content), limit))
    return list(islice(_parse_json(path, content), limit))


def _parse_jsonl(path: Path, content: str) -> Iterator[Prompt]:
    # Split on newlines only: `str.splitlines` also splits on U+2028 and other
    # separators that JSON strings may contain unescaped.
    for line_number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{str(path)!r}, line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptError(f"Malformed JSON in prompts file {where}: {error.msg} (column {error.colno}).") from error
        except RecursionError:
            raise PromptError(f"Malformed JSON in prompts file {where}: nested too deeply.") from None
        yield _prompt_from_record(record, where)


def _parse_json(path: Path, content: str) -> Iterator[Prompt]:
    try:
        records = json.loads(content)
    except json.JSONDecodeError as error:
        raise PromptError(
            f"Malformed JSON in prompts file {str(path)!r}, line {error.lineno}: {error.msg} (column {error.colno})."
        ) from error
    except RecursionError:
        raise PromptError(f"Malformed JSON in prompts file {str(path)!r}: nested too deeply.") from None
    if not isinstance(records, list):
        raise PromptError(
            f"Prompts file {str(path)!r} must contain a JSON list of objects with a 'prompt' field, "
            f"got a {type(records).__name__}."
        )

    for index, record in enumerate(records):
        yield _prompt_from_record(record, f"{str(path)!r}, item {index}")


def _prompt_from_record(record: Any, where: str) -> Prompt:
    if not isinstance(record, dict):
        raise PromptError(
            f"Invalid prompt at {where}: expected an object with a 'prompt' field, got {_describe(record)}."
        )
    if "prompt" not in record and "role" in record:
        raise PromptError(
            f"Invalid prompt at {where}: found a single chat message where a prompt was expected. "
            "A conversation is a list of messages, so a list of conversations is a list of lists."
        )
    if "prompt" not in record:
        raise PromptError(f"Invalid prompt at {where}: the object has no 'prompt' field (fields: {sorted(record)}).")
    return _make_prompt(record["prompt"], where)


def _prompts_from_object(source: Any) -> Iterator[Prompt]:
    """Yield prompts from an in-memory list, or from the `prompt` column of a dataset."""
    # `datasets.Dataset` has `column_names`, a pandas DataFrame has `columns`.
    column_names = getattr(source, "column_names", None)
    if column_names is None:
        column_names = getattr(source, "columns", None)
    if column_names is not None or isinstance(source, Mapping):
        names = list(column_names) if column_names is not None else list(source)
        if "prompt" not in names:
            raise PromptError(f"The prompt dataset has no 'prompt' column (columns: {list(names)}).")
        for index, value in enumerate(source["prompt"]):
            yield _make_prompt(value, f"dataset row {index}")
        return

    if not isinstance(source, Iterable) or isinstance(source, (bytes, bytearray)):
        raise PromptError(
            f"Unsupported prompt source {_describe(source)}: expected a path to a .json or .jsonl file, "
            "a list of prompts, or a dataset with a 'prompt' column."
        )

    for index, item in enumerate(source):
        where = f"prompt list, index {index}"
        if isinstance(item, Prompt):
            yield item
        elif isinstance(item, dict):
            yield _prompt_from_record(item, where)
        else:
            yield _make_prompt(item, where)


def _check_encodable(text: str, where: str) -> None:
    # A lone surrogate (from an escaped "\ud800" in JSON) cannot be tokenized.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PromptError(f"Invalid prompt at {where}: the text is not valid Unicode ({error.reason}).") from None


def _make_prompt(value: Any, where: str) -> Prompt:
    """Build a prompt from a string or a list of role/content messages."""
    if isinstance(value, str):
        if not value.strip():
            raise PromptError(f"Empty prompt at {where}: expected non-blank text.")
        _check_encodable(value, where)
        return Prompt(text=value)

    if isinstance(value, (list, tuple)):
        if not value:
            raise PromptError(f"Empty conversation at {where}: expected at least one message.")
        return Prompt(messages=tuple(_make_message(message, where, i) for i, message in enumerate(value)))

    raise PromptError(
        f"Invalid prompt at {where}: expected a string or a list of role/content messages, got {_describe(value)}."
    )


def _make_message(message: Any, where: str, index: int) -> dict[str, str]:
    if not isinstance(message, Mapping):
        raise PromptError(
            f"Invalid message {index} at {where}: expected an object with 'role' and 'content', "
            f"got {_describe(message)}."
        )
    for key in ("role", "content"):
        if key not in message:
            raise PromptError(f"Invalid message {index} at {where}: the '{key}' field is missing.")
        if not isinstance(message[key], str):
            raise PromptError(
                f"Invalid message {index} at {where}: '{key}' must be a string, got {_describe(message[key])}."
            )
    if not message["role"].strip():
        raise PromptError(f"Invalid message {index} at {where}: 'role' is empty.")
    _check_encodable(message["content"], f"{where}, message {index}")

    # A copy, so that later edits to the caller's dict cannot change a frozen Prompt.
    return dict(message)


def _render_chat(tokenizer: Any, prompt: Prompt, index: int) -> str:
    from jinja2 import TemplateError  # transformers needs jinja2 only for chat templates

    messages = list(prompt.messages) if prompt.messages is not None else [{"role": "user", "content": prompt.text}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except (TemplateError, ValueError) as error:
        # Templates reject some conversations on purpose, for example when roles do not
        # alternate, so the template's own message is passed on with the prompt.
        raise PromptError(f"The chat template rejected prompt {index} ({_preview(prompt)}): {error}") from error
    if not isinstance(rendered, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(rendered).__name__}, expected str.")
    return rendered


def _plain_text(prompt: Prompt) -> str:
    if prompt.text is not None:
        return prompt.text
    return "\n\n".join(message["content"] for message in prompt.messages)


def _check_length(index: int, prompt: Prompt, num_tokens: int, max_new_tokens: int, context_length: int | None) -> None:
    if num_tokens == 0:
        raise PromptError(f"Prompt {index} ({_preview(prompt)}) encodes to zero tokens: expected a non-empty prompt.")
    if context_length is None or num_tokens + max_new_tokens <= context_length:
        return
    raise PromptError(
        f"Prompt {index} ({_preview(prompt)}) is too long: {num_tokens} prompt tokens plus "
        f"max_new_tokens={max_new_tokens} exceed the model's context length of {context_length} tokens. "
        "Use a shorter prompt or a smaller max_new_tokens."
    )


def _preview(prompt: Prompt) -> str:
    return repr(_truncate(prompt.display))


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {_truncate(repr(value))}"


def _truncate(text: str) -> str:
    if len(text) > _PREVIEW_CHARS:
        return text[:_PREVIEW_CHARS] + "..."
    return text
