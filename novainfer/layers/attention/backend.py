"""The attention backend interface and the registry that picks one by name."""

from __future__ import annotations

import importlib.util
from typing import Protocol

import torch

from novainfer.layers.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    """Writes a layer's new K/V into the paged cache, then attends over the cached context.

    q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim];
    kv_cache: [2, num_blocks, block_size, kv_heads, head_dim] for one layer.
    Returns [tokens, heads, head_dim].
    """

    name: str

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor: ...


def available_backends(device: torch.device, head_dim: int | None = None) -> list[str]:
    """Backend names usable on `device` (and `head_dim`), best first.

    Only checks that triton is installed (no import: `import novainfer` never imports triton).
    The Triton kernels tile the head dimension, so they need a power of two >= 16.
    """
    names = []
    triton_ok = head_dim is None or (head_dim >= 16 and head_dim & (head_dim - 1) == 0)
    if device.type == "cuda" and triton_ok and importlib.util.find_spec("triton") is not None:
        names.append("triton")
    names.append("torch")
    return names


def get_backend(name: str, device: torch.device, head_dim: int | None = None) -> AttentionBackend:
    allowed = available_backends(device, head_dim)
    if name == "auto":
        name = allowed[0]
    if name not in allowed:
        raise ValueError(
            f"attention_backend '{name}' is not available on {device.type} with head_dim "
            f"{head_dim}; allowed: "
            f"{', '.join(['auto', *allowed])}"
        )
    if name == "triton":
        from novainfer.layers.attention.triton_backend import TritonBackend

        return TritonBackend()
    from novainfer.layers.attention.torch_ref import TorchReferenceBackend

    return TorchReferenceBackend()
