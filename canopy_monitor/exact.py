"""Exact canopy entropy of one prompt, by walking the whole rollout tree of a tiny model.

The estimators of `canopy_monitor.estimators` are checked against these figures: on a
model with a handful of tokens and a short length cap, every rollout with positive
probability can be enumerated. The distribution at each node is the one that
`sample_rollouts` samples from, because the walker builds it with the same `generate`
set-up (`PolicyGeneration`): the processors of the model's generation config relative
to the real prompt, then temperature, top-k and top-p.

Usage:
```python
from canopy_monitor import SamplingConfig
from canopy_monitor.exact import exact_canopy
from canopy_monitor.prompts import Prompt

config = SamplingConfig(max_new_tokens=4, temperature=0.7, use_chat_template=False)
tree = exact_canopy(model, tokenizer, Prompt(text="a b"), config)
print(tree.ce_star, tree.length_distribution, tree.truncation_probability)
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import LogitsProcessor, StoppingCriteria

from .config import SamplingConfig
from .prompts import Prompt
from .sampling.sampler import PolicyGeneration, _model_device

DEFAULT_MAX_NODES = 100_000


@dataclass(frozen=True)
class ExactCanopy:
    """Exact figures of the rollout tree of one prompt under one decoding policy, in nats.

    `N`, `S` and `L` are the rollout length, step-entropy sum and surprisal sum of a
    rollout drawn from the policy (see `RolloutStats`).

    Attributes:
        ce_star: canopy entropy `CE* = E[S]`, the sum over the tree's nodes of
            `P(node) * h(node)`.
        length_distribution: `P(N = n)` for `n = 1..T`, index `n - 1`.
        mean_length: `E[N]`.
        truncation_probability: probability that the cap `T` cuts the rollout.
        entropy_rate: `E[S / N]`, the expected entropy rate of one rollout.
        entropy_sum_variance: `Var(S)`; `sqrt(Var(S) / M)` is the standard error of the
            Rao-Blackwellised estimate from `M` rollouts.
        surprisal_sum_variance: `Var(L)`; the same for the plain Monte Carlo estimate.
        probability_mass: total probability of the enumerated rollouts. It is 1 up to
            rounding, and below 1 only by tokens whose float32 probability underflows
            to 0, which `generate` cannot sample either.
        num_nodes: prefixes whose next-token distribution was computed, the empty
            prefix included.
        num_leaves: complete rollouts with positive probability.
    """

    ce_star: float
    length_distribution: tuple[float, ...]
    mean_length: float
    truncation_probability: float
    entropy_rate: float
    entropy_sum_variance: float
    surprisal_sum_variance: float
    probability_mass: float
    num_nodes: int
    num_leaves: int

    @property
    def mc_variance_ratio(self) -> float:
        """`Var(L) / Var(S)`, NaN when `Var(S)` is 0."""
        if self.entropy_sum_variance == 0:
            return math.nan
        return self.surprisal_sum_variance / self.entropy_sum_variance


class _WeightedMoments:
    """Weighted mean and sum of squared deviations of several quantities.

    Each batch's own mean and sum of squared deviations are merged into the running ones,
    so the leaves never need to be stored together.
    """

    def __init__(self, num_quantities: int) -> None:
        self.weight = 0.0
        self.mean = torch.zeros(num_quantities, dtype=torch.float64)
        self.squared_deviations = torch.zeros(num_quantities, dtype=torch.float64)

    def add(self, weights: torch.Tensor, values: torch.Tensor) -> None:
        """Add leaves with `weights` `[n]` and `values` `[n, Q]`."""
        batch_weight = float(weights.sum())
        if batch_weight == 0:
            return
        batch_mean = (weights[:, None] * values).sum(dim=0) / batch_weight  # [Q]
        batch_squared = (weights[:, None] * (values - batch_mean) ** 2).sum(dim=0)  # [Q]
        total = self.weight + batch_weight
        delta = batch_mean - self.mean
        self.squared_deviations += batch_squared + delta**2 * self.weight * batch_weight / total
        self.mean += delta * batch_weight / total
        self.weight = total

    def variance(self) -> torch.Tensor:
        return self.squared_deviations / self.weight


class _CaptureScores(LogitsProcessor):
    """Keep the scores of step `depth` (0-based, counted from the prompt end)."""

    def __init__(self, prompt_width: int, depth: int) -> None:
        self.prompt_width = prompt_width
        self.depth = depth
        self.scores: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] - self.prompt_width == self.depth:
            self.scores = scores.clone()
        return scores


class _ForcePath(LogitsProcessor):
    """Make row `b` take token `paths[b, s]` at step `s`, and the most likely token after the path.

    It runs after `_CaptureScores`, so the captured distribution is untouched, while the
    processors before it see the path as if it had been sampled.
    """

    def __init__(self, prompt_width: int, paths: torch.Tensor) -> None:
        self.prompt_width = prompt_width
        self.paths = paths  # [B, d]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_width
        if step < self.paths.shape[1]:
            tokens = self.paths[:, step]  # [B]
        else:
            tokens = scores.argmax(dim=-1)  # [B]
        forced = torch.full_like(scores, -math.inf)
        forced.scatter_(1, tokens[:, None].to(scores.device), 0.0)
        return forced


class _StopAtLength(StoppingCriteria):
    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool, device=input_ids.device)


def _next_token_scores(
    model, policy: PolicyGeneration, prompt_ids: Sequence[int], paths: torch.Tensor
) -> torch.Tensor:
    """Return the processed scores `[B, V]` (float32) after each prefix in `paths` `[B, d]`.

    `generate` runs on the prompt alone with the prefix forced token by token, so that
    every processor counts from the real prompt end and uses the real length cap.
    """
    device = _model_device(model)
    num_rows, depth = paths.shape
    prompt_width = len(prompt_ids)
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device).expand(num_rows, -1)  # [B, W]
    attention_mask = torch.ones_like(input_ids)
    capture = _CaptureScores(prompt_width, depth)
    policy.generate(
        model,
        input_ids,
        attention_mask,
        num_return_sequences=1,
        after_policy=[capture, _ForcePath(prompt_width, paths.to(device))],
        stopping_criteria=[_StopAtLength(prompt_width + depth + 1)],
    )
    if capture.scores is None:
        raise RuntimeError(f"generate stopped before step {depth + 1}: a stopping criterion other than the cap is active")
    return capture.scores.float().cpu()


@dataclass(frozen=True)
class _Frontier:
    """Prefixes of one depth that have not ended, with what each carries from the root."""

    paths: torch.Tensor  # [n, d], the tokens after the prompt
    probabilities: torch.Tensor  # [n], float64
    entropy_sums: torch.Tensor  # [n], float64, step entropies along the prefix
    surprisal_sums: torch.Tensor  # [n], float64, surprisals along the prefix

    @property
    def size(self) -> int:
        return self.paths.shape[0]

    def rows(self, rows: slice) -> "_Frontier":
        return _Frontier(self.paths[rows], self.probabilities[rows], self.entropy_sums[rows], self.surprisal_sums[rows])

    @staticmethod
    def concatenate(parts: list["_Frontier"]) -> "_Frontier":
        return _Frontier(
            torch.cat([part.paths for part in parts]),
            torch.cat([part.probabilities for part in parts]),
            torch.cat([part.entropy_sums for part in parts]),
            torch.cat([part.surprisal_sums for part in parts]),
        )


class _TreeTotals:
    """The exact figures, summed over the nodes and leaves seen so far."""

    def __init__(self, max_new_tokens: int) -> None:
        self.ce_star = 0.0
        self.length_probabilities = [0.0] * max_new_tokens
        self.truncation_probability = 0.0
        self.num_leaves = 0
        self.moments = _WeightedMoments(4)  # per leaf: N, S, L, S / N

    def expand(self, frontier: _Frontier, scores: torch.Tensor, is_end: torch.Tensor, is_last_step: bool) -> _Frontier:
        """Add the step entropies of `frontier` and its ending children, and return the
        children that go on.

        Args:
            frontier (`_Frontier` of `B` prefixes at depth `d`).
            scores (`torch.Tensor` of shape `[B, V]`, float32): processed scores after each prefix.
            is_end (`torch.Tensor` of shape `[V]`, bool): end-of-sequence ids.
            is_last_step (`bool`): whether step `d + 1` is the cap `T`.
        """
        depth = frontier.paths.shape[1]
        sampleable = torch.softmax(scores, dim=-1) > 0  # [B, V], as generate's float32 softmax
        logprobs = torch.log_softmax(scores.double(), dim=-1)  # [B, V]
        token_probabilities = logprobs.exp()
        step_entropies = -torch.where(token_probabilities > 0, token_probabilities * logprobs, 0.0).sum(dim=-1)  # [B]
        self.ce_star += float((frontier.probabilities * step_entropies).sum())

        child_probabilities = frontier.probabilities[:, None] * token_probabilities  # [B, V]
        child_entropy_sums = (frontier.entropy_sums + step_entropies)[:, None].expand_as(logprobs)  # [B, V]
        child_surprisal_sums = frontier.surprisal_sums[:, None] - torch.where(sampleable, logprobs, 0.0)  # [B, V]
        ends = sampleable & is_end[None, :]  # [B, V]
        continues = sampleable & ~is_end[None, :]  # [B, V]
        is_leaf = sampleable if is_last_step else ends

        leaf_probabilities = child_probabilities[is_leaf]  # [n_leaves]
        leaf_entropy_sums = child_entropy_sums[is_leaf]  # [n_leaves]
        leaf_lengths = torch.full_like(leaf_entropy_sums, depth + 1)  # [n_leaves]
        leaf_values = [leaf_lengths, leaf_entropy_sums, child_surprisal_sums[is_leaf], leaf_entropy_sums / leaf_lengths]
        self.moments.add(leaf_probabilities, torch.stack(leaf_values, dim=1))  # [n_leaves, 4]
        self.num_leaves += int(is_leaf.sum())
        self.length_probabilities[depth] += float(leaf_probabilities.sum())
        if is_last_step:
            self.truncation_probability += float(child_probabilities[continues].sum())
            continues = torch.zeros_like(continues)

        parent_rows, tokens = continues.nonzero(as_tuple=True)  # [n_next], [n_next]
        return _Frontier(
            paths=torch.cat([frontier.paths[parent_rows], tokens[:, None]], dim=1),  # [n_next, d + 1]
            probabilities=child_probabilities[continues],
            entropy_sums=child_entropy_sums[continues],
            surprisal_sums=child_surprisal_sums[continues],
        )


@torch.no_grad()
def exact_canopy(
    model,
    tokenizer,
    prompt: Prompt,
    config: SamplingConfig,
    *,
    eos_token_ids: Sequence[int] | None = None,
    max_nodes: int = DEFAULT_MAX_NODES,
) -> ExactCanopy:
    """Walk every rollout of `prompt` and compute canopy entropy and its companions exactly.

    A rollout ends at its first end-of-sequence token, which counts in its length, or
    is cut at `config.max_new_tokens`. A token is expanded when its probability is
    positive in the float32 softmax that `generate` samples from. Node distributions
    come from `generate` itself, as in `sample_rollouts`, batched over the nodes of one
    depth in chunks of `config.batch_size` (32 when it is `None`). `num_rollouts` is not used. The model's
    training mode and every global random state are as before when this returns.

    The cost is about `num_nodes * T` forward rows, so keep it for tiny models: the
    tree of a policy over `V` tokens with one end-of-sequence id has up to
    `sum_{d < T} (V - 1)^d` nodes.

    Args:
        model: a causal LM with `generate`.
        tokenizer: its tokenizer.
        prompt (`Prompt`): the prompt, encoded as `sample_rollouts` encodes it.
        config (`SamplingConfig`): decoding policy and length cap `T`.
        eos_token_ids (sequence of `int`, *optional*): end-of-sequence ids added to
            those of the generation config and the tokenizer.
        max_nodes (`int`, *optional*, defaults to `100_000`): the most nodes to expand.

    Returns:
        `ExactCanopy`.

    Raises:
        `ValueError`: the tree has more than `max_nodes` nodes, or no end-of-sequence id
            is defined.
    """
    if isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or max_nodes < 1:
        raise ValueError(f"max_nodes must be a positive integer, got {max_nodes!r}.")
    policy = PolicyGeneration.build(model, tokenizer, config, eos_token_ids)
    prompt_ids = policy.encode(model, tokenizer, [prompt])[0]
    max_new_tokens = config.max_new_tokens
    eos_ids = torch.tensor(policy.eos_token_ids, dtype=torch.long)

    frontier = _Frontier(
        paths=torch.zeros((1, 0), dtype=torch.long),
        probabilities=torch.ones(1, dtype=torch.float64),
        entropy_sums=torch.zeros(1, dtype=torch.float64),
        surprisal_sums=torch.zeros(1, dtype=torch.float64),
    )
    totals = _TreeTotals(max_new_tokens)
    num_nodes = 1
    chunk_size = config.batch_size or 32

    with policy.session(model):
        for depth in range(max_new_tokens):
            is_last_step = depth + 1 == max_new_tokens
            children: list[_Frontier] = []
            num_children = 0
            for start in range(0, frontier.size, chunk_size):
                chunk = frontier.rows(slice(start, start + chunk_size))
                scores = _next_token_scores(model, policy, prompt_ids, chunk.paths)  # [B, V]
                is_end = torch.isin(torch.arange(scores.shape[1]), eos_ids)  # [V]
                children.append(totals.expand(chunk, scores, is_end, is_last_step))
                num_children += children[-1].size
                if num_nodes + num_children > max_nodes:
                    raise ValueError(
                        f"the rollout tree of this prompt has more than max_nodes={max_nodes} nodes "
                        f"(already {num_nodes + num_children} at depth {depth + 1} of max_new_tokens={max_new_tokens}); "
                        "lower max_new_tokens, narrow the policy with top_k or top_p, or raise max_nodes"
                    )
            if num_children == 0:
                break
            frontier = _Frontier.concatenate(children)
            num_nodes += num_children

    moments = totals.moments
    mean_length, _, _, entropy_rate = moments.mean.tolist()
    _, entropy_sum_variance, surprisal_sum_variance, _ = moments.variance().tolist()
    return ExactCanopy(
        ce_star=totals.ce_star,
        length_distribution=tuple(totals.length_probabilities),
        mean_length=mean_length,
        truncation_probability=totals.truncation_probability,
        entropy_rate=entropy_rate,
        entropy_sum_variance=entropy_sum_variance,
        surprisal_sum_variance=surprisal_sum_variance,
        probability_mass=moments.weight,
        num_nodes=num_nodes,
        num_leaves=totals.num_leaves,
    )
