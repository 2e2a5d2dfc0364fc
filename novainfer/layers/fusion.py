"""Kernel fusion for the small element-wise ops, on CUDA only.

Each wrapped function is compiled by torch.compile (dynamic shapes, so one kernel serves
every batch size) the first time it sees a CUDA tensor; on the CPU the plain PyTorch code
runs, which is also the reference the compiled version is checked against.
Set NOVAINFER_NO_COMPILE=1 to run eager everywhere.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def fused_on_cuda(fn: F) -> F:
    compiled: Callable | None = None

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args, **kwargs):
        nonlocal compiled
        if not x.is_cuda or os.environ.get("NOVAINFER_NO_COMPILE") == "1":
            return fn(x, *args, **kwargs)
        if compiled is None:
            # One specialisation per (dtype, eps, model shape): a process that loads several
            # models (tests, benchmarks) needs more than dynamo's default of 8.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
            compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        return compiled(x, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
