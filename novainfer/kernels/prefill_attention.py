"""Paged prefill / chunked-prefill attention, flash-attention style (one launch for all prefills).

Grid: (query tiles, query heads, sequences). A program takes BLOCK_M consecutive query tokens of
one sequence and one head. Query i of a sequence with query_len q and context length c sits at
context position c - q + i and attends causally over the cached context (prefix + the new tokens,
already written by `store_kv`), which is gathered from the paged cache one KV tile at a time
through the block table. KV tiles entirely below the tile's first query position need no mask;
only the last few (diagonal) tiles are masked. Softmax in fp32 with exp2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from novainfer.kernels._common import (
    check_head_dim,
    check_kv_dtype,
    kv_tile,
    next_pow2,
    scale_log2,
    use_ieee,
)


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i, KV, bt_row, tile, q_pos, ctx, head_off, qk_scale,
    stride_kv, stride_slot,
    offs_n, offs_d,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
    FP8: tl.constexpr,
):
    pos = tile * BLOCK_N + offs_n
    if BLOCK_N <= BLOCK_SIZE:
        blk = tl.load(bt_row + (tile * BLOCK_N) // BLOCK_SIZE).to(tl.int64)
    else:
        if MASKED:
            blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=pos < ctx, other=0).to(tl.int64)
        else:
            blk = tl.load(bt_row + pos // BLOCK_SIZE).to(tl.int64)
    kv_off = (blk * BLOCK_SIZE + (pos % BLOCK_SIZE)) * stride_slot + head_off
    if MASKED:
        kmask = pos < ctx
        k = tl.load(KV + kv_off[None, :] + offs_d[:, None], mask=kmask[None, :], other=0.0)
        v = tl.load(KV + stride_kv + kv_off[:, None] + offs_d[None, :], mask=kmask[:, None], other=0.0)
    else:
        k = tl.load(KV + kv_off[None, :] + offs_d[:, None])
        v = tl.load(KV + stride_kv + kv_off[:, None] + offs_d[None, :])
    if FP8:  # exact in q's dtype; the scales are applied by the caller
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = s * qk_scale
    if MASKED:
        # causal: keys at or before the query's position (implies pos < ctx for real queries;
        # rows past the query length only see zero-filled keys and are never stored)
        s = tl.where(pos[None, :] <= q_pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


# Arguments that change from step to step (the block-table width; tensors sliced at the
# number of decodes) are not specialised: Triton would otherwise compile a new variant the
# first time one is divisible by 16 / 16-byte aligned, in the middle of a timed run.
@triton.jit(do_not_specialize=["BT", "QSL", "SEQ_LENS", "SCALES", "stride_bt"])
def _prefill_kernel(
    Q, KV, BT, QSL, SEQ_LENS, OUT, SCALES,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kv, stride_slot, stride_cache_h, stride_bt,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    FP8: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(QSL + seq)
    q_len = tl.load(QSL + seq + 1) - q_start
    if pid_m * BLOCK_M < q_len:
        ctx = tl.load(SEQ_LENS + seq)
        prefix = ctx - q_len
        kvh = head // GROUP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        mmask = offs_m < q_len
        tok = (q_start + offs_m).to(tl.int64)
        q = tl.load(Q + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=mmask[:, None], other=0.0)
        q_pos = prefix + offs_m

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        bt_row = BT + seq.to(tl.int64) * stride_bt
        head_off = kvh * stride_cache_h
        if FP8:  # K's scale folds into the softmax scale, V's into the output
            qk_scale = qk_scale * tl.load(SCALES)

        first_q = prefix + pid_m * BLOCK_M  # smallest query position in this tile (< ctx)
        n_full = first_q // BLOCK_N  # tiles entirely at or before first_q: no masking
        last_q = tl.minimum(first_q + BLOCK_M, ctx)  # exclusive bound of keys any row can see
        n_all = tl.cdiv(last_q, BLOCK_N)
        for t in range(n_full):
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, KV, bt_row, t, q_pos, ctx, head_off, qk_scale,
                stride_kv, stride_slot, offs_n, offs_d,
                BLOCK_SIZE, BLOCK_N, False, IEEE, FP8,
            )
        for t in range(n_full, n_all):
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, KV, bt_row, t, q_pos, ctx, head_off, qk_scale,
                stride_kv, stride_slot, offs_n, offs_d,
                BLOCK_SIZE, BLOCK_N, True, IEEE, FP8,
            )
        o = acc / l_i[:, None]
        if FP8:
            o = o * tl.load(SCALES + 1)
        tl.store(OUT + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 o.to(OUT.dtype.element_ty), mask=mmask[:, None])


def _default_tiles(head_dim: int, block_size: int, max_query_len: int) -> tuple[int, int, int]:
    block_m = 64 if head_dim <= 128 else 32
    block_m = max(16, min(block_m, next_pow2(max_query_len)))
    block_n = kv_tile(block_size, 64 if head_dim <= 128 else 32)
    # H200, D=128, bf16, 4x2048 causal: (64, 64, 4 warps, 2 stages) 273 TFLOP/s beat 8 warps
    # (200) and BLOCK_M=128 (219)
    num_warps = 4
    return block_m, block_n, num_warps


def prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    kv_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """q, out: [tokens, heads, D] for the prefill sequences only (query_start_loc[0] == 0);
    kv_cache: [2, blocks, block_size, kv_heads, D] already holding the new tokens' K/V, in q's
    dtype or fp8 e4m3 with kv_scales (float32 [2]: k, v) on the device;
    block_tables: [seqs, max_blocks] int32; query_start_loc: [seqs + 1] int32;
    seq_lens: [seqs] int32 (context length incl. the new tokens). Writes `out`, returns it."""
    num_seqs = seq_lens.shape[0]
    num_tokens, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    check_head_dim(head_dim)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if num_seqs == 0 or num_tokens == 0 or max_query_len <= 0:
        return out
    assert kv_cache.is_contiguous(), "kv_cache must be contiguous"
    assert q.stride(-1) == 1 and out.stride(-1) == 1
    fp8 = check_kv_dtype(q, kv_cache, kv_scales)
    bm, bn, nw = _default_tiles(head_dim, block_size, max_query_len)
    block_m = block_m or bm
    block_n = block_n or bn
    num_warps = num_warps or nw
    grid = (triton.cdiv(max_query_len, block_m), num_heads, num_seqs)
    _prefill_kernel[grid](
        q, kv_cache, block_tables, query_start_loc, seq_lens, out, kv_scales if fp8 else seq_lens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        scale_log2(scale),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        IEEE=use_ieee(q.dtype),
        FP8=fp8,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
