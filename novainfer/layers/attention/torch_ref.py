"""Pure-PyTorch paged attention: the reference every fast kernel is tested against.

Runs on CPU and GPU. Decodes are handled together: one gather of their cached K/V and one
batched SDPA call (the query group of each KV head shares its K/V: enable_gqa). Prefills
and prefill chunks over a cached prefix go one sequence at a time with a causal mask
offset by the cached length. An fp8 cache is quantized on the write and dequantized into
q's dtype on the gather (kernels/fp8.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from novainfer.kernels.fp8 import FP8_DTYPE, dequantize_fp8, quantize_fp8
from novainfer.layers.attention.metadata import AttentionMetadata


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor | None = None,
    kv_scales: torch.Tensor | None = None,
) -> None:
    """Scatter new K/V rows into their cache slots; slots < 0 (padding) are skipped.

    `valid` (rows with a real slot, or None when all are real) may be passed in by a caller
    that derived it once per step; otherwise it is computed here. An fp8 cache stores the
    rows quantized with `kv_scales` (float32 [2]: k, v).
    """
    if valid is None and not bool((slots >= 0).all()):
        valid = slots >= 0
    if valid is not None:
        slots, k, v = slots[valid], k[valid], v[valid]
    if kv_cache.dtype == FP8_DTYPE:
        # index_copy_ has no fp8 kernel on the CPU: copy the bytes
        k = quantize_fp8(k, kv_scales[0]).view(torch.uint8)
        v = quantize_fp8(v, kv_scales[1]).view(torch.uint8)
        kv_cache = kv_cache.view(torch.uint8)
    k_flat = kv_cache[0].view(-1, *k.shape[1:])
    v_flat = kv_cache[1].view(-1, *v.shape[1:])
    k_flat.index_copy_(0, slots, k)
    v_flat.index_copy_(0, slots, v)


def gather_kv(
    kv_cache: torch.Tensor, block_tables: torch.Tensor, length: int,
    kv_scales: torch.Tensor | None = None, dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of sequences as [seqs, kv_heads, length, head_dim] (strided views of a copy);
    from an fp8 cache, dequantized with `kv_scales` into `dtype`."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-length // block_size)
    ids = block_tables[:, :num_blocks].reshape(-1).long()
    shape = (block_tables.shape[0], num_blocks * block_size, *kv_cache.shape[-2:])
    # index_select copies whole blocks; much faster than advanced indexing on the CPU.
    k = kv_cache[0].index_select(0, ids).view(shape)[:, :length]
    v = kv_cache[1].index_select(0, ids).view(shape)[:, :length]
    if kv_cache.dtype == FP8_DTYPE:
        k, v = dequantize_fp8(k, kv_scales[0], dtype), dequantize_fp8(v, kv_scales[1], dtype)
    return k.transpose(1, 2), v.transpose(1, 2)


# Decodes are attended in groups of similar length, so the gathered (padded) K/V of a
# group stays close to what its sequences really hold: the gather is memory-bound.
DECODE_GROUP = 8


class TorchReferenceBackend:
    name = "torch"

    @staticmethod
    def _valid_slots(meta: AttentionMetadata) -> torch.Tensor | None:
        """Rows with a real KV slot (None: all of them), derived once per step."""
        if "torch_valid" not in meta.backend_cache:
            valid = meta.slot_mapping >= 0
            meta.backend_cache["torch_valid"] = None if bool(valid.all()) else valid
        return meta.backend_cache["torch_valid"]

    @staticmethod
    def _decode_groups(meta: AttentionMetadata, device: torch.device) -> list:
        """Per group of decodes: (row indices, padded length, block tables, length mask).

        Everything here depends only on the step, so it is built once and reused by every layer.
        """
        groups = meta.backend_cache.get("torch_decode_groups")
        if groups is None:
            lens = meta.seq_lens_host[: meta.num_decodes]
            order = sorted(range(len(lens)), key=lens.__getitem__)
            groups = []
            for i in range(0, len(order), DECODE_GROUP):
                rows = order[i : i + DECODE_GROUP]
                idx = torch.tensor(rows, device=device)
                max_len = lens[rows[-1]]
                positions = torch.arange(max_len, device=device)
                mask = positions[None, :] < meta.seq_lens.index_select(0, idx)[:, None]
                tables = meta.block_tables.index_select(0, idx)
                groups.append((idx, max_len, tables, mask[:, None, None, :]))
            meta.backend_cache["torch_decode_groups"] = groups
        return groups

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
        self.write(k, v, kv_cache, meta, kv_scales)
        out = torch.empty_like(q)
        if meta.num_decodes:
            self.decode(q, kv_cache, meta, scale, out, kv_scales)
        self.prefill(q, kv_cache, meta, scale, out, kv_scales)
        return out

    def write(
        self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
        kv_scales: torch.Tensor | None = None,
    ) -> None:
        write_kv(k, v, kv_cache, meta.slot_mapping, self._valid_slots(meta), kv_scales)

    def decode(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
        out: torch.Tensor, kv_scales: torch.Tensor | None = None,
    ) -> None:
        """Attention of the leading `num_decodes` rows (one query each) into `out`."""
        for idx, max_len, tables, mask in self._decode_groups(meta, q.device):
            kd, vd = gather_kv(kv_cache, tables, max_len, kv_scales, q.dtype)
            qd = q.index_select(0, idx).unsqueeze(2)  # [group, heads, 1, head_dim]
            od = F.scaled_dot_product_attention(
                qd, kd, vd, attn_mask=mask, scale=scale, enable_gqa=True
            )
            out.index_copy_(0, idx, od.squeeze(2))

    @staticmethod
    def prefill(
        q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
        out: torch.Tensor, kv_scales: torch.Tensor | None = None,
    ) -> None:
        """Attention of the prefill rows (after the decodes), one sequence at a time, into `out`."""
        start = meta.num_decodes
        for i in range(meta.num_decodes, meta.num_seqs):
            q_len, ctx = meta.query_lens_host[i], meta.seq_lens_host[i]
            ks, vs = gather_kv(kv_cache, meta.block_tables[i : i + 1], ctx, kv_scales, q.dtype)
            qs = q[start : start + q_len].transpose(0, 1).unsqueeze(0)  # [1, heads, q_len, d]
            if q_len == ctx:  # no cached prefix: plain causal, which skips the masked half
                os_ = F.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True
                )
            else:
                # Query j sits at context position ctx - q_len + j and sees keys up to there.
                rows = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
                mask = torch.arange(ctx, device=q.device)[None, :] <= rows
                os_ = F.scaled_dot_product_attention(
                    qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True
                )
            out[start : start + q_len] = os_[0].transpose(0, 1)
            start += q_len
