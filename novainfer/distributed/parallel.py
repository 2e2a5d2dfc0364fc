"""The tensor-parallel group a model shard belongs to, and the collectives its layers use.

`TensorParallel()` (size 1) is the single-device case: every collective is the identity and
no process group exists, so a model built without tensor parallelism pays nothing. With
size > 1, `group` carries the layers' collectives (NCCL on CUDA, gloo on the CPU) and
`control` (always gloo, CPU tensors) carries the driver's step messages and small
agreements such as the KV-cache size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: Any = None
    control: Any = None
    peer: Any = None  # PeerAllReduce (distributed/peer_allreduce.py) for small GPU messages

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place (captured inside CUDA graphs on NCCL)."""
        if self.size > 1:
            with _profiled():
                if self.peer is None or not self.peer(x):
                    torch.distributed.all_reduce(x, group=self.group)
        return x

    def fused_all_reduce_add_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
        slot: int, bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(weight * RMSNorm(s + residual), s + residual), s = x summed over the ranks plus
        `bias`, in one kernel on the peer path (distributed/peer_allreduce.py); None where
        that path does not take x (the caller then all-reduces and normalises apart). `slot`
        must differ between consecutive calls."""
        if self.peer is None or not self.peer.fuses(x, residual, weight):
            return None
        with _profiled():
            return self.peer.add_rms_norm(x, residual, weight, eps, bias, slot)

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise max of x over the ranks, in place (the fp8 KV scales, once)."""
        if self.size > 1:
            torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: the ranks' x concatenated along the last dim (rank order); others: None."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        with _profiled():
            torch.distributed.gather(x, parts, dst=self._global(0), group=self.group)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """x of rank 0 on every rank, in place (the step's sampled ids, asynchronous
        scheduling); a no-op on one rank."""
        if self.size > 1:
            with _profiled():
                torch.distributed.broadcast(x, src=self._global(0), group=self.group)
        return x

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's value (e.g. the KV blocks each rank's memory holds)."""
        return value if self.size == 1 else min_over(value, self.control)

    def _global(self, group_rank: int) -> int:
        return torch.distributed.get_global_rank(self.group, group_rank)


def min_over(value: int, control: Any) -> int:
    """The smallest of every rank's `value`, over the gloo group `control` (CPU tensors)."""
    t = torch.tensor([value], dtype=torch.int64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=control)
    return int(t.item())


def _profiled() -> contextlib.AbstractContextManager:
    """A `novainfer profile` category range around a collective, only while profiling."""
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function("novainfer.cat::communication")
    return contextlib.nullcontext()


def split(total: int, size: int, what: str) -> int:
    """total / size, or a ValueError naming both numbers."""
    if total % size:
        raise ValueError(
            f"{what} ({total}) is not divisible by tensor_parallel_size ({size}); "
            f"choose a tensor_parallel_size that divides {total}"
        )
    return total // size


def kv_heads_per_rank(num_kv_heads: int, size: int) -> tuple[int, int]:
    """(KV heads each rank holds, the first one's index for rank 0 .. stride): with more ranks
    than KV heads, each KV head is replicated on size / num_kv_heads ranks (as vLLM does)."""
    if num_kv_heads >= size:
        return split(num_kv_heads, size, "num_key_value_heads"), 0
    if size % num_kv_heads:
        raise ValueError(
            f"tensor_parallel_size ({size}) exceeds num_key_value_heads ({num_kv_heads}) and is "
            f"not a multiple of it, so KV heads cannot be replicated evenly; choose a "
            f"tensor_parallel_size that divides or is a multiple of {num_kv_heads}"
        )
    return 1, size // num_kv_heads


def kv_head_start(rank: int, num_kv_heads: int, size: int) -> int:
    """Index of the first KV head that `rank` holds."""
    local, replicas = kv_heads_per_rank(num_kv_heads, size)
    return rank * local if replicas == 0 else rank // replicas


def check_shapes(cfg: Any, size: int) -> None:
    """ValueError naming both numbers when the model cannot be split over `size` ranks."""
    split(cfg.num_heads, size, "num_attention_heads")
    kv_heads_per_rank(cfg.num_kv_heads, size)
    split(cfg.intermediate_size, size, "intermediate_size")
    split(cfg.vocab_size, size, "vocab_size")
