"""The fp8 KV cache's number format: e4m3 (torch.float8_e4m3fn) with float32 scales.

The cache stores x / scale saturated to ±448 (e4m3's largest finite value: it has no
infinity, and torch's cast turns larger values into NaN); readers multiply back by the
scale. Each layer has one scale for K and one for V, a float32 [2] tensor on the device
(so CUDA graphs read the current value). PyTorch only: the reference paths and the CPU use
it, and the Triton kernels are tested against it.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, saturated to ±448, cast to e4m3 (round to nearest even)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 values back in `dtype`: x * scale."""
    return (x.float() * scale).to(dtype)


def calibrate_kv_scales(k: torch.Tensor, v: torch.Tensor, kv_scales: torch.Tensor) -> None:
    """Set a layer's scales from the K/V it is about to store: amax / 448 (vLLM's
    calculate_kv_scales, on the first prefill), on the device, with no host sync. An
    all-zero K or V keeps its scale (a zero scale would fill the cache with NaN)."""
    amax = torch.stack([k.abs().amax(), v.abs().amax()]).float() / FP8_MAX
    kv_scales.copy_(torch.where(amax > 0, amax, kv_scales))
