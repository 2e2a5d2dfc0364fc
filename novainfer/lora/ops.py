"""The two LoRA ops over a batch whose tokens use different adapters, and the step's
grouping of tokens by adapter slot.

`shrink` and `expand` have three implementations (`impl`):

- "cuda": the CUDA C++ kernels (kernels/lora_cuda.cu), the default on CUDA for steps of up
  to NOVAINFER_LORA_CUDA_MAX_TOKENS tokens (512; decode steps). They are batched
  matrix-vector products (Punica's BGMV) and lose to Triton's tiles on long prefills, so
  larger steps take Triton (as Punica's SGMV). If they cannot be built or raise at run
  time, a warning says "CUDA LoRA kernel failed" with the cause and the process uses Triton
  from then on.
- "triton": the Triton kernels (kernels/lora.py); on CUDA for larger steps, and for every
  step with NOVAINFER_FORCE_TRITON_LORA=1.
- "torch": the PyTorch twins below, the path off CUDA; they loop over the step's segments on
  the host, where the kernels take them all in one launch.

With NOVAINFER_VALIDATE_LORA=1 every CUDA call also runs Triton on the same inputs and
compares (lora/validate.py): a NaN/Inf or a difference beyond bf16 tolerance raises
`LoRAValidationError` with the largest difference, which ends the run with a non-zero status.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from novainfer.lora import switches


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
    """The LoRABatch of `group_by_slot`'s arrays (device views of the step's buffer, and the
    host ones)."""
    if not len(host_slot):
        return None
    segments = [(int(slot), int(lo), int(hi)) for slot, lo, hi in
                zip(host_slot.tolist(), host_start[:-1].tolist(), host_start[1:].tolist())]
    return LoRABatch(tokens, seg_start, seg_slot, segments,
                     int(np.diff(host_start).max()))


class LoRAValidationError(RuntimeError):
    """The CUDA and Triton LoRA kernels disagree (or produced NaN/Inf)."""


_cuda_failure: str | None = None  # why the CUDA kernels are not used in this process
_forced: str | None = None  # `using`'s choice


@contextlib.contextmanager
def using(impl: str) -> Iterator[None]:
    """Run every LoRA op in the block by `impl` (benchmarks and tests compare them)."""
    global _forced
    if impl not in ("torch", "triton", "cuda"):
        raise ValueError(f"impl must be torch, triton or cuda, not {impl!r}")
    previous, _forced = _forced, impl
    try:
        yield
    finally:
        _forced = previous


def choose_impl(x: torch.Tensor) -> str:
    """The implementation for x ([tokens, features] of one step) on its device: see the
    module's docstring."""
    if _forced is not None:
        return _forced
    if not x.is_cuda:
        return "torch"
    settings = switches.lora_settings()
    if settings.force_triton or _cuda_failure is not None:
        return "triton"
    return "cuda" if x.shape[0] <= settings.cuda_max_tokens else "triton"


def cuda_failed(error: BaseException) -> None:
    """Stop using the CUDA kernels in this process, with a warning naming the cause."""
    global _cuda_failure
    first = _cuda_failure is None
    _cuda_failure = f"{type(error).__name__}: {error}".strip()
    if first:
        warnings.warn(f"CUDA LoRA kernel failed, using the Triton kernels: {_cuda_failure}",
                      RuntimeWarning, stacklevel=3)


def _kernel(op: str, impl: str):
    if impl == "cuda":
        from novainfer.kernels import lora_cuda

        return getattr(lora_cuda, f"lora_{op}_cuda")
    from novainfer.kernels import lora as lora_triton

    return getattr(lora_triton, f"lora_{op}_triton")


def _launch(op: str, impl: str, out: torch.Tensor, args: tuple) -> None:
    """Run `op` by `impl` into `out` (args: the kernel's, `out` among them), falling back
    from CUDA to Triton on failure and comparing the two in validation mode."""
    if impl == "cuda":
        before = out.clone() if switches.lora_settings().validate else None
        try:
            _kernel(op, "cuda")(*args)
        except Exception as e:  # noqa: BLE001 (a build or launch failure: Triton takes over)
            if before is not None:
                out.copy_(before)
            cuda_failed(e)
            impl = "triton"
        else:
            if before is not None:
                from novainfer.lora.validate import compare

                reference = before.clone()
                _kernel(op, "triton")(*(reference if a is out else a for a in args))
                rows = args[3]  # the batch's tokens: the only rows either kernel writes
                got, want = out[rows].float(), reference[rows].float()
                if op == "expand":  # what each added to y (the shrink's rows start unset)
                    got, want = got - before[rows].float(), want - before[rows].float()
                compare(op, got, want)
            return
    _kernel(op, impl)(*args)


def shrink(x: torch.Tensor, a: torch.Tensor, batch: LoRABatch, impl: str | None = None
           ) -> torch.Tensor:
    """[tokens, n] float32: x[t] @ a[slot(t)].T for the batch's tokens; the other rows are
    left unset (`expand` reads only the batch's tokens), which saves a fill per layer."""
    out = torch.empty(x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    impl = impl or choose_impl(x)
    if impl != "torch":
        _launch("shrink", impl, out, (x, a, out, batch.tokens, batch.seg_start,
                                      batch.seg_slot, batch.max_rows))
        return out
    for slot, lo, hi in batch.segments:
        rows = batch.tokens[lo:hi]
        out[rows] = x[rows].float() @ a[slot].float().T
    return out


def expand(shrunk: torch.Tensor, b: torch.Tensor, y: torch.Tensor, batch: LoRABatch,
           parts: list[tuple[int, int, int]], rank: int, slot_stride: int = 0,
           impl: str | None = None) -> None:
    """y[t, y0:y0 + size] += shrunk[t, c:c + rank] @ b[slot(t), y0:y0 + size, :rank].T with
    c = s0 + slot(t) * slot_stride, for every part (y0, size, s0) and the batch's tokens, in
    place. slot_stride 0: `shrink`'s output; parts x R: the fused QKV matmul's, where each
    token has every slot's shrink and reads its own slot's in place."""
    impl = impl or choose_impl(y)
    if impl != "torch":
        _launch("expand", impl, y, (shrunk, b, y, batch.tokens, batch.seg_start,
                                    batch.seg_slot, batch.max_rows, parts, rank, slot_stride))
        return
    for slot, lo, hi in batch.segments:
        rows = batch.tokens[lo:hi]
        s = shrunk[rows].to(b.dtype).float()  # the kernel multiplies in B's dtype
        total = y[rows].float()
        for y0, size, s0 in parts:
            c = s0 + slot * slot_stride
            total[:, y0 : y0 + size] += s[:, c : c + rank] @ b[slot, y0 : y0 + size, :rank].float().T
        y[rows] = total.to(y.dtype)
