"""Linear layers: the one seam where tensor-parallel sharding and LoRA hook in.

Fused projections (q/k/v, gate/up) keep one weight; transformers' separate tensors are
copied into their slices at load time. Split sizes are computed once, at construction.

With tensor parallelism each rank holds a slice: column-parallel layers (q/k/v, gate/up)
hold the rank's rows of every part (its heads, its slice of the intermediate size), so
their outputs need no communication; row-parallel layers (o_proj, down_proj) hold the
rank's columns and all-reduce their output, bias added once after the sum. The decoder
builds the same modules at every size; a size-1 group makes them plain linears. On the
CPU, `pack_for_cpu` may replace a float32 weight by the C matmul's panels after loading.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from novainfer.distributed.parallel import TensorParallel, kv_head_start, kv_heads_per_rank, split
from novainfer.kernels import cpu_native, kernel_module
from novainfer.layers.fusion import PLAIN_PYTORCH

SINGLE = TensorParallel()


def gemv_setting(value: str | None) -> bool:
    """NOVAINFER_GEMV's value, checked: `1` (or unset) sends one-row matmuls of the weights
    where kernels/gemv.py beats cuBLAS to it on CUDA, `0` keeps cuBLAS everywhere."""
    text = (value or "").strip() or "1"
    if text not in ("0", "1"):
        raise ValueError(f"NOVAINFER_GEMV must be '0' or '1', got {value!r}")
    return text == "1"


# Read once: matmul runs ~200 times per step.
GEMV = gemv_setting(os.environ.get("NOVAINFER_GEMV")) and not PLAIN_PYTORCH
GEMV_DTYPES = (torch.bfloat16, torch.float16)
# Where the one-row kernel won on an H200 (benchmarks/gemv.py): weights of up to 2**25
# elements (r1-distill-qwen-1.5b's gate/up, 17920 x 1536: 15.3 vs 17.1 us; llama3-8b's
# q/k/v, 6144 x 4096: 14.2 vs 16.3 us) whose rows are at most 4096 long; cuBLAS is as fast
# or faster beyond (llama3-8b's gate/up, 28672 x 4096; r1's down, rows of 8960).
GEMV_MAX_K = 4096
GEMV_MAX_ELEMENTS = 1 << 25


def gemv_fits(in_features: int, out_features: int) -> bool:
    """Whether one-row matmuls of a weight [out_features, in_features] go to kernels/gemv.py."""
    return in_features <= GEMV_MAX_K and in_features * out_features <= GEMV_MAX_ELEMENTS

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

    def loadable_weight(self) -> torch.Tensor:
        """The weight tensor to load a checkpoint into; an error once it is held as panels
        (a copy unpacked from them would take the values and drop them)."""
        if "weight_panels" in self._parameters:
            raise RuntimeError(
                f"{type(self).__name__}'s weight is packed for the CPU kernels: load weights "
                "before pack_for_cpu"
            )
        return self.weight.data

    def hold_as_tensor(self, weight: torch.Tensor) -> None:
        """Hold `weight` (e.g. a view of a larger buffer) as the plain weight tensor, with the
        default matmul: undoes `pack_for_cpu` for this module (its panels are its own)."""
        self._parameters.pop("weight_panels", None)
        self.weight = nn.Parameter(weight, requires_grad=False)
        if hasattr(self, "cpu_matmul"):
            self.cpu_matmul = None

    def hold_as_panels(self, panels: nn.Parameter) -> None:
        """Drop the weight tensor, keep `panels` (pack_linear_weight's layout of it) instead."""
        del self.weight
        self.weight_panels = panels


@dataclass(frozen=True)
class Shard:
    """Rows [start, start + size) of this rank's weight take rows [src_start, src_start +
    size) of one checkpoint tensor (a fused layer's part, or the whole weight)."""

    start: int
    size: int
    src_start: int = 0


class Linear(CpuPackable):
    """x @ weight^T + bias, the whole weight on every rank (or a shard of it: subclasses).

    `in_slice` (row-parallel): this rank holds checkpoint columns [start, start + size) and
    the partial outputs are summed over `tp`'s ranks.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        tp: TensorParallel = SINGLE,
        in_slice: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(out_features, in_features)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        # Output slices by shard name; a plain linear has one shard covering everything.
        self.shards: dict[str | int | None, Shard] = {None: Shard(0, out_features)}
        self.tp = tp
        self.in_slice = in_slice
        self.reduce = in_slice is not None and tp.enabled
        self.cpu_matmul: CpuMatmul | None = None  # set by pack_for_cpu after loading
        self.gemv_fits = gemv_fits(in_features, out_features)
        self.lora: nn.Module | None = None  # LoRASlots (lora/layers.py) with enable_lora

    def takes_gemv(self, x: torch.Tensor) -> bool:
        """Whether this rank's matmul of `x` (or of the row it is made from) runs in
        kernels/gemv.py: on CUDA, one contiguous 16-bit row (a batch-1 decode step), for
        the weights where that beats cuBLAS (docs/performance.md)."""
        return (GEMV and self.cpu_matmul is None and x.is_cuda and x.dim() == 2
                and x.shape[0] == 1 and x.dtype in GEMV_DTYPES and x.stride(1) == 1
                and self.gemv_fits and self.weight.stride(1) == 1)

    def takes_prologue(self, x: torch.Tensor) -> bool:
        """Whether the norm that makes this layer's input from `x` may run inside its
        one-row kernel (`after_norm`): not with LoRA attached (whatever the step), whose
        update needs the input itself."""
        return self.lora is None and self.takes_gemv(x)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """This rank's x @ weight^T (+ bias), one row through kernels/gemv.py where
        `takes_gemv`."""
        if self.cpu_matmul is not None:
            return self.cpu_matmul(x, bias)
        if self.takes_gemv(x):
            return kernel_module("gemv").gemv(x, self.weight, bias)
        return F.linear(x, self.weight, bias)

    def after_norm(
        self, h: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
        eps: float, silu_mul: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward(RMSNorm(h + residual), reduce=False), h + residual) in one kernel, for a
        row where `takes_prologue(h)`; with `silu_mul` (gate/up: the output is [gate | up]),
        silu_and_mul of the first result, in the same kernel."""
        return kernel_module("gemv").gemv_add_rms_norm(
            h, residual, norm_weight, eps, self.weight, None if self.reduce else self.bias,
            silu_mul=silu_mul)

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """x @ weight^T + bias. A row-parallel layer with `reduce=False` returns its partial
        sum without the bias: the caller sums it (and adds `pending_bias`) later."""
        if self.lora is not None and self.lora.takes_over(x):  # fused QKV + LoRA shrink
            return self.lora.run_layer(self, x)
        y = self.matmul(x, None if self.reduce else self.bias)
        if self.lora is not None:  # before the all-reduce: a row-parallel update is partial
            y = self.lora(x, y)
        if self.reduce and reduce:
            self.tp.all_reduce(y)
            if self.bias is not None:
                y = y + self.bias
        return y

    @property
    def pending_bias(self) -> torch.Tensor | None:
        """The bias that `forward(x, reduce=False)` left out (row-parallel layers only)."""
        return self.bias if self.reduce else None

    def checkpoint_slice(self, param_name: str, shard: str | int | None) -> tuple[slice, ...]:
        """The part of a checkpoint tensor this rank loads (read lazily from the file)."""
        part = self.shards[shard]
        rows = slice(part.src_start, part.src_start + part.size)
        if param_name == "bias":
            return (slice(None),) if self.in_slice is not None else (rows,)
        if self.in_slice is None:
            return (rows, slice(None))
        start, size = self.in_slice
        return (rows, slice(start, start + size))

    def load(self, param_name: str, tensor: torch.Tensor, shard: str | int | None = None) -> None:
        """Copy this rank's part of a checkpoint tensor (already cut by `checkpoint_slice`)
        into `param_name` ("weight"/"bias"), into `shard`'s rows."""
        data = self.loadable_weight() if param_name == "weight" else self.bias.data
        part = self.shards[shard]
        target = data if param_name == "bias" and self.in_slice is not None else (
            data.narrow(0, part.start, part.size))
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(
                f"checkpoint tensor for {param_name} shard {shard} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(target.shape)}"
            )
        target.copy_(tensor)


class RowParallelLinear(Linear):
    """Input features split over the ranks (o_proj, down_proj): one all-reduce per call."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, tp: TensorParallel = SINGLE
    ) -> None:
        local = split(in_features, tp.size, f"{in_features}-wide projection input")
        super().__init__(local, out_features, bias, tp, in_slice=(tp.rank * local, local))


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
    """Several projections of the same input stacked on the output dim (e.g. gate and up),
    column-parallel: each rank holds its slice of every part."""

    def __init__(
        self,
        in_features: int,
        out_sizes: list[int],
        bias: bool = False,
        tp: TensorParallel = SINGLE,
        names: list[str | int] | None = None,
        src_starts: list[int] | None = None,
    ) -> None:
        """`out_sizes` are this rank's sizes; `src_starts` where each part's rows start in
        its checkpoint tensor (default: this rank's equal slice)."""
        super().__init__(in_features, sum(out_sizes), bias, tp)
        names = list(range(len(out_sizes))) if names is None else names
        if src_starts is None:
            src_starts = [tp.rank * n for n in out_sizes]
        starts = [sum(out_sizes[:i]) for i in range(len(out_sizes))]
        self.shards = {
            name: Shard(start, n, src)
            for name, start, n, src in zip(names, starts, out_sizes, src_starts)
        }
        self.out_sizes = list(out_sizes)


def gate_up_linear(hidden: int, intermediate: int, bias: bool, tp: TensorParallel) -> MergedLinear:
    local = split(intermediate, tp.size, "intermediate_size")
    return MergedLinear(hidden, [local, local], bias, tp)


class QKVLinear(MergedLinear):
    """q, k and v projections in one matmul; `split` returns the three views. Each rank holds
    num_heads / tp query heads and its KV heads (replicated when there are fewer KV heads
    than ranks)."""

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        bias: bool,
        tp: TensorParallel = SINGLE,
    ) -> None:
        self.num_heads = split(num_heads, tp.size, "num_attention_heads")
        self.num_kv_heads, _ = kv_heads_per_rank(num_kv_heads, tp.size)
        q, kv = self.num_heads * head_dim, self.num_kv_heads * head_dim
        kv_start = kv_head_start(tp.rank, num_kv_heads, tp.size) * head_dim
        super().__init__(hidden, [q, kv, kv], bias, tp, names=["q", "k", "v"],
                         src_starts=[tp.rank * q, kv_start, kv_start])

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.split(self.out_sizes, dim=-1)
