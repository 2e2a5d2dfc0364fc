"""Token embedding and the LM head (which may share the embedding's weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from novainfer.layers.linear import CpuMatmul


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.cpu_matmul: CpuMatmul | None = None  # set by pack_for_cpu after loading
        self.bias = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.cpu_matmul is not None:
            return self.cpu_matmul(hidden, None)
        return F.linear(hidden, self.weight)
