"""The CPU thread-count logic (novainfer/threads.py) on made-up readings: no timing involved."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import completion_tokens, make_llm, random_prompts

from novainfer import SamplingParams, threads
from novainfer.threads import CpuThreads, cpu_thread_control, mode, usable_cores


class FakeMachine:
    """A clock, the CPUs' busy seconds and this process's CPU seconds, advanced by hand."""

    def __init__(self) -> None:
        self.now = self.busy = self.own = 0.0
        self.calls: list[int] = []

    def run(self, seconds: float, own_cores: float, other_cores: float) -> None:
        self.now += seconds
        self.own += own_cores * seconds
        self.busy += (own_cores + other_cores) * seconds

    def controller(self, max_threads: int = 2, cpus: int = 2) -> CpuThreads:
        return CpuThreads(max_threads, cpus, lambda: self.busy, lambda: self.own,
                          lambda: self.now, self.calls.append, window_s=0.5)


def test_drops_to_one_thread_beside_busy_processes_and_returns_when_they_stop():
    m = FakeMachine()
    ctl = m.controller()
    m.run(0.6, own_cores=2.0, other_cores=0.0)  # alone: both cores are ours
    ctl.step()
    assert ctl.threads == 2 and m.calls == []
    m.run(0.6, own_cores=0.7, other_cores=1.3)  # two rivals took most of the cores
    ctl.step()
    assert ctl.threads == 1 and m.calls == [1]
    m.run(0.6, own_cores=0.67, other_cores=1.33)  # still there: stay at one
    ctl.step()
    assert m.calls == [1]
    m.run(0.6, own_cores=1.0, other_cores=0.05)  # they stopped: the second core is free
    ctl.step()
    assert ctl.threads == 2 and m.calls == [1, 2]


def test_decides_once_per_window_and_never_above_the_maximum():
    m = FakeMachine()
    ctl = m.controller(max_threads=3, cpus=8)
    m.run(0.4, own_cores=0.0, other_cores=8.0)
    ctl.step()  # inside the first window: no decision yet
    assert ctl.threads == 3 and m.calls == []
    m.run(0.2, own_cores=0.0, other_cores=8.0)
    ctl.step()  # all 8 cores busy with others over 0.6 s: one thread
    assert m.calls == [1]
    m.run(0.6, own_cores=1.0, other_cores=0.0)
    ctl.step()  # 8 cores free, but 3 is the most we may use
    assert ctl.threads == 3 and m.calls == [1, 3]


@pytest.mark.parametrize(("others", "threads_left"), [(0.4, 2), (0.6, 2), (1.4, 1), (3.5, 1)])
def test_keeps_a_thread_for_each_core_at_least_a_quarter_free(others, threads_left):
    m = FakeMachine()
    ctl = m.controller(max_threads=4, cpus=2)
    m.run(1.0, own_cores=1.0, other_cores=others)
    ctl.step()
    assert ctl.threads == threads_left


def test_usable_cores_takes_the_cpu_set_and_the_quota():
    assert usable_cores(cpus=8, quota=None) == 8
    assert usable_cores(cpus=8, quota=2.0) == 2
    assert usable_cores(cpus=8, quota=1.5) == 2  # a partial core still runs a thread
    assert usable_cores(cpus=2, quota=16.0) == 2
    assert usable_cores(cpus=4, quota=0.2) == 1


def test_cgroup_quota_v1_and_v2(tmp_path):
    cg = tmp_path / "proc_self_cgroup"
    (tmp_path / "cpu,cpuacct" / "job").mkdir(parents=True)
    (tmp_path / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us").write_text("150000\n")
    (tmp_path / "cpu,cpuacct" / "job" / "cpu.cfs_period_us").write_text("100000\n")
    cg.write_text("4:memory:/job\n1:cpu,cpuacct:/job\n")
    assert threads._cgroup_quota(cg, tmp_path) == 1.5
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "cpu.max").write_text("200000 100000\n")
    cg.write_text("0::/job\n")
    assert threads._cgroup_quota(cg, tmp_path) == 2.0
    cg.write_text("0::/elsewhere\n")  # a container that mounts its own cgroup as the root
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert threads._cgroup_quota(cg, tmp_path) == 0.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads._cgroup_quota(cg, tmp_path) is None
    assert threads._cgroup_quota(tmp_path / "missing", tmp_path) is None


def test_mode(monkeypatch):
    monkeypatch.setenv(threads.ENV, "3")
    assert mode() == 3
    monkeypatch.setenv(threads.ENV, " Off ")
    assert mode() == "off"
    monkeypatch.delenv(threads.ENV)
    assert mode() == "auto"
    for bad in ("many", "0", "-2"):
        monkeypatch.setenv(threads.ENV, bad)
        with pytest.raises(ValueError, match="NOVAINFER_CPU_THREADS"):
            mode()


def test_hook_sets_a_fixed_count_and_does_nothing_when_off(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(threads.ENV, "1")
        cpu_thread_control(torch.device("cpu"))()
        assert torch.get_num_threads() == 1
        monkeypatch.setenv(threads.ENV, "off")
        torch.set_num_threads(before)
        cpu_thread_control(torch.device("cpu"))()
        assert torch.get_num_threads() == before
        monkeypatch.setenv(threads.ENV, "auto")
        step = cpu_thread_control(torch.device("cpu"))
        step()  # the first window has not passed: no change yet
        assert 1 <= torch.get_num_threads() <= before
    finally:
        torch.set_num_threads(before)


def test_engine_steps_drive_the_controller_and_tokens_do_not_change(checkpoint, monkeypatch):
    """The model worker calls the controller every step; when it drops to one thread in the
    middle of a request, the greedy tokens stay those of a run that never changed."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to have a thread count to lower")
    before = torch.get_num_threads()
    m, steps = FakeMachine(), []

    class Scripted(CpuThreads):
        """Every step: 1 s passed in which others kept all CPUs busy from the 3rd step on."""

        def __init__(self, max_threads, cpus, read_busy, set_threads=None):
            super().__init__(max_threads, cpus, lambda: m.busy, lambda: m.own, lambda: m.now,
                             set_threads)

        def step(self):
            steps.append(self.threads)
            m.run(1.0, own_cores=1.0, other_cores=0.0 if len(steps) < 3 else float(self.cpus))
            super().step()

    prompts = random_prompts([7, 12], seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv(threads.ENV, "off")
        expected = completion_tokens(make_llm(checkpoint("llama")).generate(prompts, params))
        monkeypatch.setenv(threads.ENV, "auto")
        monkeypatch.setattr(threads, "CpuThreads", Scripted)
        llm = make_llm(checkpoint("llama"))
        got = completion_tokens(llm.generate(prompts, params))
        assert got == expected
        assert steps[:3] == [2, 2, 2] and set(steps[4:]) == {1} and len(steps) >= 8
        assert torch.get_num_threads() == 1
        llm.shutdown()  # the engine gives the process its thread count back
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
