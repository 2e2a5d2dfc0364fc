"""Per-chunk softmax statistics of the sampler's logits in one pass (Triton).

For row r and chunk c (`chunk` consecutive vocabulary entries, the last chunk padded with
-inf):  max[r, c] = max_j x[r, j] * scale[r]  and  sum[r, c] = sum_j exp(x[r, j] * scale[r]
- max[r, c]); a chunk of only -inf has max -inf and sum 0. The logits are read once in their
own dtype (bf16 from the LM head): no float copy, no tempered copy, no softmax output. The
PyTorch twin and the draw that uses these are in engine/sampler.py (`chunk_stats`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
            HAS_SCALE=scale is not None, BLOCK=chunk,
        )
    return top, total
