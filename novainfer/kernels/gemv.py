"""x @ weight^T (+ bias) for one row: the smaller linear layers of a batch-1 decode step.

At one token per step every linear layer is a matrix-vector product that should run at the
weight-read bandwidth. cuBLAS's choices there are uneven: on an H200, qwen3-0.6b's o_proj
(1024 x 2048) takes 12.6 us (0.33 TB/s) where this kernel takes 3.9 us; on the largest
weights (llama3-8b's gate/up, 28672 x 4096) cuBLAS is 4% faster (`benchmarks/gemv.py`,
docs/performance.md). Each program streams BLOCK_N weight rows once, in BLOCK_K-wide tiles,
multiplies them by x into float32 accumulators and adds the bias in float32 before the one
rounding to the output dtype. Its twin is `F.linear` (tests/test_gemv_kernel.py).

`gemv_add_rms_norm` folds the residual add + RMSNorm before q/k/v's and gate/up's
projections into the kernel, one launch fewer each (a batch-1 decode step of qwen3-0.6b is
~400 launches of 1-6 us, so launches count): every program computes the row's statistics
itself (the row is a few KiB, read from L2), the first one also writes h + residual (the
next residual stream), and x is rounded where layers/norm.py's `add_rms_norm` rounds it.
(A SiLU-and-mul prologue for down_proj was measured slower than the two launches: every
program re-reads both halves of the wider gate/up row.)

`SILU_MUL` instead puts SiLU-and-mul in gate/up's epilogue: each program takes gate's rows
j and up's rows j + n/2 for the same j, so it holds both halves of its outputs and writes
silu(gate) * up, rounded as kernels/norm_act.py's `silu_and_mul` rounds it (gate and up to
the output dtype first, then silu(gate), then the product).

On Hopper and later the kernel is launched with programmatic dependent launch (PDL): it may
start while the previous kernel in the stream is still running, loads its first weight tile
(which no kernel writes), then waits (`gdc_wait`) for that kernel's writes before it reads x
or stores anything, and lets the next kernel start early in turn. At batch 1 a layer's
kernels run a few microseconds each, so the launch gap and the weight fetch's latency are
a large share of them. `NOVAINFER_PDL=0` turns it off.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from novainfer.kernels._common import pdl_launch


@triton.jit
def _summed(X, R, ks, k_ok, HAS_RES: tl.constexpr):
    """h (+ residual) at ks, rounded to X's dtype as the unfused add is; float32."""
    h = tl.load(X + ks, mask=k_ok, other=0.0)
    if HAS_RES:
        h = (h.to(tl.float32) + tl.load(R + ks, mask=k_ok, other=0.0).to(tl.float32))
        h = h.to(X.dtype.element_ty)
    return h.to(tl.float32)


@triton.jit
def _normed(h, NW, ks, k_ok, rstd, dtype: tl.constexpr):
    """RMSNorm's output at ks from `_summed`'s h and the row's 1 / rms, rounded as
    layers/norm.py rounds it."""
    normed = (h * rstd).to(dtype).to(tl.float32)
    return (tl.load(NW + ks, mask=k_ok, other=0.0).to(tl.float32) * normed).to(dtype)


@triton.jit
def _gemv_kernel(
    X, W, B, Y, n, k, stride_wn,
    R, NW, RES_OUT, eps,  # NORM: residual, norm weight, h + residual out, epsilon
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr,
    SILU_MUL: tl.constexpr, PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    if SILU_MUL:  # weight rows [gate | up]: interleave j and j + n/2 (j = this program's)
        i = tl.arange(0, BLOCK_N)
        outs = pid * (BLOCK_N // 2) + i // 2
        cols = outs + (i % 2) * (n // 2)
        col_ok = outs < n // 2
    else:
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n
    w_rows = W + cols.to(tl.int64)[:, None] * stride_wn
    # The first weight tile is loaded before anything the previous kernel writes: with
    # PDL this load overlaps that kernel's tail, and nothing is stored before the wait.
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < k
    w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()  # the previous kernel's writes are visible after this
        tl.extra.cuda.gdc_launch_dependents()
    if NORM:  # the row's statistics first; program 0 writes the new residual
        if ONE_TILE:
            h = _summed(X, R, ks, k_ok, HAS_RES)
            if HAS_RES and pid == 0:
                tl.store(RES_OUT + ks, h.to(X.dtype.element_ty), mask=k_ok)
            rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / k + eps)
        else:
            sq = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, k, BLOCK_K):
                ks_i = k0 + tl.arange(0, BLOCK_K)
                ok_i = ks_i < k
                h_i = _summed(X, R, ks_i, ok_i, HAS_RES)
                sq += h_i * h_i
                if HAS_RES and pid == 0:
                    tl.store(RES_OUT + ks_i, h_i.to(X.dtype.element_ty), mask=ok_i)
            rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / k + eps)
            h = _summed(X, R, ks, k_ok, HAS_RES)
        x = _normed(h, NW, ks, k_ok, rstd, X.dtype.element_ty)
    else:
        rstd = 0.0
        x = tl.load(X + ks, mask=k_ok, other=0.0)
    acc = tl.sum(x.to(tl.float32)[None, :] * w.to(tl.float32), axis=1)
    for k0 in range(BLOCK_K, k, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            x = _normed(_summed(X, R, ks, k_ok, HAS_RES), NW, ks, k_ok, rstd,
                        X.dtype.element_ty)
        else:
            x = tl.load(X + ks, mask=k_ok, other=0.0)
        acc += tl.sum(x.to(tl.float32)[None, :] * w.to(tl.float32), axis=1)
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    if SILU_MUL:
        gate, up = tl.split(tl.reshape(acc.to(Y.dtype.element_ty).to(tl.float32),
                                       [BLOCK_N // 2, 2]))
        act = (gate / (1.0 + tl.exp(-gate))).to(Y.dtype.element_ty).to(tl.float32)
        outs = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(Y + outs, (act * up).to(Y.dtype.element_ty), mask=outs < n // 2)
    else:
        tl.store(Y + cols, acc.to(Y.dtype.element_ty), mask=col_ok)


def config(k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps): two weight rows per program, 1024-wide tiles, two warps:
    the best of a sweep (benchmarks/gemv.py --sweep) for nearly every weight where the kernel
    beats cuBLAS on an H200."""
    return 2, min(1024, triton.next_power_of_2(k)), 2


def _check(x: torch.Tensor, weight: torch.Tensor, k: int) -> None:
    if x.numel() != k or weight.shape[1] != k or weight.stride(1) != 1 or x.stride(-1) != 1:
        raise ValueError(f"gemv takes one contiguous row x [1, {k}] and a row-major weight "
                         f"[n, {k}]; got x {tuple(x.shape)} {x.stride()}, weight "
                         f"{tuple(weight.shape)} {weight.stride()}")


def _launch(x, weight, bias, y, block, residual=None, norm_weight=None, residual_out=None,
            eps=0.0, silu_mul=False) -> None:
    """The kernel, with the residual add + RMSNorm prologue when `norm_weight` is given and
    the SiLU-and-mul epilogue with `silu_mul`."""
    n, k = weight.shape
    if n == 0:
        return
    block_n, block_k, warps = block or config(k)
    if silu_mul and block_n < 2:
        raise ValueError(f"gemv: the SiLU-and-mul epilogue needs BLOCK_N >= 2, got {block_n}")
    outputs, per_program = (n // 2, block_n // 2) if silu_mul else (n, block_n)
    _gemv_kernel[(triton.cdiv(outputs, per_program),)](
        x, weight, bias if bias is not None else weight, y, n, k, weight.stride(0),
        residual if residual is not None else x, norm_weight if norm_weight is not None else x,
        residual_out if residual_out is not None else y, eps,
        HAS_BIAS=bias is not None, NORM=norm_weight is not None, HAS_RES=residual is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, ONE_TILE=k <= block_k, SILU_MUL=silu_mul,
        num_warps=warps, **pdl_launch(x.device),
    )


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         block: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x @ weight^T + bias for x: [1, k] (or [k]), weight: [n, k] row-major; a new [1, n]
    (or [n]) tensor of x's dtype. `block` overrides `config`."""
    k = x.shape[-1]
    _check(x, weight, k)
    y = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
    _launch(x, weight, bias, y, block)
    return y


def gemv_add_rms_norm(
    h: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor, bias: torch.Tensor | None = None,
    block: tuple[int, int, int] | None = None, silu_mul: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(h + residual) @ weight^T + bias, h + residual) for h, residual: [1, k]
    (residual None: RMSNorm(h), and h itself as the second result), the norm's weight [k],
    weight [n, k]; the results are new tensors (h itself without a residual). `silu_mul`:
    the first result is silu_and_mul of it instead ([1, n/2]; weight = [gate | up])."""
    k = h.shape[-1]
    _check(h, weight, k)
    if silu_mul and weight.shape[0] % 2:
        raise ValueError(f"gemv_add_rms_norm: silu_mul needs an even number of weight rows "
                         f"([gate | up]), got {weight.shape[0]}")
    if residual is not None and (residual.shape != h.shape or residual.stride(-1) != 1):
        raise ValueError(f"gemv_add_rms_norm: residual {tuple(residual.shape)} must match h "
                         f"{tuple(h.shape)}, contiguous")
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    y = torch.empty(*h.shape[:-1], n, dtype=h.dtype, device=h.device)
    summed = torch.empty_like(h) if residual is not None else h
    _launch(h, weight, bias, y, block, residual, norm_weight, summed, eps, silu_mul)
    return y, summed
