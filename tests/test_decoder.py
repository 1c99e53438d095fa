import pytest
import torch

from canopy_monitor.config import SamplingConfig
from canopy_monitor.prompts import Prompt
from canopy_monitor.sampling import build_warpers, sample_rollouts, sampler
from canopy_monitor.sampling.decoder import _Slots, _SlotLayer, decode_prompts
from canopy_monitor.sampling.draws import inverse_transform_sample, rollout_uniforms
from canopy_monitor.sampling.sampler import PolicyGeneration

from conftest import make_model
from test_sampler import teacher_forced_figures

PROMPTS = [
    Prompt(text="what is the sum of two plus two ?"),
    Prompt(text="hello"),
    Prompt(text="tell me a story"),
]
EOS = 2


def test_draws_follow_the_cumulative_probabilities():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]])
    logprobs = probs.log().expand(6, -1)
    uniforms = torch.tensor([0.0, 0.05, 0.11, 0.69, 0.71, 1.0 - 1e-16], dtype=torch.float64)

    tokens = inverse_transform_sample(logprobs, uniforms)

    assert tokens.tolist() == [0, 0, 2, 2, 3, 3]


def test_evenly_spaced_uniforms_give_each_token_its_share():
    # With n evenly spaced uniforms a token of probability p is drawn n * p times, up
    # to one draw at each boundary; filtered tokens (probability 0) never.
    logits = torch.tensor([2.0, -1.0, float("-inf"), 0.5, 0.0, float("-inf"), 1.0])
    logprobs = torch.log_softmax(logits, dim=-1)
    n = 100_000
    uniforms = (torch.arange(n, dtype=torch.float64) + 0.5) / n

    tokens = inverse_transform_sample(logprobs.expand(n, -1), uniforms)

    counts = torch.bincount(tokens, minlength=7).double()
    expected = logprobs.double().exp() * n
    assert counts[2] == 0
    assert counts[5] == 0
    assert torch.all((counts - expected).abs() <= 1)


def test_prompt_uniforms_depend_on_seed_and_key_only():
    first = rollout_uniforms(seed=3, key=5, num_rollouts=4, max_new_tokens=6)
    again = rollout_uniforms(seed=3, key=5, num_rollouts=4, max_new_tokens=6)
    longer = rollout_uniforms(seed=3, key=5, num_rollouts=4, max_new_tokens=9)

    assert first.dtype == torch.float64
    assert torch.equal(first, again)
    assert not torch.equal(first, rollout_uniforms(seed=3, key=6, num_rollouts=4, max_new_tokens=6))
    assert not torch.equal(first, rollout_uniforms(seed=4, key=5, num_rollouts=4, max_new_tokens=6))
    assert bool(((first >= 0) & (first < 1)).all())
    # torch.rand fills row-major, so a longer cap changes which uniform each step gets.
    assert longer.shape == (4, 9)


@pytest.mark.parametrize("rows", [1, 3, 5, 8, 64])
def test_rollouts_do_not_depend_on_rows_or_order(tokenizer, rows):
    model = make_model(seed=2)
    with torch.no_grad():
        model.lm_head.weight[EOS] += 0.5
    config = SamplingConfig(num_rollouts=4, max_new_tokens=12, seed=3, use_chat_template=False)
    reference = decode(model, tokenizer, config, PROMPTS, rows=12)

    run = decode(model, tokenizer, config, PROMPTS, rows=rows, order=[2, 0, 1])

    for index in range(len(PROMPTS)):
        ours, theirs = run.rollouts[index], reference.rollouts[index]
        assert torch.equal(ours.generated, theirs.generated)
        torch.testing.assert_close(ours.step_entropies, theirs.step_entropies, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.token_logprobs, theirs.token_logprobs, rtol=1e-5, atol=1e-4)


def test_prompt_keys_reproduce_a_share_of_the_prompts(tokenizer):
    # A process that samples prompts 1 and 2 of the list with their keys draws what
    # one process sampling the whole list draws for them.
    model = make_model(seed=2)
    with torch.no_grad():
        model.lm_head.weight[EOS] += 0.5
    config = SamplingConfig(num_rollouts=4, max_new_tokens=12, seed=3, use_chat_template=False, batch_size=8)
    whole = sample_rollouts(model, tokenizer, PROMPTS, config)

    share = sample_rollouts(model, tokenizer, PROMPTS[1:], config, prompt_keys=[1, 2])
    unkeyed = sample_rollouts(model, tokenizer, PROMPTS[1:], config)

    assert [r.token_ids for r in share] == [r.token_ids for r in whole[1:]]
    assert [r.token_ids for r in unkeyed] != [r.token_ids for r in whole[1:]]
    with pytest.raises(ValueError, match="prompt_keys has 1 keys for 2 prompts"):
        sample_rollouts(model, tokenizer, PROMPTS[1:], config, prompt_keys=[1])


def decode(model, tokenizer, config, prompts, rows, order=None):
    policy = PolicyGeneration.build(model, tokenizer, config)
    encoded = policy.encode(model, tokenizer, prompts)
    order = list(range(len(prompts))) if order is None else order
    with policy.session(model):
        run = decode_prompts(model, policy, encoded, order, rows=rows)
    assert run is not None
    return run


def test_rows_leave_and_next_prompts_join(tokenizer):
    model = make_model(seed=4)
    with torch.no_grad():
        model.lm_head.weight[EOS] += 0.8
    config = SamplingConfig(num_rollouts=4, max_new_tokens=15, seed=0, use_chat_template=False)

    run = decode(model, tokenizer, config, PROMPTS, rows=8)

    lengths = {index: sampler.rollout_lengths(result.generated, [EOS], 15)[0] for index, result in run.rollouts.items()}
    assert sorted(run.rollouts) == [0, 1, 2]
    # A rollout is fed to the model once per token but its last.
    assert run.row_steps == sum(int((value - 1).sum()) for value in lengths.values())
    # Batches of two prompts run one after the other would need this many passes.
    # The third prompt joins as soon as four rows are free, so fewer are needed.
    first_two = max(int(lengths[0].max()), int(lengths[1].max())) - 1
    assert run.forward_passes < first_two + int(lengths[2].max()) - 1
    for index, result in run.rollouts.items():
        after_end = torch.arange(result.generated.shape[1])[None, :] >= lengths[index][:, None]
        assert bool((result.generated[after_end] == 0).all())
        assert bool((result.step_entropies[after_end] == 0).all())
        assert bool((result.step_entropies[~after_end] > 0).all())


@pytest.mark.parametrize("batch_size", [1, 3, 4, 5, 8, 64])
def test_every_row_samples_its_own_policy(tokenizer, batch_size):
    # Rows of three prompt lengths share the cache, end at different steps and are
    # replaced by the next rollouts, so rollouts of one prompt may be at different
    # steps. Each rollout's figures must still be those of its own prompt, unpadded,
    # at its own step. The padding id gets large logits, so a row that saw another
    # row's padding (through the penalty or the attention) would show.
    from transformers import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    model = make_model(seed=6)
    with torch.no_grad():
        model.lm_head.weight[0] *= 25.0
        model.lm_head.weight[EOS] += 0.6
    model.generation_config.repetition_penalty = 1.5
    model.generation_config.no_repeat_ngram_size = 2
    model.generation_config.min_new_tokens = 2
    config = SamplingConfig(
        num_rollouts=4, max_new_tokens=10, seed=1, temperature=0.9, batch_size=batch_size, use_chat_template=False
    )

    results = sample_rollouts(model, tokenizer, PROMPTS, config)

    lengths = [len(ids) for result in results for ids in result.token_ids]
    assert min(lengths) < max(lengths)
    assert min(lengths) >= 2
    for prompt, result in zip(PROMPTS, results):
        prompt_ids = tokenizer(prompt.text)["input_ids"]
        processors = LogitsProcessorList(
            [
                RepetitionPenaltyLogitsProcessor(1.5),
                NoRepeatNGramLogitsProcessor(2),
                MinNewTokensLengthLogitsProcessor(len(prompt_ids), 2, torch.tensor([EOS])),
                *build_warpers(config),
            ]
        )
        for index, rollout_ids in enumerate(result.token_ids):
            entropy_sum, surprisal_sum = teacher_forced_figures(model, prompt_ids, rollout_ids, processors)
            assert float(result.stats.entropy_sums[index]) == pytest.approx(entropy_sum, abs=1e-4)
            assert float(result.stats.surprisal_sums[index]) == pytest.approx(surprisal_sum, abs=1e-3)


def test_slot_layer_writes_each_row_at_its_position():
    slots = _Slots(rows=3, device="cpu")
    layer = _SlotLayer(slots, rows=3, capacity=6, like=torch.zeros(1, 2, 1, 4))
    storage = layer._key_storage.data_ptr()
    prompt_a, prompt_b = torch.randn(2, 3, 4), torch.randn(2, 1, 4)  # [H, w, D]
    layer.write_prompt(torch.tensor([0, 1]), prompt_a, prompt_a)
    layer.write_prompt(torch.tensor([2]), prompt_b, prompt_b)
    slots.live = 3
    slots.lengths[:3] = torch.tensor([3, 3, 1])
    slots.refresh_max_length()

    new = torch.randn(3, 2, 1, 4)
    keys, values = layer.update(new, new)

    assert keys.shape == (3, 2, 4, 4)
    torch.testing.assert_close(keys[0, :, :3], prompt_a, rtol=0, atol=0)
    torch.testing.assert_close(keys[0, :, 3], new[0, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(keys[2, :, :1], prompt_b, rtol=0, atol=0)
    torch.testing.assert_close(keys[2, :, 1], new[2, :, 0], rtol=0, atol=0)
    assert bool((keys[2, :, 2:] == 0).all())  # not reached: zeros, never stale garbage
    layer.move_rows(torch.tensor([2]), torch.tensor([0]))
    torch.testing.assert_close(layer._key_storage[0], layer._key_storage[2], rtol=0, atol=0)
    assert layer._key_storage.data_ptr() == storage  # written in place, never reallocated


def test_prompt_dependent_processors_fall_back_to_generate(tokenizer, caplog):
    # The encoder repetition penalty maps rows to prompts, so rows cannot leave the batch.
    model = make_model(seed=5)
    model.generation_config.encoder_repetition_penalty = 1.5
    config = SamplingConfig(num_rollouts=3, max_new_tokens=6, seed=0, use_chat_template=False)
    policy = PolicyGeneration.build(model, tokenizer, config)
    encoded = policy.encode(model, tokenizer, PROMPTS[:1])

    with policy.session(model), caplog.at_level("DEBUG", logger="canopy_monitor.sampling.decoder"):
        assert decode_prompts(model, policy, encoded, [0], rows=3) is None
    assert "EncoderRepetitionPenaltyLogitsProcessor" in caplog.text
    results = sample_rollouts(model, tokenizer, PROMPTS[:1], config)
    assert all(1 <= len(ids) <= 6 for ids in results[0].token_ids)
