"""Triton kernels for the paged KV cache (imported lazily: `import novainfer` never imports triton)."""

from __future__ import annotations

import importlib
from types import ModuleType

_loaded: dict[str, ModuleType] = {}


def kernel_module(name: str) -> ModuleType:
    """novainfer.kernels.<name>, imported on first use: the Triton kernel modules import
    triton, which `import novainfer` must not. Callers look the function up on the module
    at each call (so a test may replace it there)."""
    module = _loaded.get(name)
    if module is None:
        module = _loaded[name] = importlib.import_module(f"{__name__}.{name}")
    return module
