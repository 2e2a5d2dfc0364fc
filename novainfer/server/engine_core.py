"""The engine core process of `novainfer serve`: the scheduler, KV cache and model runner
(and the tensor-parallel workers it starts), driven by one loop that talks to the frontend
processes over pipes (server/wire.py says what crosses).

Each turn: apply every frontend's queued commands, run one model step when requests are in
flight, and send each frontend one message with its requests' new tokens (ids only: the
frontend owns the text). The core never imports the HTTP stack. It exits when every frontend
said goodbye, or as soon as one vanishes without it (a crashed frontend takes the core down
so that a supervisor restarts the whole server, rather than leaving a core nobody can reach).
"""

from __future__ import annotations

import logging
import pickle
import signal
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from novainfer.engine.llm_engine import LLMEngine, StepDelta
from novainfer.inputs import PromptInputs
from novainfer.server.wire import FINISH_CODES, PackedLogprobs, Step

logger = logging.getLogger("novainfer.core")


class FrontendGone(Exception):
    """A frontend's pipe closed without its goodbye: it crashed or was killed."""


class EngineCore:
    def __init__(self, engine: LLMEngine, links: list[tuple[Connection, Connection]]) -> None:
        """`links`: per frontend, the pipe it writes commands to and the one it reads from."""
        self.engine = engine
        self.conns = {i: inbox for i, (inbox, _) in enumerate(links)}  # until it says bye
        self.outboxes = {i: outbox for i, (_, outbox) in enumerate(links)}
        self.owner: dict[str, tuple[int, int]] = {}  # engine request id -> (frontend, cid)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.frontend_metrics: dict[int, dict] = {}  # relayed to the other frontends
        self._out: dict[int, Step] = {}

    def run(self) -> None:
        """Serve until every frontend has said goodbye; FrontendGone if one vanished."""
        engine = self.engine
        while self.conns:
            busy = engine.has_unfinished_requests()
            ready = wait(list(self.conns.values()), timeout=0 if busy else 1.0)
            for conn in ready:
                self._receive(next(i for i, c in self.conns.items() if c is conn))
            stepped = engine.has_unfinished_requests()
            if stepped:
                self._step()
            if ready or stepped:  # every frontend gets the fresh gauges
                for fi in self.conns:
                    self._message(fi)
                self._send()

    # -- commands ---------------------------------------------------------------------------

    def _receive(self, fi: int) -> None:
        """Apply every message frontend `fi` has queued (a burst of requests is admitted in
        one turn, and aborts and finishes never wait behind it)."""
        conn = self.conns[fi]
        while fi in self.conns and conn.poll():
            try:
                commands = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                raise FrontendGone(
                    f"frontend {fi} closed its pipe without saying goodbye") from None
            self._apply(fi, commands)

    def _apply(self, fi: int, commands: list[tuple]) -> None:
        for cmd in commands:
            kind = cmd[0]
            if kind == "add":
                self._add(fi, *cmd[1:])
            elif kind == "abort":
                for cid in cmd[1]:
                    self.engine.abort_request(_rid(fi, cid))
                    self.owner.pop(_rid(fi, cid), None)
            elif kind == "finish":
                _, cid, index, stop = cmd
                if self.engine.finish_sequence(_rid(fi, cid), index, stop):
                    self.owner.pop(_rid(fi, cid), None)
            elif kind == "metrics":
                self.frontend_metrics[fi] = cmd[1]
            elif kind == "bye":
                for rid in [r for r, (f, _) in self.owner.items() if f == fi]:
                    self.engine.abort_request(rid)
                    del self.owner[rid]
                del self.conns[fi]
                del self.outboxes[fi]
                self._out.pop(fi, None)
                return

    def _add(self, fi: int, cid: int, token_ids: np.ndarray, salt: str | None, params,
             lora=None) -> None:
        rid = _rid(fi, cid)
        ids = token_ids.tolist()
        try:
            self.engine.add_request(rid, PromptInputs(ids, None, salt), params, stream=True,
                                    lora_request=lora)
        except Exception as exc:  # noqa: BLE001 - reported to that request only
            client = isinstance(exc, (ValueError, TypeError))
            if not client:
                logger.error("add_request failed:\n%s", traceback.format_exc())
            self._message(fi).rejected.append((cid, str(exc), client))
            return
        self.owner[rid] = (fi, cid)
        self.prompt_tokens += len(ids)
        self._message(fi).accepted.append(cid)

    # -- steps ------------------------------------------------------------------------------

    def _step(self) -> None:
        try:
            delta = self.engine.advance()
        except Exception as exc:  # noqa: BLE001 - an engine bug: fail what is in flight, keep serving
            logger.error("engine step failed:\n%s", traceback.format_exc())
            self._fail_all(exc)
            return
        if delta is None:
            return
        self._pack(delta)
        self.engine.end_step(delta)

    def _pack(self, delta: StepDelta) -> None:
        rows: dict[int, list[int]] = {}  # frontend -> flat rows (CID, INDEX, TOKEN, ...)
        lps: dict[int, list] = {}
        owner = self.owner
        for seq, token, lp in delta.tokens:
            fi, cid = owner[seq.request_id]
            stop = seq.stop_reason if isinstance(seq.stop_reason, int) else -1
            out = rows.get(fi)
            if out is None:
                out = rows[fi] = []
            if lp is not None:
                lps.setdefault(fi, []).append((len(out) // 5, lp))
            out.extend((cid, seq.index, token, FINISH_CODES[seq.finish_reason], stop))
            if seq.index == 0 and len(seq.token_ids) - seq.num_prompt_tokens == 1:
                self._message(fi).cached.append((cid, seq.num_cached_tokens))
        self.generation_tokens += len(delta.tokens)
        for fi, fi_rows in rows.items():
            msg = self._message(fi)
            msg.rows = np.array(fi_rows, dtype=np.int64).reshape(-1, 5)
            if fi in lps:
                msg.logprob_rows = [r for r, _ in lps[fi]]
                msg.logprobs = PackedLogprobs.pack([lp for _, lp in lps[fi]])
        for seq, entries in delta.prompt_logprobs:
            fi, cid = self.owner[seq.request_id]
            self._message(fi).prompt_logprobs.append((cid, PackedLogprobs.pack(entries)))
        for request, done in delta.requests:
            if done:
                self.owner.pop(request.request_id, None)

    def _fail_all(self, exc: BaseException) -> None:
        for rid, (fi, cid) in list(self.owner.items()):
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001 - best effort
                logger.error("abort failed:\n%s", traceback.format_exc())
            if fi in self.conns:
                self._message(fi).failed.append((cid, f"{type(exc).__name__}: {exc}"))
        self.owner.clear()

    # -- messages ---------------------------------------------------------------------------

    def _message(self, fi: int) -> Step:
        msg = self._out.get(fi)
        if msg is None:
            msg = self._out[fi] = Step(snapshot={})
        return msg

    def _send(self) -> None:
        snapshot = self.snapshot()
        out, self._out = self._out, {}
        for fi, msg in out.items():
            if fi not in self.outboxes:
                continue
            msg.snapshot = snapshot
            try:
                self.outboxes[fi].send_bytes(pickle.dumps(("step", msg), protocol=5))
            except OSError:
                # A frontend that said goodbye while this turn ran has closed its end: its
                # "bye" waits in its pipe. Without one, it died.
                self._receive(fi)
                if fi in self.conns:
                    raise FrontendGone(f"frontend {fi} closed its pipe") from None

    def snapshot(self) -> dict[str, float]:
        """Gauges and counters for /health and /metrics, as of now."""
        engine = self.engine
        bm = engine.block_manager
        sched = engine.scheduler
        running = {s.request_id for s in sched.running}
        waiting = {s.request_id for s in sched.waiting} - running
        queries = bm.prefix_queries
        return {
            "num_requests_running": len(running),
            "num_requests_waiting": len(waiting),
            "kv_cache_usage_perc": bm.usage,
            "kv_free_blocks": bm.num_free_blocks,
            "kv_total_blocks": bm.num_blocks,
            "prefix_cache_queries_total": queries,
            "prefix_cache_hits_total": bm.prefix_hits,
            "prefix_cache_hit_rate": bm.prefix_hits / queries if queries else 0.0,
            "prompt_tokens_total": self.prompt_tokens,
            "generation_tokens_total": self.generation_tokens,
            "frontend_metrics": self.frontend_metrics,
        }


def set_process_name(name: str) -> None:
    """The name `ps` and /proc/PID/comm show (Linux; elsewhere nothing happens)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _rid(fi: int, cid: int) -> str:
    return f"{fi}-{cid}"


def run_core_process(config: Any, links: list[tuple[Connection, Connection]],
                     log_level: str = "INFO", loras: list | None = None) -> None:
    """Entry point of the spawned core process: build the engine and check the served LoRA
    adapters, say ready (or why not) to every frontend, serve, then stop the engine's
    workers."""
    # Ctrl-C and SIGTERM go to the frontends, which drain and then say goodbye.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    set_process_name("novainfer-core")
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = LLMEngine(config, detokenize=False)
        for lora in loras or ():
            engine.check_lora(lora)  # a bad adapter stops the server at startup
    except BaseException:  # noqa: BLE001 - reported to the frontends, which exit with it
        text = traceback.format_exc()
        for _, outbox in links:
            try:
                outbox.send_bytes(pickle.dumps(("failed", text)))
            except OSError:
                pass
        return
    core = EngineCore(engine, links)
    info = {"max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size,
            "tokenizer": str(config.tokenizer or engine.model_folder), "snapshot": core.snapshot()}
    try:
        for _, outbox in links:
            outbox.send_bytes(pickle.dumps(("ready", info)))
        core.run()
    except FrontendGone as exc:
        logger.error("%s; the engine core exits", exc)
    except OSError:  # a frontend stopped while the model loaded (Ctrl-C, SIGTERM)
        logger.error("a frontend left before the engine core was ready; it exits")
    finally:
        engine.shutdown()
