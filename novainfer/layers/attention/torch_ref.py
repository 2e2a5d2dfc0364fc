"""Pure-PyTorch paged attention: the reference every fast kernel is tested against.

Runs on CPU and GPU. Decodes are handled together as one batched gather + matmul;
prefills and prefill chunks (with a cached prefix) one sequence at a time.
"""

from __future__ import annotations

import torch

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
    kv_cache: torch.Tensor, block_table: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous K and V of one or many sequences: [..., length, kv_heads, head_dim]."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-length // block_size)
    table = block_table[..., :num_blocks].long()
    k = kv_cache[0][table]  # [..., num_blocks, block_size, kv_heads, head_dim]
    v = kv_cache[1][table]
    shape = (*table.shape[:-1], num_blocks * block_size, *k.shape[-2:])
    return k.reshape(shape)[..., :length, :, :], v.reshape(shape)[..., :length, :, :]


def _softmax_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q: [..., kv_heads, rows, d]; k, v: [..., kv_heads, ctx, d]; mask True = keep.

    Each kv head's query group is stacked into `rows`, so every matmul is a plain batched
    GEMM with no broadcasting (GQA without repeating K/V).
    """
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2))
    scores.mul_(scale).masked_fill_(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.to(acc)).to(q.dtype)


class TorchReferenceBackend:
    name = "torch"

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
        num_heads, head_dim = q.shape[1], q.shape[2]
        num_kv_heads = k.shape[1]
        group = num_heads // num_kv_heads
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            max_len = max(meta.seq_lens_host[:nd])
            kd, vd = gather_kv(kv_cache, meta.block_tables[:nd], max_len)  # [nd, T, Hkv, D]
            qd = q[:nd].view(nd, num_kv_heads, group, head_dim)
            positions = torch.arange(max_len, device=q.device)
            mask = (positions[None, :] < meta.seq_lens[:nd, None]).view(nd, 1, 1, max_len)
            od = _softmax_attend(qd, kd.transpose(1, 2), vd.transpose(1, 2), mask, scale)
            out[:nd] = od.view(nd, num_heads, head_dim)
        start = nd
        for i in range(nd, meta.num_seqs):
            q_len, ctx = meta.query_lens_host[i], meta.seq_lens_host[i]
            ks, vs = gather_kv(kv_cache, meta.block_tables[i], ctx)  # [ctx, Hkv, D]
            qs = q[start : start + q_len].view(q_len, num_kv_heads, group, head_dim)
            qs = qs.permute(1, 2, 0, 3).reshape(num_kv_heads, group * q_len, head_dim)
            # Query i sits at context position ctx - q_len + i and sees keys up to there.
            rows = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
            mask = (torch.arange(ctx, device=q.device)[None, :] <= rows).repeat(group, 1)
            os_ = _softmax_attend(qs, ks.transpose(0, 1), vs.transpose(0, 1), mask, scale)
            os_ = os_.view(num_kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3)
            out[start : start + q_len] = os_.reshape(q_len, num_heads, head_dim)
            start += q_len
        return out
