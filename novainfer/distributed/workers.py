"""Tensor-parallel ranks 1 .. N-1: their processes, the per-step message, and supervision.

The driver (rank 0, in the caller's process) starts one worker process per other rank with
`torch.multiprocessing` (spawn), or finds them already started by `torchrun` (the standard
MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE variables). Every rank joins one
`torch.distributed` group: NCCL on CUDA for the layers' collectives, plus a gloo group for
the driver's messages (on the CPU the one gloo group does both).

Each step the driver broadcasts the packed step (engine/step_inputs.py) over the gloo
group: a fixed int64 header [command, data length, the step's sizes], then the int64 data.
That is a typed, bounded message; no Python object crosses in the hot path. The workers run
the step in lockstep with rank 0 (same collectives, same order) and never send anything
back: rank 0 receives the gathered logits and samples. With asynchronous scheduling the
step's header asks rank 0 to broadcast the sampled ids behind the step (NCCL, on the
device), because the next step, packed before they reach the host, reads them there.

Failure: spawned workers report an exception (rank and traceback) over a pipe and exit; a
monitor thread in the driver watches those pipes and the processes, records the first
failure, and aborts the process groups so that a collective blocked on the dead rank
returns. The driver then raises an error naming the rank and cause. Workers ignore SIGINT
(the driver decides), and exit when the driver's end of their pipe closes, so a killed
driver leaves no orphans.
"""

from __future__ import annotations

import datetime
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from novainfer.distributed import peer_allreduce
from novainfer.distributed.parallel import TensorParallel
from novainfer.engine.step_inputs import HEADER

CMD_STEP, CMD_STOP, CMD_LORA = 1, 2, 3
MESSAGE_HEADER = 2 + len(HEADER)  # command, data length, then the step's header
ABORT_AFTER_S = 5.0  # a failure the driver has not noticed by then: abort its collectives
# Collectives give up after this long: a hang guard, far beyond any step. Failures are
# normally seen within a second by the monitor.
GROUP_TIMEOUT = datetime.timedelta(minutes=30)
# Multicast (NVLS) on shared GPU hosts can take GPUs out of service: keep it off.
NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                 "NVSHMEM_DISABLE_NVLS": "1"}


class WorkerFailed(RuntimeError):
    """A tensor-parallel worker died or raised; the message names the rank and cause."""


@dataclass(frozen=True)
class Launch:
    """How the ranks find each other."""

    size: int
    init_method: str  # tcp://host:port, or env:// under torchrun
    backend: str  # nccl | gloo
    base_device: torch.device  # rank r uses base index + r (CUDA) or the CPU


def rank_device(launch: Launch, rank: int) -> torch.device:
    if launch.base_device.type != "cuda":
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", rank))
    return torch.device("cuda", (launch.base_device.index or 0) + local)


def torchrun_rank(size: int) -> int | None:
    """This process's rank when a launcher such as torchrun started the ranks, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    if world != size:
        raise ValueError(
            f"tensor_parallel_size ({size}) differs from the launcher's WORLD_SIZE ({world}); "
            "start as many ranks as tensor_parallel_size"
        )
    return int(os.environ["RANK"])


def join_group(launch: Launch, rank: int) -> TensorParallel:
    """Join the process group as `rank`; returns this rank's TensorParallel."""
    for key, value in NCCL_SAFE_ENV.items():
        os.environ.setdefault(key, value)
    device = rank_device(launch, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(
        launch.backend, init_method=launch.init_method, rank=rank, world_size=launch.size,
        timeout=GROUP_TIMEOUT,
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    group = torch.distributed.group.WORLD
    control = torch.distributed.new_group(backend="gloo") if launch.backend == "nccl" else group
    if device.type == "cpu":  # the ranks share the cores
        torch.set_num_threads(max(1, torch.get_num_threads() // launch.size))
    peer = peer_allreduce.create(group, control, device)
    return TensorParallel(rank, launch.size, group, control, peer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the step message -----------------------------------------------------------------------


def send_step(tp: TensorParallel, header: np.ndarray, data: np.ndarray) -> None:
    head = np.empty(MESSAGE_HEADER, dtype=np.int64)
    head[0], head[1], head[2:] = CMD_STEP, len(data), header
    torch.distributed.broadcast(torch.from_numpy(head), src=0, group=tp.control)
    torch.distributed.broadcast(torch.from_numpy(data), src=0, group=tp.control)


def send_stop(tp: TensorParallel) -> None:
    head = np.zeros(MESSAGE_HEADER, dtype=np.int64)
    head[0] = CMD_STOP
    torch.distributed.broadcast(torch.from_numpy(head), src=0, group=tp.control)


def stop_ranks(tp: TensorParallel) -> None:
    """Tell the other ranks to leave their loop, then leave the process group."""
    try:
        send_stop(tp)
    except Exception:  # noqa: BLE001 - a dead rank: the others are killed by their owner
        pass
    leave_group()


def leave_group(timeout: float = 30.0) -> None:
    """Destroy this process's groups; if that does not finish in `timeout` s (a peer died
    mid-teardown), abort them instead so the process can go on (or start new groups)."""
    if not torch.distributed.is_initialized():
        return
    done = threading.Event()

    def destroy() -> None:
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001 - an aborted group may refuse: abort below
            pass
        done.set()

    threading.Thread(target=destroy, name="novainfer-tp-teardown", daemon=True).start()
    if not done.wait(timeout):
        sys.stderr.write("novainfer: process group teardown timed out; aborting it\n")
        abort_groups()


_abort_lock = threading.Lock()


def abort_groups(timeout: float = 10.0) -> None:
    """Abort this process's groups without waiting for any peer, once (best effort: on gloo
    a dead peer already fails every collective). Runs on a helper thread and gives up after
    `timeout` s, so a teardown that blocks cannot hang the caller."""

    def abort() -> None:
        with _abort_lock:
            if not torch.distributed.is_initialized():
                return
            try:
                from torch.distributed.distributed_c10d import _abort_process_group

                _abort_process_group()
            except Exception:  # noqa: BLE001 - nothing more to try
                pass

    thread = threading.Thread(target=abort, name="novainfer-tp-abort", daemon=True)
    thread.start()
    thread.join(timeout)


def send_lora(tp: TensorParallel, slot: int, adapter: Any) -> None:
    """Give the other ranks an adapter (rank 0's checked LoRAAdapter, whose tensors travel
    pickled over the gloo group; each rank keeps its shard) for a device slot. Only when a
    slot changes, never per step; no rank reads the folder again."""
    head = np.zeros(MESSAGE_HEADER, dtype=np.int64)
    head[0], head[1] = CMD_LORA, slot
    torch.distributed.broadcast(torch.from_numpy(head), src=0, group=tp.control)
    torch.distributed.broadcast_object_list([adapter], src=0, group=tp.control)


def receive_step(tp: TensorParallel, worker: Any = None) -> tuple[np.ndarray, np.ndarray] | None:
    """The next step (header, data), or None when the driver says stop; adapter loads
    (`send_lora`) that come first are applied to `worker` on the way."""
    head = torch.empty(MESSAGE_HEADER, dtype=torch.int64)
    torch.distributed.broadcast(head, src=0, group=tp.control)
    head_np = head.numpy()
    while head_np[0] == CMD_LORA:
        adapter = [None]
        torch.distributed.broadcast_object_list(adapter, src=0, group=tp.control)
        worker.load_lora(int(head_np[1]), adapter[0])
        torch.distributed.broadcast(head, src=0, group=tp.control)
        head_np = head.numpy()
    if head_np[0] == CMD_STOP:
        return None
    data = torch.empty(int(head_np[1]), dtype=torch.int64)
    torch.distributed.broadcast(data, src=0, group=tp.control)
    return head_np[2:].copy(), data.numpy()


def run_external_rank(rank: int, launch: Launch, config: Any, model_config: Any, folder: Path,
                      max_model_len: int) -> None:
    """A rank > 0 started by torchrun: load this rank's shard and serve steps until rank 0
    says stop."""
    from novainfer.engine.worker import ModelWorker

    tp = join_group(launch, rank)
    worker = ModelWorker(config, model_config, folder, max_model_len, tp, rank_device(launch, rank))
    serve(worker, tp)
    worker.release_graphs()
    leave_group()


def serve(worker: Any, tp: TensorParallel) -> None:
    """A worker rank's loop: run each step the driver sends until it says stop."""
    with torch.inference_mode():
        while (step := receive_step(tp, worker)) is not None:
            worker.run(*step)


# -- worker processes -----------------------------------------------------------------------


def _die_with_parent(conn: multiprocessing.connection.Connection) -> None:
    """Exit when the driver's end of the pipe closes (the driver exited or was killed)."""
    try:
        while True:
            conn.recv()
    except (EOFError, OSError):
        os._exit(1)


def worker_main(
    rank: int, launch: Launch, config: Any, model_config: Any, folder: Path,
    max_model_len: int, conn: multiprocessing.connection.Connection,
) -> None:
    """Entry point of a spawned worker process (rank >= 1)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    threading.Thread(target=_die_with_parent, args=(conn,), daemon=True).start()
    from novainfer.engine.worker import ModelWorker

    stage = "joining the process group"
    try:
        tp = join_group(launch, rank)
        stage = "loading its shard of the model"
        worker = ModelWorker(config, model_config, folder, max_model_len, tp,
                             rank_device(launch, rank))
        conn.send(("ready", rank))
        stage = "running a step"
        serve(worker, tp)
        worker.release_graphs()
        leave_group()
    except BaseException as exc:  # noqa: BLE001 - reported to the driver, then exit
        try:
            conn.send(("error", rank, f"{stage}: {type(exc).__name__}: {exc}",
                       traceback.format_exc()))
        except OSError:
            pass
        sys.stderr.write(f"novainfer tensor-parallel rank {rank} failed while {stage}:\n"
                         f"{traceback.format_exc()}")
        os._exit(1)
    os._exit(0)


def exit_code_of(pid: int) -> int | str:
    """A dead child's exit code (negative: the signal that killed it) without reaping it:
    only the thread that owns the processes may reap them, or its `join`/`is_alive` race the
    reaper (`Process.exitcode` reaps; `is_alive()` then said True for a dead worker)."""
    # The sentinel pipe closes while the process exits, a moment before it can be waited for.
    for _ in range(500):  # up to ~5 s
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except (AttributeError, OSError):  # no waitid here (macOS), or already reaped
            return "unknown"
        if info is not None:
            return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        time.sleep(0.01)
    return "unknown"


class Workers:
    """The driver's handle on ranks 1 .. N-1 that it spawned: start, supervise, stop."""

    def __init__(self, launch: Launch, config: Any, model_config: Any, folder: Path,
                 max_model_len: int) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self.failure: str | None = None
        self.tp: TensorParallel | None = None
        self._stopping = False
        self.procs = []
        self.conns = []
        for rank in range(1, launch.size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main, name=f"novainfer-tp{rank}", daemon=True,
                args=(rank, launch, config, model_config, folder, max_model_len, child),
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self._ready: set[int] = set()
        self._ready_event = threading.Event()
        self._failed = threading.Event()
        self._noticed = threading.Event()  # the driver has seen the failure
        self._monitor = threading.Thread(target=self._watch, name="novainfer-tp-monitor",
                                         daemon=True)
        self._monitor.start()

    def _watch(self) -> None:
        waiting = {c: rank for rank, c in enumerate(self.conns, start=1)}
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.procs, start=1)}
        while waiting or sentinels:
            try:
                ready = multiprocessing.connection.wait([*waiting, *sentinels])
            except (OSError, ValueError):  # shutdown closed the pipes under us
                return
            if self._stopping:
                return
            for obj in ready:
                if obj in waiting:
                    rank = waiting[obj]
                    try:
                        message = obj.recv()
                    except (EOFError, OSError):
                        del waiting[obj]
                        continue
                    if message[0] == "ready":
                        self._ready.add(rank)
                        if len(self._ready) == len(self.procs):
                            self._ready_event.set()
                    elif message[0] == "error":
                        self._fail(f"tensor-parallel worker rank {rank} failed while {message[2]}"
                                   f"\n{message[3]}")
                else:
                    rank = sentinels.pop(obj)
                    code = exit_code_of(self.procs[rank - 1].pid)
                    self._fail(f"tensor-parallel worker rank {rank} exited (exit code {code})")
            if self.failure is not None and not self._stopping:
                # The driver normally notices at its next collective (gloo fails on a dead
                # peer); if it does not, it is blocked in an NCCL collective: abort it.
                if not self._noticed.wait(ABORT_AFTER_S) and not self._stopping:
                    abort_groups()
                return

    def _fail(self, message: str) -> None:
        if self.failure is None and not self._stopping:
            self.failure = message
            self._failed.set()

    def wait_ready(self) -> None:
        """Until every worker loaded its shard; WorkerFailed if one failed instead."""
        while not self._ready_event.wait(0.1):
            self.check()
        self.check()

    def wait_failure(self, timeout: float) -> str | None:
        """The failure, waiting up to `timeout` s for the monitor to see one (a collective
        can fail on a dead peer before the monitor has noticed the death)."""
        self._failed.wait(timeout)
        self._noticed.set()
        return self.failure

    def check(self) -> None:
        if self.failure is not None:
            raise WorkerFailed(self.failure)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the workers to stop, then make sure they are gone."""
        if self._stopping:
            return
        self._stopping = True
        if self.tp is not None and self.failure is None:
            stop_ranks(self.tp)
        for proc in self.procs:
            proc.join(timeout)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        self._monitor.join(1.0)  # it returns once it sees the exits; then close its pipes
        for conn in self.conns:
            conn.close()
        if self.failure is None:
            leave_group()
        else:  # a rank is gone: an orderly teardown would wait for it
            abort_groups()
