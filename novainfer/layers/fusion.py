"""Fused small element-wise ops: torch.compile or hand-written Triton on CUDA, C on the CPU.

On CUDA, NOVAINFER_FUSED_OPS (read once, at import) picks how: `triton` (the default) calls
the function's hand-written Triton twin (novainfer/kernels/norm_act.py) where it has one,
torch.compile where it has not; `compile` has torch.compile compile each wrapped function
(dynamic shapes, so one kernel serves every batch size) the first time it sees a CUDA
tensor. docs/performance.md ("Fused ops") has the measurements that chose the default. On the
CPU, float32 calls go to the function's C twin (novainfer/kernels/cpu_elementwise.c) when
that library could be built. Everything else runs the plain PyTorch code, which is also the
reference all of them are tested against. Set NOVAINFER_NO_COMPILE=1 (before the process
starts) to run the plain PyTorch code everywhere.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TypeVar

import torch

from novainfer.kernels import cpu_native, kernel_module

F = TypeVar("F", bound=Callable)


FUSED_OPS_CHOICES = ("compile", "triton")
# The hand-written kernels compute in fp32: other dtypes (float64) keep the compiled path.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fused_ops_mode(value: str | None) -> str:
    """NOVAINFER_FUSED_OPS's value, checked (unset or empty: triton)."""
    mode = (value or "triton").strip().lower()
    if mode not in FUSED_OPS_CHOICES:
        raise ValueError(f"NOVAINFER_FUSED_OPS must be one of {', '.join(FUSED_OPS_CHOICES)}, "
                         f"got {value!r}")
    return mode


# Read once: the wrappers run ~150 times per step, and os.environ lookups are not free.
PLAIN_PYTORCH = os.environ.get("NOVAINFER_NO_COMPILE") == "1"
FUSED_OPS = fused_ops_mode(os.environ.get("NOVAINFER_FUSED_OPS"))


def triton_op(name: str) -> Callable:
    """The Triton twin `name` of kernels/norm_act.py, imported on first use (importing
    novainfer does not import triton)."""
    return getattr(kernel_module("norm_act"), name)


def fused(cpu: Callable | None = None, triton: str | None = None) -> Callable[[F], F]:
    """Decorator: run `fn` on CUDA as its Triton twin `triton` (a name in kernels/norm_act.py)
    under NOVAINFER_FUSED_OPS=triton, the default, or compiled (no twin, or `compile`); as
    `cpu` (a C twin) on float32 CPU tensors.

    The first argument's device and dtype decide (the other floating-point tensors of these
    ops share them).
    """

    def decorate(fn: F) -> F:
        compiled: Callable | None = None
        hand_written: Callable | None = None

        @functools.wraps(fn)
        def wrapper(x: torch.Tensor, *args, **kwargs):
            nonlocal compiled, hand_written
            if PLAIN_PYTORCH:
                return fn(x, *args, **kwargs)
            if x.is_cuda:
                if triton is not None and FUSED_OPS == "triton" and x.dtype in TRITON_DTYPES:
                    if hand_written is None:
                        hand_written = triton_op(triton)
                    return hand_written(x, *args, **kwargs)
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
        wrapper.triton_name = triton
        return wrapper  # type: ignore[return-value]

    return decorate
