"""Prefill without a cached prefix through PyTorch SDPA (one kernel backend, chosen by the
caller): the `cudnn` backend's prefill path and benchmarks/ab.py's SDPA contenders.

Needs no paged cache: with no cached prefix, a sequence's keys are exactly its new tokens.
Imports no Triton, so it runs wherever torch does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from novainfer.layers.attention.metadata import AttentionMetadata


def is_pure_prefill(meta: AttentionMetadata) -> bool:
    """No decodes, and every sequence's query covers its whole context (query_len == seq_len:
    no prefix-cache hit, no earlier chunk), at least two tokens each."""
    return (
        meta.num_decodes == 0
        and meta.num_seqs > 0
        and all(q == s > 1 for q, s in zip(meta.query_lens_host, meta.seq_lens_host))
    )


def equal_length_runs(lengths: list[int]) -> list[tuple[int, int]]:
    """(count, length) of each run of consecutive equal lengths: one batched call each."""
    runs: list[tuple[int, int]] = []
    for n in lengths:
        if runs and runs[-1][1] == n:
            runs[-1] = (runs[-1][0] + 1, n)
        else:
            runs.append((1, n))
    return runs


def _heads_first(x: torch.Tensor, start: int, count: int, length: int) -> torch.Tensor:
    """Rows start .. start + count * length of a packed [tokens, heads, D] tensor as
    [count, heads, length, D] (a view)."""
    return x[start : start + count * length].unflatten(0, (count, length)).transpose(1, 2)


def sdpa_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_lens: list[int],
    scale: float,
    out: torch.Tensor,
    backend: SDPBackend = SDPBackend.CUDNN_ATTENTION,
) -> torch.Tensor:
    """Causal attention of sequences without a cached prefix, through SDPA's `backend` only.

    q, out: [tokens, heads, D]; k, v: [tokens, kv_heads, D] (the packed rows; views allowed);
    sequence i owns the next query_lens[i] rows. Writes the first sum(query_lens) rows of
    `out` and returns it. SDPA raises RuntimeError if `backend` cannot run these inputs.
    """
    start = 0
    with sdpa_kernel(backend):
        for count, length in equal_length_runs(query_lens):
            o = F.scaled_dot_product_attention(
                _heads_first(q, start, count, length), _heads_first(k, start, count, length),
                _heads_first(v, start, count, length), is_causal=True, scale=scale,
                enable_gqa=True,
            )
            out[start : start + count * length] = o.transpose(1, 2).flatten(0, 1)
            start += count * length
    return out
