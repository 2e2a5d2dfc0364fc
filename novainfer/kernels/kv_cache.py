"""Write a layer's new K/V rows into the paged cache: one launch per layer.

An fp8 cache (`kv_cache_dtype="fp8"`) gets x / scale saturated to ±448; kernels/fp8.py
holds the format and the PyTorch twin (`quantize_fp8`) this kernel is tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from novainfer.kernels.fp8 import FP8_DTYPE


@triton.jit
def to_cache(x, SCALES, WHICH: tl.constexpr, FP8: tl.constexpr, dt: tl.constexpr):
    """x as the cache stores it: in the cache's dtype `dt`, or (FP8) x / scale saturated to
    ±448 (SCALES[WHICH]: 0 for K, 1 for V). Every kernel that writes the cache uses this
    (here and kernels/rope_store.py)."""
    if FP8:
        x = x.to(tl.float32) / tl.load(SCALES + WHICH)
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    return x.to(dt)


@triton.jit
def _store_kv_kernel(
    K, V, KV, SLOTS, SCALES,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kv, stride_slot, stride_cache_h,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FP8: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(SLOTS + tok).to(tl.int64)
    if slot >= 0:
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
        tok64 = tok.to(tl.int64)
        k = tl.load(K + tok64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(V + tok64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
        k = to_cache(k, SCALES, 0, FP8, KV.dtype.element_ty)
        v = to_cache(v, SCALES, 1, FP8, KV.dtype.element_ty)
        dst = slot * stride_slot + offs_h[:, None] * stride_cache_h + offs_d[None, :]
        tl.store(KV + dst, k, mask=mask)
        tl.store(KV + stride_kv + dst, v, mask=mask)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    """k, v: [tokens, kv_heads, head_dim]; kv_cache: [2, blocks, block_size, kv_heads, head_dim]
    (contiguous); slot_mapping: [tokens] flat slot (block * block_size + offset), < 0 = skip.
    kv_scales: float32 [2] (k, v) on the device, required when kv_cache is fp8."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    assert kv_cache.is_contiguous(), "kv_cache must be contiguous"
    assert kv_cache.shape[-2:] == (num_kv_heads, head_dim), (kv_cache.shape, k.shape)
    fp8 = kv_cache.dtype == FP8_DTYPE
    assert k.dtype == v.dtype and (fp8 or kv_cache.dtype == k.dtype), (kv_cache.dtype, k.dtype)
    assert not fp8 or kv_scales is not None, "an fp8 cache needs kv_scales"
    _store_kv_kernel[(num_tokens,)](
        k, v, kv_cache, slot_mapping, kv_scales if fp8 else slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        FP8=fp8,
        num_warps=1 if num_kv_heads * head_dim <= 256 else 4,
    )
