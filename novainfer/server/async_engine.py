"""The engine loop on its own thread, fed by a command queue, feeding asyncio queues.

`LLMEngine` is not thread-safe, so one thread owns it: every tokenization, add, abort and
step happens there. The event loop only puts commands on a `queue.Queue`; the engine thread
drains the commands before each step and hands each request's outputs back to its
`asyncio.Queue` with `loop.call_soon_threadsafe` (one call per step for all requests).

One HTTP request is one `Group`: one engine request per prompt, all validated before any is
queued, so a bad prompt in a batch queues nothing. Events a group's queue receives:
`Accepted`, then `RequestOutput`s (every step while streaming, the final one otherwise),
or a single `Failed` (validation error or engine failure).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from novainfer.outputs import RequestOutput
from novainfer.sampling_params import SamplingParams
from novainfer.server.metrics import Metrics

logger = logging.getLogger("novainfer.server")

# (engine) -> (prompt: text or token ids, params); runs on the engine thread.
Make = Callable[[Any], tuple[Any, SamplingParams]]


@dataclass
class Accepted:
    prompt_token_ids: list[list[int]]


@dataclass
class Failed:
    error: BaseException
    client_error: bool  # True: the request was invalid (400); False: engine failure


@dataclass
class Group:
    request_ids: list[str]
    makes: list[Make]
    stream: bool
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float = field(default_factory=time.monotonic)
    # engine-thread state
    first_token_at: float | None = None
    last_token_at: dict[tuple[str, int], float] = field(default_factory=dict)
    token_counts: dict[tuple[str, int], int] = field(default_factory=dict)
    live: set[str] = field(default_factory=set)


def _is_client_error(exc: BaseException) -> bool:
    if isinstance(exc, (ValueError, TypeError, KeyError, IndexError)):
        return True
    try:
        from jinja2 import TemplateError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, TemplateError)


class AsyncEngine:
    def __init__(self, engine: Any, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self._cmds: queue.Queue = queue.Queue()
        self._groups: dict[str, Group] = {}  # engine request id -> group (engine thread only)
        self._thread = threading.Thread(target=self._run, name="novainfer-engine", daemon=True)
        self._stopped = threading.Event()
        self.snapshot: dict[str, float] = {}
        self.failed: BaseException | None = None
        self._take_snapshot()
        self.initial_free_blocks = self.snapshot["kv_free_blocks"]

    # -- event-loop side ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort everything still running and end the engine thread."""
        if self._thread.is_alive():
            self._cmds.put(("stop",))
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set()

    def num_waiting(self) -> int:
        """Requests not yet running: queued commands plus the scheduler's waiting requests."""
        return int(self.snapshot.get("num_requests_waiting", 0)) + self._cmds.qsize()

    def submit(self, request_ids: list[str], makes: list[Make], stream: bool) -> Group:
        loop = asyncio.get_running_loop()
        group = Group(request_ids, makes, stream, loop, asyncio.Queue())
        self._cmds.put(("add", group))
        return group

    def abort(self, group: Group) -> None:
        self._cmds.put(("abort", group))

    def abort_all(self) -> None:
        """Abort every request; their consumers get a final output with finish_reason 'abort'."""
        self._cmds.put(("abort_all",))

    # -- engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                idle = not engine.has_unfinished_requests()
                if not self._drain(block=idle):
                    break
                if not engine.has_unfinished_requests():
                    self._take_snapshot()
                    continue
                try:
                    outputs = engine.step()
                except Exception as exc:  # noqa: BLE001 - an engine bug: fail what is in flight, keep serving
                    logger.error("engine step failed:\n%s", traceback.format_exc())
                    self._fail_all(exc)
                    continue
                self._dispatch(outputs)
                self._take_snapshot()
        finally:
            self._stopped.set()
            stopped = RuntimeError("the engine stopped")
            self._fail_all(stopped, outcome="abort")
            self._fail_queued(stopped)
            self._take_snapshot()

    def _drain(self, block: bool) -> bool:
        """Apply queued commands; False when asked to stop."""
        while True:
            try:
                cmd = self._cmds.get(timeout=1.0) if block else self._cmds.get_nowait()
            except queue.Empty:
                if block:
                    continue
                return True
            block = False
            if cmd[0] == "stop":
                return False
            if cmd[0] == "add":
                self._add(cmd[1])
            elif cmd[0] == "abort":
                self._abort(cmd[1])
            elif cmd[0] == "abort_all":
                self._abort_all()

    def _add(self, group: Group) -> None:
        engine = self.engine
        added: list[str] = []
        try:
            prepared = [make(engine) for make in group.makes]
            for rid, (prompt, params) in zip(group.request_ids, prepared):
                engine.add_request(rid, prompt, params, stream=True)
                added.append(rid)
        except Exception as exc:  # noqa: BLE001 - reported to this request only
            for rid in added:
                engine.abort_request(rid)
            client = _is_client_error(exc)
            if not client:
                logger.error("add_request failed:\n%s", traceback.format_exc())
            self.metrics.count_request("rejected_400" if client else "error")
            self._send([(group, Failed(exc, client))])
            return
        ids = [list(engine.requests[rid].prompt_token_ids) for rid in added]
        self.metrics.add_tokens(prompt=sum(len(i) for i in ids))
        for rid in added:
            self._groups[rid] = group
            group.live.add(rid)
        self._send([(group, Accepted(ids))])

    def _abort(self, group: Group) -> None:
        for rid in list(group.live):
            out = self.engine.abort_request(rid)
            group.live.discard(rid)
            self._groups.pop(rid, None)
            if out is not None:
                for _ in out.outputs:
                    self.metrics.count_request("abort")

    def _abort_all(self) -> None:
        deliveries = []
        for rid, group in list(self._groups.items()):
            out = self.engine.abort_request(rid)
            group.live.discard(rid)
            del self._groups[rid]
            if out is not None:
                for _ in out.outputs:
                    self.metrics.count_request("abort")
                deliveries.append((group, out))
        self._send(deliveries)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        deliveries = []
        ttft: list[float] = []
        itl: list[float] = []
        e2e: list[float] = []
        new_tokens = 0
        for out in outputs:
            group = self._groups.get(out.request_id)
            if group is None:
                continue
            for c in out.outputs:
                key = (out.request_id, c.index)
                before = group.token_counts.get(key, 0)
                n = len(c.token_ids) - before
                if n <= 0:
                    continue
                new_tokens += n
                group.token_counts[key] = len(c.token_ids)
                if group.first_token_at is None:
                    group.first_token_at = now
                    ttft.append(now - group.arrival)
                last = group.last_token_at.get(key)
                if last is not None:
                    itl.extend([(now - last) / n] * n)
                group.last_token_at[key] = now
            if out.finished:
                group.live.discard(out.request_id)
                del self._groups[out.request_id]
                for c in out.outputs:
                    self.metrics.count_request(c.finish_reason or "abort")
                if not group.live:
                    e2e.append(now - group.arrival)
            if group.stream or out.finished:
                deliveries.append((group, out))
        self.metrics.add_tokens(generation=new_tokens)
        if ttft or itl or e2e:
            self.metrics.observe(ttft, itl, e2e)
        self._send(deliveries)

    def _fail_all(self, exc: BaseException, outcome: str = "error") -> None:
        """Fail and abort every request in the engine (a step raised, or the thread ends)."""
        deliveries = []
        for rid, group in list(self._groups.items()):
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001 - best effort
                logger.error("abort failed:\n%s", traceback.format_exc())
            self._groups.pop(rid, None)
            if rid in group.live:
                group.live.discard(rid)
                self.metrics.count_request(outcome)
                deliveries.append((group, Failed(exc, False)))
        # one Failed per group is enough
        seen: set[int] = set()
        self._send([d for d in deliveries if not (id(d[0]) in seen or seen.add(id(d[0])))])

    def _fail_queued(self, exc: BaseException) -> None:
        """When the engine thread ends: requests still queued will never run."""
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                self._send([(cmd[1], Failed(exc, False))])

    def _send(self, deliveries: list[tuple[Group, Any]]) -> None:
        by_loop: dict[int, list] = {}
        loops = {}
        for group, item in deliveries:
            by_loop.setdefault(id(group.loop), []).append((group.queue, item))
            loops[id(group.loop)] = group.loop
        for key, items in by_loop.items():
            try:
                loops[key].call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop is closed: nobody is listening
                pass

    def _take_snapshot(self) -> None:
        engine = self.engine
        bm = engine.block_manager
        sched = engine.scheduler
        running = {s.request_id for s in list(sched.running)}
        waiting = {s.request_id for s in list(sched.waiting)} - running
        queries = bm.prefix_queries
        self.snapshot = {
            "num_requests_running": len(running),
            "num_requests_waiting": len(waiting),
            "kv_cache_usage_perc": bm.usage,
            "kv_free_blocks": bm.num_free_blocks,
            "kv_total_blocks": bm.num_blocks,
            "prefix_cache_queries_total": queries,
            "prefix_cache_hits_total": bm.prefix_hits,
            "prefix_cache_hit_rate": bm.prefix_hits / queries if queries else 0.0,
        }


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)
