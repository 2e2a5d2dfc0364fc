"""Step metadata: built once per step by the model runner and passed to every attention call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """Describes one batch of sequences, each contributing `query_len` new tokens.

    Sequences with a single new token (decodes) come first in the batch, then the rest
    (prefills and prefill chunks), so backends can treat the two groups separately.
    All tensors live on the model's device; the *_host lists mirror them for Python loops.
    """

    slot_mapping: torch.Tensor  # [num_tokens] flat KV slot per new token; -1 = padding, not written
    query_start_loc: torch.Tensor  # [num_seqs + 1] cumulative query lengths (int32)
    seq_lens: torch.Tensor  # [num_seqs] context length after this step, cached prefix included (int32)
    block_tables: torch.Tensor  # [num_seqs, max_blocks] KV block ids per sequence (int32, 0-padded)
    num_decodes: int  # leading sequences with query_len == 1
    max_query_len: int
    max_seq_len: int
    query_lens_host: list[int]
    seq_lens_host: list[int]
    # fp8 KV cache with calculate_kv_scales: the step that sets every layer's K/V scales from
    # the K/V it stores (the first one; the worker never replays a CUDA graph for it).
    calibrate_kv_scales: bool = False
    # Per-step values a backend derives once and reuses in every layer (e.g. index tensors).
    backend_cache: dict[str, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)
