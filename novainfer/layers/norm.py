"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from novainfer.kernels import cpu_native
from novainfer.layers.fusion import fused


@fused(cpu=cpu_native.rms_norm, triton="rms_norm")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same order of operations as transformers: statistics in at least fp32, scale in x's dtype.
    dtype = x.dtype
    xf = x.to(torch.promote_types(dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


@fused(cpu=cpu_native.add_rms_norm, triton="add_rms_norm")
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x + residual
    dtype = x.dtype
    xf = x.to(torch.promote_types(dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype), x


class RMSNorm(nn.Module):
    """RMSNorm, optionally after the residual add. Built with `sum_over` (a tensor-parallel
    group, any size), its input is a partial sum over the ranks: a row-parallel output whose
    all-reduce was left to this norm, so that the peer path can do both in one kernel.
    `slot` tells that kernel which staging slot to use (models/decoder.py assigns them)."""

    def __init__(self, hidden_size: int, eps: float, sum_over: Any = None, slot: int = 0) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.sum_over = sum_over  # TensorParallel (distributed/parallel.py) or None
        self.slot = slot

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without `sum_over`: norm(x), or with `residual` (norm(x + residual), x +
        residual). With it: s = x summed over the ranks, plus `bias` (the row-parallel
        layer's, which it left out), then (norm(s + residual), s + residual), or without
        residual (norm(s), s)."""
        if self.sum_over is None:
            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            return add_rms_norm(x, residual, self.weight, self.eps)
        if self.sum_over.enabled:
            fused = self.sum_over.fused_all_reduce_add_norm(x, residual, self.weight, self.eps,
                                                            self.slot, bias)
            if fused is not None:
                return fused
            self.sum_over.all_reduce(x)
        if bias is not None:
            x = x + bias
        if residual is None:
            return rms_norm(x, self.weight, self.eps), x
        return add_rms_norm(x, residual, self.weight, self.eps)
