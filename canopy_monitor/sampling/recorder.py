"""Records step entropies and sampled-token log-probabilities while `generate` runs."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, StoppingCriteria


def policy_entropy(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the entropy `[B]` and the log-probabilities `[B, V]` of `softmax(scores)`, in float32.

    Tokens removed by a filter have probability 0 and log-probability -inf; they
    contribute 0 to the entropy, not 0 * -inf = NaN.
    """
    logprobs = torch.log_softmax(scores.to(torch.float32), dim=-1)  # [B, V]
    probs = logprobs.exp()
    entropy = -torch.where(probs > 0, probs * logprobs, 0.0).sum(dim=-1)  # [B]
    return entropy, logprobs


class StepEntropyRecorder:
    """Record `h_t` and `log pi(y_t | x, y_<t)` for every row at every decoding step.

    The entropy is taken of the scores handed to the recorder, so its logits processor
    must be the last one that changes the distribution: the sampler places the
    temperature, top-k and top-p warpers before it itself. Only the current step's
    log-probabilities `[B, V]` are kept, never a `[T, V]` history: the sampled token's
    log-probability is read from them by the stopping-criteria hook, which `generate`
    calls right after it appends the token.

    Usage:
    ```python
    recorder = StepEntropyRecorder()
    model.generate(..., logits_processor=[*warpers, recorder.logits_processor],
                   stopping_criteria=[recorder.stopping_criteria])
    step_entropies, token_logprobs = recorder.stacked()  # [B, K], [B, K]
    ```
    """

    def __init__(self) -> None:
        self.logits_processor = _EntropyProcessor(self)
        self.stopping_criteria = _SampledTokenCriteria(self)
        self._step_entropies: list[torch.Tensor] = []  # K tensors of [B]
        self._token_logprobs: list[torch.Tensor] = []  # K tensors of [B]
        self._current_logprobs: torch.Tensor | None = None  # [B, V]

    def observe_scores(self, scores: torch.Tensor) -> None:
        entropy, logprobs = policy_entropy(scores)
        self._step_entropies.append(entropy)
        self._current_logprobs = logprobs

    def observe_token(self, input_ids: torch.Tensor) -> None:
        if self._current_logprobs is None:
            raise RuntimeError("the sampled token was reported before any scores: the recorder is wired wrongly")
        sampled = input_ids[:, -1:]  # [B, 1]
        self._token_logprobs.append(self._current_logprobs.gather(1, sampled).squeeze(1))  # [B]
        self._current_logprobs = None

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return step entropies and token log-probabilities, each `[B, K]`."""
        if not self._token_logprobs:
            raise RuntimeError("generate produced no token")
        num_steps = len(self._token_logprobs)
        step_entropies = torch.stack(self._step_entropies[:num_steps], dim=1)  # [B, K]
        token_logprobs = torch.stack(self._token_logprobs, dim=1)  # [B, K]
        return step_entropies, token_logprobs


class _EntropyProcessor(LogitsProcessor):
    def __init__(self, recorder: StepEntropyRecorder) -> None:
        self.recorder = recorder

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.recorder.observe_scores(scores)
        return scores


class _SampledTokenCriteria(StoppingCriteria):
    def __init__(self, recorder: StepEntropyRecorder) -> None:
        self.recorder = recorder

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.recorder.observe_token(input_ids)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
