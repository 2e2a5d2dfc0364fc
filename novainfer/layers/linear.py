"""Linear layers: the one seam where tensor-parallel sharding and LoRA will hook in.

Fused projections (q/k/v, gate/up) keep one weight; transformers' separate tensors are
copied into their slices at load time. Split sizes are computed once, at construction. On
the CPU, `pack_for_cpu` may replace a float32 weight by the C matmul's panels after loading.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from novainfer.kernels import cpu_native
from novainfer.layers.fusion import PLAIN_PYTORCH

# x, bias -> x @ weight^T + bias, with the weight captured in a CPU-friendly layout.
CpuMatmul = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class CpuPackable(nn.Module):
    """A module with a weight [out_features, in_features] (a linear layer, the LM head, the
    embedding) that `pack_for_cpu` may hold as cpu_linear.c's panels, parameter
    `weight_panels`, instead of the tensor: one copy in memory, not two. `weight` then
    unpacks a new tensor on every read (for tools and tests; writing to it changes nothing).
    """

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        weight = self._parameters.get("weight")
        if weight is not None:
            return weight
        panels = self._parameters.get("weight_panels")
        if panels is None:  # not set yet: nn.Module's lookup takes over
            raise AttributeError("weight")
        return cpu_native.unpack_linear_weight(panels, self.out_features)

    def hold_as_panels(self, panels: nn.Parameter) -> None:
        """Drop the weight tensor, keep `panels` (pack_linear_weight's layout of it) instead."""
        del self.weight
        self.weight_panels = panels


class Linear(CpuPackable):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(out_features, in_features)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        # Output slices by shard name; a plain linear has one shard covering everything.
        self.shards: dict[str | int, tuple[int, int]] = {None: (0, out_features)}
        self.cpu_matmul: CpuMatmul | None = None  # set by pack_for_cpu after loading

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_matmul is not None:
            return self.cpu_matmul(x, self.bias)
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


def pack_for_cpu(modules: list[CpuPackable]) -> None:
    """Give the modules that share one float32 CPU weight (a linear layer; the LM head and,
    when tied, the embedding) the fastest matmul as `cpu_matmul` (those that have one); other
    weights, and NOVAINFER_NO_COMPILE=1, keep F.linear.

    First choice: novainfer's C kernel (kernels/cpu_linear.c) on the weight repacked into
    panels, which then replace the weight in all of `modules`: one copy in memory. Measured
    on the 2-core CI CPU over all 30 layers and the LM head of the default model, it is
    1.3-2.2x faster than oneDNN at 1-32 rows (decode steps) and on par at 128-512 rows
    (prefill). Without a C compiler: oneDNN's blocked layout, 25-35% faster than F.linear at
    decode sizes, beside the weight (oneDNN cannot give the weight back).
    """
    weight = modules[0].weight
    layers = [m for m in modules if hasattr(m, "cpu_matmul")]
    if not layers or weight.device.type != "cpu" or weight.dtype != torch.float32 or PLAIN_PYTORCH:
        return
    if cpu_native.native_available():
        panels = nn.Parameter(cpu_native.pack_linear_weight(weight), requires_grad=False)
        out_features = weight.shape[0]
        for module in modules:
            module.hold_as_panels(panels)
        matmul = lambda x, bias: cpu_native.packed_linear(x, panels, bias, out_features)
    else:
        matmul = _onednn_matmul(weight)
    for layer in layers:
        layer.cpu_matmul = matmul


def _onednn_matmul(weight: torch.Tensor) -> CpuMatmul | None:
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        blocked = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, weight.shape[1]), blocked, None,
                                           "none", [], "")
    except (RuntimeError, AttributeError):
        return None
    onednn = torch.ops.mkldnn._linear_pointwise
    return lambda x, bias: onednn(x, blocked, bias, "none", [], "")


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
