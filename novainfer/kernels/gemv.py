"""x @ weight^T (+ bias) for one row: the smaller linear layers of a batch-1 decode step.

At one token per step every linear layer is a matrix-vector product that should run at the
weight-read bandwidth. cuBLAS's choices there are uneven: on an H200, qwen3-0.6b's o_proj
(1024 x 2048) takes 12.6 us (0.33 TB/s) where this kernel takes 3.9 us; on the largest
weights (llama3-8b's gate/up, 28672 x 4096) cuBLAS is 4% faster (`benchmarks/gemv.py`,
docs/performance.md). Each program streams BLOCK_N weight rows once, in BLOCK_K-wide tiles,
multiplies them by x into float32 accumulators and adds the bias in float32 before the one
rounding to the output dtype. Its twin is `F.linear` (tests/test_gemv_kernel.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(
    X, W, B, Y, n, k, stride_wn,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    w_rows = W + cols.to(tl.int64)[:, None] * stride_wn
    for k0 in range(0, k, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(X + ks, mask=k_ok, other=0.0)
        acc += tl.sum(x.to(tl.float32)[None, :] * w.to(tl.float32), axis=1)
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(Y + cols, acc.to(Y.dtype.element_ty), mask=col_ok)


def config(k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps): two weight rows per program, 1024-wide tiles, two warps:
    the best of a sweep (benchmarks/gemv.py --sweep) for nearly every weight where the kernel
    beats cuBLAS on an H200."""
    return 2, min(1024, triton.next_power_of_2(k)), 2


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         block: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x @ weight^T + bias for x: [1, k] (or [k]), weight: [n, k] row-major; a new [1, n]
    (or [n]) tensor of x's dtype. `block` overrides `config`."""
    k = x.shape[-1]
    n = weight.shape[0]
    if x.numel() != k or weight.shape[1] != k or weight.stride(1) != 1 or x.stride(-1) != 1:
        raise ValueError(f"gemv takes one contiguous row x [1, k] and a row-major weight "
                         f"[n, k]; got x {tuple(x.shape)} {x.stride()}, weight "
                         f"{tuple(weight.shape)} {weight.stride()}")
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    block_n, block_k, warps = block or config(k)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, y, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )
    return y
