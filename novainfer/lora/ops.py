"""The two LoRA ops over a batch whose tokens use different adapters, and the step's
grouping of tokens by adapter slot.

`shrink` and `expand` run the Triton kernels (kernels/lora.py) on CUDA and the PyTorch
twins below elsewhere (and wherever a test asks for them): the twins loop over the step's
segments on the host, the kernels take them all in one launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LoRABatch:
    """A step's tokens that use an adapter, grouped by slot: segment s is tokens[starts[s]:
    starts[s + 1]], of slot slots[s]. Device tensors for the kernels, host lists for the
    twins, `max_rows` the longest segment (the kernels' grid)."""

    tokens: torch.Tensor  # int64 [tokens using an adapter]
    seg_start: torch.Tensor  # int64 [segments + 1]
    seg_slot: torch.Tensor  # int64 [segments]
    segments: list[tuple[int, int, int]]  # (slot, start, end)
    max_rows: int


def group_by_slot(token_slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, seg_start, seg_slot) int64 of a step's per-token slots (-1: no adapter):
    the tokens that use one, grouped by slot, and where each slot's group starts."""
    used = np.flatnonzero(token_slots >= 0)
    tokens = used[np.argsort(token_slots[used], kind="stable")]
    slots, counts = np.unique(token_slots[tokens], return_counts=True)
    starts = np.zeros(len(slots) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    return tokens.astype(np.int64), starts, slots.astype(np.int64)


def lora_batch(tokens: torch.Tensor, seg_start: torch.Tensor, seg_slot: torch.Tensor,
               host_start: np.ndarray, host_slot: np.ndarray) -> LoRABatch | None:
    """The LoRABatch of `group_by_slot`'s arrays (device copies, and the host ones)."""
    if not len(host_slot):
        return None
    segments = [(int(slot), int(lo), int(hi)) for slot, lo, hi in
                zip(host_slot.tolist(), host_start[:-1].tolist(), host_start[1:].tolist())]
    if tokens.is_cuda:  # fresh allocations are aligned: Triton then compiles one variant,
        # where views at arbitrary offsets of the step's buffer would each compile their own
        tokens, seg_start, seg_slot = tokens.clone(), seg_start.clone(), seg_slot.clone()
    return LoRABatch(tokens, seg_start, seg_slot, segments,
                     int(np.diff(host_start).max()))


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda


def shrink(x: torch.Tensor, a: torch.Tensor, batch: LoRABatch, triton: bool | None = None
           ) -> torch.Tensor:
    """[tokens, n] float32: x[t] @ a[slot(t)].T for the batch's tokens (other rows 0)."""
    out = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    if use_triton(x) if triton is None else triton:
        from novainfer.kernels.lora import lora_shrink_triton

        lora_shrink_triton(x, a, out, batch.tokens, batch.seg_start, batch.seg_slot,
                           batch.max_rows)
        return out
    for slot, lo, hi in batch.segments:
        rows = batch.tokens[lo:hi]
        out[rows] = x[rows].float() @ a[slot].float().T
    return out


def expand(shrunk: torch.Tensor, b: torch.Tensor, y: torch.Tensor, batch: LoRABatch,
           parts: list[tuple[int, int, int]], rank: int, slot_stride: int = 0,
           triton: bool | None = None) -> None:
    """y[t, y0:y0 + size] += shrunk[t, c:c + rank] @ b[slot(t), y0:y0 + size, :rank].T with
    c = s0 + slot(t) * slot_stride, for every part (y0, size, s0) and the batch's tokens, in
    place. slot_stride 0: `shrink`'s output; parts x R: the fused QKV matmul's, where each
    token has every slot's shrink and reads its own slot's in place."""
    if use_triton(y) if triton is None else triton:
        from novainfer.kernels.lora import lora_expand_triton

        lora_expand_triton(shrunk, b, y, batch.tokens, batch.seg_start, batch.seg_slot,
                           batch.max_rows, parts, rank, slot_stride)
        return
    for slot, lo, hi in batch.segments:
        rows = batch.tokens[lo:hi]
        s = shrunk[rows].to(b.dtype).float()  # the kernel multiplies in B's dtype
        total = y[rows].float()
        for y0, size, s0 in parts:
            c = s0 + slot * slot_stride
            total[:, y0 : y0 + size] += s[:, c : c + rank] @ b[slot, y0 : y0 + size, :rank].float().T
        y[rows] = total.to(y.dtype)
