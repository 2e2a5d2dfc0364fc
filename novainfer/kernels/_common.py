"""Shared helpers for the Triton kernels."""

from __future__ import annotations

import functools
import math
import os

import torch

LOG2E = 1.4426950408889634


def check_head_dim(head_dim: int) -> None:
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(
            f"triton attention needs head_dim to be a power of 2 >= 16, got {head_dim}; "
            "use attention_backend='torch' for this model"
        )


def check_kv_dtype(q: torch.Tensor, kv_cache: torch.Tensor, kv_scales: torch.Tensor | None) -> bool:
    """Whether the cache is fp8 (e4m3, read with kv_scales); otherwise it must be q's dtype."""
    if kv_cache.dtype == torch.float8_e4m3fn:
        assert kv_scales is not None and kv_scales.dtype == torch.float32, "fp8 needs kv_scales"
        return True
    assert kv_cache.dtype == q.dtype, (kv_cache.dtype, q.dtype)
    return False


def scale_log2(scale: float) -> float:
    """Softmax scale folded with log2(e), so the kernels can use exp2."""
    return float(scale) * LOG2E


def kv_tile(block_size: int, preferred: int) -> int:
    """KV tile length (`preferred`, a power of 2 >= 16). Block sizes are powers of 2, so the tile
    is either a whole number of cache blocks (gathered per token through the block table) or a
    slice of one block (one block-table entry per tile); it never straddles a block partially."""
    assert preferred >= 16 and preferred & (preferred - 1) == 0
    return preferred


def use_ieee(dtype: torch.dtype) -> bool:
    """fp32 inputs: exact dot products (no TF32) so fp32 runs match the reference."""
    return dtype == torch.float32


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def pdl_setting(value: str | None) -> bool:
    """NOVAINFER_PDL's value, checked: `1` (or unset) launches the one-row GEMV, the q/k
    rope + KV store and the decode attention kernels with programmatic dependent launch
    where the GPU has it (compute capability 9.0 and later), `0` never."""
    text = (value or "").strip() or "1"
    if text not in ("0", "1"):
        raise ValueError(f"NOVAINFER_PDL must be '0' or '1', got {value!r}")
    return text == "1"


PDL = pdl_setting(os.environ.get("NOVAINFER_PDL"))


@functools.lru_cache(maxsize=None)
def _has_pdl(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (TRITON_INTERPRET set)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pdl_applies(device: torch.device) -> bool:
    """Whether launches on `device` use programmatic dependent launch (PDL): a CUDA device
    of compute capability >= 9.0, the switch on, not the Triton interpreter."""
    return PDL and device.type == "cuda" and not interpreting() and _has_pdl(device)


def pdl_launch(device: torch.device) -> dict:
    """The launch arguments of a kernel with a `PDL` constexpr: with PDL, the kernel may
    start while the previous one in the stream still runs; it must call
    `tl.extra.cuda.gdc_wait()` in every program before it reads what earlier kernels wrote
    or writes anything they read, and `gdc_launch_dependents()` lets the next one start."""
    if pdl_applies(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
