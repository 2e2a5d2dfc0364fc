"""Paged KV-cache bookkeeping: ref-counted blocks and prefix caching by chained block hashes.

A block's hash covers its tokens, the sequence's cache key extras (`cache_salt`; later the
LoRA adapter) and, through the previous block's hash, every token before them. The hash only
finds a candidate: every cached block also keeps its key, `(parent key, tokens)` (the tokens
as int64 bytes) with the extras in place of the parent for a first block, and a hit counts
only if that key equals the sequence's own (tokens compared, parents compared by identity
first). A hash collision therefore costs a miss, never another request's KV. Blocks whose
ref count drops to zero keep their hash and key and wait in the free queue; they are handed
out again least-recently-used first, and a later request with the same prefix can take them
back before that happens.

Each sequence holding blocks also owns a row of `tables` (engine/block_tables.py), an int32
mirror of its block table (0-padded) that is written only when blocks change; every rank keeps
a device copy of it, so a step sends row numbers and the changed entries, not the tables.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict

import xxhash

from novainfer.engine.block_tables import BlockTables
from novainfer.engine.sequence import Sequence

# What a cached block's KV depends on: its parent's key (the extras for a first block) and
# its tokens. Keys of verified hits are shared objects, so comparing parents is usually `is`.
BlockKey = tuple


def block_hash(parent: int | None, tokens: bytes, extras: tuple = ()) -> int:
    """xxh3-128 over the parent's hash (or, for a first block, the extras) and the tokens
    (int64 little-endian bytes). One call over the joined bytes: on the 2-core VM 1,024
    blocks hash in ~1.3 ms this way against ~2.3 ms with a hasher object and three updates
    per block (the same values)."""
    if parent is not None:
        return xxhash.xxh3_128_intdigest(parent.to_bytes(16, "little") + tokens)
    encoded = repr(extras).encode()
    return xxhash.xxh3_128_intdigest(len(encoded).to_bytes(8, "little") + encoded + tokens)


def _adopt(keys: list[BlockKey], i: int, shared: BlockKey) -> None:
    """Take the cached key object `shared` (equal to keys[i]) for block i, and make the next
    block's key name it as parent, so later compares are cheap `is` checks."""
    keys[i] = shared
    if i + 1 < len(keys):
        keys[i + 1] = (shared, keys[i + 1][1])


def _relink(keys: list[BlockKey], start: int) -> None:
    """Rebuild keys[start + 1:] on top of keys[start] when it was replaced by an equal (shared)
    object, so no key's parent chain keeps replaced objects and compares stay shallow."""
    for j in range(start + 1, len(keys)):
        if keys[j][0] is keys[j - 1]:
            break
        keys[j] = (keys[j - 1], keys[j][1])


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
        self.keys: list[BlockKey | None] = [None] * num_blocks  # of blocks in `cached`
        self.cached: dict[int, int] = {}  # block hash -> block id
        # Free blocks in eviction order: the first is reused first (least recently used).
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found
        # Only running sequences hold blocks, and at most max_num_seqs of them run at once.
        self.tables = BlockTables(max_num_seqs, max_blocks_per_seq)
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def _update_hashes(self, seq: Sequence, num_tokens: int) -> None:
        """Extend seq.block_hashes and seq.block_keys to cover the full blocks among its first
        num_tokens tokens."""
        bs = self.block_size
        first, end = len(seq.block_hashes), num_tokens // bs
        if first >= end:
            return
        # The new blocks' tokens as int64 bytes in one conversion; a block's slice of them is
        # both what its hash reads and the token part of its key.
        raw, width = array("q", seq.token_ids[first * bs : end * bs]).tobytes(), 8 * bs
        hashes, keys = seq.block_hashes, seq.block_keys
        for i in range(end - first):
            tokens = raw[i * width : (i + 1) * width]
            if hashes:
                hashes.append(block_hash(hashes[-1], tokens))
                keys.append((keys[-1], tokens))
            else:
                hashes.append(block_hash(None, tokens, seq.cache_extras))
                keys.append((seq.cache_extras, tokens))

    def _lookup_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks matching seq's leading full blocks; the last token is always computed."""
        limit = (seq.num_tokens - 1) // self.block_size
        if seq.parent is not None and seq.parent.block_table and not seq.parent.is_finished:
            # n > 1: share the sibling's computed prompt blocks, cache or no cache.
            done = min(seq.parent.num_computed_tokens, seq.num_prompt_tokens - 1)
            return seq.parent.block_table[: min(limit, done // self.block_size)]
        if not self.enable_prefix_caching or (
            seq.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.num_prompt_tokens
        ):
            return []  # missing prompt logprobs need their prompt positions computed
        self._update_hashes(seq, limit * self.block_size)
        hits = []
        keys = seq.block_keys
        for i, h in enumerate(seq.block_hashes[:limit]):
            block = self.cached.get(h)
            if block is None or self.keys[block] != keys[i]:
                break  # not cached, or a hash collision: never trust the hash alone
            _adopt(keys, i, self.keys[block])
            hits.append(block)
        _relink(keys, len(hits))
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
        self.tables.write(seq.block_row, 0, seq.block_table)
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
        self.tables.write(seq.block_row, start, seq.block_table[start:])
        return True

    def _pop_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.hashes[block]
        if old is not None:
            if self.cached.get(old) == block:
                del self.cached[old]
            self.hashes[block] = self.keys[block] = None
        self.ref_counts[block] = 1
        return block

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register seq's blocks that are full and computed, so later requests can reuse them
        (only tokens the host has: a pending token's block waits until it is collected)."""
        full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        if not self.enable_prefix_caching or full <= seq.num_registered_blocks:
            return
        self._update_hashes(seq, full * self.block_size)
        start, seq.num_registered_blocks = seq.num_registered_blocks, full
        keys = seq.block_keys
        for i in range(start, full):
            block = seq.block_table[i]
            if self.hashes[block] is None:
                h = seq.block_hashes[i]
                other = self.cached.get(h)
                if other is None:
                    self.cached[h] = block
                    self.hashes[block], self.keys[block] = h, keys[i]
                    continue
            else:
                other = block  # registered already (a hit, or a sibling's shared block)
            # Adopt an equal cached key so that this sequence's later blocks name the cached
            # parent (cheap `is` compares); a different key is a hash collision: stay uncached.
            if self.keys[other] is not keys[i] and self.keys[other] == keys[i]:
                _adopt(keys, i, self.keys[other])
        _relink(keys, full)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (vLLM's reset_prefix_cache); only while no sequence holds
        blocks, else False and nothing changes."""
        if len(self.free) != self.num_blocks:
            return False
        self.cached.clear()
        self.hashes = [None] * self.num_blocks
        self.keys = [None] * self.num_blocks
        return True

    def free_seq(self, seq: Sequence) -> None:
        # Tail blocks first, so a prefix outlives its suffixes in the eviction order.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
                if self.hashes[block] is None:
                    self.free.move_to_end(block, last=False)  # nothing to keep: reuse first
        if seq.block_row >= 0:
            self.tables.clear(seq.block_row, len(seq.block_table))
            self.free_rows.append(seq.block_row)
            seq.block_row = -1
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
