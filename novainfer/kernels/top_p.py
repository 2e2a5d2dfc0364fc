"""Top-p (nucleus) filtering without sorting the vocabulary: a radix search for the cut.

A row keeps token i when the probability mass of the tokens with larger logits is below p
(the first token always survives), and every logit equal to a kept one (vLLM's tie rule, as
the top-k path keeps ties). That kept set is "every logit >= T" for one value T, and T is
found digit by digit: each float32 logit maps to a 32-bit key with the same order, and
eight passes over the row each fix four more bits of T's key. A pass sums, for the 16
values of the next digit, the mass of the logits whose key starts with the bits fixed so
far; the lowest digit whose largest logit still has less than p of the mass ahead of it is
where the cut lies.

Each pass is one launch over (rows, vocabulary chunks of SPLIT entries). The chunks' sums
go to a small buffer; every program of the next pass sums them and takes the decision
itself (the first chunk's program also stores it for the pass after), so programs never
wait for each other. The first pass weighs each chunk by its own maximum and the second
rescales to the row's. The chunk size is fixed, not chosen from the number of rows, so a
row's arithmetic (hence a seeded request's token) does not depend on its batch-mates.
Past the first digits few logits share the prefix: blocks without one are skipped, and pass
COMPACT (the fourth) also keeps its chunk's logits under the 12-bit prefix (at most CAP),
which the later passes read instead of the chunk (where more than CAP matched, the chunk
again). Nine launches reading the row six times (the first reads its chunk twice: max,
then mass), against PyTorch's sort of the whole vocabulary. NaN logits are undefined input
here, as they are for the sort: filter them out before.

The PyTorch twin is the sort path, engine/sampler.py `_top_k_top_p_sorted`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SPLIT = 4096  # vocabulary entries per program
BLOCK = 256  # entries per loop step inside a program
LEVELS = 8  # 4-bit digits of a 32-bit key
COMPACT = 3  # the pass that keeps its chunk's logits under the prefix (12 bits) for the rest
CAP = 512  # at most this many per chunk (more: the later passes read the chunk again)
_FIXED = ["stride_x", "stride_out", "rows", "vocab", "splits"]  # compile once, whatever the batch


@triton.jit
def _ordered_key(x):
    """float32 -> uint32 with the floats' order (-inf lowest): negative floats' bits
    inverted, positive floats' sign bit set."""
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) == 1, ~bits, bits | 0x80000000)


@triton.jit
def _key_value(key):
    """The float32 whose `_ordered_key` is `key`."""
    return tl.where((key >> 31) == 1, key ^ 0x80000000, ~key).to(tl.float32, bitcast=True)


@triton.jit
def _under(key, prefix, SHIFT: tl.constexpr):
    """Which keys start with `prefix`'s bits above SHIFT + 4 (all for the first digit)."""
    if SHIFT == 28:
        return key == key
    return (key >> (SHIFT + 4)) == (prefix >> (SHIFT + 4))


@triton.jit
def _block_mass(acc, x, key, match, m, SHIFT: tl.constexpr, digits):
    """`acc` plus, per value of the key's digit at SHIFT, the weight exp(x - m) of the logits
    `x` where `match` (`_under`; every logit for the first digit)."""
    if SHIFT == 28:
        acc += tl.where((key >> SHIFT)[:, None] == digits[None, :], tl.exp(x - m)[:, None], 0.0)
    else:
        w = tl.where(match, tl.exp(x - m), 0.0)
        acc += tl.where(((key >> SHIFT) & 15)[:, None] == digits[None, :], w[:, None], 0.0)
    return acc


@triton.jit
def _digit_mass(base, m, prefix, split, vocab, CAND, CNT, SHIFT: tl.constexpr,
                SPLIT: tl.constexpr, BLOCK: tl.constexpr, CAP: tl.constexpr,
                MODE: tl.constexpr):
    """[16]: the weight exp(x - m) of this chunk's logits whose key starts with `prefix`'s
    bits above SHIFT + 4, per value of the key's digit at SHIFT.

    MODE 0 reads the chunk. MODE 1 reads it and also stores the logits under the prefix
    (the candidates of every later pass) at CAND, up to CAP of them, and their number at
    CNT. MODE 2 reads those candidates instead of the chunk, unless there were more than
    CAP (then the chunk again)."""
    digits = tl.arange(0, 16).to(tl.uint32)
    acc = tl.zeros((BLOCK, 16), tl.float32)  # summed across the loop, reduced once
    count = tl.load(CNT) if MODE == 2 else 0
    use_candidates = count <= CAP if MODE == 2 else False
    if use_candidates:
        for start in range(0, CAP, BLOCK):
            if start < count:
                offs = start + tl.arange(0, BLOCK)
                x = tl.load(CAND + offs, mask=offs < count, other=float("-inf"))
                key = _ordered_key(x)
                acc = _block_mass(acc, x, key, _under(key, prefix, SHIFT), m, SHIFT, digits)
    else:
        found = tl.zeros((), tl.int32)
        for start in range(split * SPLIT, split * SPLIT + SPLIT, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(base + offs, mask=offs < vocab, other=float("-inf"))
            key = _ordered_key(x)
            match = _under(key, prefix, SHIFT)
            if SHIFT == 28:
                acc = _block_mass(acc, x, key, match, m, SHIFT, digits)
            else:
                hits = tl.sum(match.to(tl.int32), axis=0)
                # Past the first digits few logits share the prefix: skip blocks without one.
                if hits > 0:
                    acc = _block_mass(acc, x, key, match, m, SHIFT, digits)
                    if MODE == 1:
                        slot = found + tl.cumsum(match.to(tl.int32), axis=0) - 1
                        tl.store(CAND + slot, x, mask=match & (slot < CAP))
                        found += hits
        if MODE == 1:
            tl.store(CNT, found)
    return tl.sum(acc, axis=0)


@triton.jit
def _decide(mass, above, target, prefix, SHIFT: tl.constexpr):
    """From the mass per digit value at SHIFT of the logits under `prefix`: the lowest digit
    whose largest logit has less than `target` ahead of it (the cut lies in its range)."""
    digits = tl.arange(0, 16)
    # mass of the digits above each digit (exactly 0 for the top one)
    after = tl.sum(tl.where(digits[None, :] > digits[:, None], mass[None, :], 0.0), axis=1)
    chosen = tl.min(tl.where((mass > 0) & (above + after < target), digits, 16), axis=0)
    # `above` < target always holds (the previous choice checked it), so the top digit with
    # mass qualifies and no digit is left only when nothing under the prefix weighs
    # anything: a row of nothing but -inf, or logits whose exp(x - max) underflows. Take
    # the top digit then: the cut rises to the top of the range, dropping only logits of
    # weight 0 (the row's max, weight 1, is never among them). For a dead row the cut
    # decodes as NaN and keeps nothing, which is right: it had nothing to keep.
    chosen = tl.where(chosen == 16, 15, chosen)
    above += tl.sum(tl.where(digits == chosen, after, 0.0), axis=0)
    return prefix | (chosen.to(tl.uint32) << SHIFT), above


@triton.jit
def _chunk_sums(PART, row, splits, SPLITS_PAD: tl.constexpr):
    offs_s = tl.arange(0, SPLITS_PAD)
    part = tl.load(PART + (row * splits + offs_s[:, None]) * 16 + tl.arange(0, 16)[None, :],
                   mask=(offs_s < splits)[:, None], other=0.0)
    return part, offs_s


@triton.jit(do_not_specialize=_FIXED)
def _first_kernel(X, stride_x, PART, PMAX, rows, vocab, splits, SPLIT: tl.constexpr,
                  BLOCK: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    base = X + row.to(tl.int64) * stride_x
    top = tl.full((BLOCK,), float("-inf"), tl.float32)
    for start in range(split * SPLIT, split * SPLIT + SPLIT, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        top = tl.maximum(top, tl.load(base + offs, mask=offs < vocab, other=float("-inf")))
    m = tl.max(top, axis=0)  # -inf for a chunk of nothing but -inf: stored as it is
    shift = tl.where(m == float("-inf"), 0.0, m)  # its weights 0, not NaN
    mass = _digit_mass(base, shift, tl.zeros((), tl.uint32), split, vocab, PART, PART, 28,
                       SPLIT, BLOCK, 1, 0)
    tl.store(PART + (row * splits + split) * 16 + tl.arange(0, 16), mass)
    tl.store(PMAX + row * splits + split, m)


@triton.jit
def _state(PART, PMAX, P, ROWMAX, TARGET, PREFIX, ABOVE, row, rows, splits,
           LEVEL: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """The row's max, target mass and the prefix after LEVEL digits, from pass LEVEL - 1's
    chunk sums (and, after the first pass, what the previous pass stored)."""
    part, offs_s = _chunk_sums(PART + (LEVEL - 1) * rows * splits * 16, row, splits,
                               SPLITS_PAD)
    if LEVEL == 1:  # chunk sums weighed by their own max: rescale to the row's
        pmax = tl.load(PMAX + row * splits + offs_s, mask=offs_s < splits,
                       other=float("-inf"))
        m = tl.max(pmax, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)  # a row of nothing but -inf
        # A dead chunk (or a padding slot) weighs 0: exp(-inf - m) but never 0 * inf.
        scale = tl.where(pmax == float("-inf"), 0.0, tl.exp(pmax - m))
        mass = tl.sum(part * scale[:, None], axis=0)
        target = tl.load(P + row) * tl.sum(mass, axis=0)
        prefix = tl.zeros((), tl.uint32)
        above = tl.zeros((), tl.float32)
    else:
        mass = tl.sum(part, axis=0)
        m = tl.load(ROWMAX + row)
        target = tl.load(TARGET + row)
        prefix = tl.load(PREFIX + (LEVEL - 1) * rows + row).to(tl.uint32, bitcast=True)
        above = tl.load(ABOVE + (LEVEL - 1) * rows + row)
    prefix, above = _decide(mass, above, target, prefix, 32 - 4 * LEVEL)
    return m, target, prefix, above


@triton.jit(do_not_specialize=_FIXED)
def _level_kernel(X, stride_x, P, PART, PMAX, ROWMAX, TARGET, PREFIX, ABOVE, CAND, CNT, rows,
                  vocab, splits, LEVEL: tl.constexpr, SPLITS_PAD: tl.constexpr,
                  SPLIT: tl.constexpr, BLOCK: tl.constexpr, CAP: tl.constexpr,
                  COMPACT: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    m, target, prefix, above = _state(PART, PMAX, P, ROWMAX, TARGET, PREFIX, ABOVE, row, rows,
                                      splits, LEVEL, SPLITS_PAD)
    if split == 0:  # for the next pass (read only after this launch has finished)
        tl.store(PREFIX + LEVEL * rows + row, prefix.to(tl.int32, bitcast=True))
        tl.store(ABOVE + LEVEL * rows + row, above)
        if LEVEL == 1:
            tl.store(ROWMAX + row, m)
            tl.store(TARGET + row, target)
    base = X + row.to(tl.int64) * stride_x
    chunk = row * splits + split
    mode = 0 if LEVEL < COMPACT else (1 if LEVEL == COMPACT else 2)
    mass = _digit_mass(base, m, prefix, split, vocab, CAND + chunk.to(tl.int64) * CAP,
                       CNT + chunk, 28 - 4 * LEVEL, SPLIT, BLOCK, CAP, mode)
    tl.store(PART + ((LEVEL * rows + row) * splits + split) * 16 + tl.arange(0, 16), mass)


@triton.jit(do_not_specialize=_FIXED)
def _apply_kernel(X, stride_x, P, PART, PMAX, ROWMAX, TARGET, PREFIX, ABOVE, OUT, stride_out,
                  rows, vocab, splits, SPLITS_PAD: tl.constexpr, SPLIT: tl.constexpr,
                  BLOCK: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    _, _, prefix, _ = _state(PART, PMAX, P, ROWMAX, TARGET, PREFIX, ABOVE, row, rows, splits,
                             8, SPLITS_PAD)
    cut = _key_value(prefix)
    base = X + row.to(tl.int64) * stride_x
    out = OUT + row.to(tl.int64) * stride_out  # may be X itself: each program its own chunk
    for start in range(split * SPLIT, split * SPLIT + SPLIT, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < vocab, other=float("-inf"))
        tl.store(out + offs, tl.where(x >= cut, x, float("-inf")), mask=offs < vocab)


def _aligned(n: int) -> int:
    return -(-n // 32) * 32  # 4-byte elements: 128 bytes


def top_p_filter_triton(logits: torch.Tensor, top_p: torch.Tensor,
                        inplace: bool = False) -> torch.Tensor:
    """float32 logits [rows, vocab] with everything outside each row's top-p set at -inf;
    `top_p` float32 [rows] in (0, 1]. A row with top_p 1 keeps every logit with any mass.
    `inplace`: write into `logits` (rows of unit stride) and return it, taking no
    [rows, vocab] buffer from the allocator (the sampler's own scaled copy)."""
    if logits.dtype != torch.float32:
        raise ValueError(f"top_p_filter_triton: logits must be float32, got {logits.dtype}")
    rows, vocab = logits.shape
    if logits.stride(-1) != 1 or (rows > 1 and logits.stride(0) < vocab):
        if inplace:
            raise ValueError("top_p_filter_triton: inplace needs rows of unit stride that do "
                             "not overlap")
        logits = logits.contiguous()
    dev = logits.device
    out = logits if inplace else torch.empty((rows, vocab), dtype=torch.float32, device=dev)
    if rows == 0 or vocab == 0:
        return out
    splits = -(-vocab // SPLIT)
    # The eight scratch tensors in two allocations (each costs host time at batch 1), every
    # piece 128-byte aligned, as a tensor of its own would be (Triton specialises on it).
    floats = [_aligned(n) for n in (LEVELS * rows * splits * 16, rows * splits, rows, rows,
                                    LEVELS * rows, rows * splits * CAP)]
    ints = [_aligned(n) for n in (LEVELS * rows, rows * splits)]
    part, pmax, rowmax, target, above, cand = torch.empty(
        sum(floats), dtype=torch.float32, device=dev).split(floats)
    prefix, cnt = torch.empty(sum(ints), dtype=torch.int32, device=dev).split(ints)
    p = top_p.float().contiguous()
    state = (p, part, pmax, rowmax, target, prefix, above)  # prefix: uint32 bits in int32
    sizes = dict(SPLITS_PAD=max(16, triton.next_power_of_2(splits)), SPLIT=SPLIT, BLOCK=BLOCK)
    grid = (rows, splits)
    x, stride = logits, logits.stride(0)
    _first_kernel[grid](x, stride, part, pmax, rows, vocab, splits, SPLIT=SPLIT, BLOCK=BLOCK)
    for level in range(1, LEVELS):
        _level_kernel[grid](x, stride, *state, cand, cnt, rows, vocab, splits, LEVEL=level,
                            CAP=CAP, COMPACT=COMPACT, **sizes)
    _apply_kernel[grid](x, stride, *state, out, out.stride(0), rows, vocab, splits, **sizes)
    return out
