"""flash-attn (FlashAttention-2) paged-attention backend.

The new K/V go into the cache first (Triton `store_kv` on CUDA). Decodes then run through
`flash_attn_with_kvcache`, one query per sequence over its first `seq_lens` cached keys;
prefills and prefill chunks through `flash_attn_varlen_func` over the same paged cache
(block_table). flash-attn aligns the causal mask to the bottom-right corner, so query j of a
q_len-token chunk over a ctx-token context sees keys up to ctx - q_len + j: exactly what a
chunk after a cached prefix needs.

flash-attn 2's paged kernels need block_size % 256 == 0 and fp16/bf16 (backend.py decides
when this backend may be picked). The real package was not available to test against; the
CPU tests drive this code through a plain-torch stand-in of the two functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from novainfer.layers.attention.metadata import AttentionMetadata
from novainfer.layers.attention.torch_ref import write_kv


class FlashAttnBackend:
    name = "flash_attn"
    # The decode call takes only tensors (seq_lens, block tables; no host-side lengths) and
    # store_kv skips padding rows (slot -1) on the device, so a captured decode step replays
    # correctly with new lengths.
    supports_cuda_graphs = True

    def __init__(self, device: torch.device) -> None:
        try:
            from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
        except ImportError as e:
            raise ImportError(
                f"attention_backend 'flash_attn': importing flash_attn failed ({e}); install a "
                "flash-attn build matching this torch, or use attention_backend='triton'"
            ) from e
        self._varlen = flash_attn_varlen_func
        self._with_kvcache = flash_attn_with_kvcache
        if device.type == "cuda":
            # One launch that skips slot -1 rows itself: no host sync, so graph-safe
            # (torch's write_kv reads the slots back to the host to drop padding).
            from novainfer.kernels.kv_cache import store_kv

            self._write_kv = store_kv
        else:
            # Only the CPU tests (flash-attn stand-in) get here: the registry offers this
            # backend on CUDA only.
            self._write_kv = write_kv

    def reserve_workspace(
        self, max_num_seqs: int, num_heads: int, head_dim: int, num_splits: int,
        device: torch.device,
    ) -> None:
        """Nothing to reserve: flash-attn allocates its split-KV scratch per call from torch's
        caching allocator, which CUDA-graph capture records into the graph's pool."""

    @staticmethod
    def _prefill_args(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
        """cu_seqlens_q and cu_seqlens_k (int32, from 0) of the prefill part, its max query
        and key lengths, and the row after its last query token.

        Derived once per step and reused by every layer.
        """
        cached = meta.backend_cache.get("flash_attn_prefill")
        if cached is None:
            nd = meta.num_decodes
            qsl = meta.query_start_loc[nd:]
            cu_q = qsl - qsl[0]
            cu_k = F.pad(meta.seq_lens[nd:].cumsum(0, dtype=torch.int32), (1, 0))
            q_lens = meta.query_lens_host[nd:]
            cached = (cu_q, cu_k, max(q_lens), max(meta.seq_lens_host[nd:]), nd + sum(q_lens))
            meta.backend_cache["flash_attn_prefill"] = cached
        return cached

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scales: torch.Tensor | None = None,  # always None: get_backend refuses an fp8 cache
    ) -> torch.Tensor:
        self._write_kv(k, v, kv_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        # [num_blocks, block_size, kv_heads, head_dim]: flash-attn's paged layout as is.
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._with_kvcache(
                q[:nd].unsqueeze(1), k_cache, v_cache,
                cache_seqlens=meta.seq_lens[:nd], block_table=meta.block_tables[:nd],
                softmax_scale=scale, causal=True,
            ).squeeze(1)
        if meta.num_seqs > nd:
            cu_q, cu_k, max_q, max_k, end = self._prefill_args(meta)
            out[nd:end] = self._varlen(
                q[nd:end], k_cache, v_cache, cu_q, cu_k, max_q, max_k,
                softmax_scale=scale, causal=True, block_table=meta.block_tables[nd:],
            )
        return out
