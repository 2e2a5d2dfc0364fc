"""SiLU-and-mul over the fused gate/up projection output."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from novainfer.kernels import cpu_native
from novainfer.layers.fusion import fused


@fused(cpu=cpu_native.silu_and_mul, triton="silu_and_mul")
def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
