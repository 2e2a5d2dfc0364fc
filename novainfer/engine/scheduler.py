"""Continuous batching: each step, decide how many tokens each sequence computes.

Running sequences go first (one token for a decode, a chunk for an unfinished prefill),
then waiting ones are admitted while the token budget, `max_num_seqs` and free KV blocks
allow. When a running sequence cannot get a block, the newest running sequence is
preempted: its blocks are freed and it is recomputed later from its tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from novainfer.engine.block_manager import BlockManager
from novainfer.engine.block_tables import BlockTables
from novainfer.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]
    block_tables: BlockTables  # BlockManager.tables: row seq.block_row is seq's block table

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_loras: int | None = None,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_loras = max_loras  # distinct LoRA adapters per step (None: no LoRA)
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
            total = seq.num_tokens
            if seq.num_pending and total >= seq.max_num_tokens:
                i += 1  # its pending token is its last (length): nothing more to compute
                continue
            num_new = min(total - seq.num_computed_tokens, budget)
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
        # LoRA: the adapters of running sequences hold the slots. A sequence whose adapter
        # finds no free slot waits at the head of the queue; from then on only sequences
        # without an adapter are admitted, so the running adapters drain and it gets the
        # next slot (no starvation).
        adapters = None
        if self.max_loras is not None:
            adapters = {s.lora_int_id for s in self.running if s.lora_int_id}
        slot_blocked = False
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending:  # preempted while its last token is in flight: not yet
                skipped.append(self.waiting.popleft())
                continue
            lora_id = seq.lora_int_id
            if lora_id and adapters is not None and (slot_blocked or (
                    lora_id not in adapters and len(adapters) >= self.max_loras)):
                slot_blocked = True
                skipped.append(self.waiting.popleft())
                continue
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
            if lora_id and adapters is not None:
                adapters.add(lora_id)
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
        seq.num_pending = 0  # a launched step's token for it is dropped when collected
