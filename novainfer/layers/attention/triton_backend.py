"""Triton paged-attention backend: store_kv, then flash-decoding for the decodes and a
flash-attention prefill kernel for the prefills / prefill chunks (one launch each)."""

from __future__ import annotations

import torch

from novainfer.kernels.decode_attention import (
    decode_attention,
    decode_launch,
    decode_order,
    decode_workspace_numel,
)
from novainfer.kernels.kv_cache import store_kv
from novainfer.kernels.prefill_attention import prefill_attention
from novainfer.layers.attention.metadata import AttentionMetadata


class TritonBackend:
    name = "triton"
    supports_cuda_graphs = True  # decode reads no host-side lengths; grid fixed per batch size
    # Prefill steps too (engine/cuda_graphs.py, PrefillGraphs): the prefill kernel's grid
    # comes from the bucket and its programs skip empty query ranges.
    supports_prefill_graphs = True

    def __init__(self, num_splits: int | None = None) -> None:
        # None: derived per call from static shapes (batch size, block-table width, SM count),
        # which is CUDA-graph safe as long as the block-table buffer width is fixed.
        self.num_splits = num_splits
        self._workspace: torch.Tensor | None = None

    def reserve_workspace(
        self, max_num_seqs: int, num_heads: int, head_dim: int, num_splits: int,
        device: torch.device,
    ) -> None:
        """Allocate the decode scratch once (call before CUDA-graph capture)."""
        self._get_workspace(decode_workspace_numel(max_num_seqs, num_heads, head_dim, num_splits),
                            device)

    def _get_workspace(self, numel: int, device: torch.device) -> torch.Tensor:
        ws = self._workspace
        if ws is None or ws.numel() < numel or ws.device != device:
            ws = torch.empty(numel, dtype=torch.float32, device=device)
            self._workspace = ws
        return ws

    @staticmethod
    def _prefill_offsets(meta: AttentionMetadata) -> tuple[torch.Tensor, int]:
        """Query offsets of the prefill part (rebased to 0) and its max query length.

        Derived once per step and reused by every layer.
        """
        cached = meta.backend_cache.get("triton_prefill")
        if cached is None:
            nd = meta.num_decodes
            qsl = meta.query_start_loc[nd:]
            cached = (qsl - qsl[0] if nd else qsl, max(meta.query_lens_host[nd:]))
            meta.backend_cache["triton_prefill"] = cached
        return cached

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        store_kv(k, v, kv_cache, meta.slot_mapping, kv_scales)
        return self.attend(q, kv_cache, meta, scale, kv_scales)

    def attends_to_stored_kv(self, meta: AttentionMetadata) -> bool:
        """Whether this step's attention may run as `attend` on K/V that a fused kernel
        stored already (kernels/rope_store.py, models/decoder.py): always, here."""
        return True

    def attend(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`forward` without the store: the step's K/V are in the cache already (a one-row
        step's kernels/rope_store.py wrote them)."""
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            num_heads, head_dim = q.shape[1], q.shape[2]
            block_tables = meta.block_tables[:nd]
            splits, ordered = decode_launch(  # kernels/decode_attention.py
                nd, kv_cache.shape[3], block_tables.shape[1] * kv_cache.shape[2], q.device
            )
            if self.num_splits is not None:
                splits = self.num_splits
            ws = None
            if splits > 1:
                ws = self._get_workspace(
                    decode_workspace_numel(nd, num_heads, head_dim, splits), q.device
                )
            seq_lens = meta.seq_lens[:nd]
            order = None
            if ordered and nd > 1:
                order = meta.backend_cache.get("triton_decode_order")
                if order is None:  # one decode_order a step, shared by the layers
                    order = meta.backend_cache["triton_decode_order"] = decode_order(seq_lens)
            decode_attention(
                q[:nd], kv_cache, block_tables, seq_lens, scale, out[:nd],
                num_splits=splits, workspace=ws, kv_scales=kv_scales,
                heads_first=ordered, order=order,
            )
        if meta.num_seqs > nd:
            qsl, max_q = self._prefill_offsets(meta)
            prefill_attention(
                q[nd:], kv_cache, meta.block_tables[nd:], qsl, meta.seq_lens[nd:],
                max_q, scale, out[nd:], kv_scales=kv_scales,
            )
        return out
