"""Token embedding and the LM head (which may share the embedding's weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from novainfer.kernels.cpu_native import PANEL
from novainfer.layers.linear import CpuMatmul, CpuPackable


class Embedding(CpuPackable):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__(vocab_size, hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        panels = self._parameters.get("weight_panels")
        if panels is not None:  # tied to the packed LM head: token t is column t % 16 of a panel
            return panels[input_ids // PANEL, :, input_ids % PANEL]
        return F.embedding(input_ids, self.weight)


class LMHead(CpuPackable):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__(vocab_size, hidden_size)
        self.cpu_matmul: CpuMatmul | None = None  # set by pack_for_cpu after loading
        self.bias = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.cpu_matmul is not None:
            return self.cpu_matmul(hidden, None)
        return F.linear(hidden, self.weight)
