"""The frontend's handle on the engine core process: requests go out as commands, each step
comes back as token ids that become RequestOutputs here (server/request_state.py).

Everything runs on the frontend's event loop: tokenization and chat templates when a request
is submitted, and the core's messages through a reader on its pipe, so no lock is needed.
Commands leave through a sender thread, so a full pipe (the core busy with a step) never
blocks the loop, which keeps reading the core's messages meanwhile: no deadlock of two
processes each waiting for the other to read.
One HTTP request is one `Group`: one engine request per prompt, all validated here (prompt
forms, vocabulary, lengths against max_model_len) before any is sent, so a bad prompt in a
batch queues nothing; a rejection by the core (its own checks) aborts the group's others. Events a group's queue receives:
`Accepted` (once the core took every request), then `RequestOutput`s (every step while
streaming, the final one otherwise), or a single `Failed`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from novainfer.engine.detokenizer import decorate
from novainfer.inputs import check_request, prompt_inputs
from novainfer.sampling_params import SamplingParams
from novainfer.server.metrics import Metrics
from novainfer.server.request_state import RequestState
from novainfer.server.wire import CID, FINISH, FINISH_NAMES, INDEX, STOP_TOKEN, TOKEN, Step

logger = logging.getLogger("novainfer.server")

# (client) -> (prompt: text, token ids or PromptInputs, params); runs on the event loop.
Make = Callable[[Any], tuple[Any, SamplingParams]]


@dataclass
class Accepted:
    prompt_token_ids: list[list[int]]


@dataclass
class Failed:
    error: BaseException
    client_error: bool  # True: the request was invalid (400); False: engine failure
    fatal: bool = False  # the engine core died: 500, and the server is going down


@dataclass
class Group:
    request_ids: list[str]
    stream: bool
    queue: asyncio.Queue
    states: list[RequestState] = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)
    num_accepted: int = 0
    first_token_at: float | None = None
    closed: bool = False  # failed or aborted: no more events


def is_client_error(exc: BaseException) -> bool:
    if isinstance(exc, (ValueError, TypeError, KeyError, IndexError)):
        return True
    try:
        from jinja2 import TemplateError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, TemplateError)


class EngineClient:
    """`inbox`/`outbox`: the pipes from and to the core. `info` is the core's ready message:
    max_model_len, vocab_size, its first snapshot. `on_death(reason)` runs once if the core's
    pipe closes while this frontend still needs it."""

    def __init__(self, inbox: Connection, outbox: Connection, info: dict, tokenizer: Any,
                 metrics: Metrics, on_death: Callable[[str], None] | None = None,
                 index: int = 0, num_frontends: int = 1) -> None:
        self.inbox, self.outbox = inbox, outbox
        self.index, self.num_frontends = index, num_frontends
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_model_len = int(info["max_model_len"])
        self.vocab_size = int(info["vocab_size"])
        self.snapshot: dict[str, float] = dict(info["snapshot"])
        self.initial_free_blocks = self.snapshot["kv_free_blocks"]
        self.on_death = on_death
        self.death: str | None = None
        self._states: dict[int, RequestState] = {}  # cid -> live request
        self._cids = itertools.count()
        self._commands: list[tuple] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._texts: dict[int, str] = {}  # token id -> text, for logprob entries
        self._unaccepted = 0
        self._outgoing: queue.SimpleQueue = queue.SimpleQueue()  # pickled commands; None: stop
        self._sender = threading.Thread(target=self._send_loop, name="novainfer-to-core",
                                        daemon=True)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        fd = self.inbox.fileno()
        self._loop.add_reader(fd, self._on_readable)
        # uvloop (libuv) makes a watched descriptor non-blocking; a message is read whole once
        # its first bytes are there, so keep it blocking.
        os.set_blocking(fd, True)
        self._sender.start()
        if self.num_frontends > 1:
            self.metrics.others = self._other_metrics
            self._share_metrics()

    def _share_metrics(self) -> None:
        """Several frontends: send this one's request counts and latency histograms to the
        core once a second, which relays every frontend's to the others."""
        if self.death is None and not self.inbox.closed:
            self._send(("metrics", self.metrics.state()))
            self._loop.call_later(1.0, self._share_metrics)

    def _other_metrics(self) -> list[dict]:
        shared = self.snapshot.get("frontend_metrics", {})
        return [state for fi, state in shared.items() if fi != self.index]

    def stop(self) -> None:
        """Say goodbye to the core (it aborts what this frontend still had) and close."""
        if self._loop is not None and not self.inbox.closed:
            self._loop.remove_reader(self.inbox.fileno())
        if self.death is None:
            self._outgoing.put(pickle.dumps([("bye",)]))
        self._outgoing.put(None)
        if self._sender.is_alive():
            self._sender.join(30)
        self.inbox.close()
        self.outbox.close()

    @property
    def alive(self) -> bool:
        return self.death is None

    def num_waiting(self) -> int:
        """Requests not yet running: those the core has not taken yet plus its waiting ones."""
        return int(self.snapshot.get("num_requests_waiting", 0)) + self._unaccepted

    # -- requests -----------------------------------------------------------------------------

    def submit(self, request_ids: list[str], makes: list[Make], stream: bool,
               lora: Any = None) -> Group:
        """Queue a group of requests (`lora`: the LoRARequest of the adapter they use)."""
        group = Group(request_ids, stream, asyncio.Queue())
        if self.death is not None:
            group.queue.put_nowait(Failed(RuntimeError(self.death), False, True))
            return group
        try:
            states = []
            for cid, rid, make in zip(self._cids, request_ids, makes):
                prompt, params = make(self)
                inputs = prompt_inputs(prompt, self.tokenizer, self.vocab_size)
                # the core checks again; here so that a bad prompt in a batch queues nothing
                check_request(inputs, params, self.max_model_len, self.vocab_size)
                states.append(RequestState.new(cid, rid, inputs, params, stream, group,
                                               self.tokenizer))
        except Exception as exc:  # reported to this request only
            client = is_client_error(exc)
            if not client:
                logger.exception("preparing a request failed")
            self.metrics.count_request("rejected_400" if client else "error")
            group.queue.put_nowait(Failed(exc, client))
            return group
        group.states = states
        for st in states:
            self._states[st.cid] = st
            ids = np.asarray(st.inputs.token_ids, dtype=np.int32)
            self._send(("add", st.cid, ids, st.inputs.cache_salt, st.params, lora))
        self._unaccepted += len(states)
        return group

    def abort(self, group: Group) -> None:
        """The client went away: drop the group's requests here and in the core."""
        live = [st for st in group.states if self._states.pop(st.cid, None) is not None]
        if live:
            for st in live:
                for _ in st.seqs:
                    self.metrics.count_request("abort")
            self._send(("abort", [st.cid for st in live]))
        group.closed = True

    def abort_all(self) -> None:
        """End every request with finish_reason 'abort' (the shutdown grace period is over)."""
        for st in list(self._states.values()):
            del self._states[st.cid]
            st.abort()
            self._send(("abort", [st.cid]))
            for _ in st.seqs:
                self.metrics.count_request("abort")
            if st.group.num_accepted == len(st.group.states):
                st.group.queue.put_nowait(st.output(self.tokenizer))
            else:
                self._fail(st.group, RuntimeError("the server is shutting down"), False)

    # -- the pipe -----------------------------------------------------------------------------

    def _send(self, command: tuple) -> None:
        """Queue a command; all of one event-loop turn's commands travel as one message."""
        if not self._commands:
            self._loop.call_soon(self._flush)
        self._commands.append(command)

    def _flush(self) -> None:
        commands, self._commands = self._commands, []
        if commands and self.death is None:
            self._outgoing.put(pickle.dumps(commands, protocol=5))

    def _send_loop(self) -> None:
        """The sender thread: writes each message whole, blocking while the pipe is full."""
        while (data := self._outgoing.get()) is not None:
            try:
                self.outbox.send_bytes(data)
            except OSError:
                self._loop.call_soon_threadsafe(self._died, "the engine core's pipe is closed")
                return

    def _on_readable(self) -> None:
        # A few messages per call, then back to the loop (it calls again while more wait), so
        # a frontend behind the core still serves its connections between them.
        try:
            for _ in range(4):
                if not self.inbox.poll():
                    return
                kind, body = pickle.loads(self.inbox.recv_bytes())
                if kind == "step":
                    self._on_step_safely(body)
        except (EOFError, OSError):
            self._died("the engine core exited")

    def _on_step_safely(self, msg: Step) -> None:
        """A bug while applying a message fails the requests in flight (503), as a failed
        engine step would, instead of leaving them waiting for tokens that were lost."""
        try:
            self._on_step(msg)
        except Exception as exc:  # reported to every request in flight
            logger.exception("applying the engine core's message failed")
            live = list(self._states.values())
            self._states.clear()
            if live:
                self._send(("abort", [st.cid for st in live]))
            for st in live:
                self.metrics.count_request("error")
                self._fail(st.group, exc, False)

    def _died(self, reason: str) -> None:
        if self.death is not None:
            return
        self.death = reason
        logger.error("%s; failing %d requests in flight", reason, len(self._states))
        if self._loop is not None and not self.inbox.closed:
            self._loop.remove_reader(self.inbox.fileno())
        live = list(self._states.values())
        self._states.clear()
        for st in live:
            self.metrics.count_request("error")
            self._fail(st.group, RuntimeError(reason), False, fatal=True)
        if self.on_death is not None:
            self.on_death(reason)

    def _fail(self, group: Group, error: BaseException, client: bool, fatal: bool = False) -> None:
        if not group.closed:
            group.closed = True
            group.queue.put_nowait(Failed(error, client, fatal))

    # -- one step's message -------------------------------------------------------------------

    def _on_step(self, msg: Step) -> None:
        self.snapshot = msg.snapshot
        states = self._states
        for cid in msg.accepted:
            st = states.get(cid)
            self._unaccepted -= 1
            if st is not None:
                group = st.group
                group.num_accepted += 1
                if group.num_accepted == len(group.states):
                    group.queue.put_nowait(Accepted([s.inputs.token_ids for s in group.states]))
        for cid, message, client in msg.rejected:
            self._unaccepted -= 1
            st = states.get(cid)
            if st is None:
                continue
            others = [s for s in st.group.states if states.pop(s.cid, None) is not None]
            others = [s.cid for s in others if s.cid != cid]
            if others:
                self._send(("abort", others))
            self.metrics.count_request("rejected_400" if client else "error")
            err = ValueError(message) if client else RuntimeError(message)
            self._fail(st.group, err, client)
        for cid, message in msg.failed:
            st = states.pop(cid, None)
            if st is not None:
                self.metrics.count_request("error")
                self._fail(st.group, RuntimeError(message), False)
        for cid, cached in msg.cached:
            if cid in states:
                states[cid].num_cached_tokens = cached
        for cid, packed in msg.prompt_logprobs:
            st = states.get(cid)
            if st is not None and st.prompt_logprobs is not None:
                st.prompt_logprobs.extend(e if e is None else decorate(self.tokenizer, self._texts, e)
                                          for e in packed.unpack())
        if msg.rows is not None:
            self._on_tokens(msg)

    def _on_tokens(self, msg: Step) -> None:
        states, tok = self._states, self.tokenizer
        now, wall = time.monotonic(), time.time()
        lps: dict[int, Any] = {}
        if msg.logprobs is not None:
            lps = dict(zip(msg.logprob_rows, msg.logprobs.unpack()))
        touched: dict[int, RequestState] = {}
        ttft, itl, e2e = [], [], []
        finishes = []
        for r, row in enumerate(msg.rows.tolist()):
            st = states.get(row[CID])
            if st is None:
                continue
            index = row[INDEX]
            seq = st.seqs[index]
            if seq.finish_reason is not None:
                continue
            stop = st.add_token(index, row[TOKEN], FINISH_NAMES[row[FINISH]], row[STOP_TOKEN],
                                lps.get(r), tok, self._texts)
            if stop is not None:
                finishes.append(("finish", st.cid, index, stop))
            touched[st.cid] = st
            group = st.group
            if group.first_token_at is None:
                group.first_token_at = now
                ttft.append(now - group.arrival)
            if seq.last_token_at is not None:
                itl.append(now - seq.last_token_at)
            seq.last_token_at = now
        for command in finishes:
            self._send(command)
        for st in touched.values():
            metrics = st.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = wall
            metrics.last_token_time = wall
            done = st.finished
            if done:
                metrics.finished_time = wall
                del states[st.cid]
                for seq in st.seqs:
                    self.metrics.count_request(seq.finish_reason)
                group = st.group
                if not any(s.cid in states for s in group.states):
                    e2e.append(now - group.arrival)
            if (done or st.stream) and not st.group.closed:
                st.group.queue.put_nowait(st.output(tok))
        if ttft or itl or e2e:
            self.metrics.observe(ttft, itl, e2e)
