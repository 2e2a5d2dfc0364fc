"""Per-step phase timing: where one engine step spends its time.

Phases, in order: ``schedule`` (scheduler + block manager), ``prepare`` (host-side step
metadata and its upload), ``forward`` (the model and the LM head: device work),
``sample`` (the sampler) and ``postprocess`` (computed counts, prefix-cache registration,
stop rules, detokenization, outputs).

Off by default and free when off: the engine holds ``step_timer = None`` and each phase
boundary is one ``is not None`` test. Turned on by ``--step-timing`` (generate, bench) or
``NOVAINFER_STEP_TIMING=1``. When on and the device is CUDA, every boundary synchronizes
the device, so each phase's wall time includes the device work it launched (the steps get
slower; the split is what this measures), and the engine runs its steps synchronously while
a timer is set (asynchronous scheduling would overlap the phases). The same hooks can open NVTX ranges (for Nsight
Systems) and profiler ranges (for ``novainfer profile``), with or without recording times.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import torch

PHASES = ("schedule", "prepare", "forward", "sample", "postprocess")
ENV_VAR = "NOVAINFER_STEP_TIMING"


def enabled_by_env() -> bool:
    return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class StepRecord:
    total: float  # seconds, whole step
    phases: dict[str, float]  # seconds per phase
    num_tokens: int = 0
    num_seqs: int = 0
    decode_only: bool = True


@dataclass
class StepTimer:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    record: bool = True  # keep per-step times
    nvtx: bool = False  # torch.cuda.nvtx ranges (no-op without CUDA)
    profiler_ranges: bool = False  # torch.profiler record_function ranges ("novainfer::<phase>")
    steps: list[StepRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sync = self.record and self.device.type == "cuda"
        self.nvtx = self.nvtx and torch.cuda.is_available()
        self._phase: str | None = None
        self._t_step = 0.0
        self._t_phase = 0.0
        self._cur: dict[str, float] = {}
        self._ranges: list = []
        self.reported = False

    # -- hooks called by the engine and the model runner ---------------------------------

    def start(self) -> None:
        """Beginning of a step (before scheduling)."""
        if self._sync:
            torch.cuda.synchronize(self.device)
        self._cur = {}
        self._phase = None
        self._open("step")
        self._t_step = self._t_phase = time.perf_counter()

    def phase(self, name: str) -> None:
        """Close the current phase (if any) and open `name`."""
        if self._sync:
            torch.cuda.synchronize(self.device)
        now = self._end_phase()
        self._phase, self._t_phase = name, now
        self._open(name)

    def stop(self, num_tokens: int = 0, num_seqs: int = 0, decode_only: bool = True) -> None:
        """End of a step that ran the model."""
        if self._sync:
            torch.cuda.synchronize(self.device)
        now = self._end_phase()
        self._close()  # the step range
        self._phase = None
        if self.record:
            self.steps.append(StepRecord(now - self._t_step, self._cur, num_tokens, num_seqs, decode_only))

    def _end_phase(self) -> float:
        """Add the running phase's time to this step and close its range; returns now."""
        now = time.perf_counter()
        if self._phase is not None:
            self._cur[self._phase] = self._cur.get(self._phase, 0.0) + now - self._t_phase
            self._close()
        return now

    def cancel(self) -> None:
        """End of a step that had nothing to run (not recorded)."""
        while self._ranges:
            self._close()
        self._phase = None

    def reset(self) -> None:
        self.steps.clear()
        self.reported = False

    def _open(self, name: str) -> None:
        if self.nvtx:
            torch.cuda.nvtx.range_push(name)
            self._ranges.append(None)
        if self.profiler_ranges:
            rf = torch.profiler.record_function(f"novainfer::{name}")
            rf.__enter__()
            self._ranges.append(rf)

    def _close(self) -> None:
        if self.profiler_ranges and self._ranges:
            rf = self._ranges.pop()
            rf.__exit__(None, None, None)
        if self.nvtx and self._ranges:
            self._ranges.pop()
            torch.cuda.nvtx.range_pop()

    # -- summary -----------------------------------------------------------------------------

    def summary(self) -> dict:
        """{steps, wall_s, phases: {name: {mean_ms, p50_ms, p99_ms, total_s, share}}, ...}."""
        return summarize(self.steps)

    def report(self, file=None) -> str:
        text = format_summary(self.summary())
        print(text, file=file or sys.stderr)
        self.reported = True
        return text


def _pct(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return 0.0
    k = (len(sorted_vals) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def _stats(values: list[float], wall: float) -> dict:
    s = sorted(values)
    total = sum(s)
    return {
        "mean_ms": 1e3 * total / len(s) if s else 0.0,
        "p50_ms": 1e3 * _pct(s, 0.5),
        "p99_ms": 1e3 * _pct(s, 0.99),
        "total_s": total,
        "share": total / wall if wall > 0 else 0.0,
    }


def summarize(steps: list[StepRecord]) -> dict:
    wall = sum(s.total for s in steps)
    phases = {p: _stats([s.phases.get(p, 0.0) for s in steps], wall) for p in PHASES}
    accounted = sum(v["total_s"] for v in phases.values())
    out = {
        "steps": len(steps),
        "wall_s": wall,
        "step": _stats([s.total for s in steps], wall),
        "phases": phases,
        "unaccounted_s": wall - accounted,
        "tokens": sum(s.num_tokens for s in steps),
        "by_kind": {},
    }
    for kind, pick in (("decode", True), ("prefill/mixed", False)):
        sub = [s for s in steps if s.decode_only is pick]
        if sub:
            sub_wall = sum(s.total for s in sub)
            out["by_kind"][kind] = {
                "steps": len(sub),
                "step_mean_ms": 1e3 * sub_wall / len(sub),
                "phases_mean_ms": {
                    p: 1e3 * sum(s.phases.get(p, 0.0) for s in sub) / len(sub) for p in PHASES
                },
            }
    return out


def format_summary(summary: dict) -> str:
    if not summary["steps"]:
        return "step timing: no steps recorded"
    lines = [
        (
            f"step timing: {summary['steps']} steps, {summary['wall_s']:.3f} s in steps, "
            f"{summary['tokens']} tokens computed"
        ),
        f"{'phase':<12} {'mean ms':>9} {'p50 ms':>9} {'p99 ms':>9} {'total s':>9} {'share':>7}",
    ]
    for name, st in [*summary["phases"].items(), ("step", summary["step"])]:
        lines.append(
            f"{name:<12} {st['mean_ms']:>9.3f} {st['p50_ms']:>9.3f} {st['p99_ms']:>9.3f} "
            f"{st['total_s']:>9.3f} {100 * st['share']:>6.1f}%"
        )
    for kind, k in summary["by_kind"].items():
        parts = ", ".join(f"{p} {v:.2f}" for p, v in k["phases_mean_ms"].items())
        lines.append(f"{kind} steps ({k['steps']}): {k['step_mean_ms']:.2f} ms/step = {parts} ms")
    return "\n".join(lines)
