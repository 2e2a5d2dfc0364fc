"""Token embedding and the LM head (which may share the embedding's weight).

With tensor parallelism both are vocab-parallel: each rank holds rows [start, start +
vocab / tp) of the vocabulary. The embedding looks up the ids in its range, zeroes the
others and all-reduces; the LM head returns this rank's slice of the logits, which
CausalLM.compute_logits gathers on rank 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from novainfer.distributed.parallel import TensorParallel, split
from novainfer.kernels.cpu_native import PANEL
from novainfer.layers.linear import SINGLE, CpuMatmul, CpuPackable


class VocabParallel(CpuPackable):
    """A [vocab, hidden] weight of which this rank holds rows [vocab_start, vocab_start +
    out_features)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        local = split(vocab_size, tp.size, "vocab_size")
        super().__init__(local, hidden_size)
        self.tp = tp
        self.vocab_start = tp.rank * local

    def checkpoint_slice(self, param_name: str, shard: object = None) -> tuple[slice, ...]:
        return (slice(self.vocab_start, self.vocab_start + self.out_features), slice(None))

    def load(self, param_name: str, tensor: torch.Tensor, shard: object = None) -> None:
        if tuple(tensor.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"checkpoint tensor for {param_name} has shape {tuple(tensor.shape)}, expected "
                f"{(self.out_features, self.in_features)} (this rank's vocabulary rows)"
            )
        self.loadable_weight().copy_(tensor)


class Embedding(VocabParallel):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__(vocab_size, hidden_size, tp)

    def forward(self, input_ids: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """The rows of input_ids; with tensor parallelism and `reduce=False`, this rank's
        part of them (zeros for tokens of other ranks' vocabulary) for the caller to sum."""
        if not self.tp.enabled:
            return self._lookup(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.out_features)
        rows = self._lookup(local.masked_fill(outside, 0))
        rows.masked_fill_(outside[:, None], 0.0)
        return self.tp.all_reduce(rows) if reduce else rows

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        panels = self._parameters.get("weight_panels")
        if panels is not None:  # tied to the packed LM head: token t is column t % 16 of a panel
            return panels[ids // PANEL, :, ids % PANEL]
        return F.embedding(ids, self.weight)


class LMHead(VocabParallel):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__(vocab_size, hidden_size, tp)
        self.cpu_matmul: CpuMatmul | None = None  # set by pack_for_cpu after loading
        self.bias = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the logits."""
        if self.cpu_matmul is not None:
            return self.cpu_matmul(hidden, None)
        return F.linear(hidden, self.weight)
