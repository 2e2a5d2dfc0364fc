"""Fused small element-wise ops: torch.compile on CUDA, C kernels on the CPU.

Each wrapped function is compiled by torch.compile (dynamic shapes, so one kernel serves
every batch size) the first time it sees a CUDA tensor. On the CPU, float32 calls go to the
function's C twin (novainfer/kernels/cpu_elementwise.c) when that library could be built.
Everything else runs the plain PyTorch code, which is also the reference both are tested
against. Set NOVAINFER_NO_COMPILE=1 (before the process starts) to run the plain PyTorch
code everywhere.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TypeVar

import torch

from novainfer.kernels import cpu_native

F = TypeVar("F", bound=Callable)


# Read once: the wrappers run ~150 times per step, and os.environ lookups are not free.
PLAIN_PYTORCH = os.environ.get("NOVAINFER_NO_COMPILE") == "1"


def fused(cpu: Callable | None = None) -> Callable[[F], F]:
    """Decorator: run `fn` compiled on CUDA, as `cpu` (a C twin) on float32 CPU tensors.

    The first argument's device and dtype decide (the other floating-point tensors of these
    ops share them).
    """

    def decorate(fn: F) -> F:
        compiled: Callable | None = None

        @functools.wraps(fn)
        def wrapper(x: torch.Tensor, *args, **kwargs):
            nonlocal compiled
            if PLAIN_PYTORCH:
                return fn(x, *args, **kwargs)
            if x.is_cuda:
                if compiled is None:
                    # One specialisation per (dtype, eps, model shape): a process that loads
                    # several models (tests, benchmarks) needs more than dynamo's default of 8.
                    torch._dynamo.config.recompile_limit = max(
                        torch._dynamo.config.recompile_limit, 128
                    )
                    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
                return compiled(x, *args, **kwargs)
            use_c = cpu is not None and x.is_cpu and x.dtype == torch.float32
            if use_c and cpu_native.native_available():
                return cpu(x, *args, **kwargs)
            return fn(x, *args, **kwargs)

        wrapper.reference = fn  # the plain PyTorch version, for tests
        return wrapper  # type: ignore[return-value]

    return decorate
