"""Continuous batching: each step, decide how many tokens each sequence computes.

Running sequences go first (one token for a decode, a chunk for an unfinished prefill),
then waiting ones are admitted while the token budget, `max_num_seqs` and free KV blocks
allow. When a running sequence cannot get a block, the newest running sequence is
preempted: its blocks are freed and it is recomputed later from its tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from novainfer.engine.block_manager import BlockManager
from novainfer.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]
    block_tables: np.ndarray  # BlockManager.tables: row seq.block_row is seq's block table

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch([], [], self.block_manager.tables)
        preempted = False
        i = 0
        running, try_append = self.running, self.block_manager.try_append
        while i < len(running) and budget > 0:
            seq = running[i]
            num_new = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            while not try_append(seq, num_new):
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(num_new)
                budget -= num_new
                i += 1
        if not preempted:
            budget = self._admit(batch, budget)
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int) -> int:
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            parent = seq.parent
            if parent is not None and not parent.is_finished and (
                parent.num_computed_tokens < parent.num_prompt_tokens
            ):
                # n > 1: wait until the sibling's prompt is in the cache, then share it.
                skipped.append(self.waiting.popleft())
                continue
            first_admission = seq.num_cached_tokens == 0 and seq.num_output_tokens == 0
            cached = self.block_manager.allocate_new(seq, budget)
            if cached is None:
                break
            if first_admission:
                seq.num_cached_tokens = cached
            self.waiting.popleft()
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return budget

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.FINISHED
