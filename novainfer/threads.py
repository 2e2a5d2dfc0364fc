"""How many CPU threads the engine uses: as many as there are cores that nobody else is using.

A CPU decode step runs ~150 OpenMP parallel regions (the C kernels and torch's ops share
torch's libgomp), each ending in a barrier that waits for every thread of the team. On
cores shared with other busy processes one of the team is often descheduled, so every
barrier waits for a time slice while the waiting threads spin (libgomp spins ~3 ms before
sleeping) on the cores the late thread needs. Beside two other engines, batch-1 decode on
2 cores ran ~15x slower than alone instead of the fair ~3x.

`CpuThreads`, called by the model worker (engine/worker.py) before each CPU forward, sets torch's thread count
(which the C kernels use too) to the cores of this process's CPU set and cgroup quota that
other processes left free over the last half second: the CPUs' busy time in /proc/stat
minus this process's own CPU time. One thread when the cores are shared (no barrier then
waits for anyone), all of them again once the others stop. Measured in
benchmarks/cpu_contention.py and docs/performance.md.

NOVAINFER_CPU_THREADS: `auto` (default), `off` (leave torch's thread count alone) or a
number (that many threads, fixed).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

ENV = "NOVAINFER_CPU_THREADS"
WINDOW_S = 0.5  # how often the thread count is reconsidered
# A core counts as free for a thread when at least this much of it is: a light neighbour (an
# HTTP client streaming tokens) costs a 2-thread team less than dropping to 1 thread does.
FREE_FOR_A_THREAD = 0.25


def mode() -> str | int:
    """NOVAINFER_CPU_THREADS as `auto`, `off` or a thread count; ValueError otherwise."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value in ("auto", "off"):
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise ValueError(f"{ENV} must be 'auto', 'off' or a positive thread count, got {value!r}")


def _cgroup_quota(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 cpu.max, else v1 cfs), or None.
    In a container the cgroup's own folder may be mounted as the root: tried second."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        v2 = hierarchy == "0"
        if not v2 and "cpu" not in controllers.split(","):
            continue
        base = root if v2 else root / controllers
        for folder in (base / path.lstrip("/"), base):
            try:
                if v2:
                    quota, period = (folder / "cpu.max").read_text().split()
                    return None if quota == "max" else int(quota) / int(period)
                quota = int((folder / "cpu.cfs_quota_us").read_text())
                period = int((folder / "cpu.cfs_period_us").read_text())
                return None if quota <= 0 else quota / period
            except (OSError, ValueError):
                continue
    return None


def usable_cores(cpus: int | None = None, quota: float | None = None) -> int:
    """Cores this process may run on: its CPU set, capped by its cgroup's CPU quota."""
    cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
    quota = _cgroup_quota() if quota is None else quota
    return max(1, min(cpus, math.ceil(quota))) if quota else max(1, cpus)


def busy_seconds(cpus: set[int]) -> float:
    """Seconds the given CPUs were not idle (steal included: another VM had them), from
    /proc/stat."""
    total = 0
    for line in Path("/proc/stat").read_text().splitlines()[1:]:
        name, *fields = line.split()
        if not name.startswith("cpu"):
            break
        if int(name[3:]) in cpus:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
            total += user + nice + system + irq + softirq + steal
    return total / os.sysconf("SC_CLK_TCK")


class CpuThreads:
    """Per-step thread-count controller. Once per window it measures how many of the `cpus`
    CPUs other processes used (the CPUs' busy time minus this process's CPU time, over the
    wall time) and sets the thread count to the CPUs left (a thread for each core at least
    FREE_FOR_A_THREAD free), between 1 and `max_threads`.

    `read_busy`, `read_own` (CPU seconds), `clock` and `set_threads` are injectable for tests.
    """

    def __init__(
        self,
        max_threads: int,
        cpus: int,
        read_busy: Callable[[], float],
        read_own: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
        set_threads: Callable[[int], None] | None = None,
        window_s: float = WINDOW_S,
    ) -> None:
        self.max_threads, self.cpus, self.window_s = max_threads, cpus, window_s
        self._read_busy, self._read_own, self._clock = read_busy, read_own, clock
        self._set = set_threads
        self.threads = max_threads
        self._mark = (clock(), read_busy(), read_own())

    def step(self) -> None:
        """Call before each step; reconsiders the thread count once per window."""
        now = self._clock()
        then, busy0, own0 = self._mark
        if now - then < self.window_s:
            return
        busy, own = self._read_busy(), self._read_own()
        self._mark = (now, busy, own)
        others = max(0.0, (busy - busy0) - (own - own0)) / (now - then)
        free = self.cpus - others
        target = min(self.max_threads, max(1, math.floor(free + 1 - FREE_FOR_A_THREAD)))
        if target != self.threads:
            self.threads = target
            if self._set is not None:
                self._set(target)


def cpu_thread_control(device) -> Callable[[], None]:
    """What the model worker calls before each forward pass on `device`: a `CpuThreads` on the CPU
    in `auto` mode, else nothing (a fixed NOVAINFER_CPU_THREADS is set here, once).

    The most threads: torch's count (its default, the physical cores, or what the user set)
    capped by the CPU set and the cgroup quota. Others' load is measured over the CPU set:
    rivals inside this cgroup's quota, on a machine with more CPUs than the quota, go unseen."""
    import torch

    setting = mode()
    if device.type != "cpu" or setting == "off":
        return _nothing
    if isinstance(setting, int):
        torch.set_num_threads(setting)
        return _nothing
    try:
        cpus = os.sched_getaffinity(0)
        busy_seconds(cpus)
    except (AttributeError, OSError):  # not Linux: no CPU set or /proc/stat to read
        return _nothing
    top = min(torch.get_num_threads(), usable_cores(len(cpus)))
    if top != torch.get_num_threads():
        torch.set_num_threads(top)
    control = CpuThreads(top, len(cpus), lambda: busy_seconds(cpus),
                         set_threads=torch.set_num_threads)
    return control.step


def _nothing() -> None:
    pass
