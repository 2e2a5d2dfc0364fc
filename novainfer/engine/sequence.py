"""One generated sequence: its tokens, how many of them have KV in the cache, and its blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from novainfer.outputs import PositionLogprobs, RequestMetrics
from novainfer.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Tokens are prompt + generated; `num_computed_tokens` of them already have KV in blocks.

    The scheduler asks each step for the tokens still to compute; a step that reaches the
    last token produces logits and a new sampled token. Prefill, chunked prefill, decode and
    recompute after preemption are all the same rule.
    """

    seq_id: int
    request_id: str
    index: int  # completion index within its request (n > 1)
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    generator: torch.Generator | None
    metrics: RequestMetrics  # the request's, shared by its sequences
    parent: Sequence | None = None  # n > 1: the sibling whose prompt blocks this one shares
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    block_table: list[int] = field(default_factory=list)
    block_row: int = -1  # this sequence's row of BlockManager.tables while it holds blocks
    # Prefix-cache identity: extras mixed into the first block (cache_salt; later the LoRA
    # adapter), chained hashes of full token blocks and their keys (engine/block_manager.py).
    cache_extras: tuple = ()
    block_hashes: list[int] = field(default_factory=list)
    block_keys: list[tuple] = field(default_factory=list)
    num_registered_blocks: int = 0  # leading blocks already offered to the prefix cache
    # Asynchronous scheduling: tokens sampled by launched steps whose values the host does
    # not have yet (at most 2: one step in flight, one being launched). They count in `num_tokens` (the scheduler computes them next
    # step, reading the value on the device: row `pending_row` of the last step's samples), but
    # are not in `token_ids` until the step is collected.
    num_pending: int = 0
    pending_row: int = -1
    max_num_tokens: int = 1 << 62  # prompt + max_tokens, capped at max_model_len
    lora_int_id: int = 0  # the request's LoRA adapter (0: the base model)
    lora_slot: int = -1  # its device slot for the step being packed
    logprobs: list[PositionLogprobs] | None = None
    # Prompt logprobs (entry 0 is None), collected by the sequence that computes the prompt
    # (index 0 of its request) when params.prompt_logprobs is set.
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    output_counts: dict[int, int] = field(default_factory=dict)  # for presence/frequency penalties

    def __post_init__(self) -> None:
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None and self.index == 0:
            self.prompt_logprobs = [None]

    @property
    def num_tokens(self) -> int:
        """Tokens so far, pending ones included."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1
