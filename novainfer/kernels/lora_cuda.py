"""Builds, caches and calls the CUDA C++ LoRA kernels (kernels/lora_cuda.cu).

The extension is compiled with nvcc by `torch.utils.cpp_extension` the first time a LoRA op
runs on CUDA, into the novainfer cache (`kernels/lora_cuda-<key>`, the key naming the source,
the torch/CUDA versions and the GPU architecture), so later processes load it in about a
second. `load()` raises
whatever stopped the build; lora/ops.py turns that into a warning and the Triton kernels.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("lora_cuda.cu")
_lock = threading.Lock()
_module: ModuleType | None = None


def cache_key() -> str:
    """Names the build: the source, torch and CUDA versions, and the GPU architecture it is
    compiled for (a cache shared by machines with other GPUs must not load a build without
    kernels for this one)."""
    major, minor = torch.cuda.get_device_capability()
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or f"sm_{major}{minor}"
    parts = [SOURCE.read_bytes(), torch.__version__.encode(), str(torch.version.cuda).encode(),
             arch.encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def load() -> ModuleType:
    """The compiled extension (built on first use; raises if it cannot be)."""
    global _module
    if _module is not None:  # every LoRA op asks: no lock once it is built
        return _module
    with _lock:
        if _module is None:
            from torch.utils.cpp_extension import load as build

            from novainfer.kernels.cpu_native import kernels_dir

            key = cache_key()
            directory = kernels_dir() / f"lora_cuda-{key}"
            directory.mkdir(exist_ok=True)
            _module = build(name=f"novainfer_lora_{key}", sources=[str(SOURCE)],
                            build_directory=str(directory), extra_cuda_cflags=["-O3"],
                            verbose=False)
        return _module


def lora_shrink_cuda(x: torch.Tensor, a: torch.Tensor, out: torch.Tensor, tokens: torch.Tensor,
                     seg_start: torch.Tensor, seg_slot: torch.Tensor, max_rows: int) -> None:
    """out[t, :n] = x[t] @ a[slot(t)].T for the segments' tokens (out float32)."""
    load().lora_shrink(x, a, out, tokens, seg_start, seg_slot, max_rows)


def lora_expand_cuda(shrunk: torch.Tensor, b: torch.Tensor, y: torch.Tensor,
                     tokens: torch.Tensor, seg_start: torch.Tensor, seg_slot: torch.Tensor,
                     max_rows: int, parts: list[tuple[int, int, int]], rank: int,
                     slot_stride: int = 0) -> None:
    """y[t, y0:y0 + size] += shrunk[t, c:c + rank] @ b[slot(t), y0:y0 + size, :rank].T, c =
    s0 + slot(t) * slot_stride, for each part (y0, size, s0): one launch for all (<= 3)."""
    y0, size, s0 = (list(column) for column in zip(*parts))
    load().lora_expand(shrunk, b, y, tokens, seg_start, seg_slot, max_rows, y0, size, s0,
                       slot_stride, rank)
