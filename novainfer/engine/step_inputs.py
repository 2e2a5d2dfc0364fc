"""One step's model inputs: packed on the host by the driver, unpacked on every rank.

`pack_step` turns a scheduled batch into one int64 array plus a small header (the sizes that
cut it): that pair is everything a rank needs to run the step, and it is what the driver
broadcasts to tensor-parallel workers. Block tables are not in it: every rank keeps a copy
of them (engine/block_tables.py), and the step carries its sequences' rows of that copy and
the entries written since the last step. `unpack_step` copies the array to the rank's device
in one transfer, applies those entries and builds the AttentionMetadata that every attention
call receives. The driver keeps the Python side of the step (which sequences sample, which
prompt positions report logprobs) in `HostStep`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from novainfer.engine.block_tables import device_tables
from novainfer.engine.scheduler import ScheduledBatch
from novainfer.engine.sequence import Sequence
from novainfer.layers.attention import AttentionMetadata
from novainfer.lora.ops import LoRABatch, group_by_slot, lora_batch

# Header fields, in order (int64).
HEADER = ("num_tokens", "num_seqs", "max_blocks", "num_decodes", "num_sampled",
          "num_prompt_rows", "max_query_len", "max_seq_len", "num_fills", "share_sampled",
          "lora_tokens", "lora_segments", "table_updates")


@dataclass
class PromptLogprobRows:
    """Prompt positions [first, first + count) of `seq` computed this step; each predicts the
    next prompt token."""

    seq: Sequence
    first: int
    count: int


@dataclass
class HostStep:
    """A packed step and the driver's view of it."""

    header: np.ndarray  # int64[len(HEADER)]
    data: np.ndarray  # int64: ids | positions | slots | seq_lens | query starts | logits rows
    #                   (sampled rows, then prompt-logprob rows) | fill rows | fill sources
    #                   | LoRA: tokens grouped by slot, segment starts, segment slots
    #                   | block-table entries written (flat indices, values) | table rows
    sampling_seqs: list[Sequence]
    prompt_rows: list[PromptLogprobRows]


@dataclass
class StepInputs:
    """A step on one rank's device."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # hidden rows that sample
    prompt_indices: torch.Tensor  # hidden rows whose logits give prompt logprobs
    lora: LoRABatch | None = None  # the tokens that use an adapter, grouped by slot


def pack_step(
    batch: ScheduledBatch, block_size: int, share_sampled: bool = False, lora: bool = False
) -> HostStep:
    """Pack a batch. A decode whose input token is still pending (asynchronous scheduling)
    gets a fill: its id is taken on the device from the previous step's samples.
    `share_sampled`: the ranks keep this step's samples for the next step's fills. `lora`:
    each token carries its sequence's adapter slot (-1: none)."""
    # Decodes (one new token) first, so attention can batch them together.
    seqs, query_lens = batch.seqs, batch.num_new_tokens
    num_decodes = query_lens.count(1)
    if query_lens[:num_decodes].count(1) < num_decodes:  # a decode follows a prefill
        order = sorted(range(len(batch)), key=lambda i: query_lens[i] != 1)
        seqs = [seqs[i] for i in order]
        query_lens = [query_lens[i] for i in order]
    starts = [seq.num_computed_tokens for seq in seqs]
    # The new tokens' ids are the only per-sequence Python work; the rest is numpy.
    input_ids = []
    fill_rows, fill_sources = [], []
    for row, (seq, p) in enumerate(zip(seqs[:num_decodes], starts)):
        if seq.num_pending:  # its last token: sampled by the step in flight
            fill_rows.append(row)
            fill_sources.append(seq.pending_row)
            input_ids.append(0)
        else:
            input_ids.append(seq.token_ids[p])
    for seq, p, q in zip(seqs[num_decodes:], starts[num_decodes:], query_lens[num_decodes:]):
        input_ids.extend(seq.token_ids[p : p + q])  # a chunk never holds a pending token
    n, num_tokens, bs = len(seqs), len(input_ids), block_size
    # Each list becomes an array once: numpy converts Python ints slowly.
    start = np.array(starts, dtype=np.int64)
    q = np.array(query_lens, dtype=np.int64)
    seq_lens = start + q
    cu = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(q, out=cu[1:])
    # A chunk that reaches the sequence's last token samples after it.
    num_tokens_now = np.array([seq.num_tokens for seq in seqs], dtype=np.int64)
    sampled = np.flatnonzero(seq_lens == num_tokens_now)
    prompt_rows, prompt_indices = _prompt_logprob_rows(seqs, starts, query_lens, cu)
    logits_rows = np.concatenate([cu[sampled + 1] - 1, prompt_indices])
    token_row = np.repeat(np.arange(n), q)
    positions = np.arange(num_tokens) - cu[token_row] + start[token_row]
    max_blocks = max([len(seq.block_table) for seq in seqs])
    rows = np.array([seq.block_row for seq in seqs], dtype=np.int64)
    tables = batch.block_tables
    slots = tables.host[rows[token_row], positions // bs].astype(np.int64) * bs + positions % bs
    lora_parts: tuple = ([], [], [])
    if lora:
        grouped = group_by_slot(np.array([seq.lora_slot for seq in seqs], dtype=np.int64)[token_row])
        if len(grouped[2]):  # some token uses an adapter
            lora_parts = grouped
    written = tables.updates()  # the caller calls tables.taken() once every rank has them
    parts = (input_ids, positions, slots, seq_lens, cu, logits_rows, fill_rows, fill_sources,
             *lora_parts, *written, rows)
    sizes = [num_tokens, num_tokens, num_tokens, n, n + 1, len(logits_rows), len(fill_rows),
             len(fill_rows), *(len(p) for p in lora_parts), len(written[0]), len(written[0]), n]
    data = np.empty(sum(sizes), dtype=np.int64)
    lo = 0
    for values, size in zip(parts, sizes):
        data[lo : lo + size] = values
        lo += size
    header = np.array(
        [num_tokens, n, max_blocks, num_decodes, len(sampled), len(prompt_indices),
         max(query_lens), int(seq_lens.max()), len(fill_rows), int(share_sampled),
         len(lora_parts[0]), len(lora_parts[2]), len(written[0])],
        dtype=np.int64,
    )
    return HostStep(header, data, [seqs[i] for i in sampled.tolist()], prompt_rows)


def unpack_step(
    header: np.ndarray,
    data: np.ndarray,
    upload: Callable[[np.ndarray], torch.Tensor],
    tables: torch.Tensor,
    last_sampled: torch.Tensor | None = None,
) -> StepInputs:
    """Device tensors and metadata of a packed step (`upload`: host array -> device);
    `tables`: this rank's copy of the block tables, which the step's entries update;
    `last_sampled`: the previous step's sampled ids on this device, for the fills."""
    h = dict(zip(HEADER, header.tolist()))
    t, n, fills = h["num_tokens"], h["num_seqs"], h["num_fills"]
    segs, written = h["lora_segments"], h["table_updates"]
    sizes = [t, t, t, n, n + 1, h["num_sampled"] + h["num_prompt_rows"], fills, fills,
             h["lora_tokens"], segs + 1 if segs else 0, segs, written, written, n]
    offsets = np.cumsum([0, *sizes])
    buf = upload(data)
    part = [buf[offsets[i] : offsets[i + 1]] for i in range(len(sizes))]
    if fills:
        if last_sampled is None:
            raise RuntimeError("a step reads pending tokens but no step sampled before it")
        part[0][part[6]] = last_sampled[part[7]]
    cu = data[offsets[4] : offsets[5]]
    seq_lens = data[offsets[3] : offsets[4]]
    meta = AttentionMetadata(
        slot_mapping=part[2],
        query_start_loc=part[4].to(torch.int32),
        seq_lens=part[3].to(torch.int32),
        block_tables=device_tables(tables, part[11], part[12], part[13], h["max_blocks"]),
        num_decodes=h["num_decodes"],
        max_query_len=h["max_query_len"],
        max_seq_len=h["max_seq_len"],
        query_lens_host=np.diff(cu).tolist(),
        seq_lens_host=seq_lens.tolist(),
    )
    rows = part[5]
    lora = None
    if segs:
        lora = lora_batch(part[8], part[9], part[10], data[offsets[9] : offsets[10]],
                          data[offsets[10] : offsets[11]])
    return StepInputs(part[0], part[1], meta, rows[: h["num_sampled"]], rows[h["num_sampled"] :],
                      lora)


def _prompt_logprob_rows(
    seqs: list[Sequence], starts: list[int], query_lens: list[int], cu: np.ndarray
) -> tuple[list[PromptLogprobRows], np.ndarray]:
    """Where this step computes prompt positions whose logprobs are still missing (position
    t predicts prompt token t + 1; entries 0 .. len(seq.prompt_logprobs) - 1 exist), and
    their rows in the step's flat token order."""
    rows: list[PromptLogprobRows] = []
    indices: list[np.ndarray] = []
    for i, seq in enumerate(seqs):
        if seq.prompt_logprobs is None:
            continue
        lo = max(starts[i], len(seq.prompt_logprobs) - 1)
        hi = min(starts[i] + query_lens[i], seq.num_prompt_tokens - 1)
        if lo < hi:
            rows.append(PromptLogprobRows(seq, lo, hi - lo))
            first = int(cu[i]) + lo - starts[i]
            indices.append(np.arange(first, first + hi - lo, dtype=np.int64))
    return rows, np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
