"""The server's engine thread (server/async_engine.py) in process: a step that raises fails
the requests in flight with an engine error and frees their KV blocks; a request that
arrives while that step fails, and the ones after, are served normally. Runs without
fastapi (the engine thread needs only the standard library)."""

from __future__ import annotations

import asyncio

from conftest import make_llm, random_prompts

from novainfer import SamplingParams
from novainfer.server.async_engine import Accepted, AsyncEngine, Failed, Group
from novainfer.server.metrics import Metrics


async def _events(queue: asyncio.Queue) -> list:
    events = []
    while True:
        event = await asyncio.wait_for(queue.get(), timeout=60)
        events.append(event)
        if isinstance(event, Failed) or getattr(event, "finished", False):
            return events


async def _submit(engine: AsyncEngine, rid: str, make) -> list:
    return await _events(engine.submit([rid], [make], stream=False).queue)


def test_step_failure_fails_in_flight_requests_and_keeps_serving(checkpoint):
    llm = make_llm(checkpoint("llama"))
    prompt = random_prompts([9], seed=5)[0]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    want = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    inner = llm.llm_engine
    real_step, calls = inner.step, {"n": 0}
    engine = AsyncEngine(inner, Metrics("tiny"))
    # A request that arrives (is queued) while the failing step runs: not in flight yet.
    late_loop = asyncio.new_event_loop()
    late = Group(["late"], [lambda _e: (prompt, params)], False, late_loop, asyncio.Queue())

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 3:  # mid-generation, after the prefill
            engine._cmds.put(("add", late))
            raise RuntimeError("injected engine failure")
        return real_step()

    inner.step = flaky_step
    engine.start()
    try:
        first = asyncio.run(_submit(engine, "a", lambda _e: (prompt, params)))
        assert isinstance(first[0], Accepted)
        failure = first[-1]
        assert isinstance(failure, Failed) and not failure.client_error
        assert "injected" in str(failure.error)
        assert engine.alive
        queued = late_loop.run_until_complete(_events(late.queue))
        assert queued[-1].finished and queued[-1].outputs[0].token_ids == want
        second = asyncio.run(_submit(engine, "b", lambda _e: (prompt, params)))
        final = second[-1]
        assert final.finished and final.outputs[0].token_ids == want
        assert not inner.has_unfinished_requests()
        assert inner.block_manager.num_free_blocks == inner.runner.num_blocks  # nothing leaked
    finally:
        engine.stop()
        late_loop.close()
