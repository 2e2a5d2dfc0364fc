"""Rotary position embedding (non-interleaved, as transformers), with llama3 and linear scaling."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from novainfer.kernels import cpu_native
from novainfer.layers import fusion
from novainfer.layers.fusion import fused
from novainfer.layers.norm import rms_norm


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type != "llama3":
        return inv_freq
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Holds cos/sin for every position up to max_positions; applies them to q and k."""

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any]
    ) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        # fp32 tables, cast to the activations' dtype on use, as transformers does.
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim]."""
        return apply_rope(q, k, positions, self.cos, self.sin)


@fused(cpu=cpu_native.apply_rope)  # the C twin rotates q and k in place
def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos[positions].to(q.dtype).unsqueeze(1)
    sin = sin[positions].to(q.dtype).unsqueeze(1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def fused_qk_norm_rope_applies(q: torch.Tensor) -> bool:
    """Whether the q/k norms and the rotary embedding run as one Triton launch
    (qk_norm_rope): NOVAINFER_FUSED_OPS=triton, on CUDA. Otherwise the model calls its
    q_norm, k_norm and rotary modules (compiled, C or plain PyTorch as each decides)."""
    return (fusion.FUSED_OPS == "triton" and q.is_cuda and q.dtype in fusion.TRITON_DTYPES
            and not fusion.PLAIN_PYTORCH)


def qk_norm_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, q_weight: torch.Tensor,
    k_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of q and k (Qwen3's q/k norm), then the rotary embedding, in one Triton launch
    (kernels/norm_act.py); `qk_norm_rope_reference` is its twin."""
    return fusion.triton_op("qk_norm_rope")(q, k, positions, q_weight, k_weight, eps, cos, sin)


def qk_norm_rope_reference(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, q_weight: torch.Tensor,
    k_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain PyTorch twin of qk_norm_rope, for tests."""
    return apply_rope.reference(rms_norm.reference(q, q_weight, eps),
                                rms_norm.reference(k, k_weight, eps), positions, cos, sin)
