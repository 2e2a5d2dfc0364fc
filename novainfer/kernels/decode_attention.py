"""Paged decode attention (one query token per sequence), flash-decoding style.

Kernel 1 (`_decode_split_kernel`): grid (sequences, kv heads, splits), or (kv heads,
splits, sequences) with `heads_first`; with `order` the sequence axis walks the sequences in
that order (`decode_order`: longest first). A program takes one
sequence, one kv head and one slice of the context, loads the query heads of that kv head's
group as one [GROUP_PAD, D] tile (so each K/V tile is read once per group) and walks its
slice of the context in KV tiles gathered through the block table, with an fp32 online
softmax. It writes partial (max, sum, acc) to an fp32 workspace; with a single split it
normalizes and writes the output directly.
Kernel 2 (`_decode_reduce_kernel`): grid (sequences, heads), merges the splits.

CUDA-graph safe: no host sync; the grid depends only on the batch size, the head counts and
`num_splits` (which callers fix once, or which is derived from static shapes: batch size,
block-table width and the SM count). Sequences with seq_len 0 produce zeros and read nothing.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from novainfer.kernels._common import (
    cdiv,
    check_head_dim,
    check_kv_dtype,
    interpreting,
    next_pow2,
    pdl_launch,
    scale_log2,
    use_ieee,
)


# Step-varying arguments are not specialised (see kernels/prefill_attention.py).
@triton.jit(do_not_specialize=["BT", "SEQ_LENS", "SCALES", "ORDER", "stride_bt"])
def _decode_split_kernel(
    Q, KV, BT, SEQ_LENS, OUT, ACC, M, L, SCALES, ORDER,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kv, stride_blk, stride_slot, stride_cache_h, stride_bt,
    qk_scale,
    NUM_HEADS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    FP8: tl.constexpr,
    DOT_F16: tl.constexpr,
    PDL: tl.constexpr,
    VPAIRS: tl.constexpr = False,
    HEADS_FIRST: tl.constexpr = False,
    HAS_ORDER: tl.constexpr = False,
):
    if PDL:  # before anything is read or written (kernels/_common.py, pdl_launch)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if HEADS_FIRST:  # grid (kv heads, splits, sequences): a sequence's programs together
        kvh = tl.program_id(0)
        split = tl.program_id(1)
        slot = tl.program_id(2)
    else:
        slot = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
    if HAS_ORDER:
        seq = tl.load(ORDER + slot)
    else:
        seq = slot
    seq64 = seq.to(tl.int64)

    seq_len = tl.load(SEQ_LENS + seq)
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_g
    gmask = offs_g < GROUP
    q = tl.load(
        Q + seq64 * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=gmask[:, None], other=0.0,
    )

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    bt_row = BT + seq64 * stride_bt
    head_off = kvh * stride_cache_h
    if FP8:
        # fp8 K/V widen exactly to q's dtype (or fp16: DOT_F16); K's scale folds into the
        # softmax scale and V's into the output, so the tiles are never multiplied element
        # by element
        qk_scale = qk_scale * tl.load(SCALES)
    if DOT_F16:
        # e4m3 -> fp16 is one conversion instruction, -> bf16 three. q is clamped to fp16's
        # range first, so an outlier saturates instead of becoming inf.
        q = tl.minimum(tl.maximum(q, -65504.0), 65504.0).to(tl.float16)

    if VPAIRS:  # the even and the odd head-dim columns of the output, accumulated apart
        offs_h = tl.arange(0, HEAD_DIM // 2)
        acc_even = tl.zeros([GROUP_PAD, HEAD_DIM // 2], tl.float32)
        acc_odd = tl.zeros([GROUP_PAD, HEAD_DIM // 2], tl.float32)
        V16 = (KV + stride_kv).to(tl.pointer_type(tl.int16), bitcast=True)
    else:
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for t in range(tile_lo, tile_hi):
        pos = t * BLOCK_N + offs_n
        pmask = pos < seq_len
        if BLOCK_N <= BLOCK_SIZE:
            # the tile lies inside one cache block: one block-table entry
            blk = tl.load(bt_row + (t * BLOCK_N) // BLOCK_SIZE).to(tl.int64)
            slots = blk * BLOCK_SIZE + (pos % BLOCK_SIZE)
        else:
            blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=pmask, other=0).to(tl.int64)
            slots = blk * BLOCK_SIZE + (pos % BLOCK_SIZE)
        kv_off = slots * stride_slot + head_off
        k = tl.load(KV + kv_off[None, :] + offs_d[:, None], mask=pmask[None, :], other=0.0)
        if FP8:
            k = k.to(q.dtype)  # (q is fp16 under DOT_F16)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = tl.where(pmask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if VPAIRS:
            # V read as int16 pairs of adjacent e4m3 bytes. As the p.v dot's operand, a tile of
            # bytes is gathered one byte a load (the operand pairs consecutive tokens, memory
            # pairs consecutive head-dim elements); 16-bit units move with ldmatrix.trans. A
            # pair widens to the even and the odd head-dim element of its token, each column
            # set with its own dot.
            vw = tl.load(V16 + (kv_off // 2)[:, None] + offs_h[None, :], mask=pmask[:, None],
                         other=0)
            v_even, v_odd = tl.inline_asm_elementwise(
                "{ .reg .b32 t; cvt.rn.f16x2.e4m3x2 t, $2; mov.b32 {$0, $1}, t; }",
                "=h,=h,h", [vw], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
            pv = p.to(tl.float16)
            acc_even = acc_even * alpha[:, None] + tl.dot(pv, v_even)
            acc_odd = acc_odd * alpha[:, None] + tl.dot(pv, v_odd)
        else:
            v = tl.load(KV + stride_kv + kv_off[:, None] + offs_d[None, :], mask=pmask[:, None],
                        other=0.0)
            if FP8:
                v = v.to(q.dtype)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # One split writes the output, several their partial results for the reduce kernel.
    v_scale = tl.load(SCALES + 1) if FP8 else 1.0
    denom = tl.where(l_i > 0.0, l_i, 1.0)
    if NUM_SPLITS == 1:
        dst = OUT + seq64 * stride_ot + heads[:, None] * stride_oh
    else:
        row = (seq64 * NUM_HEADS + heads) * NUM_SPLITS + split  # [GROUP_PAD]
        tl.store(M + row, m_i, mask=gmask)
        tl.store(L + row, l_i, mask=gmask)
        dst = ACC + row[:, None] * HEAD_DIM
    if VPAIRS:
        _write_columns(dst + 2 * offs_h[None, :], acc_even, v_scale, denom, gmask, FP8,
                       NUM_SPLITS == 1)
        _write_columns(dst + 2 * offs_h[None, :] + 1, acc_odd, v_scale, denom, gmask, FP8,
                       NUM_SPLITS == 1)
    else:
        _write_columns(dst + offs_d[None, :], acc, v_scale, denom, gmask, FP8, NUM_SPLITS == 1)


@triton.jit
def _write_columns(dst, acc, v_scale, denom, gmask, FP8: tl.constexpr, NORMALIZE: tl.constexpr):
    """Output columns of the query rows in `gmask`: times V's fp8 scale, then (NORMALIZE,
    one split) divided by the softmax sum; cast to the destination's type."""
    if FP8:
        acc = acc * v_scale
    if NORMALIZE:
        acc = acc / denom[:, None]
    tl.store(dst, acc.to(dst.dtype.element_ty), mask=gmask[:, None])


@triton.jit
def _decode_reduce_kernel(
    OUT, ACC, M, L,
    stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    smask = offs_s < NUM_SPLITS
    row = (seq * NUM_HEADS + head) * NUM_SPLITS + offs_s
    m = tl.load(M + row, mask=smask, other=float("-inf"))
    l = tl.load(L + row, mask=smask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # empty context: all weights 0
    w = tl.exp2(m - m_max)
    denom = tl.sum(w * l, 0)
    acc = tl.load(ACC + row[:, None] * HEAD_DIM + offs_d[None, :], mask=smask[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(OUT + seq * stride_ot + head * stride_oh + offs_d, o.to(OUT.dtype.element_ty))


@functools.cache
def _cuda_props(index: int):
    """A CUDA device's properties, read once: every decode call (per layer, per eager step)
    consults them."""
    return torch.cuda.get_device_properties(index)


def _props(device: torch.device):
    return _cuda_props(device.index if device.index is not None else torch.cuda.current_device())


def _sm_count(device: torch.device) -> int:
    return _props(device).multi_processor_count if device.type == "cuda" else 8


def default_num_splits(
    num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device,
    min_tokens_per_split: int = 64, max_splits: int = 32, programs_per_sm: int = 2,
) -> int:
    """Splits so that (seqs x kv heads x splits) programs number at least `programs_per_sm`
    per SM (rounded up to a power of two), never splitting the context into pieces shorter
    than `min_tokens_per_split`. Depends only on static quantities (batch size, kv heads,
    maximum context capacity, SM count): CUDA-graph safe. 2 per SM suits the plain launch
    order; with the sequences longest first (`decode_order_enabled`) the backend asks for 4."""
    # H200 (132 SMs), D=128, 8 kv heads, bf16: 8 seqs x 4k -> 8 splits (51 us vs 141 us
    # unsplit); 64 x 1k or more -> 1 split (~3.4-4.0 TB/s). A minimum of 64 tokens (one
    # tile) instead of 256: qwen3-0.6b at batch 1, 1,000-token context, max_model_len 1,264,
    # 1.334 -> 1.217 ms/token (benchmarks/latency.py, one call); large batches unchanged.
    programs = max(1, num_seqs * num_kv_heads)
    want = next_pow2(cdiv(programs_per_sm * _sm_count(device), programs))
    by_len = max(1, cdiv(max_context, min_tokens_per_split))
    return max(1, min(want, by_len, max_splits))


def _smem_per_block(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 30  # the interpreter: no limit
    return int(getattr(_props(device), "shared_memory_per_block_optin", 0) or 0)


def default_tile(
    head_dim: int, num_splits: int, kv_bytes: int, device: torch.device
) -> tuple[int, int]:
    """(BLOCK_N, num_stages) for the decode kernel. A function of the split count (not of a
    step's block-table width, which varies in eager steps), so it adds no kernel variant.

    128-token tiles at one or two splits (large batches) over a 1- or 2-byte cache (5 stages for
    fp8, which Triton's pipeliner turns into two K/V buffers: the next tile loads while this one
    is computed; 3 and 4 stages give one); 64 at more splits (batch 1 cuts a 1,000-token context
    into ~64-token pieces); 32 for head_dim > 128. On an H200 (2026-12-01, one call, `novainfer
    bench`, 256 prompts) 128-token tiles gave qwen3-0.6b 22,715 / 22,617 tok/s vs 21,595 /
    21,831 with 64, and r1-distill-qwen-1.5b 29,099 vs 28,492; with the fp8 cache and 3 stages
    qwen3-0.6b 23,450 vs 21,834 (benchmarks/decode_sweep.py: fp8 128/3 250.7 us vs 64/2 276.0
    us). An earlier end-to-end loss with 128-token tiles (13,214 vs 17,375) came from kernels
    recompiling on step-varying arguments, since fixed. The 128-token tile needs ~2x the shared
    memory: fp32 caches, and GPUs with less than 160 KiB a block, keep 64. Two fp8 buffers take
    73 KiB a program (3 programs an SM on Hopper); on an H200 (2026-12-03, 256 sequences of
    100-2048 tokens, us per call) 217.2 -> 211.4 with qwen3-0.6b heads."""
    if head_dim > 128:
        return 32, 2
    if num_splits <= 2 and kv_bytes <= 2 and _smem_per_block(device) >= 160 * 1024:
        return 128, 5 if kv_bytes == 1 else 2
    return 64, 2


def default_maxnreg(
    block_n: int, kv_bytes: int, num_warps: int, head_dim: int, group_pad: int, dot_f16: bool,
    capability: tuple[int, int],
) -> int | None:
    """A register cap for the decode kernel, or None. Over an fp8 cache with 128-token tiles
    and 4 warps the kernel takes 200 registers a thread (the widened K and V tiles), which
    fits 2 programs per SM; capped at 168 (no spills) 3 fit. On an H200 (2026-12-02, one
    call, 256 sequences of 100-2048 tokens, `decode_attention` on the fp8 cache): qwen3-0.6b
    heads (16 / 8) 256.6 -> 216.7 us, r1-distill-qwen-1.5b heads (12 / 2) 85.8 -> 78.4; a cap
    of 160 was slower than 168, one of 128 spilled (241.1 us), and 64-token tiles with a cap
    of 128 stayed at 252 us. Only where that was checked: Hopper (compute capability 9.x),
    head_dim 128, at most 16 query rows a program, fp16 dots; larger tiles could spill. The
    bf16 kernel is at the copy bandwidth already. With V read as 16-bit pairs (`v_pairs`) the
    kernel needs ~156 registers; the cap still helps r1-distill-qwen-1.5b's group of 6 heads
    (57.5 against 69.1 us uncapped, the same sweep on 2026-12-03)."""
    if (block_n == 128 and kv_bytes == 1 and num_warps == 4 and head_dim == 128
            and group_pad <= 16 and dot_f16 and capability[0] == 9):
        return 168
    return None


@functools.cache
def decode_order_enabled() -> bool:
    """NOVAINFER_DECODE_ORDER: "longest-first" (the default) or "off". With it, decode steps
    launch a sequence's programs side by side and the sequences longest first
    (`decode_attention`'s heads_first and order; the order is one rank kernel a step, inside
    the CUDA graphs), at twice the split count (`default_num_splits`, programs_per_sm=4): with
    the long sequences first, more and shorter programs even out the end of the call instead
    of leaving SMs idle. At a given split count the order changes no output bit; the doubled
    split count sums in another order, as any split count does. Measured on an H200,
    2026-12-03, with the kernel alone (`python benchmarks/decode_sweep.py --order-sweep`:
    contexts drawn from 100-2048 tokens, replayed from a CUDA graph, us per call), plain at
    the old split count against both at the new one:
    - qwen3-0.6b's heads (16 / 8), bf16 cache: 16 sequences 25.4 -> 18.9; 48 66.3 -> 60.1;
      128 144.4 -> 128.1.
    - The same on the fp8 cache: 16 sequences 19.2 -> 13.9; 48 45.1 -> 40.5.
    - r1-distill-qwen-1.5b's heads (12 / 2), bf16: 48 sequences 25.7 -> 22.0; 64 30.5 ->
      27.0; 128 50.2 -> 42.6.
    - The same on fp8: 48 sequences 19.1 -> 15.0; 64 22.4 -> 18.9.
    The order alone, at the old split count, lost where every program fits in one wave
    (qwen3's heads, 48 sequences at 1 split: 66.3 -> 73.1), since neighbouring programs
    share an SM: the doubled split count avoids that case. Read once per process."""
    value = os.environ.get("NOVAINFER_DECODE_ORDER", "").strip().lower() or "longest-first"
    if value not in ("longest-first", "off"):
        raise ValueError(f"NOVAINFER_DECODE_ORDER must be 'longest-first' or 'off', got {value!r}")
    return value == "longest-first"


@triton.jit(do_not_specialize=["N"])  # eager steps' batch sizes vary: one variant
def _order_kernel(LENS, ORDER, N, BLOCK: tl.constexpr):
    """ORDER[rank(i)] = i, where rank(i) counts the sequences j before i: longer, or as long
    with j < i (a stable descending sort). Each program ranks BLOCK sequences against all."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    imask = i < N
    li = tl.load(LENS + i, mask=imask, other=0)
    rank = tl.zeros([BLOCK], tl.int32)
    for start in range(0, N, BLOCK):
        j = start + tl.arange(0, BLOCK)
        lj = tl.load(LENS + j, mask=j < N, other=-1)  # below any length: never before i
        before = (lj[None, :] > li[:, None]) | ((lj[None, :] == li[:, None])
                                                & (j[None, :] < i[:, None]))
        rank += tl.sum(before.to(tl.int32), axis=1)
    tl.store(ORDER + rank, i, mask=imask)


ORDER_BLOCK = 128


def decode_order(seq_lens: torch.Tensor) -> torch.Tensor:
    """The sequences' indices (int32), longest context first, ties in index order
    (`decode_attention`'s order), on CUDA or in Triton's interpreter like the decode kernel
    it feeds. One launch of `_order_kernel` instead of torch.argsort's sort kernels: on an
    H200 (2026-12-03, benchmarks/run_breakdown.py, where "sort" kernels count as sampling)
    the sampling category of a bench run fell from 35.6 to 23.6 ms on qwen3-0.6b and
    r1-distill-qwen-1.5b alike; the argsort had cost ~18 us a step at 193-256 sequences.
    Lengths: non-negative (padding rows: 0, last)."""
    n = seq_lens.shape[0]
    order = torch.empty(n, dtype=torch.int32, device=seq_lens.device)
    if n:
        _order_kernel[(cdiv(n, ORDER_BLOCK),)](seq_lens, order, n, BLOCK=ORDER_BLOCK)
    return order


# A CUDA grid's y and z dimensions hold at most 65535 programs; heads_first puts the
# sequences on z.
MAX_GRID_Z = 65535


def decode_launch(
    num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device
) -> tuple[int, bool]:
    """How the engine launches a decode step (layers/attention/triton_backend.py): (split
    count, ordered). Ordered (`decode_order_enabled`, and at most MAX_GRID_Z sequences):
    heads_first with the sequences longest first, at 4 programs per SM; else the plain
    launch at 2."""
    ordered = decode_order_enabled() and num_seqs <= MAX_GRID_Z
    splits = default_num_splits(num_seqs, num_kv_heads, max_context, device,
                                programs_per_sm=4 if ordered else 2)
    return splits, ordered


def decode_workspace_numel(num_seqs: int, num_heads: int, head_dim: int, num_splits: int) -> int:
    return num_seqs * num_heads * num_splits * (head_dim + 2)


def alloc_decode_workspace(
    max_num_seqs: int, num_heads: int, head_dim: int, num_splits: int, device: torch.device
) -> torch.Tensor:
    """fp32 scratch for `decode_attention(..., workspace=)`: allocate once, reuse every step."""
    n = decode_workspace_numel(max_num_seqs, num_heads, head_dim, num_splits)
    return torch.empty(n, dtype=torch.float32, device=device)


@functools.cache
def fp8_dot_fp16() -> bool:
    """NOVAINFER_FP8_DOT: with a bf16 model over an fp8 cache, the decode kernel's dots run
    in "fp16" (the default: q narrowed to fp16, clamped to its +-65504, which query values
    stay far inside, and the cache widened to fp16, one conversion instruction on the GPU)
    or "bf16" (the cache widened to q's dtype, three instructions). On an H200 (2026-12-01,
    one call) fp16 dots made the decode kernel 8% faster (281 vs 307 us, 256 sequences)
    and `bench --kv-cache-dtype fp8` 2.7% faster (21,418 vs 20,865 tok/s). Read once per
    process."""
    value = os.environ.get("NOVAINFER_FP8_DOT", "").strip().lower() or "fp16"
    if value not in ("bf16", "fp16"):
        raise ValueError(f"NOVAINFER_FP8_DOT must be 'bf16' or 'fp16', got {value!r}")
    return value == "fp16"


def decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    num_splits: int | None = None,
    workspace: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    kv_scales: torch.Tensor | None = None,
    dot_f16: bool | None = None,
    maxnreg: int | None = None,
    v_pairs: bool | None = None,
    heads_first: bool = False,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [seqs, heads, D] (one token per sequence); kv_cache: [2, blocks, block_size, kv_heads, D]
    in q's dtype, or fp8 e4m3 with kv_scales (float32 [2]: k, v) on the device;
    dot_f16 (q over an fp8 cache; None: NOVAINFER_FP8_DOT for bf16 q, `fp8_dot_fp16`): the
    dots in fp16 instead of q's dtype (explicit True also narrows fp32 q: the CPU tests);
    block_tables: [seqs, max_blocks] int32; seq_lens: [seqs] int32 (0 = padding row -> zeros);
    out: [seqs, heads, D], written in place and returned. maxnreg: a register cap per thread
    (None: `default_maxnreg` on CUDA; 0: none). v_pairs: V read as 16-bit pairs and widened
    by inline PTX (`_decode_split_kernel`, VPAIRS); None: wherever it applies (an fp8 cache
    read with fp16 dots, head_dim <= 128, compiled kernels on CUDA: the interpreter cannot
    run PTX); True where it does not is a ValueError.
    heads_first: a sequence's programs (its kv heads and splits) are neighbours in the
    launch (its kv heads read the same cache blocks, which hold every kv head of a token side
    by side). order: int [seqs], a permutation of 0..seqs-1: the programs take the sequences
    in this order (`decode_order` gives the longest first, so that the long ones do not start
    last and leave SMs idle at the end). Neither changes a program's arithmetic: the output
    is the same bits.

    num_splits None -> `default_num_splits` from static shapes (graph safe). workspace: an fp32
    tensor of at least `decode_workspace_numel(...)` elements (else allocated when splitting).
    """
    num_seqs, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    check_head_dim(head_dim)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if num_seqs == 0:
        return out
    assert kv_cache.is_contiguous(), "kv_cache must be contiguous"
    assert q.stride(-1) == 1 and out.stride(-1) == 1
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = default_num_splits(
            num_seqs, num_kv_heads, block_tables.shape[1] * block_size, q.device
        )
    fp8 = check_kv_dtype(q, kv_cache, kv_scales)
    if block_n is None:
        block_n, tile_stages = default_tile(
            head_dim, num_splits, kv_cache.element_size(), q.device
        )
        if num_stages is None:
            num_stages = tile_stages
    if num_stages is None:
        num_stages = 2
    if dot_f16 is None:
        dot_f16 = q.dtype == torch.bfloat16 and fp8_dot_fp16()
    dot_f16 = dot_f16 and fp8 and q.dtype != torch.float16
    group_pad = max(16, next_pow2(group))
    if maxnreg is None and q.device.type == "cuda":
        maxnreg = default_maxnreg(
            block_n, kv_cache.element_size(), num_warps, head_dim, group_pad, dot_f16,
            (_props(q.device).major, _props(q.device).minor),
        )
    ieee = use_ieee(q.dtype) and not dot_f16
    # V pairs: fp16 dots over an fp8 cache, head_dim <= 128 (run on the GPU at 16-128), and
    # compiled code (inline PTX).
    pairs_apply = (fp8 and (dot_f16 or q.dtype == torch.float16) and head_dim <= 128
                   and q.device.type == "cuda" and not interpreting())
    if v_pairs and not pairs_apply:
        raise ValueError("v_pairs=True needs an fp8 cache read with fp16 dots, head_dim <= 128 "
                         f"and compiled kernels on CUDA (got kv {kv_cache.dtype}, q {q.dtype}, "
                         f"dot_f16 {dot_f16}, head_dim {head_dim}, device {q.device.type})")
    v_pairs = pairs_apply if v_pairs is None else v_pairs
    if heads_first and num_seqs > MAX_GRID_Z:
        raise ValueError(f"heads_first launches the sequences on the grid's z axis, which holds "
                         f"at most {MAX_GRID_Z}; got {num_seqs} sequences")
    if order is not None and (order.shape != (num_seqs,) or order.device != q.device
                              or order.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"order must be an int32 or int64 tensor of shape ({num_seqs},) on "
                         f"{q.device}, got {order.dtype} {tuple(order.shape)} on {order.device}")
    if num_splits > 1:
        need = decode_workspace_numel(num_seqs, num_heads, head_dim, num_splits)
        if workspace is None:
            workspace = torch.empty(need, dtype=torch.float32, device=q.device)
        assert workspace.dtype == torch.float32 and workspace.numel() >= need, "workspace too small"
        rows = num_seqs * num_heads * num_splits
        acc = workspace[: rows * head_dim]
        m = workspace[rows * head_dim : rows * (head_dim + 1)]
        lse = workspace[rows * (head_dim + 1) : rows * (head_dim + 2)]
    else:
        acc = m = lse = out  # unused
    grid = ((num_kv_heads, num_splits, num_seqs) if heads_first
            else (num_seqs, num_kv_heads, num_splits))
    _decode_split_kernel[grid](
        q, kv_cache, block_tables, seq_lens, out, acc, m, lse, kv_scales if fp8 else seq_lens,
        seq_lens if order is None else order,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        scale_log2(scale),
        NUM_HEADS=num_heads,
        NUM_SPLITS=num_splits,
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        IEEE=ieee,
        FP8=fp8,
        DOT_F16=dot_f16,
        VPAIRS=v_pairs,
        HEADS_FIRST=heads_first,
        HAS_ORDER=order is not None,
        num_warps=num_warps,
        num_stages=num_stages,
        **({"maxnreg": maxnreg} if maxnreg else {}),
        **pdl_launch(q.device),
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out, acc, m, lse,
            out.stride(0), out.stride(1),
            NUM_HEADS=num_heads,
            NUM_SPLITS=num_splits,
            SPLITS_PAD=next_pow2(num_splits),
            HEAD_DIM=head_dim,
            num_warps=1 if head_dim <= 64 else 2,
            **pdl_launch(q.device),
        )
    return out
