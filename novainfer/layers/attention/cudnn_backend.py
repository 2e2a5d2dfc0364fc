"""cuDNN attention for pure-prefill steps, the Triton backend for everything else.

A step is a pure prefill when it has no decodes and every sequence computes its whole
context (no cached prefix, no earlier chunk): then each sequence's keys are exactly its new
tokens, so attention needs no paged cache and PyTorch's SDPA with its cuDNN kernel runs on
the packed q/k/v, causal, one call per run of equal-length sequences (sdpa_prefill.py). The
new K/V still go into the paged cache (Triton `store_kv`) for the decodes that follow. Any
other step (decodes, chunks, prefix-cache hits) runs exactly as the `triton` backend runs
it, so CUDA-graph decodes are the Triton ones.

backend.py decides when this backend may be picked (CUDA, fp16/bf16, no fp8 cache, a head
dim both cuDNN and the Triton kernels take); "auto" never picks it.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend

from novainfer.kernels.kv_cache import store_kv
from novainfer.layers.attention.metadata import AttentionMetadata
from novainfer.layers.attention.sdpa_prefill import is_pure_prefill, sdpa_prefill
from novainfer.layers.attention.triton_backend import TritonBackend


class CudnnBackend(TritonBackend):
    name = "cudnn"
    supports_cuda_graphs = True  # decodes, the only captured steps, take the Triton path
    supports_prefill_graphs = False  # its prefills are cuDNN's, sized from host lengths
    sdp_backend = SDPBackend.CUDNN_ATTENTION  # the CPU tests put MATH here

    @staticmethod
    def _pure_prefill(meta: AttentionMetadata) -> bool:
        pure = meta.backend_cache.get("cudnn_pure_prefill")
        if pure is None:  # host lists only: decided once per step, no device sync
            pure = meta.backend_cache["cudnn_pure_prefill"] = is_pure_prefill(meta)
        return pure

    def attends_to_stored_kv(self, meta: AttentionMetadata) -> bool:
        """Every step but a pure prefill, whose attention is SDPA's over the new K/V."""
        return not self._pure_prefill(meta)

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
        if not self._pure_prefill(meta):
            return super().forward(q, k, v, kv_cache, meta, scale, kv_scales)
        store_kv(k, v, kv_cache, meta.slot_mapping, kv_scales)
        out = torch.empty_like(q)
        return sdpa_prefill(q, k, v, meta.query_lens_host, scale, out, self.sdp_backend)
