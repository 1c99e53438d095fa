"""Monitoring points under several processes: split the prompts, gather the rollouts.

Every process samples a share of the prompts with their indices in the whole list as
keys (`sampling.draws`), so the rollouts are those one process would draw for the
same seed. The shares are gathered on every process, and the main process estimates,
logs and writes the history.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Processes:
    """The processes a trainer runs on.

    Attributes:
        count (`int`): number of processes, 1 without distributed training.
        index (`int`): this process's index, from 0.
    """

    count: int = 1
    index: int = 0

    @classmethod
    def of(cls, trainer) -> "Processes":
        """Return the processes of `trainer`'s accelerator, or one process when it has none."""
        accelerator = getattr(trainer, "accelerator", None)
        if accelerator is None:
            return cls()
        return cls(count=int(accelerator.num_processes), index=int(accelerator.process_index))

    def share(self, num_prompts: int) -> list[int]:
        """Return the indices of the prompts this process samples: every `count`-th, from `index`."""
        return list(range(self.index, num_prompts, self.count))


class ShareFailed(RuntimeError):
    """Sampling failed on at least one process, so the monitoring point has no result."""


def gather_shares(processes: Processes, outcome: tuple[str, Any]) -> list[tuple[str, Any]]:
    """Return every process's `outcome`, in process order; a collective call on several processes.

    An outcome is `("ok", [(prompt index, rollouts), ...])` or `("error", message)`.
    Every process must call this at the same point, also after a failure, or the
    others would wait for it forever.
    """
    if processes.count == 1:
        return [outcome]
    from accelerate.utils import gather_object

    return gather_object([outcome])


def merge_shares(outcomes: Sequence[tuple[str, Any]], num_prompts: int) -> list[Any]:
    """Return the rollouts of every prompt in prompt order, or raise `ShareFailed` naming the failed processes."""
    errors = [f"process {index}: {value}" for index, (kind, value) in enumerate(outcomes) if kind != "ok"]
    if errors:
        raise ShareFailed("sampling failed on " + "; ".join(errors))
    by_prompt = {index: rollouts for _, share in outcomes for index, rollouts in share}
    missing = sorted(set(range(num_prompts)) - set(by_prompt))
    if missing:
        raise ShareFailed(f"no process returned the rollouts of prompts {missing}")
    return [by_prompt[index] for index in range(num_prompts)]


def broadcast_from_main(processes: Processes, value: Any) -> Any:
    """Return the main process's `value` on every process; a collective call on several processes."""
    if processes.count == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


@contextlib.contextmanager
def gathered_weights(trainer) -> Iterator[None]:
    """Gather DeepSpeed ZeRO-3 partitioned weights on every process while sampling, as TRL's trainers do.

    With ZeRO-3 each process holds a slice of every weight, and a forward pass would
    wait for the other processes, which sample other prompts for other numbers of
    steps. Inside this block every process has the whole weights and samples alone.
    Without ZeRO-3 it does nothing. A collective call under ZeRO-3.
    """
    accelerator = getattr(trainer, "accelerator", None)
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if plugin is None or getattr(plugin, "zero_stage", None) != 3:
        yield
        return

    # NOTE: written after `trl.models.utils._unwrap_model_for_generation` (TRL 1.16) and
    # not run here: DeepSpeed is not installed on the machines this was built on.
    import deepspeed
    from trl.models.utils import add_hooks, remove_hooks

    engine = trainer.model_wrapped
    with deepspeed.zero.GatheredParameters(engine.parameters()):
        remove_hooks(engine)
        try:
            yield
        finally:
            add_hooks(engine)
