"""The server's engine core loop (server/engine_core.py) in process, over a real pipe: a
step that raises fails the requests in flight and frees their KV blocks; a request that
arrives while that step fails, and the ones after, are served normally; a frontend that
says goodbye aborts its requests and ends the loop, one that vanishes raises FrontendGone.
Runs without fastapi (the core needs only the engine and the standard library)."""

from __future__ import annotations

import pickle
import threading
from multiprocessing import Pipe

import numpy as np
import pytest
from conftest import make_llm, random_prompts

from novainfer import SamplingParams
from novainfer.server.engine_core import EngineCore, FrontendGone
from novainfer.server.wire import CID, FINISH, FINISH_NAMES, TOKEN


def _add(cid: int, prompt: list[int], params: SamplingParams) -> tuple:
    return ("add", cid, np.asarray(prompt, np.int32), None, params)


def _collect(conn, cids: set[int]) -> dict[int, tuple[list[int], str]]:
    """Read the core's messages until each cid finished or failed: (tokens, outcome)."""
    tokens: dict[int, list[int]] = {c: [] for c in cids}
    done: dict[int, tuple[list[int], str]] = {}
    while len(done) < len(cids):
        assert conn.poll(120), "the core sent nothing"  # a hang guard
        kind, msg = pickle.loads(conn.recv_bytes())
        assert kind == "step"
        for cid, error in msg.failed:
            done[cid] = (tokens[cid], "failed: " + error)
        for cid, _, _ in msg.rejected:
            done[cid] = (tokens[cid], "rejected")
        for row in (msg.rows.tolist() if msg.rows is not None else []):
            tokens[row[CID]].append(row[TOKEN])
            if row[FINISH]:
                done[row[CID]] = (tokens[row[CID]], FINISH_NAMES[row[FINISH]])
    return done


def test_step_failure_fails_in_flight_requests_and_keeps_serving(checkpoint):
    llm = make_llm(checkpoint("llama"))
    prompt = random_prompts([9], seed=5)[0]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    want = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    inner = llm.llm_engine
    inner.detokenize = False
    core_in, frontend = Pipe(duplex=False)
    frontend_in, core_out = Pipe(duplex=False)
    core = EngineCore(inner, [(core_in, core_out)])
    real_advance, calls = inner.advance, {"n": 0}

    def flaky_advance():
        calls["n"] += 1
        if calls["n"] == 3:  # mid-generation, after the prefill
            # a request that arrives while the failing step runs: not in flight yet
            frontend.send_bytes(pickle.dumps([_add(2, prompt, params)]))
            raise RuntimeError("injected engine failure")
        return real_advance()

    inner.advance = flaky_advance
    thread = threading.Thread(target=core.run, daemon=True)
    thread.start()
    try:
        frontend.send_bytes(pickle.dumps([_add(1, prompt, params)]))
        first = _collect(frontend_in, {1, 2})
        assert first[1][1].startswith("failed: RuntimeError: injected")
        assert first[2] == (want, "length")
        frontend.send_bytes(pickle.dumps([_add(3, prompt, params),
                                          _add(4, [prompt[0]] * inner.max_model_len, params)]))
        second = _collect(frontend_in, {3, 4})
        assert second[3] == (want, "length") and second[4][1] == "rejected"
        assert not inner.has_unfinished_requests()
        assert inner.block_manager.num_free_blocks == inner.runner.num_blocks  # nothing leaked
        # goodbye with a request in flight: it is aborted and the loop ends
        frontend.send_bytes(pickle.dumps([_add(5, prompt, SamplingParams(max_tokens=100)),
                                          ("bye",)]))
        thread.join(120)
        assert not thread.is_alive()
        assert not inner.has_unfinished_requests()
        assert inner.block_manager.num_free_blocks == inner.runner.num_blocks
    finally:
        frontend.close()
        thread.join(120)


def test_vanished_frontend_ends_the_loop(checkpoint):
    llm = make_llm(checkpoint("llama"))
    core_in, frontend = Pipe(duplex=False)
    frontend.close()
    with pytest.raises(FrontendGone):
        EngineCore(llm.llm_engine, [(core_in, Pipe(duplex=False)[1])]).run()


def _step_messages(conn):
    while True:
        assert conn.poll(120), "the core sent nothing"  # a hang guard
        kind, msg = pickle.loads(conn.recv_bytes())
        assert kind == "step"
        yield msg


def test_queued_messages_are_all_applied_in_one_turn(checkpoint):
    """Three requests sent as three messages before the loop starts: one turn admits all
    three (a burst is not admitted one message per model step)."""
    llm = make_llm(checkpoint("llama"))
    core_in, frontend = Pipe(duplex=False)
    frontend_in, core_out = Pipe(duplex=False)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for cid in range(3):
        frontend.send_bytes(pickle.dumps([_add(cid, random_prompts([6], seed=cid)[0], params)]))
    core = EngineCore(llm.llm_engine, [(core_in, core_out)])
    thread = threading.Thread(target=core.run, daemon=True)
    thread.start()
    try:
        first = next(_step_messages(frontend_in))
        assert sorted(first.accepted) == [0, 1, 2]
    finally:
        frontend.send_bytes(pickle.dumps([("bye",)]))
        thread.join(120)
        assert not thread.is_alive()


def test_a_frontend_leaving_mid_step_does_not_stop_the_others(checkpoint):
    """Frontend B says goodbye and closes its pipes while the core is busy with A's request:
    the core must not take B's closed pipe for a crash; A's request runs to the end."""
    llm = make_llm(checkpoint("llama"))
    a_core_in, a_out = Pipe(duplex=False)
    a_in, a_core_out = Pipe(duplex=False)
    b_core_in, b_out = Pipe(duplex=False)
    b_in, b_core_out = Pipe(duplex=False)
    core = EngineCore(llm.llm_engine, [(a_core_in, a_core_out), (b_core_in, b_core_out)])
    errors: list[BaseException] = []

    def run() -> None:
        try:
            core.run()
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    prompt = random_prompts([9], seed=5)[0]
    a_out.send_bytes(pickle.dumps([_add(1, prompt, SamplingParams(
        temperature=0.0, max_tokens=60, ignore_eos=True))]))
    steps = _step_messages(a_in)
    while not any(m.rows is not None for m in [next(steps)]):
        pass  # A's request is running
    b_out.send_bytes(pickle.dumps([("bye",)]))
    b_in.close()
    b_out.close()
    done = _collect(a_in, {1})
    assert done[1][1] == "length" and len(done[1][0]) >= 1
    a_out.send_bytes(pickle.dumps([("bye",)]))
    thread.join(120)
    assert not thread.is_alive() and not errors, errors
