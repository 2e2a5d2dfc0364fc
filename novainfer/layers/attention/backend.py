"""The attention backend interface and the registry that picks one by name."""

from __future__ import annotations

import importlib.util
import warnings
from typing import Protocol

import torch

from novainfer.layers.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    """Writes a layer's new K/V into the paged cache, then attends over the cached context.

    q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim];
    kv_cache: [2, num_blocks, block_size, kv_heads, head_dim] for one layer, in q's dtype
    or fp8 e4m3 (kernels/fp8.py), which needs kv_scales: float32 [2] (k, v) on the device.
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
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


# flash-attn 2 refuses paged KV caches whose block size is not a multiple of this.
FLASH_ATTN_BLOCK_MULTIPLE = 256
FLASH_ATTN_DTYPES = (torch.float16, torch.bfloat16)


def _flash_attn_problem(
    device: torch.device,
    head_dim: int | None = None,
    block_size: int | None = None,
    dtype: torch.dtype | None = None,
    kv_cache_dtype: torch.dtype | None = None,
) -> str | None:
    """Why the flash_attn backend cannot run with these settings, or None if nothing known
    stops it (a None argument is not checked). Finds packages without importing them."""
    if kv_cache_dtype == torch.float8_e4m3fn:
        return "flash-attn 2 has no fp8 KV cache (use kv_cache_dtype='auto')"
    if device.type != "cuda":
        return "it needs a CUDA device"
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package (import name flash_attn) is not installed"
    if importlib.util.find_spec("triton") is None:
        return "it writes the KV cache with a Triton kernel and triton is not installed"
    if head_dim is not None and (head_dim % 8 or head_dim > 256):
        return f"flash-attn needs head_dim a multiple of 8 and <= 256, got {head_dim}"
    if block_size is not None and block_size % FLASH_ATTN_BLOCK_MULTIPLE:
        return (
            f"flash-attn's paged KV cache needs block_size a multiple of "
            f"{FLASH_ATTN_BLOCK_MULTIPLE} (use block_size={FLASH_ATTN_BLOCK_MULTIPLE}), "
            f"got {block_size}"
        )
    if dtype is not None and dtype not in FLASH_ATTN_DTYPES:
        return f"flash-attn runs float16 / bfloat16 only, got dtype {dtype}"
    return None


CUDNN_DTYPES = (torch.float16, torch.bfloat16)


def _cudnn_problem(
    device: torch.device,
    head_dim: int | None = None,
    dtype: torch.dtype | None = None,
    kv_cache_dtype: torch.dtype | None = None,
) -> str | None:
    """Why the cudnn backend (cuDNN SDPA for pure prefills, Triton for the rest) cannot run
    with these settings, or None if nothing known stops it (a None argument is not checked).
    The static checks come first, so they answer the same with or without a GPU."""
    if kv_cache_dtype == torch.float8_e4m3fn:
        return "cuDNN SDPA has no fp8 KV cache (use kv_cache_dtype='auto')"
    if device.type != "cuda":
        return "it needs a CUDA device"
    if importlib.util.find_spec("triton") is None:
        return ("its KV-cache write and its other steps are Triton kernels and triton is not "
                "installed")
    if dtype is not None and dtype not in CUDNN_DTYPES:
        return f"cuDNN attention runs float16 / bfloat16 only, got dtype {dtype}"
    if head_dim is not None and (head_dim < 16 or head_dim & (head_dim - 1) or head_dim > 256):
        return ("it needs head_dim a power of two from 16 to 128 (256 on compute capability "
                f"9.0 with cuDNN >= 9.10): cuDNN needs a multiple of 8, the Triton kernels "
                f"a power of two; got {head_dim}")
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if not torch.backends.cudnn.is_available():
        return "this torch build has no cuDNN"
    version = torch.backends.cudnn.version() or 0
    if version < 90000:
        return f"cuDNN attention needs cuDNN >= 9.0, this torch has {version}"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 0):
        return f"cuDNN attention needs compute capability >= 8.0, got {capability}"
    if head_dim is not None and head_dim > 128 and (capability != (9, 0) or version < 91000):
        return (f"cuDNN attention takes head_dim > 128 only on compute capability 9.0 with "
                f"cuDNN >= 9.10, got {head_dim} on {capability} with cuDNN {version}")
    return None


def available_backends(
    device: torch.device,
    head_dim: int | None = None,
    block_size: int | None = None,
    dtype: torch.dtype | None = None,
    kv_cache_dtype: torch.dtype | None = None,
) -> list[str]:
    """Backend names usable on `device` (and `head_dim`, `block_size`, `dtype`, the KV
    cache's `kv_cache_dtype` when it differs from `dtype`), best first: "auto" picks the first.

    Only checks that packages are installed (no import: `import novainfer` never imports
    triton or flash_attn). flash_attn is listed only when the caller passes head_dim,
    block_size and dtype and they fit, so "auto" never picks it on a guess; cudnn only when
    head_dim and dtype fit, after triton, so "auto" never picks it. The Triton
    kernels tile the head dimension, so they need a power of two >= 16, and read an fp8
    cache only where Triton has e4m3 (compute capability 8.9 and later).
    """
    names = []
    if (
        None not in (head_dim, block_size, dtype)
        and _flash_attn_problem(device, head_dim, block_size, dtype, kv_cache_dtype) is None
    ):
        names.append("flash_attn")
    triton_ok = head_dim is None or (head_dim >= 16 and head_dim & (head_dim - 1) == 0)
    if kv_cache_dtype == torch.float8_e4m3fn and device.type == "cuda":
        triton_ok = triton_ok and torch.cuda.get_device_capability(device) >= (8, 9)
    if device.type == "cuda" and triton_ok and importlib.util.find_spec("triton") is not None:
        names.append("triton")
        # After triton, so "auto" never picks it: listed where it could run, for the message.
        if None not in (head_dim, dtype) and _cudnn_problem(
            device, head_dim, dtype, kv_cache_dtype
        ) is None:
            names.append("cudnn")
    if device.type == "cpu" and _cpu_kernel_fits(head_dim):
        names.append("cpu")
    names.append("torch")
    return names


def _cpu_kernel_fits(head_dim: int | None) -> bool:
    """The C decode kernel needs a C compiler and head_dim a multiple of its 8-float vectors."""
    from novainfer.kernels.cpu_native import find_compiler

    return (head_dim is None or head_dim % 8 == 0) and find_compiler() is not None


def get_backend(
    name: str,
    device: torch.device,
    head_dim: int | None = None,
    block_size: int | None = None,
    dtype: torch.dtype | None = None,
    kv_cache_dtype: torch.dtype | None = None,
) -> AttentionBackend:
    allowed = available_backends(device, head_dim, block_size, dtype, kv_cache_dtype)
    auto = name == "auto"
    if auto:
        name = allowed[0]
    if name == "flash_attn":
        # An explicit request is refused only for a known reason; settings the caller did
        # not pass are checked by flash-attn itself on the first forward.
        problem = _flash_attn_problem(device, head_dim, block_size, dtype, kv_cache_dtype)
        if problem is not None:
            raise ValueError(
                f"attention_backend 'flash_attn' is not available: {problem}; allowed: "
                f"{', '.join(['auto', *allowed])}"
            )
        from novainfer.layers.attention.flash_attn_backend import FlashAttnBackend

        return FlashAttnBackend(device)
    if name == "cudnn":
        problem = _cudnn_problem(device, head_dim, dtype, kv_cache_dtype)
        if problem is not None:
            raise ValueError(
                f"attention_backend 'cudnn' is not available: {problem}; allowed: "
                f"{', '.join(['auto', *allowed])}"
            )
        from novainfer.layers.attention.cudnn_backend import CudnnBackend

        return CudnnBackend()
    if name not in allowed:
        raise ValueError(
            f"attention_backend '{name}' is not available on {device.type} with head_dim "
            f"{head_dim}{' and an fp8 KV cache' if kv_cache_dtype == torch.float8_e4m3fn else ''}; "
            "allowed: "
            f"{', '.join(['auto', *allowed])}"
        )
    if name == "triton":
        from novainfer.layers.attention.triton_backend import TritonBackend

        return TritonBackend()
    if name == "cpu":
        from novainfer.kernels.cpu_native import load_library

        try:
            load_library()  # builds the kernel on first use
        except (RuntimeError, OSError) as e:
            if not auto:
                raise ValueError(f"attention_backend 'cpu' is not available: {e}") from e
            warnings.warn(f"the CPU attention kernel is unavailable ({e}); using 'torch'")
        else:
            from novainfer.layers.attention.cpu_backend import CpuBackend

            return CpuBackend()
    from novainfer.layers.attention.torch_ref import TorchReferenceBackend

    return TorchReferenceBackend()
