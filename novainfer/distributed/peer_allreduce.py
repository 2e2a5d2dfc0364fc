"""A one-shot all-reduce over peer-to-peer GPU buffers, for the small messages of decode steps.

Inside a CUDA graph on two H200s NCCL's all-reduce costs ~16 us up to 128 KiB and ~38 us at
2 MiB (benchmarks/allreduce.py), and a llama3-8b decode step issues 65 of them. Here every
rank allocates one buffer in PyTorch's symmetric memory and maps its peers' buffers
(CUDA IPC over NVLink, no multicast: TORCH_SYMM_MEM_DISABLE_MULTICAST=1 stays set). An
all-reduce copies the message into the local buffer, then one kernel (PyTorch's
`symm_mem.one_shot_all_reduce_out`) waits on a barrier of signal flags, reads every rank's
buffer and writes the sum back into the message. Above ONE_SHOT_MAX_BYTES the kernel is
`two_shot_all_reduce_out` instead: each rank sums its 1/N of the message from every buffer,
then every rank gathers the N sums (no multicast either); with two ranks both give the
same bits as NCCL (a sum of two numbers is rounded once, the same in either order).
Messages larger than the buffer, of a size that is not a multiple of 4 bytes (the kernel's requirement: an odd bf16 count), of other
dtypes, and non-contiguous tensors go to NCCL.

The barrier kernel waits without a timeout. If a peer dies mid-step this rank's stream would
spin forever (NCCL, by contrast, can be aborted), so the driver waits for its GPU work by
polling an event while watching its workers (engine/model_runner.py), and after a failure
`release` keeps writing the signal flags the stuck kernels wait for (this rank's pad set,
the dead peers' pads cleared, from the host through the copy engine, which the spinning
kernels do not block) until the stream drains; the step's results are garbage and are
discarded with the error.

`NOVAINFER_ALLREDUCE`: `auto` (the default) takes the peer path wherever it can work (GPUs
of one host with peer access, the first tensor-parallel engine of a process: see below) and
NCCL elsewhere, silently; `peer` asks for it (and says so on stderr when it cannot be had);
`nccl` never takes it. Every rank must see the same setting; spawned workers inherit it.
`auto` has been measured on NVLink only; on GPUs that reach each other over PCIe, compare
with `nccl` before relying on it.
Measured on 2 x H200 (2026-11-30): 7-11 us against NCCL's 18-20 us up to 512 KiB, 20
against 39 us at 2 MiB, equal at 8 MiB, results bit-identical to NCCL's; llama3-8b `bench`
at N=2 13,620 against 13,190 tok/s with NCCL (asynchronous scheduling, same call), which
made it the default. Its GPU tests (results against NCCL's, a worker killed mid-step) pass.
Whether every rank could allocate its buffer is agreed over the control group before the
collective setup, so a rank that cannot never leaves another waiting.

The same allocation holds, after the all-reduce's BUFFER_BYTES, the staging slots of the
fused all-reduce + residual add + RMSNorm (kernels/allreduce_norm.py; `add_rms_norm`),
which the decoder's norms call on this path with NOVAINFER_FUSED_ALLREDUCE_NORM=1 (agreed
by every rank; off by default until it has run on two GPUs).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable

import torch

from novainfer.distributed.parallel import min_over

ENV = "NOVAINFER_ALLREDUCE"
FUSED_ENV = "NOVAINFER_FUSED_ALLREDUCE_NORM"  # 1 / 0 (default): the kernel below, or not
BUFFER_BYTES = 8 << 20  # messages up to this size take the peer path (tuned on 2 x H200)
# The fused all-reduce + add + RMSNorm (kernels/allreduce_norm.py) stages messages up to this
# size in one of three slots after the all-reduce's buffer: the caller alternates them so
# that consecutive calls never share one (the embedding, o_proj and down_proj outputs).
SLOT_BYTES = 8 << 20
SLOTS = 3
MAX_PROGRAMS = 128  # per fused call: every one must be resident at once on every GPU
ONE_SHOT_MAX_BYTES = 1 << 20  # larger ones: two-shot (each rank sums its share, then all
# gather), half the NVLink traffic of one-shot's read of every peer's whole message
DTYPES = (torch.bfloat16, torch.float32)
FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Group names set up in this process. PyTorch keeps a symmetric-memory registration per group
# name for the life of the process, and a later engine's group reuses the name ("0") with a
# new store: its rendezvous would wait on the old store forever. So only the first engine of
# a process takes the peer path (the worker processes are new each time).
_REGISTERED: set[str] = set()


def setting() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "nccl", "peer"):
        raise ValueError(f"{ENV} must be 'auto', 'nccl' or 'peer', got {value!r}")
    return value


class PeerAllReduce:
    """Sums small contiguous bf16/fp32 tensors over the group in place; `__call__` returns
    False (nothing done) for a message it does not take, so the caller uses NCCL. Every rank
    decides from the message alone, so all ranks take the same path."""

    def __init__(self, buffer: torch.Tensor, group_name: str, handle, fuse_norm: bool,
                 programs: int) -> None:
        # uint8 in symmetric memory, rendezvoused: BUFFER_BYTES for the all-reduce, then
        # SLOTS x SLOT_BYTES for the fused all-reduce + add + RMSNorm.
        self.buffer = buffer
        self.group_name = group_name
        self.handle = handle  # the rendezvous: every rank's buffer and signal pad, mapped
        self.two_shot = hasattr(torch.ops.symm_mem, "two_shot_all_reduce_out")
        self.fuse_norm = fuse_norm
        world = handle.world_size
        device = buffer.device
        self.buffer_ptrs = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)
        # `buffer_ptrs` are the allocations' bases; the buffer may start further in (the
        # same distance on every rank: `create` checks).
        self.base_offset = base_offset(buffer, handle)
        self.pad_ptrs = torch.tensor(handle.signal_pad_ptrs, dtype=torch.int64, device=device)
        # The fused kernel's flags: the top of the signal pads, away from the flags PyTorch's
        # kernels use from the bottom.
        flags = handle.signal_pad_size // 4
        self.programs = max(1, min(programs, flags // (2 * world)))
        self.pad_base = flags - self.programs * world

    def __call__(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        if (nbytes > BUFFER_BYTES or nbytes % 4 or x.dtype not in DTYPES
                or not x.is_contiguous()):
            return False
        flat = x.view(-1)
        staged = self.buffer[:nbytes].view(x.dtype)
        staged.copy_(flat)
        if nbytes <= ONE_SHOT_MAX_BYTES or not self.two_shot:
            torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group_name, flat)
        else:
            torch.ops.symm_mem.two_shot_all_reduce_out(staged, "sum", self.group_name, flat)
        return True

    def fuses(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> bool:
        """Whether `add_rms_norm` takes x (the same answer on every rank: it depends on the
        shapes and dtypes only)."""
        return (self.fuse_norm and x.dim() == 2 and x.dtype in FUSED_DTYPES
                and x.numel() * x.element_size() <= SLOT_BYTES and x.is_contiguous()
                and x.shape[1] <= 16384 and weight.shape == (x.shape[1],)
                and (residual is None or (residual.shape == x.shape
                                          and residual.dtype == x.dtype)))

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None,
                     weight: torch.Tensor, eps: float, bias: torch.Tensor | None,
                     slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight * RMSNorm(s + bias + residual), s + bias + residual), s = x summed over
        the ranks, in one kernel (kernels/allreduce_norm.py); `slot` (0 .. SLOTS-1) must
        differ from the previous call's. Only for x that `fuses`."""
        from novainfer.kernels.allreduce_norm import allreduce_add_rms_norm

        if not 0 <= slot < SLOTS:
            raise ValueError(f"slot must be in 0..{SLOTS - 1}, got {slot}")
        if residual is not None and not residual.is_contiguous():
            residual = residual.contiguous()
        offset = (self.base_offset + BUFFER_BYTES + slot * SLOT_BYTES) // x.element_size()
        return allreduce_add_rms_norm(
            x, residual, weight, eps, bias, buffers=self.buffer_ptrs, pads=self.pad_ptrs,
            rank=self.handle.rank, world=self.handle.world_size, slot_offset=offset,
            pad_base=self.pad_base, programs=self.programs)

    def release(self, drained: Callable[[], bool], timeout: float) -> bool:
        """After a peer died: let this rank's stuck barrier kernels pass until `drained()`
        (or `timeout` s); True when the stream drained."""
        rank, size = self.handle.rank, self.handle.world_size
        mine = self.handle.get_signal_pad(rank).view(torch.int32)
        peers = [self.handle.get_signal_pad(r).view(torch.int32) for r in range(size)
                 if r != rank]
        ones = torch.ones(mine.numel(), dtype=torch.int32).pin_memory()
        zeros = torch.zeros(mine.numel(), dtype=torch.int32).pin_memory()
        side = torch.cuda.Stream(device=self.buffer.device)
        deadline = time.monotonic() + timeout
        with torch.cuda.stream(side):
            while not drained():
                if time.monotonic() > deadline:
                    return False
                mine.copy_(ones, non_blocking=True)  # every wait of ours finds its flag
                for pad in peers:
                    pad.copy_(zeros, non_blocking=True)  # every put of ours finds room
                side.synchronize()
        return True


def create(group, control, device: torch.device) -> PeerAllReduce | None:
    """Every rank's PeerAllReduce over `group` (NCCL, one GPU each) unless NOVAINFER_ALLREDUCE
    is `nccl`; None on every rank when it is, or any rank lacks symmetric memory or peer
    access, or this process already set it up for a group of that name (see above)."""
    if setting() == "nccl" or device.type != "cuda":
        return None
    buffer, why_not = _allocate(device, group)
    if buffer is None and setting() == "peer":
        sys.stderr.write(f"novainfer: {ENV}=peer: this engine uses NCCL: {why_not}\n")
    if not min_over(int(buffer is not None), control):
        return None
    # The fused kernel's programs: as many on every rank, and all resident at once.
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = min_over(min(MAX_PROGRAMS, sms), control)
    import torch.distributed._symmetric_memory as symm

    with warnings.catch_warnings():  # deprecated (and unneeded) in newer PyTorch
        warnings.simplefilter("ignore")
        if hasattr(symm, "enable_symm_mem_for_group"):
            symm.enable_symm_mem_for_group(group.group_name)
    handle = symm.rendezvous(buffer, group.group_name)
    _REGISTERED.add(group.group_name)
    # The fused kernel only where every rank asked for it (and none for plain PyTorch ops)
    # and every rank's buffer sits as far into its allocation: a rank spinning on flags
    # while another sums through NCCL would hang, a slot at another address corrupt the sum.
    offset = base_offset(buffer, handle)
    wanted = fused_setting() and os.environ.get("NOVAINFER_NO_COMPILE") != "1"
    fuse = bool(min_over(int(wanted), control)) and (
        min_over(offset, control) == -min_over(-offset, control))
    return PeerAllReduce(buffer, group.group_name, handle, fuse, programs)


def fused_setting() -> bool:
    """NOVAINFER_FUSED_ALLREDUCE_NORM: `1` fuses each all-reduce with the add + RMSNorm after
    it on the peer path, `0` (or unset: the kernel has not yet run on two GPUs) keeps them
    apart. The ranks agree on it: any rank's `0` turns it off for all."""
    value = os.environ.get(FUSED_ENV, "0").strip()
    if value not in ("0", "1", ""):
        raise ValueError(f"{FUSED_ENV} must be '0' or '1', got {value!r}")
    return value == "1"


def base_offset(buffer: torch.Tensor, handle) -> int:
    """Bytes from this rank's symmetric allocation's base to `buffer`."""
    return buffer.data_ptr() - handle.buffer_ptrs[handle.rank]


def _allocate(device: torch.device, group) -> tuple[torch.Tensor | None, str]:
    """This rank's buffer, or None and why the peer path cannot work here (nothing collective
    happens here: the ranks agree on the outcome after)."""
    size = torch.distributed.get_world_size(group)
    if group.group_name in _REGISTERED:
        return None, "it serves the first tensor-parallel engine of a process"
    try:
        import torch.distributed._symmetric_memory as symm

        if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_out"):
            return None, "this PyTorch has no symm_mem.one_shot_all_reduce_out"
        if int(os.environ.get("LOCAL_WORLD_SIZE", size)) != size:
            return None, "the ranks are not all on this host"
        here = device.index if device.index is not None else torch.cuda.current_device()
        others = [d for d in range(torch.cuda.device_count()) if d != here]
        if not all(torch.cuda.can_device_access_peer(here, d) for d in others):
            return None, f"GPU {here} cannot access every other GPU of this host directly"
        return symm.empty(BUFFER_BYTES + SLOTS * SLOT_BYTES, dtype=torch.uint8,
                          device=device), ""
    except (ImportError, AttributeError, RuntimeError) as e:
        return None, f"symmetric memory is not available ({type(e).__name__}: {e})"
