"""The GPU benchmarks' clock: milliseconds per call measured with CUDA events.

Imported by the scripts beside it (`python benchmarks/NAME.py` puts this folder on the path).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def ms_per_call(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Milliseconds per call of fn over `iters` back-to-back calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
