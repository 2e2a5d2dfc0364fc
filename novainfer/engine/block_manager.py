"""Paged KV-cache bookkeeping: ref-counted blocks and prefix caching by chained block hashes.

A block's hash covers its tokens and, through the previous block's hash, every token before
them, so equal hashes mean equal prefixes. Blocks whose ref count drops to zero keep their
hash and wait in the free queue; they are handed out again least-recently-used first, and a
later request with the same prefix can take them back before that happens.

Each sequence holding blocks also owns a row of `tables`, an int32 mirror of its block table
(0-padded) that is written only when blocks change, so the model runner can gather a step's
block tables with one numpy index instead of converting Python lists every step.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict

import numpy as np
import xxhash

from novainfer.engine.sequence import Sequence


def block_hash(parent: int | None, tokens: list[int]) -> int:
    h = xxhash.xxh3_128()
    if parent is not None:
        h.update(parent.to_bytes(16, "little"))
    h.update(array("q", tokens).tobytes())
    return h.intdigest()


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool,
        max_num_seqs: int,
        max_blocks_per_seq: int,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hashes: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block id
        # Free blocks in eviction order: the first is reused first (least recently used).
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found
        # Only running sequences hold blocks, and at most max_num_seqs of them run at once.
        self.tables = np.zeros((max_num_seqs, max_blocks_per_seq), dtype=np.int32)
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def _update_hashes(self, seq: Sequence, num_tokens: int) -> None:
        """Extend seq.block_hashes to cover the full blocks among its first num_tokens tokens."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_tokens // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs]))

    def _lookup_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks matching seq's leading full blocks; the last token is always computed."""
        limit = (seq.num_tokens - 1) // self.block_size
        if seq.parent is not None and seq.parent.block_table and not seq.parent.is_finished:
            # n > 1: share the sibling's computed prompt blocks, cache or no cache.
            done = min(seq.parent.num_computed_tokens, seq.num_prompt_tokens - 1)
            return seq.parent.block_table[: min(limit, done // self.block_size)]
        if not self.enable_prefix_caching:
            return []
        self._update_hashes(seq, limit * self.block_size)
        hits = []
        for h in seq.block_hashes[:limit]:
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits

    def allocate_new(self, seq: Sequence, num_new_tokens: int) -> int | None:
        """Admit a waiting sequence: reuse cached prefix blocks, then allocate for num_new_tokens.

        Returns the number of tokens served from the cache, or None when blocks are short.
        """
        hits = self._lookup_prefix(seq)
        num_cached = len(hits) * self.block_size
        num_new_tokens = min(num_new_tokens, seq.num_tokens - num_cached)
        total = -(-(num_cached + num_new_tokens) // self.block_size)
        reclaimed = sum(1 for b in hits if self.ref_counts[b] == 0)
        if total - len(hits) > len(self.free) - reclaimed:
            return None
        for b in hits:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1
        seq.block_table = list(hits)
        seq.block_table.extend(self._pop_free() for _ in range(total - len(hits)))
        seq.block_row = self.free_rows.pop()
        self.tables[seq.block_row, : len(seq.block_table)] = seq.block_table
        seq.num_computed_tokens = num_cached
        seq.num_registered_blocks = 0
        return num_cached

    def try_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give a running sequence the blocks for num_new_tokens more; False if too few free."""
        needed = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size) - len(
            seq.block_table
        )
        if needed <= 0:  # the common decode step: the last block still has room
            return True
        if needed > len(self.free):
            return False
        start = len(seq.block_table)
        for _ in range(needed):
            seq.block_table.append(self._pop_free())
        self.tables[seq.block_row, start : len(seq.block_table)] = seq.block_table[start:]
        return True

    def _pop_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.hashes[block]
        if old is not None:
            if self.cached.get(old) == block:
                del self.cached[old]
            self.hashes[block] = None
        self.ref_counts[block] = 1
        return block

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register seq's blocks that are full and computed, so later requests can reuse them."""
        full = seq.num_computed_tokens // self.block_size
        if not self.enable_prefix_caching or full <= seq.num_registered_blocks:
            return
        self._update_hashes(seq, full * self.block_size)
        start, seq.num_registered_blocks = seq.num_registered_blocks, full
        for i in range(start, full):
            block = seq.block_table[i]
            if self.hashes[block] is not None:
                continue
            h = seq.block_hashes[i]
            if h not in self.cached:  # an equal block may already be cached by another request
                self.cached[h] = block
                self.hashes[block] = h

    def free_seq(self, seq: Sequence) -> None:
        # Tail blocks first, so a prefix outlives its suffixes in the eviction order.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
                if self.hashes[block] is None:
                    self.free.move_to_end(block, last=False)  # nothing to keep: reuse first
        if seq.block_row >= 0:
            self.tables[seq.block_row, : len(seq.block_table)] = 0
            self.free_rows.append(seq.block_row)
            seq.block_row = -1
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
