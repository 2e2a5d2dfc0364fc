"""LoRA shrink and expand for a batch whose tokens use different adapters (Triton).

The step's tokens that use an adapter are grouped by slot (`tokens`, with segment `s`
covering tokens[seg_start[s]:seg_start[s + 1]], all of slot seg_slot[s]); one launch covers
every segment (grid axis 2), so there is no loop over adapters on the host, and the grid
depends only on the batch size (`max_rows`), not on how tokens split between adapters.

    shrink:  out[t, :n]           = x[t] @ A[slot(t), :n].T               (fp32 out)
    expand:  y[t, y0:y0 + size]  += s[t, c:c + rank] @ B[slot(t), y0:y0 + size, :rank].T
             with c = s0 + slot(t) * slot_stride (0, or the fused QKV matmul's layout)

A is [slots, n, k] and B [slots, out, R], both contiguous in their last dimension. Rows of
`x`, `out` and `y` not in any segment are neither read nor written. The PyTorch twins (and
the path used off CUDA) are in lora/ops.py.

`tokens`, `seg_start` and `seg_slot` are views into the step's packed buffer at offsets that
change from step to step: the kernels do not specialise on their alignment, or each new
alignment would compile another variant mid-run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SEGMENT_ARGS = ["TOKENS", "SEG_START", "SEG_SLOT"]


@triton.jit
def _segment_tokens(TOKENS, SEG_START, SEG_SLOT, BLOCK_M: tl.constexpr):
    """This program's share of its segment (grid axes 0 and 2): whether it has any token,
    its slot, its BLOCK_M token rows and which of them exist."""
    pid_m, seg = tl.program_id(0), tl.program_id(2)
    first = tl.load(SEG_START + seg) + pid_m * BLOCK_M
    end = tl.load(SEG_START + seg + 1)
    slot = tl.load(SEG_SLOT + seg).to(tl.int64)
    rows = first + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    tok = tl.load(TOKENS + rows, mask=row_ok, other=0).to(tl.int64)
    return first < end, slot, tok, row_ok


@triton.jit(do_not_specialize=_SEGMENT_ARGS)
def _shrink_kernel(
    X, stride_x, A, stride_a_slot, stride_a_row, OUT, stride_out,
    TOKENS, SEG_START, SEG_SLOT, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    active, slot, tok, row_ok = _segment_tokens(TOKENS, SEG_START, SEG_SLOT, BLOCK_M)
    if not active:
        return
    pid_n = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_base = A + slot * stride_a_slot
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(X + tok[:, None] * stride_x + k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_base + n[None, :] * stride_a_row + k[:, None],
                    mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc += tl.dot(x, a, input_precision=PRECISION)
    tl.store(OUT + tok[:, None] * stride_out + n[None, :], acc,
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=_SEGMENT_ARGS)
def _expand_kernel(
    S, stride_s, s0, slot_stride, B, stride_b_slot, stride_b_row, Y, stride_y, y0,
    TOKENS, SEG_START, SEG_SLOT, SIZE, RANK,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    active, slot, tok, row_ok = _segment_tokens(TOKENS, SEG_START, SEG_SLOT, BLOCK_M)
    if not active:
        return
    pid_n = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < SIZE
    r = tl.arange(0, BLOCK_R)
    r_ok = r < RANK
    b = tl.load(B + slot * stride_b_slot + (y0 + n)[None, :] * stride_b_row + r[:, None],
                mask=n_ok[None, :] & r_ok[:, None], other=0.0)
    s = tl.load(S + tok[:, None] * stride_s + s0 + slot * slot_stride + r[None, :],
                mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    update = tl.dot(s.to(b.dtype), b, input_precision=PRECISION)
    y_ptr = Y + tok[:, None] * stride_y + y0 + n[None, :]
    mask = row_ok[:, None] & n_ok[None, :]
    y = tl.load(y_ptr, mask=mask, other=0.0)
    tl.store(y_ptr, (y.to(tl.float32) + update).to(y.dtype), mask=mask)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def lora_shrink_triton(x: torch.Tensor, a: torch.Tensor, out: torch.Tensor,
                       tokens: torch.Tensor, seg_start: torch.Tensor, seg_slot: torch.Tensor,
                       max_rows: int, block_m: int = 16) -> None:
    """out[t, :n] = x[t] @ a[slot(t)].T for the segments' tokens (out float32)."""
    _, n, k = a.shape
    segments = seg_slot.shape[0]
    if not segments or not max_rows:
        return
    block_n = max(16, min(64, triton.next_power_of_2(n)))
    grid = (triton.cdiv(max_rows, block_m), triton.cdiv(n, block_n), segments)
    _shrink_kernel[grid](
        x, x.stride(0), a, a.stride(0), a.stride(1), out, out.stride(0),
        tokens, seg_start, seg_slot, n, k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32, PRECISION=_precision(x.dtype),
    )


def lora_expand_triton(shrunk: torch.Tensor, b: torch.Tensor, y: torch.Tensor,
                       tokens: torch.Tensor, seg_start: torch.Tensor, seg_slot: torch.Tensor,
                       max_rows: int, parts: list[tuple[int, int, int]], rank: int,
                       slot_stride: int = 0, block_m: int = 16) -> None:
    """y[t, y0:y0 + size] += shrunk[t, c:c + rank] @ b[slot(t), y0:y0 + size, :rank].T, c =
    s0 + slot(t) * slot_stride, for each part (y0, size, s0); one launch per part (at most
    three: q, k, v)."""
    segments = seg_slot.shape[0]
    if not segments or not max_rows:
        return
    block_r = max(16, triton.next_power_of_2(rank))
    widest = 128 if block_r <= 128 else 32  # a rank-wide B tile stays small in shared memory
    for y0, size, s0 in parts:
        block_n = max(16, min(widest, triton.next_power_of_2(size)))
        grid = (triton.cdiv(max_rows, block_m), triton.cdiv(size, block_n), segments)
        _expand_kernel[grid](
            shrunk, shrunk.stride(0), s0, slot_stride, b, b.stride(0), b.stride(1), y, y.stride(0),
            y0,
            tokens, seg_start, seg_slot, size, rank,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, PRECISION=_precision(b.dtype),
        )
