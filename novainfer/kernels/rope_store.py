"""Qwen3's q/k RMSNorm (when the model has it), the rotary embedding, and the KV-cache
store, in one launch: what a decoder layer does between q/k/v's projection and attention.

Unfused, a one-token decode step of qwen3-0.6b runs five kernels per layer here (q norm,
k norm, q rotary, k rotary, `store_kv`), each ~1.3 us plus the gap between graph nodes;
a 256-row decode step of r1-distill-qwen-1.5b spent ~12 us a layer on two compiled rotary
kernels, v's copy to a contiguous tensor and `store_kv`. The engine takes this kernel for
one-row steps and, under NOVAINFER_FUSED_OPS=triton, for every step of the Triton backend
(models/decoder.py, `rope_store_applies`). One program per token: it writes the rotated q
to a new tensor and the rotated k and the v to the token's cache slot (none for slot < 0),
quantized as `store_kv` quantizes them for an fp8 cache (x / scale, saturated to ±448).
Each value is rounded where the PyTorch twins round it (`rms_norm`, `apply_rope`, then the
store): in the Triton interpreter the results match them bit for bit without the norm (with
it, the sum's order differs); compiled on a GPU they do not (83-87% of the elements,
measured on an H200), and the tests hold the kernel to the twins' accuracy instead. Its
tests: tests/test_rope_store_kernel.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from novainfer.kernels._common import pdl_launch
from novainfer.kernels.fp8 import FP8_DTYPE
from novainfer.kernels.kv_cache import to_cache


@triton.jit
def norm_rope(X, W, row, stride_h, c1, c2, s1, s2, eps,
               H: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
               BLOCK_HALF: tl.constexpr, NORM: tl.constexpr):
    """One token's H heads at X + row (each head's two halves x1, x2): RMSNorm with W
    (NORM), then out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin; every product and sum
    rounded to X's dtype as the PyTorch twins do. Returns (out1, out2, mask)."""
    dt = X.dtype.element_ty
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < H) & (cols[None, :] < HALF)
    src = X + row + heads[:, None] * stride_h + cols[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        ms = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF)
        rstd = 1.0 / tl.sqrt_rn(ms + eps)
        w1 = tl.load(W + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(W + HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        x1 = (w1[None, :] * (x1 * rstd[:, None]).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        x2 = (w2[None, :] * (x2 * rstd[:, None]).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    o1 = (x1 * c1[None, :]).to(dt).to(tl.float32) + (-x2 * s1[None, :]).to(dt).to(tl.float32)
    o2 = (x2 * c2[None, :]).to(dt).to(tl.float32) + (x1 * s2[None, :]).to(dt).to(tl.float32)
    return o1.to(dt), o2.to(dt), mask


@triton.jit
def rope_row(COS, SIN, POS, tok, stride_cos, dt: tl.constexpr, HALF: tl.constexpr,
              BLOCK_HALF: tl.constexpr):
    """The token's cos and sin halves (c1, c2, s1, s2), float32: cos[positions].to(dt), the
    fp32 table rounded to the activations' dtype as the PyTorch twin rounds it."""
    row = tl.load(POS + tok).to(tl.int64) * stride_cos
    cols = tl.arange(0, BLOCK_HALF)
    m = cols < HALF
    c1 = tl.load(COS + row + cols, mask=m, other=0.0).to(dt).to(tl.float32)
    c2 = tl.load(COS + row + HALF + cols, mask=m, other=0.0).to(dt).to(tl.float32)
    s1 = tl.load(SIN + row + cols, mask=m, other=0.0).to(dt).to(tl.float32)
    s2 = tl.load(SIN + row + HALF + cols, mask=m, other=0.0).to(dt).to(tl.float32)
    return c1, c2, s1, s2


@triton.jit
def store_halves(OUT, o1, o2, mask, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_HALF: tl.constexpr):
    """`norm_rope`'s (out1, out2) of one token to OUT: [heads, 2 * HALF], contiguous."""
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    dst = OUT + heads[:, None] * (2 * HALF) + cols[None, :]
    tl.store(dst, o1, mask=mask)
    tl.store(dst + HALF, o2, mask=mask)


@triton.jit(do_not_specialize=["POS", "SLOTS"])
def _rope_store_kernel(
    Q, K, V, QO, KV, QW, KW, POS, SLOTS, COS, SIN, SCALES,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kv, stride_slot, stride_cos, eps,
    HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    NORM: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # before anything is read: q/k/v are the previous kernel's output
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    tok = tl.program_id(0).to(tl.int64)
    c1, c2, s1, s2 = rope_row(COS, SIN, POS, tok, stride_cos, Q.dtype.element_ty, HALF,
                               BLOCK_HALF)
    q1, q2, qmask = norm_rope(Q, QW, tok * stride_qt, stride_qh, c1, c2, s1, s2, eps,
                               HQ, HALF, BLOCK_HQ, BLOCK_HALF, NORM)
    store_halves(QO + tok * (HQ * 2 * HALF), q1, q2, qmask, HALF, BLOCK_HQ, BLOCK_HALF)
    slot = tl.load(SLOTS + tok).to(tl.int64)
    if slot >= 0:  # the cache's heads are contiguous too: [slots, kv_heads, 2 * HALF]
        cdt = KV.dtype.element_ty
        k1, k2, kmask = norm_rope(K, KW, tok * stride_kt, stride_kh, c1, c2, s1, s2, eps,
                                   HK, HALF, BLOCK_HK, BLOCK_HALF, NORM)
        store_halves(KV + slot * stride_slot, to_cache(k1, SCALES, 0, FP8, cdt),
                     to_cache(k2, SCALES, 0, FP8, cdt), kmask, HALF, BLOCK_HK, BLOCK_HALF)
        kheads = tl.arange(0, BLOCK_HK)
        cols = tl.arange(0, BLOCK_HALF)
        v = V + tok * stride_vt + kheads[:, None] * stride_vh + cols[None, :]
        v1 = tl.load(v, mask=kmask)
        v2 = tl.load(v + HALF, mask=kmask)
        store_halves(KV + stride_kv + slot * stride_slot, to_cache(v1, SCALES, 1, FP8, cdt),
                     to_cache(v2, SCALES, 1, FP8, cdt), kmask, HALF, BLOCK_HK, BLOCK_HALF)


def rope_store(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
    eps: float = 0.0, kv_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [tokens, heads, d], k and v [tokens, kv_heads, d] (views of the qkv output, each
    head contiguous); positions [tokens]; cos/sin [max_positions, d] fp32 tables;
    kv_cache [2, blocks, block_size, kv_heads, d] in q's dtype, or fp8 e4m3 with kv_scales
    (float32 [2]: k, v, on the device) (contiguous); slot_mapping [tokens] (< 0: not
    stored). With q_weight and k_weight (both or neither, [d]) q and k are RMS-normalised
    first. Stores k and v into the cache; returns the new q (contiguous)."""
    tokens, hq, d = q.shape
    hk = k.shape[1]
    if d % 2 or k.shape != (tokens, hk, d) or v.shape != k.shape:
        raise ValueError(f"rope_store: q {tuple(q.shape)}, k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)} must share tokens and an even head_dim")
    fp8 = kv_cache.dtype == FP8_DTYPE
    if k.dtype != q.dtype or v.dtype != q.dtype or not (fp8 or kv_cache.dtype == q.dtype):
        raise ValueError(f"rope_store: q, k, v and the cache share one dtype, or the cache is "
                         f"fp8 ({FP8_DTYPE}); got {q.dtype}, {k.dtype}, {v.dtype}, "
                         f"{kv_cache.dtype}")
    if fp8 and (kv_scales is None or kv_scales.dtype != torch.float32
                or kv_scales.numel() != 2):
        raise ValueError("rope_store: an fp8 cache needs kv_scales, float32 [2] (k, v)")
    if not kv_cache.is_contiguous() or kv_cache.shape[-2:] != (hk, d):
        raise ValueError(f"rope_store: kv_cache {tuple(kv_cache.shape)} must be contiguous "
                         f"[2, blocks, block_size, {hk}, {d}]")
    if (q_weight is None) != (k_weight is None):
        raise ValueError("rope_store: give both q_weight and k_weight, or neither")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"rope_store: {name}'s heads must be contiguous")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if tokens == 0:
        return q_out
    norm = q_weight is not None
    half = d // 2
    _rope_store_kernel[(tokens,)](
        q, k, v, q_out, kv_cache, q_weight if norm else q, k_weight if norm else q,
        positions, slot_mapping, cos, sin, kv_scales if fp8 else cos,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(2), cos.stride(0), eps,
        HQ=hq, HK=hk, HALF=half, BLOCK_HQ=triton.next_power_of_2(hq),
        BLOCK_HK=triton.next_power_of_2(hk), BLOCK_HALF=triton.next_power_of_2(half),
        NORM=norm, FP8=fp8, num_warps=4 if hq * d >= 1024 else 1, **pdl_launch(q.device),
    )
    return q_out
