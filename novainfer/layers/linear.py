"""Linear layers: the one seam where tensor-parallel sharding and LoRA will hook in.

Fused projections (q/k/v, gate/up) keep one weight; transformers' separate tensors are
copied into their slices at load time. Split sizes are computed once, at construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        # Output slices by shard name; a plain linear has one shard covering everything.
        self.shards: dict[str | int, tuple[int, int]] = {None: (0, out_features)}

        self.packed: torch.Tensor | None = None  # oneDNN layout of `weight` (CPU fp32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return cpu_packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    def load(self, param_name: str, tensor: torch.Tensor, shard: str | int | None = None) -> None:
        """Copy a checkpoint tensor into `param_name` ("weight"/"bias"), into `shard`'s rows."""
        param = getattr(self, param_name)
        start, size = self.shards[shard]
        target = param.data.narrow(0, start, size)
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(
                f"checkpoint tensor for {param_name} shard {shard} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(target.shape)}"
            )
        target.copy_(tensor)


def cpu_packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def pack_for_cpu(weight: torch.Tensor) -> torch.Tensor | None:
    """Reorder an fp32 CPU weight into oneDNN's blocked layout, or None where unsupported.

    Measured on the 2-core CI CPU: 25-35% faster decode GEMMs and 2x faster LM head than
    F.linear, because the blocked layout streams weights from DRAM better.
    """
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        probe = torch.zeros(1, weight.shape[1])
        cpu_packed_linear(probe, packed, None)
    except (RuntimeError, AttributeError):
        return None
    return packed


class MergedLinear(Linear):
    """Several projections of the same input stacked on the output dim (e.g. gate and up)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(out_sizes), bias)
        starts = [sum(out_sizes[:i]) for i in range(len(out_sizes))]
        self.shards = {i: (s, n) for i, (s, n) in enumerate(zip(starts, out_sizes))}
        self.out_sizes = list(out_sizes)


class QKVLinear(MergedLinear):
    """q, k and v projections in one matmul; `split` returns the three views."""

    def __init__(
        self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool
    ) -> None:
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        super().__init__(hidden, sizes, bias)
        self.shards = {name: self.shards[i] for i, name in enumerate(("q", "k", "v"))}

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.split(self.out_sizes, dim=-1)
