"""Asynchronous scheduling: the engine launches step N+1 before it collects step N, so the
host's work overlaps the device's (engine/llm_engine.py, `advance`).

It is off on the CPU by default, so it is tested here with it forced on: every engine
feature test and every engine-core test runs again overlapped (the star imports below),
and the tests in this file check that the overlap really happens, that it gives the same
tokens as synchronous steps (greedy, seeded, logprobs, stop rules, n > 1, preemption,
chunked prefill, the prefix cache, two tensor-parallel ranks), that a sequence ended by a
token it could not know about gets no extra token, and that aborts and requests that need
synchronous steps behave.
"""

from __future__ import annotations

import pytest
import test_engine_core
import test_engine_features
from conftest import (
    ASYNC_SCHEDULING,
    TIGHT,
    completion_tokens,
    hf_greedy,
    make_llm,
    random_prompts,
)
from test_engine_core import *  # the same tests, with overlapped engines
from test_engine_features import *

from novainfer import SamplingParams
from novainfer.config import EngineConfig

assert test_engine_core and test_engine_features  # their tests are collected here too



@pytest.fixture(scope="module", autouse=True)
def _overlapped_engines():
    ASYNC_SCHEDULING[0] = True
    yield
    ASYNC_SCHEDULING[0] = None


class Overlaps:
    """Counts, on an engine's runner, launches made while another step was not collected."""

    def __init__(self, engine) -> None:
        self.uncollected = 0
        self.overlapped = 0
        self.launches = 0
        runner = engine.runner
        launch, collect = runner.launch, runner.collect

        def counted_launch(*args, **kwargs):
            self.launches += 1
            self.overlapped += self.uncollected > 0
            step = launch(*args, **kwargs)
            self.uncollected += 1
            return step

        def counted_collect(step):
            self.uncollected -= 1
            return collect(step)

        runner.launch, runner.collect = counted_launch, counted_collect


def _outputs(outs) -> list:
    """Everything a user sees (logprobs as floats: compare with `_same`)."""
    def lps(c):
        if c.logprobs is None:
            return None
        return [{t: lp.logprob for t, lp in pos.items()} for pos in c.logprobs]

    return [[(list(c.token_ids), c.text, c.finish_reason, c.stop_reason, lps(c))
             for c in o.outputs] for o in outs]


def _same(got, want, tol: float = 1e-4) -> bool:
    """`_outputs` equal, logprobs within `tol` (batch composition and the ranks' summation
    order move the last bits; rounding to 4 places instead flipped on a value at the edge)."""
    if isinstance(got, float) and isinstance(want, float):
        return abs(got - want) <= tol
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(_same(got[k], want[k], tol) for k in got)
    if isinstance(got, (list, tuple)) and isinstance(want, (list, tuple)):
        return len(got) == len(want) and all(_same(a, b, tol) for a, b in zip(got, want))
    return got == want


def _mixed_params(stop_token: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=40),  # may meet EOS
        SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=30, logprobs=2),
        SamplingParams(temperature=0.7, seed=5, n=2, max_tokens=25, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[stop_token],
                       ignore_eos=True),
        SamplingParams(temperature=1.0, seed=9, max_tokens=35, stop=["w1"], min_tokens=3),
    ]


def test_same_outputs_overlapped_and_synchronous(checkpoint):
    """Greedy, seeded (alone and n=2), logprobs, EOS, stop tokens and stop strings, through
    preemption, chunked prefill and the prefix cache: identical outputs either way."""
    folder = checkpoint("llama")
    prompts = random_prompts([20, 45, 7, 33, 60], seed=50)
    sync = make_llm(folder, async_scheduling=False, **TIGHT)
    stop_token = sync.generate(prompts[3:4], SamplingParams(temperature=0.0, max_tokens=6,
                               ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids[4]
    params = _mixed_params(stop_token)
    want = sync.generate(prompts, params, use_tqdm=False)
    llm = make_llm(folder, async_scheduling=True, **TIGHT)
    overlaps = Overlaps(llm.llm_engine)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert _same(_outputs(got), _outputs(want)), (_outputs(got), _outputs(want))
    assert got[3].outputs[0].finish_reason == "stop" and got[3].outputs[0].stop_reason == stop_token
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert overlaps.overlapped > overlaps.launches // 2  # most steps were launched overlapped


def test_a_stop_found_late_adds_no_token_and_frees_every_block(checkpoint):
    """A greedy sequence ended by a stop token: the step launched before the host saw that
    token computes one more for it, which is dropped; the cache is empty afterwards."""
    folder = checkpoint("llama")
    prompt = random_prompts([12], seed=51)[0]
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    full = make_llm(folder, async_scheduling=False).generate([prompt], greedy,
                                                              use_tqdm=False)[0].outputs[0]
    stop_at = full.token_ids[5]
    first = full.token_ids.index(stop_at)
    llm = make_llm(folder, async_scheduling=True)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True,
                            stop_token_ids=[stop_at])
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert list(out.token_ids) == list(full.token_ids[: first + 1])
    assert out.finish_reason == "stop"
    # One prefill and `first` decodes produced first + 1 tokens; one more step was launched.
    assert engine.num_steps == first + 2
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_length_limits_cost_no_extra_step(checkpoint):
    """max_tokens is known in advance: the scheduler does not compute past it."""
    llm = make_llm(checkpoint("llama"), async_scheduling=True)
    out = llm.generate(random_prompts([8], seed=52), SamplingParams(
        temperature=0.0, max_tokens=7, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
    assert llm.llm_engine.num_steps == 7


def test_abort_while_its_step_is_in_flight(checkpoint):
    folder = checkpoint("llama")
    prompts = random_prompts([10, 14], seed=53)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    alone = make_llm(folder).generate(prompts[1:], params, use_tqdm=False)
    llm = make_llm(folder, async_scheduling=True)
    engine = llm.llm_engine
    engine.add_request("a", prompts[0], params)
    engine.add_request("b", prompts[1], params)
    for _ in range(4):
        engine.step()
    assert engine._in_flight is not None
    aborted = engine.abort_request("a")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert set(outs) == {"b"}
    assert completion_tokens([outs["b"]]) == completion_tokens(alone)
    engine.step()  # collects the last launched step
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_requests_that_read_the_history_run_synchronously(checkpoint):
    """Penalties read every token so far: while such a request is in the engine, each step
    is collected before the next is scheduled; overlap resumes when it leaves."""
    folder = checkpoint("llama")
    prompts = random_prompts([9, 16], seed=54)
    penalized = SamplingParams(temperature=0.0, max_tokens=6, repetition_penalty=1.3,
                               frequency_penalty=0.5, ignore_eos=True)
    plain = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    want = make_llm(folder, async_scheduling=False).generate(prompts, [penalized, plain],
                                                             use_tqdm=False)
    llm = make_llm(folder, async_scheduling=True)
    engine = llm.llm_engine
    overlaps = Overlaps(engine)
    engine.add_request("pen", prompts[0], penalized)
    engine.add_request("plain", prompts[1], plain)
    outs, overlapped_while_penalized = {}, 0
    while engine.has_unfinished_requests():
        if "pen" in engine.requests:
            before = overlaps.overlapped
            outs.update({o.request_id: o for o in engine.step() if o.finished})
            overlapped_while_penalized += overlaps.overlapped - before
        else:
            outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert overlapped_while_penalized == 0
    assert overlaps.overlapped > 10  # the plain request's later steps
    assert completion_tokens([outs["pen"], outs["plain"]]) == completion_tokens(want)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_two_ranks_overlapped_match_transformers(checkpoint, name):
    """Tensor parallelism (gloo): rank 0 shares each step's samples with the other rank,
    which reads its pending input tokens from them."""
    folder = checkpoint(name)
    prefix = random_prompts([20], seed=40)[0]
    prompts = [prefix + t for t in random_prompts([12, 30, 3], seed=41)]
    expected = hf_greedy(folder, prompts, 40)
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    with make_llm(folder, tensor_parallel_size=2, async_scheduling=True, **TIGHT) as llm:
        overlaps = Overlaps(llm.llm_engine)
        assert completion_tokens(llm.generate(prompts, greedy, use_tqdm=False)) == expected
        assert llm.llm_engine.scheduler.num_preemptions > 0
        assert overlaps.overlapped > 0


def test_two_ranks_overlapped_sample_as_one_synchronous_rank(checkpoint):
    folder = checkpoint("llama")
    prompts = random_prompts([9, 33, 17], seed=42)
    params = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=7, n=2,
                             logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=12, logprobs=0),
              SamplingParams(temperature=1.0, max_tokens=15, seed=8, stop=["w1"])]
    want = make_llm(folder, async_scheduling=False).generate(prompts, params, use_tqdm=False)
    with make_llm(folder, tensor_parallel_size=2, async_scheduling=True) as llm:
        got = llm.generate(prompts, params, use_tqdm=False)
    assert _same(_outputs(got), _outputs(want)), (_outputs(got), _outputs(want))


def test_async_scheduling_setting_is_checked():
    with pytest.raises(TypeError, match="async_scheduling must be True, False or None"):
        EngineConfig(device="cpu", async_scheduling="yes")
    assert not EngineConfig(device="cpu").overlaps_steps()
    assert EngineConfig(device="cpu", async_scheduling=True).overlaps_steps()


def test_timing_turned_on_mid_flight_records_only_timed_steps(checkpoint):
    """The step launched before the timer was set is collected untimed (no bogus record);
    from then on steps run synchronously and are timed."""
    llm = make_llm(checkpoint("llama"), async_scheduling=True)
    engine = llm.llm_engine
    engine.add_request("r", random_prompts([9], seed=55)[0],
                       SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine._in_flight is not None
    timer = engine.enable_step_timing()
    engine.step()  # collects the step in flight
    assert engine._in_flight is None and not timer.steps
    engine.step()
    assert len(timer.steps) == 1
    engine.disable_step_timing()
    while engine.has_unfinished_requests():
        engine.step()
