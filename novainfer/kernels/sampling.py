"""The sampler's inverse-CDF draw in two Triton launches: per-chunk softmax statistics of
the logits in one pass, then one program per row that finds the drawn token.

`chunk_stats_triton`: for row r and chunk c (`chunk` consecutive vocabulary entries, the
last chunk padded with -inf):  max[r, c] = max_j x[r, j] * scale[r]  and  sum[r, c] =
sum_j exp(x[r, j] * scale[r] - max[r, c]); a chunk of only -inf has max -inf and sum 0.
The logits are read once in their own dtype (bf16 from the LM head): no float copy, no
tempered copy, no softmax output.

`pick_token_triton`: from those statistics and the row's uniform number u, the chunk whose
cumulative weight first exceeds u * (the row's total), then the token inside it (its
`chunk` logits read again). In PyTorch that is ~25 small kernels per step; here one.

The PyTorch twins, and the draw that uses both, are in engine/sampler.py (`chunk_stats`,
`pick_token`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# x * scale rounded on its own before anything is subtracted, as PyTorch rounds it: a row
# filtered in PyTorch first (scale applied there, none here) and an unfiltered row scaled
# here then see the same float32 values, so a seeded row draws the same token whether or
# not a batch-mate filters. Compiled, Triton would fuse the multiply and the subtraction.
NO_FMA = {"enable_fp_fusion": False}


@triton.jit
def _chunk_stats_kernel(
    X, stride_x, SCALE, MAX, SUM, vocab, chunks,
    HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + row.to(tl.int64) * stride_x + offs, mask=offs < vocab, other=float("-inf"))
    x = x.to(tl.float32)
    if HAS_SCALE:
        x = x * tl.load(SCALE + row)
    top = tl.max(x, axis=0)
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.exp(x - shift), axis=0)
    tl.store(MAX + row * chunks + chunk, top)
    tl.store(SUM + row * chunks + chunk, total)


def chunk_stats_triton(
    logits: torch.Tensor, scale: torch.Tensor | None, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, sum) float32 [rows, ceil(vocab / chunk)]; `scale` float32 [rows] or None; chunk
    a power of two."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    chunks = -(-vocab // chunk)
    top = torch.empty((rows, chunks), dtype=torch.float32, device=logits.device)
    total = torch.empty_like(top)
    if rows and chunks:
        scale_arg = scale.float().contiguous() if scale is not None else top  # unread if None
        _chunk_stats_kernel[(rows, chunks)](
            logits, logits.stride(0), scale_arg, top, total, vocab, chunks,
            HAS_SCALE=scale is not None, BLOCK=chunk, **NO_FMA,
        )
    return top, total


@triton.jit
def _pick_token_kernel(
    X, stride_x, SCALE, TOP, SUM, U, OUT, vocab, chunks,
    HAS_SCALE: tl.constexpr, CHUNKS_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs_c = tl.arange(0, CHUNKS_PAD)
    cmask = offs_c < chunks
    top = tl.load(TOP + row * chunks + offs_c, mask=cmask, other=float("-inf"))
    sums = tl.load(SUM + row * chunks + offs_c, mask=cmask, other=0.0)
    row_max = tl.max(top, axis=0)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    totals = sums * tl.exp(top - shift)  # chunk weights on the row's common scale
    cdf = tl.cumsum(totals, axis=0)
    target = tl.load(U + row) * tl.max(cdf, axis=0)  # cdf is non-decreasing: max = last
    # searchsorted(cdf, target, right=True): one past the last chunk whose cdf <= target (a
    # position even if a parallel scan's rounding made cdf dip), clamped to the last chunk
    after = tl.where(cmask & (cdf <= target), offs_c + 1, 0)
    chunk = tl.minimum(tl.max(after, axis=0), chunks - 1)
    before = tl.sum(tl.where(offs_c == chunk, cdf - totals, 0.0), axis=0)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    inside = cols < vocab
    x = tl.load(X + row.to(tl.int64) * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_SCALE:
        x = x * tl.load(SCALE + row)
    local = tl.cumsum(tl.where(inside, tl.exp(x - shift), 0.0), axis=0)
    rest = tl.maximum(target - before, 0.0)  # left to cover inside the chunk
    # Rounding may put `rest` at or past the chunk's own total; stay inside its tokens.
    rest = tl.minimum(rest, tl.max(local, axis=0) * (1 - 2**-20))
    token = tl.minimum(chunk * BLOCK + tl.sum((local <= rest).to(tl.int32), axis=0), vocab - 1)
    # A NaN anywhere in the row's weights (a NaN or +inf logit) gives the last token, as the
    # twin's searchsorted does with NaN.
    nan = tl.sum((totals != totals).to(tl.int32), axis=0) + (target != target).to(tl.int32)
    tl.store(OUT + row, tl.where(nan > 0, vocab - 1, token).to(tl.int64))


def pick_token_triton(
    logits: torch.Tensor, scale: torch.Tensor | None, u: torch.Tensor, top: torch.Tensor,
    sums: torch.Tensor, chunk: int,
) -> torch.Tensor:
    """int64 [rows]: the token each row draws for u (float32 [rows, 1] in [0, 1)), from
    `chunk_stats_triton`'s (top, sums) of the same logits and scale."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    chunks = top.shape[1]
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        scale_arg = scale.float().contiguous() if scale is not None else top  # unread if None
        _pick_token_kernel[(rows,)](
            logits, logits.stride(0), scale_arg, top.contiguous(), sums.contiguous(),
            u.float().contiguous(), out, vocab, chunks,
            HAS_SCALE=scale is not None, CHUNKS_PAD=max(16, triton.next_power_of_2(chunks)),
            BLOCK=chunk, num_warps=4, **NO_FMA,
        )
    return out
