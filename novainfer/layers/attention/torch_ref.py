"""Pure-PyTorch paged attention: the reference every fast kernel is tested against.

Runs on CPU and GPU. Decodes are handled together: one gather of their cached K/V and one
batched SDPA call (the query group of each KV head shares its K/V: enable_gqa). Prefills
and prefill chunks over a cached prefix go one sequence at a time with a causal mask
offset by the cached length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from novainfer.layers.attention.metadata import AttentionMetadata


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """Scatter new K/V rows into their cache slots; slots < 0 (padding) are skipped."""
    k_flat = kv_cache[0].view(-1, *k.shape[1:])
    v_flat = kv_cache[1].view(-1, *v.shape[1:])
    valid = slots >= 0
    if not bool(valid.all()):
        slots, k, v = slots[valid], k[valid], v[valid]
    k_flat.index_copy_(0, slots, k)
    v_flat.index_copy_(0, slots, v)


def gather_kv(
    kv_cache: torch.Tensor, block_tables: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of sequences as [seqs, kv_heads, length, head_dim] (strided views of a copy)."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-length // block_size)
    ids = block_tables[:, :num_blocks].reshape(-1).long()
    shape = (block_tables.shape[0], num_blocks * block_size, *kv_cache.shape[-2:])
    # index_select copies whole blocks; much faster than advanced indexing on the CPU.
    k = kv_cache[0].index_select(0, ids).view(shape)[:, :length]
    v = kv_cache[1].index_select(0, ids).view(shape)[:, :length]
    return k.transpose(1, 2), v.transpose(1, 2)


# Decodes are attended in groups of similar length, so the gathered (padded) K/V of a
# group stays close to what its sequences really hold: the gather is memory-bound.
DECODE_GROUP = 8


class TorchReferenceBackend:
    name = "torch"

    @staticmethod
    def _decode_groups(meta: AttentionMetadata, device: torch.device) -> list:
        """[(row indices, padded length)] for the decodes, computed once per step."""
        groups = meta.backend_cache.get("torch_decode_groups")
        if groups is None:
            lens = meta.seq_lens_host[: meta.num_decodes]
            order = sorted(range(len(lens)), key=lens.__getitem__)
            groups = []
            for i in range(0, len(order), DECODE_GROUP):
                rows = order[i : i + DECODE_GROUP]
                groups.append((torch.tensor(rows, device=device), lens[rows[-1]]))
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
    ) -> torch.Tensor:
        write_kv(k, v, kv_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        for idx, max_len in self._decode_groups(meta, q.device):
            kd, vd = gather_kv(kv_cache, meta.block_tables.index_select(0, idx), max_len)
            positions = torch.arange(max_len, device=q.device)
            mask = positions[None, :] < meta.seq_lens.index_select(0, idx)[:, None]
            qd = q.index_select(0, idx).unsqueeze(2)  # [group, heads, 1, head_dim]
            od = F.scaled_dot_product_attention(
                qd, kd, vd, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
            )
            out.index_copy_(0, idx, od.squeeze(2))
        start = nd
        for i in range(nd, meta.num_seqs):
            q_len, ctx = meta.query_lens_host[i], meta.seq_lens_host[i]
            ks, vs = gather_kv(kv_cache, meta.block_tables[i : i + 1], ctx)
            qs = q[start : start + q_len].transpose(0, 1).unsqueeze(0)  # [1, heads, q_len, d]
            # Query j sits at context position ctx - q_len + j and sees keys up to there.
            rows = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
            mask = torch.arange(ctx, device=q.device)[None, :] <= rows
            os_ = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True
            )
            out[start : start + q_len] = os_[0].transpose(0, 1)
            start += q_len
        return out
