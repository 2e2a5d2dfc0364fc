"""Triton kernels for the decoder's small element-wise ops: RMSNorm, residual add + RMSNorm in
one pass, SiLU-and-mul, and Qwen3's q/k RMSNorm + rotary embedding in one pass. Their twins
are the PyTorch functions in layers/norm.py, layers/activation.py and layers/rotary.py
(`.reference`, `qk_norm_rope_reference`), whose rounding they repeat step for step: the sum
x + residual rounded to the activations' dtype, statistics in fp32, the normalised value
rounded to the activations' dtype before the weight multiplies it; silu(gate) rounded before
it multiplies up; each rotary product and their sum rounded.

Each launch allocates only its outputs and never reads a value back to the host, so the ops
can be captured in CUDA graphs. Only the grids depend on the row count, so one compiled
variant per model shape serves every batch size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from novainfer.kernels.rope_store import norm_rope, rope_row, store_halves

# Rows of a small hidden size (q/k norms: head_dim 128) share a program, so tiny rows do not
# each pay a whole program's start-up.
_ROW_ELEMS = 2048


# The row count changes every step: not specialised (== 1, % 16), or the timed run would
# compile a variant whenever a batch size first hits one of those cases.
@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(
    X, R, W, OUT, SUM,
    n_rows, n_cols, heads, eps,
    stride_xt, stride_xh, stride_rt, stride_rh,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Row r of the input is token r // heads, head r % heads: a [tokens, heads, dim] view
    # whose heads are contiguous (the q/k slices of the qkv output) needs no copy.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    rows64 = rows.to(tl.int64)
    tok, head = rows64 // heads, rows64 % heads
    x_off = (tok * stride_xt + head * stride_xh)[:, None] + cols[None, :]
    x = tl.load(X + x_off, mask=mask, other=0.0)
    out_off = rows64[:, None] * n_cols + cols[None, :]
    if HAS_RESIDUAL:
        r_off = (tok * stride_rt + head * stride_rh)[:, None] + cols[None, :]
        r = tl.load(R + r_off, mask=mask, other=0.0)
        x = x + r  # in the activations' dtype, as `x + residual`
        tl.store(SUM + out_off, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)
    normed = (xf * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(OUT + out_off, (w[None, :] * normed).to(OUT.dtype.element_ty), mask=mask)


def _rows_view(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows, heads, token stride, head stride) of x seen as rows of its last dimension.
    2-D inputs may be row-strided; 3-D ones need contiguous rows inside a token."""
    if x.stride(-1) != 1 or x.dim() > 3:
        raise ValueError(f"expected a row-major 2-D or 3-D tensor, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    if x.dim() == 1:
        return 1, 1, 0, 0
    if x.dim() == 2:
        return x.shape[0], 1, x.stride(0), 0
    return x.shape[0] * x.shape[1], x.shape[1], x.stride(0), x.stride(1)


def _launch_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({n},)")
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, heads, sxt, sxh = _rows_view(x)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    total, srt, srh = None, 0, 0
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not match "
                             f"x {tuple(x.shape)} {x.dtype}")
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
        _, _, srt, srh = _rows_view(residual)
        total = torch.empty_like(x, memory_format=torch.contiguous_format)
    if rows == 0:
        return out, total
    block_n = triton.next_power_of_2(n)
    block_r = max(1, min(16, _ROW_ELEMS // block_n))
    warps = 1 if block_r * block_n <= 512 else (4 if block_r * block_n <= 4096 else 8)
    _rms_norm_kernel[(triton.cdiv(rows, block_r),)](
        x, residual if residual is not None else x, weight, out,
        total if total is not None else out,
        rows, n, heads, eps, sxt, sxh, srt, srh,
        HAS_RESIDUAL=residual is not None, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=warps,
    )
    return out, total


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * RMSNorm(x) over the last dimension; x: [..., n] (2-D, or 3-D with contiguous
    rows), weight: [n]. A new contiguous tensor of x's shape."""
    return _launch_norm(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * RMSNorm(x + residual), x + residual) in one pass over x and residual."""
    out, total = _launch_norm(x, residual, weight, eps)
    return out, total


@triton.jit
def _silu_and_mul_kernel(GU, OUT, n_cols, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(GU + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GU + row * stride_row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + row * n_cols + cols, (act * up).to(OUT.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dimension: [rows, 2 n] (rows may
    be strided) -> [rows, n], a new tensor."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dimension must be even, got {gate_up.shape[-1]}")
    n = gate_up.shape[-1] // 2
    flat = gate_up if gate_up.dim() == 2 and gate_up.stride(-1) == 1 else gate_up.reshape(-1, 2 * n)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = torch.empty(*gate_up.shape[:-1], n, dtype=gate_up.dtype, device=gate_up.device)
    rows = flat.shape[0]
    if rows == 0 or n == 0:
        return out
    block = min(1024, triton.next_power_of_2(n))
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](
        flat, out, n, flat.stride(0), BLOCK=block, num_warps=4 if block >= 512 else 1,
    )
    return out


# POS is a view into the step's packed buffer at an offset that changes with the token
# count: specialising on its alignment compiled a second variant in the middle of a timed
# run (bench --strict on an H200, 2026-11-30). Not yet re-run on a GPU.
@triton.jit(do_not_specialize=["POS"])
def _qk_norm_rope_kernel(
    Q, K, QO, KO, QW, KW, POS, COS, SIN,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, eps,
    HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # The helpers of kernels/rope_store.py (which also writes k and v to the cache).
    tok = tl.program_id(0).to(tl.int64)
    c1, c2, s1, s2 = rope_row(COS, SIN, POS, tok, stride_cos, QO.dtype.element_ty, HALF,
                              BLOCK_HALF)
    q1, q2, qmask = norm_rope(Q, QW, tok * stride_qt, stride_qh, c1, c2, s1, s2, eps,
                              HQ, HALF, BLOCK_HQ, BLOCK_HALF, True)
    store_halves(QO + tok * (HQ * 2 * HALF), q1, q2, qmask, HALF, BLOCK_HQ, BLOCK_HALF)
    k1, k2, kmask = norm_rope(K, KW, tok * stride_kt, stride_kh, c1, c2, s1, s2, eps,
                              HK, HALF, BLOCK_HK, BLOCK_HALF, True)
    store_halves(KO + tok * (HK * 2 * HALF), k1, k2, kmask, HALF, BLOCK_HK, BLOCK_HALF)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                 cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's q/k RMSNorm and the rotary embedding in one launch: q [tokens, heads, d] and
    k [tokens, kv_heads, d] (views of the qkv output; each head contiguous), positions
    [tokens], cos/sin [max_positions, d] fp32 tables. New contiguous q and k."""
    tokens, hq, d = q.shape
    hk = k.shape[1]
    if d % 2 or k.shape != (tokens, hk, d) or k.dtype != q.dtype:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype} and k {tuple(k.shape)} {k.dtype} must "
                         "share tokens, head_dim (even) and dtype")
    if q_weight.shape != (d,) or k_weight.shape != (d,) or \
            q_weight.dtype != q.dtype or k_weight.dtype != q.dtype:
        raise ValueError(f"q/k norm weights must be ({d},) in {q.dtype}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if tokens == 0:
        return q_out, k_out
    half = d // 2
    _qk_norm_rope_kernel[(tokens,)](
        q, k, q_out, k_out, q_weight, k_weight, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), eps,
        HQ=hq, HK=hk, HALF=half, BLOCK_HQ=triton.next_power_of_2(hq),
        BLOCK_HK=triton.next_power_of_2(hk), BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4 if hq * d >= 1024 else 1,
    )
    return q_out, k_out
