"""One kernel for a row-parallel layer's all-reduce, the residual add and the RMSNorm after it.

In a tensor-parallel decoder every all-reduce (o_proj, down_proj, the embedding) is followed
by `add_rms_norm`. Unfused that is three launches on the GPU: a copy of the partial sum into
the symmetric buffer, PyTorch's one- or two-shot all-reduce kernel (a barrier, the reads of
every peer's buffer, a second barrier before the buffer may be reused), then the norm. Here
one Triton kernel does it all, each program for its own rows (row i belongs to program
i % programs on every rank):

1. copy its rows of this rank's partial sum into this rank's slot of the symmetric buffer;
2. signal every peer's program of the same index, and wait for their signals (flags in the
   signal pads: a release compare-and-swap 0 -> 1 into the peer's pad, an acquire 1 -> 0 on
   its own; the pads are PyTorch's, so `PeerAllReduce.release` unblocks a kernel whose peer
   died, as it does PyTorch's);
3. sum its rows over every rank's slot in rank order (float32, rounded once to the
   activations' dtype: every rank gets the same bits, and for two ranks the same as NCCL's
   sum), add the pending bias and the residual and normalise exactly as `add_rms_norm` does
   (layers/norm.py, kernels/norm_act.py).

No second barrier: consecutive calls use different slots (the caller names the slot), and a
peer that signals call k has finished call k-1's kernel (stream order), so a slot is never
written while a peer may still read it. The number of programs must be the same on every
rank and all of them resident at once (each waits for its peers): `programs` is capped by
the caller.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _barrier(PADS, rank, base, WORLD: tl.constexpr):
    """Signal every peer's flag [base + rank], then wait for ours [base + r] from each peer."""
    tl.debug_barrier()  # this program's stores happen before its signal
    mine = tl.load(PADS + rank).to(tl.pointer_type(tl.int32)) + base
    for r in tl.static_range(WORLD):
        if r != rank:
            theirs = tl.load(PADS + r).to(tl.pointer_type(tl.int32)) + base + rank
            while tl.atomic_cas(theirs, 0, 1, sem="release", scope="sys") != 0:
                pass
    for r in tl.static_range(WORLD):
        if r != rank:
            while tl.atomic_cas(mine + r, 1, 0, sem="acquire", scope="sys") != 1:
                pass
    tl.debug_barrier()  # every thread's reads come after the waits


# The row count and the slot change from call to call: not specialised.
@triton.jit(do_not_specialize=["n_rows", "rank", "slot_offset"])
def _allreduce_add_rms_norm_kernel(
    X, R, W, BIAS, OUT, SUM, BUFFERS, PADS,
    n_rows, n_cols, rank, slot_offset, pad_base, eps,
    WORLD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    dtype = X.dtype.element_ty
    mine = tl.load(BUFFERS + rank).to(tl.pointer_type(dtype)) + slot_offset
    for row in range(pid, n_rows, programs):
        off = row * n_cols + cols  # int32: a slot holds < 2**31 elements
        tl.store(mine + off, tl.load(X + off, mask=mask, other=0.0), mask=mask)
    _barrier(PADS, rank, pad_base + pid * WORLD, WORLD)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    for row in range(pid, n_rows, programs):
        off = row * n_cols + cols  # int32: a slot holds < 2**31 elements
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r in tl.static_range(WORLD):
            part = tl.load(BUFFERS + r).to(tl.pointer_type(dtype)) + slot_offset
            acc += tl.load(part + off, mask=mask, other=0.0, cache_modifier=".cv").to(tl.float32)
        x = acc.to(dtype)  # the all-reduce's result
        if HAS_BIAS:
            x = x + tl.load(BIAS + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            x = x + tl.load(R + off, mask=mask, other=0.0)
        tl.store(SUM + off, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        normed = (xf * rstd).to(dtype).to(tl.float32)
        tl.store(OUT + off, (w * normed).to(OUT.dtype.element_ty), mask=mask)


def allreduce_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
    bias: torch.Tensor | None, *, buffers: torch.Tensor, pads: torch.Tensor, rank: int,
    world: int, slot_offset: int, pad_base: int, programs: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * RMSNorm(s + bias + residual), s + bias + residual) with s = x summed over the
    ranks, for x: [rows, n] contiguous (this rank's partial sum). `buffers` / `pads`: int64
    device tensors of every rank's symmetric buffer / signal pad address; x's rows go to
    element `slot_offset` of this rank's buffer; the flags used are [pad_base, pad_base +
    programs * world) of every pad. Every rank must call it with the same arguments but x,
    residual and rank."""
    rows, n = x.shape
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    total = torch.empty_like(x)
    if rows == 0:
        return out, total
    block_n = triton.next_power_of_2(n)
    warps = 1 if block_n <= 256 else (4 if block_n <= 2048 else 8)
    _allreduce_add_rms_norm_kernel[(min(rows, programs),)](
        x, residual if residual is not None else x, weight,
        bias if bias is not None else weight, out, total, buffers, pads,
        rows, n, rank, slot_offset, pad_base, eps,
        WORLD=world, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, num_warps=warps,
    )
    return out, total
