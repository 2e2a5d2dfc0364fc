"""The CPU backend: decodes read the paged cache in place through a small C kernel.

The reference backend gathers every decode's context into a contiguous copy before SDPA,
which on a CPU (bandwidth-bound) costs more than the attention itself. Prefills keep the
reference path: they are dominated by the linear layers. Only float32 has kernels (the
decode and the KV write); other dtypes (float64 in tests, bfloat16) and an fp8 cache use
the reference (fp8 on the CPU saves memory, not time: it is there for tests and parity).
"""

from __future__ import annotations

import torch

from novainfer.kernels.cpu_native import paged_decode_attention, store_kv
from novainfer.layers.attention.metadata import AttentionMetadata
from novainfer.layers.attention.torch_ref import TorchReferenceBackend


class CpuBackend(TorchReferenceBackend):
    name = "cpu"

    def write(
        self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
        kv_scales: torch.Tensor | None = None,
    ) -> None:
        if k.dtype != torch.float32 or kv_cache.dtype != torch.float32:
            super().write(k, v, kv_cache, meta, kv_scales)
            return
        store_kv(k, v, kv_cache, meta.slot_mapping)

    def decode(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
        out: torch.Tensor, kv_scales: torch.Tensor | None = None,
    ) -> None:
        if q.dtype != torch.float32 or kv_cache.dtype != torch.float32:
            super().decode(q, kv_cache, meta, scale, out, kv_scales)
            return
        nd = meta.num_decodes
        paged_decode_attention(
            q[:nd], kv_cache[0], kv_cache[1], meta.block_tables[:nd], meta.seq_lens[:nd], scale,
            out=out[:nd],  # the decodes lead the batch: a contiguous prefix of `out`
        )
