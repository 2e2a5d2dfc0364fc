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


def graph_ms_per_call(fn: Callable[[], object], calls: int = 20, replays: int = 10) -> float:
    """Milliseconds per call of fn with `calls` calls captured in one CUDA graph and replayed
    `replays` times: the device time alone, as the engine's graphs run it (back-to-back
    Python calls measure the host instead when a call takes less than its launch)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (calls * replays)
