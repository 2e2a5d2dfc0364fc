"""Where a whole bench run's device time goes, by step kind and batch size.

    python benchmarks/run_breakdown.py --preset qwen3-0.6b [--kv-cache-dtype fp8] [bench flags]

Runs `novainfer bench` (its flags, its workload) for two timed rounds. Round 1 records a
CUDA event before each step's launch: each step's real device span. Round 2 runs under
torch.profiler (device only) with a marker kernel (`torch.cuda._sleep(0)`) before each
launch, which splits the device timeline into steps. The host labels each step with its rows,
prefill tokens and context tokens. Printed per step kind (prefill/mixed, decode by rows):
steps, span (round 1), kernel time (round 2; each kernel's time not covered by an earlier
one: with programmatic dependent launch a kernel starts while its predecessor runs), idle
(span - kernel time: the device waiting for the host), time by category (the name rules of
`novainfer profile`), and for decode the KV bytes the attention read per second. With tensor
parallelism the trace is rank 0's device. Round 1's last span also holds the host's time
after the last step (collecting it, the final sync).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

MARKER = "spin_kernel"  # torch.cuda._sleep's kernel
DECODE_BUCKETS = ((1, 16), (17, 64), (65, 128), (129, 192), (193, 256), (257, 1 << 30))
SHOWN = ("attention", "GEMM", "norm", "rotary", "activation", "sampling", "KV-cache write",
         "memcpy/memset", "communication", "other")


@dataclass
class StepInfo:
    rows: int
    prefill_tokens: int  # tokens of rows that are not one-token decodes (0: decode only)
    context_tokens: int  # sum over rows of the context the step's last token attends to

    @property
    def kind(self) -> str:
        if self.prefill_tokens:
            return "prefill/mixed"
        for lo, hi in DECODE_BUCKETS:
            if lo <= self.rows <= hi:
                return f"decode {lo}-{hi}" if hi < 1 << 30 else f"decode {lo}+"
        raise ValueError(f"a step of {self.rows} rows")


@dataclass
class Kernel:
    name: str
    start: float  # us
    end: float


def step_info(batch) -> StepInfo:
    """Read before the launch advances the sequences' computed tokens. A row is a decode
    when it computes one token past its prompt; anything else (a prompt chunk, or generated
    tokens recomputed after a preemption) counts as prefill."""
    prefill = context = 0
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        if n > 1 or seq.num_computed_tokens < seq.num_prompt_tokens:
            prefill += n
        context += seq.num_computed_tokens + n
    return StepInfo(len(batch.seqs), prefill, context)


def split_steps(kernels: list[Kernel], num_steps: int) -> list[tuple[float, float, list[Kernel]]]:
    """(span start, span end, kernels) per marker: from a marker's start to the next one's
    (the last: to its last kernel's end). Kernels before the first marker are dropped."""
    kernels = sorted(kernels, key=lambda k: k.start)
    marks = [i for i, k in enumerate(kernels) if MARKER in k.name]
    if len(marks) != num_steps:
        raise RuntimeError(f"{len(marks)} step markers in the device trace for {num_steps} "
                           "launched steps: the trace is incomplete")
    steps = []
    for j, i in enumerate(marks):
        stop = marks[j + 1] if j + 1 < len(marks) else len(kernels)
        body = kernels[i + 1:stop]
        end = kernels[stop].start if stop < len(kernels) else max(
            [k.end for k in body] + [kernels[i].end])
        steps.append((kernels[i].start, end, body))
    return steps


def breakdown(infos: list[StepInfo], steps: list[tuple[float, float, list[Kernel]]],
              kv_bytes_per_token: int, spans: list[float] | None = None) -> tuple[dict, dict]:
    """Per step kind: steps, rows, context tokens, span / busy / idle us and us per category;
    and us per kernel name over the whole round. A kernel counts only the time no earlier
    kernel covers: with programmatic dependent launch the next kernel starts (and waits)
    while the previous one runs, and its own duration would count that time twice.
    `spans`: each step's span (us) measured apart, without the profiler; the idle time is
    then that span less the profiled round's kernel time."""
    if spans is not None and len(spans) != len(steps):
        raise ValueError(f"{len(spans)} timed spans for {len(steps)} profiled steps")
    from novainfer.tools.profile import classify_name

    kinds: dict[str, dict] = {}
    by_name: dict[str, float] = defaultdict(float)
    frontier = float("-inf")  # the latest end of any kernel so far
    for i, (info, (start, end, body)) in enumerate(zip(infos, steps)):
        row = kinds.setdefault(info.kind, {"steps": 0, "rows": 0, "context": 0, "span": 0.0,
                                           "busy": 0.0, "cats": defaultdict(float)})
        row["steps"] += 1
        row["rows"] += info.rows
        row["context"] += info.context_tokens
        row["span"] += end - start if spans is None else spans[i]
        for k in body:
            own = max(0.0, k.end - max(k.start, frontier))
            frontier = max(frontier, k.end)
            row["busy"] += own
            row["cats"][classify_name(k.name)] += own
            by_name[k.name] += own
    for row in kinds.values():
        row["idle"] = max(0.0, row["span"] - row["busy"])
        attention = row["cats"].get("attention", 0.0)
        row["kv_TBps"] = row["context"] * kv_bytes_per_token / attention / 1e6 if attention else 0.0
    return kinds, dict(by_name)


def format_breakdown(kinds: dict, by_name: dict, top: int = 15) -> str:
    decode = [k for k in kinds if k != "prefill/mixed"]
    order = ["prefill/mixed"] + sorted(decode, key=lambda k: int(k.split()[1].split("-")[0]
                                                                  .rstrip("+")))
    head = (f"{'step kind':<16}{'steps':>6}{'rows':>6}{'span ms':>9}{'ms/step':>8}{'busy':>8}"
            f"{'idle':>7}" + "".join(f"{c[:8]:>9}" for c in SHOWN) + f"{'KV TB/s':>8}")
    lines = [head, "-" * len(head)]
    total = {"steps": 0, "span": 0.0, "busy": 0.0, "idle": 0.0, "cats": defaultdict(float)}
    for kind in order:
        if kind not in kinds:
            continue
        r = kinds[kind]
        for key in ("steps", "span", "busy", "idle"):
            total[key] += r[key]
        for c, us in r["cats"].items():
            total["cats"][c] += us
        rate = f"{r['kv_TBps']:>8.2f}" if kind != "prefill/mixed" else f"{'':>8}"
        lines.append(f"{kind:<16}{r['steps']:>6}{r['rows'] / r['steps']:>6.0f}"
                     f"{r['span'] / 1e3:>9.1f}{r['span'] / r['steps'] / 1e3:>8.2f}"
                     f"{r['busy'] / 1e3:>8.1f}{r['idle'] / 1e3:>7.1f}"
                     + "".join(f"{r['cats'].get(c, 0.0) / 1e3:>9.1f}" for c in SHOWN) + rate)
    lines.append(f"{'all':<16}{total['steps']:>6}{'':>6}{total['span'] / 1e3:>9.1f}{'':>8}"
                 f"{total['busy'] / 1e3:>8.1f}{total['idle'] / 1e3:>7.1f}"
                 + "".join(f"{total['cats'].get(c, 0.0) / 1e3:>9.1f}" for c in SHOWN))
    lines += ["", f"top {top} kernels over the round (ms)"]
    for name, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{us / 1e3:>9.1f}  {name[:110]}")
    return "\n".join(lines)


def read_trace(path: str) -> list[Kernel]:
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    return [Kernel(e["name"], float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
            for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


@dataclass
class Recording:
    """What the two rounds leave: step labels and event spans (round 1), step labels and the
    device trace (round 2)."""
    trace_path: str
    timed_infos: list[StepInfo] = field(default_factory=list)
    spans_us: list[float] = field(default_factory=list)
    infos: list[StepInfo] = field(default_factory=list)
    kv_bytes_per_token: int = 0
    rounds: int = 0


@contextmanager
def _marked_launches(engine, infos: list[StepInfo], mark):
    """Label each launch with its step and call `mark()` just before it; the engine's own
    `_launch` (or what its instance already had there) comes back afterwards."""
    own = vars(engine).get("_launch")
    launch = engine._launch

    def marked_launch(batch, overlap):
        infos.append(step_info(batch))
        mark()
        return launch(batch, overlap)

    engine._launch = marked_launch
    try:
        yield
    finally:
        if own is None:
            del engine._launch  # the class's method again
        else:
            engine._launch = own


@contextmanager
def recorded_round(llm, rec: Recording):
    """Round 1: a CUDA event before each launch (real step spans, nothing else added). Round
    2: torch.profiler over the device with a marker kernel before each launch."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from novainfer.bench import kv_bytes_per_token

    engine = llm.llm_engine
    if engine.step_timer is not None:  # NOVAINFER_STEP_TIMING=1: it syncs every phase
        raise ValueError("run_breakdown times steps itself: unset NOVAINFER_STEP_TIMING")
    rec.rounds += 1
    if rec.rounds == 1:
        events = []

        def mark():
            events.append(torch.cuda.Event(enable_timing=True))
            events[-1].record()

        with _marked_launches(engine, rec.timed_infos, mark):
            yield
        mark()  # the end of the last step
        torch.cuda.synchronize()
        rec.spans_us = [a.elapsed_time(b) * 1e3 for a, b in zip(events, events[1:])]
        return
    with _marked_launches(engine, rec.infos, lambda: torch.cuda._sleep(0)):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            yield
    prof.export_chrome_trace(rec.trace_path)
    rec.kv_bytes_per_token = kv_bytes_per_token(engine.runner)


def main(argv: list[str]) -> None:
    import argparse

    from novainfer import bench

    import torch

    parser = bench.build_parser(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    if args.rounds != 1:
        raise ValueError("run_breakdown runs its own two rounds: leave --rounds at 1")
    for flag, given in (("--json", args.json), ("--compare", args.compare)):
        if given:
            raise ValueError(f"run_breakdown prints its own tables: leave out {flag}")
    if args.device == "cpu" or not torch.cuda.is_available():
        raise ValueError("run_breakdown traces device kernels: it needs a CUDA device")
    args.rounds = 2
    with tempfile.TemporaryDirectory() as tmp:
        rec = Recording(os.path.join(tmp, "trace.json"))
        result = bench.run(args, around_round=lambda llm: recorded_round(llm, rec))
        kernels = read_trace(rec.trace_path)
    bench.print_report(result, as_json=False)
    if rec.timed_infos != rec.infos:  # spans and kernels are matched step by step
        raise RuntimeError("the timed and the profiled rounds scheduled different steps")
    kinds, by_name = breakdown(rec.infos, split_steps(kernels, len(rec.infos)),
                               rec.kv_bytes_per_token, rec.spans_us)
    print(f"\nround 1 (CUDA events only): {result['rounds_tok_s'][0]:,.1f} tok/s, its step "
          f"spans below; round 2 (profiled: {result['rounds_tok_s'][1]:,.1f} tok/s): kernel "
          "times; idle = span - kernel time")
    print(format_breakdown(kinds, by_name))


if __name__ == "__main__":
    main(sys.argv[1:])
