"""LoRA on the linear layers: every adapter slot's A and B beside the base weight.

Each targeted layer (the fused q/k/v and gate/up projections, o_proj, down_proj) gets a
`LoRASlots`: for `max_loras` slots, A stacked over the layer's parts, [slots, parts x R, in],
and B, [slots, out, R], with R = max_lora_rank (smaller ranks are zero-padded) and the
adapter's scaling folded into B. A token that uses slot s gets, for each part p (q, k, v or
gate, up) with output rows [start, start + size):

    y[start:start + size] += (x @ A[s, p*R:(p+1)*R].T) @ B[s, start:start + size].T

The shrink `x @ A[s].T` is one matmul over all parts ([q; k; v] stacked, seed 000's layout
for fusing it into the QKV projection later), the expand one per part.

Tensor parallelism needs no extra communication: a column-parallel layer (q/k/v, gate/up)
keeps A whole and this rank's rows of B; a row-parallel one (o_proj, down_proj) keeps this
rank's columns of A and all of B, and adds its partial update before the layer's
all-reduce, which sums (x_r @ A_r.T) @ B.T over the ranks into (x @ A.T) @ B.T.

Which tokens use which slot comes with each step (`LoRABatch`, lora/ops.py, set on the
shared `LoRAState` before the forward pass). `shrink` and `expand` (lora/ops.py) run the
Triton kernels on CUDA and their PyTorch twins elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from novainfer.lora import switches
from novainfer.lora.adapter import LoRAAdapter
from novainfer.lora.ops import LoRABatch, expand, shrink
from novainfer.lora.timing import LoRATiming
from novainfer.models.decoder import PACKED_MODULES

# Adapter projection -> (our module's attribute in its block, block, part of the module).
_BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
          "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
LORA_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class LoRAState:
    """Shared by every LoRA layer of one rank's model: the step's LoRABatch (None: no token
    uses an adapter)."""

    batch: LoRABatch | None

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None


class LoRASlots(nn.Module):
    def __init__(self, layer: nn.Module, state: LoRAState, max_loras: int, max_rank: int,
                 fuse: str = "off", timing: LoRATiming | None = None) -> None:
        """`fuse`: "on", the layer's matmul takes A of every slot along (the fused QKV +
        shrink matmul); "auto", it does for steps of up to FUSION_MAX_TOKENS tokens (where
        that was measured to pay) and the larger ones take the traditional path over the
        same buffer; "off", never. `timing`: time the two paths on every call."""
        super().__init__()
        if fuse not in ("on", "off", "auto"):
            raise ValueError(f"fuse must be 'on', 'off' or 'auto', not {fuse!r}")
        self.state = state
        self.fuse = fuse
        self.fuse_max_tokens = {"on": None, "off": -1,
                                "auto": switches.lora_settings().fusion_max_tokens}[fuse]
        self.timing = timing
        self.rank = max_rank
        self.row_parallel = layer.in_slice is not None
        self.in_slice = layer.in_slice
        # (part name, first output row, rows, first row in the checkpoint tensor)
        self.parts = [(name, s.start, s.size, s.src_start) for name, s in layer.shards.items()]
        weight = layer.weight  # (unpacked from the CPU panels, if the layer holds those)
        kw = {"dtype": weight.dtype, "device": weight.device}
        rows = len(self.parts) * max_rank
        self.buffer: torch.Tensor | None = None
        if fuse != "off" or timing is not None:
            # [W; A of every slot] in one allocation, made before the KV cache is sized: the
            # layer's weight and A are views of it, so the fused matmul needs no copy and
            # loading a slot updates it in place.
            out = layer.out_features
            self.buffer = torch.zeros(out + max_loras * rows, layer.in_features, **kw)
            self.buffer[:out].copy_(weight)
            layer.hold_as_tensor(self.buffer[:out])
            self.a = self.buffer[out:].view(max_loras, rows, layer.in_features)
        else:
            self.a = torch.zeros(max_loras, rows, layer.in_features, **kw)
        self.b = torch.zeros(max_loras, layer.out_features, max_rank, **kw)
        # For `expand`: (first output column, columns, first column of the shrunk part).
        self.expand_parts = [(start, size, i * max_rank)
                             for i, (_, start, size, _) in enumerate(self.parts)]

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()

    def load(self, slot: int, part: str | int | None, a: torch.Tensor, b: torch.Tensor,
             scaling: float) -> None:
        """One part's full (unsharded) A [r, in] and B [out, r] into `slot`: this rank's
        slice is cut here, the scaling folded into B."""
        index = [p[0] for p in self.parts].index(part)
        _, start, size, src = self.parts[index]
        r = a.shape[0]
        if self.row_parallel:
            lo, n = self.in_slice
            a = a[:, lo : lo + n]
        else:
            b = b[src : src + size]
        rows = slice(index * self.rank, index * self.rank + r)
        self.a[slot, rows] = a.to(self.a.dtype)
        self.b[slot, start : start + size, :r] = (b.double() * scaling).to(self.b.dtype)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the layer's output, before any all-reduce) plus the adapters' updates."""
        batch = self.state.batch
        if batch is None:
            return y
        shrunk = shrink(x, self.a, batch)  # [tokens, parts x R], float32
        expand(shrunk, self.b, y, batch, self.expand_parts, self.rank)
        return y

    def fused(self, x: torch.Tensor) -> bool:
        """Whether x's step takes the fused path (see `fuse`)."""
        limit = self.fuse_max_tokens
        return limit is None or x.shape[0] <= limit

    def takes_over(self, x: torch.Tensor) -> bool:
        """Whether the layer's whole forward is `run_layer`'s (the fused or timed path)."""
        return self.state.batch is not None and (self.timing is not None or self.fused(x))

    def run_layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The layer's output with the adapters' updates, through the fused matmul (or both
        paths, timed). For column-parallel layers (q/k/v): no all-reduce to do."""
        if self.timing is None:
            return self._fused_path(layer, x)
        t = self.timing
        batch = self.state.batch
        t.calls += 1
        t.tokens += x.shape[0]
        with t.stage("qkv"):
            y = layer.matmul(x, layer.bias)
        with t.stage("shrink"):
            shrunk = shrink(x, self.a, batch)
        with t.stage("expand"):
            expand(shrunk, self.b, y, batch, self.expand_parts, self.rank)
        fused = self._fused_path(layer, x, t)
        return fused if self.fused(x) else y

    def _fused_path(self, layer: nn.Module, x: torch.Tensor,
                    t: LoRATiming | None = None) -> torch.Tensor:
        out_features = layer.out_features
        with t.stage("fused") if t is not None else nullcontext():
            out = F.linear(x, self.buffer)  # [tokens, out + slots x parts x R]
        y = out[:, :out_features]
        y = y + layer.bias if layer.bias is not None else y.contiguous()
        with t.stage("fused_expand") if t is not None else nullcontext():
            expand(out[:, out_features:], self.b, y, self.state.batch, self.expand_parts,
                   self.rank, slot_stride=self.a.shape[1])
        return y


def attach_lora(model: nn.Module, max_loras: int, max_rank: int, fuse_qkv: str = "off",
                timing: LoRATiming | None = None) -> LoRAState:
    """Give every targeted linear layer of the decoder its slots; returns the shared state.
    `fuse_qkv` ("on", "off", "auto") and `timing` apply to the q/k/v projection
    (lora/switches.py)."""
    state = LoRAState()
    for name, linear in _lora_layers(model):
        qkv = name == "qkv_proj"
        linear.lora = LoRASlots(linear, state, max_loras, max_rank,
                                fuse=fuse_qkv if qkv else "off", timing=timing if qkv else None)
    return state


def load_slot(model: nn.Module, slot: int, adapter: LoRAAdapter | None) -> None:
    """Put `adapter` in `slot` of every layer (None: empty the slot)."""
    for _, linear in _lora_layers(model):
        linear.lora.clear(slot)
    if adapter is None:
        return
    for (index, proj), (a, b) in adapter.weights.items():
        fused, part = PACKED_MODULES.get(proj, (proj, None))
        block = getattr(model.model.layers[index], _BLOCK[proj])
        getattr(block, fused).lora.load(slot, part, a, b, adapter.scaling)


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every linear layer LoRA targets, in every decoder layer."""
    for layer in model.model.layers:
        for block in (layer.self_attn, layer.mlp):
            for name in LORA_MODULES:
                linear = getattr(block, name, None)
                if linear is not None:
                    yield name, linear
