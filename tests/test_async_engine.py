"""The server's engine thread (server/async_engine.py) in process: a step that raises fails
the requests in flight with an engine error, frees their KV blocks, and the next request is
served normally. Runs without fastapi (the engine thread needs only the standard library)."""

from __future__ import annotations

import asyncio

from conftest import make_llm, random_prompts

from novainfer import SamplingParams
from novainfer.server.async_engine import Accepted, AsyncEngine, Failed
from novainfer.server.metrics import Metrics


async def _collect(engine: AsyncEngine, rid: str, prompt: list[int], max_tokens: int) -> list:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    group = engine.submit([rid], [lambda _e: (prompt, params)], stream=False)
    events = []
    while True:
        event = await asyncio.wait_for(group.queue.get(), timeout=60)
        events.append(event)
        if isinstance(event, Failed) or getattr(event, "finished", False):
            return events


def test_step_failure_fails_in_flight_requests_and_keeps_serving(checkpoint):
    llm = make_llm(checkpoint("llama"))
    prompt = random_prompts([9], seed=5)[0]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    want = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    inner = llm.llm_engine
    real_step, calls = inner.step, {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 3:  # mid-generation, after the prefill
            raise RuntimeError("injected engine failure")
        return real_step()

    inner.step = flaky_step
    engine = AsyncEngine(inner, Metrics("tiny"))
    engine.start()
    try:
        first = asyncio.run(_collect(engine, "a", prompt, max_tokens=8))
        assert isinstance(first[0], Accepted)
        failure = first[-1]
        assert isinstance(failure, Failed) and not failure.client_error
        assert "injected" in str(failure.error)
        assert engine.alive
        second = asyncio.run(_collect(engine, "b", prompt, max_tokens=8))
        final = second[-1]
        assert final.finished and final.outputs[0].token_ids == want
        assert not inner.has_unfinished_requests()
        assert inner.block_manager.num_free_blocks == inner.runner.num_blocks  # nothing leaked
    finally:
        engine.stop()
