"""vLLM API pieces a migrating user reaches for first: prompt dicts, prompt_logprobs (against
transformers), include_stop_str_in_output, skip_special_tokens /
spaces_between_special_tokens, the chat prompt string, RequestOutput.metrics, and prompts
that tokenize to nothing."""

from __future__ import annotations

import itertools
import time

import pytest
import torch
from conftest import (
    BOS_ID,
    build_tokenizer,
    completion_tokens,
    hf_greedy,
    hf_model,
    make_llm,
    random_prompts,
)

from novainfer import SamplingParams
from novainfer.engine import model_runner
from novainfer.engine.detokenizer import IncrementalDetokenizer, decode
from novainfer.engine.sampler import Samples

MAX_TOKENS = 12


def greedy(max_tokens: int = MAX_TOKENS, **kw) -> SamplingParams:
    kw.setdefault("ignore_eos", True)
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


@pytest.fixture(scope="module")
def model_dir(checkpoint):
    return checkpoint("llama")


@pytest.fixture(scope="module")
def llm(model_dir):
    return make_llm(model_dir, kv_cache_memory=16 << 20)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


# --------------------------------------------------------------------------- prompt forms


def test_prompt_dicts_match_plain_prompts(llm, model_dir, tokenizer):
    ids = random_prompts([20], seed=3)[0]
    text = "hello the capital of france is"
    expected = hf_greedy(model_dir, [ids, tokenizer(text).input_ids], MAX_TOKENS)
    outs = llm.generate([{"prompt_token_ids": ids}, {"prompt": text}], greedy(), use_tqdm=False)
    assert completion_tokens(outs) == expected
    assert outs[0].prompt is None and outs[1].prompt == text
    one = llm.generate({"prompt": text}, greedy(), use_tqdm=False)  # a single dict prompt
    assert completion_tokens(one) == expected[1:]


@pytest.mark.parametrize("bad,match", [
    ({"text": "hi"}, "allowed"),
    ({"prompt": "hi", "prompt_token_ids": [5]}, "not both"),
    ({"prompt_token_ids": [5], "extra": 1}, "allowed"),
    ({"prompt": 5}, "prompt\\['prompt'\\] must be a string"),
    ({"prompt_token_ids": "5 6"}, "must be a list of ints"),
    ({"prompt_token_ids": []}, "must not be empty"),
    ({"prompt_token_ids": [10**6]}, "out of range"),
])
def test_bad_prompt_dicts_are_rejected(llm, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        llm.generate([{"prompt_token_ids": [5, 6]}, bad], greedy(), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()  # nothing of the batch was queued


def test_prompt_that_tokenizes_to_nothing_is_rejected(llm, tokenizer):
    """Some tokenizers encode whitespace to no ids at all (ours adds BOS, so its encode is
    wrapped to behave like them)."""
    text = " \n "
    engine = llm.llm_engine
    real = engine.tokenizer.encode
    engine.tokenizer.encode = lambda t: [] if not t.strip() else real(t)
    try:
        with pytest.raises(ValueError, match="tokenizes to no tokens"):
            llm.generate(text, greedy(), use_tqdm=False)
        with pytest.raises(ValueError, match="tokenizes to no tokens"):
            engine.add_request("ws", {"prompt": text}, greedy())
    finally:
        engine.tokenizer.encode = real
    assert not engine.has_unfinished_requests()
    assert llm.generate("hello", greedy(2), use_tqdm=False)[0].outputs[0].token_ids


# --------------------------------------------------------------------------- prompt logprobs


def _hf_prompt_logprobs(model_dir, ids) -> torch.Tensor:
    """Row p - 1 is transformers' log-distribution of prompt token p."""
    with torch.no_grad():
        logits = hf_model(model_dir)(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1)


def _check_prompt_logprobs(entries, ids, ref, k):
    assert len(entries) == len(ids) and entries[0] is None
    for p in range(1, len(ids)):
        entry, row = entries[p], ref[p - 1]
        token = ids[p]
        assert entry[token].logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        top = row.topk(k)
        ranked = {tid: lp for tid, lp in entry.items() if lp.rank <= k}
        assert len(ranked) == k and len(entry) in (k, k + 1)
        for r, (tid, value) in enumerate(zip(top.indices.tolist(), top.values.tolist()), 1):
            assert ranked[tid].rank == r and ranked[tid].logprob == pytest.approx(value, abs=1e-4)
        assert entry[token].decoded_token is not None


@pytest.mark.parametrize("chunk", [None, 16])
def test_prompt_logprobs_match_transformers(model_dir, chunk):
    """Whole-prompt and chunked prefill (16-token chunks), n=2, and a prompt whose prefix
    is already in the prefix cache: every position is still computed and reported."""
    kw = {"max_num_batched_tokens": chunk} if chunk else {}
    llm = make_llm(model_dir, kv_cache_memory=16 << 20, **kw)
    ids = random_prompts([45], seed=31)[0]
    ref = _hf_prompt_logprobs(model_dir, ids)
    llm.generate([ids], greedy(), use_tqdm=False)  # caches the prompt's blocks
    out = llm.generate([ids], greedy(prompt_logprobs=3, n=2), use_tqdm=False)[0]
    _check_prompt_logprobs(out.prompt_logprobs, ids, ref, 3)
    assert out.num_cached_tokens == 0
    assert [list(c.token_ids) for c in out.outputs] == hf_greedy(model_dir, [ids], MAX_TOKENS) * 2
    zero = llm.generate([ids], greedy(prompt_logprobs=0), use_tqdm=False)[0].prompt_logprobs
    assert all(len(e) == 1 for e in zero[1:])  # only the prompt's own token
    assert llm.generate([ids], greedy(), use_tqdm=False)[0].prompt_logprobs is None


def test_prompt_logprobs_survive_preemption(model_dir):
    """A request preempted mid-way recomputes its prompt; the entries are not repeated."""
    llm = make_llm(model_dir, num_kv_blocks=8, block_size=16, max_model_len=128,
                   max_num_batched_tokens=32)
    prompts = random_prompts([40, 30, 35], seed=32)
    outs = llm.generate(prompts, greedy(40, prompt_logprobs=1), use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    for ids, out in zip(prompts, outs):
        _check_prompt_logprobs(out.prompt_logprobs, ids, _hf_prompt_logprobs(model_dir, ids), 1)


# --------------------------------------------------------------------------- stop strings


def test_include_stop_str_in_output(llm, tokenizer):
    ids = random_prompts([30], seed=33)[0]
    full = llm.generate([ids], greedy(24), use_tqdm=False)[0].outputs[0]
    text = full.text
    stop = tokenizer.decode(full.token_ids[8:10])
    cut = text.index(stop)
    for stream in (False, True):
        got = _generate(llm, ids, greedy(24, stop=stop, include_stop_str_in_output=True), stream)
        assert got.text == text[: cut + len(stop)] and got.finish_reason == "stop"
        got = _generate(llm, ids, greedy(24, stop=stop), stream)
        assert got.text == text[:cut]
    i = next(i for i in range(4, 24) if full.token_ids[i] not in full.token_ids[:i])
    token = full.token_ids[i]
    for stream in (False, True):
        got = _generate(llm, ids, greedy(24, stop_token_ids=[token],
                                         include_stop_str_in_output=True), stream)
        assert got.text == tokenizer.decode(full.token_ids[: i + 1]) and got.stop_reason == token
        got = _generate(llm, ids, greedy(24, stop_token_ids=[token]), stream)
        assert got.text == tokenizer.decode(full.token_ids[:i])


_ids = itertools.count()


def _generate(llm, prompt, params, stream: bool):
    """One completion, through the streaming path (engine steps, incremental text) or not."""
    if not stream:
        return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    engine = llm.llm_engine
    rid = f"s{next(_ids)}"
    engine.add_request(rid, prompt, params, stream=True)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                return out.outputs[0]
    pytest.fail("the request did not finish")


# --------------------------------------------------------------------------- special tokens


@pytest.fixture()
def scripted(monkeypatch):
    """The sampler replaced by a script of tokens: special tokens where the test wants them."""

    def install(tokens: list[int]):
        it = iter(tokens)

        def sample(logits, seqs, eos_ids, generator):
            tokens = torch.tensor([next(it) for _ in seqs], device=logits.device)
            return Samples(tokens, None, [], [])

        monkeypatch.setattr(model_runner, "sample_tensors", sample)

    return install


def test_skip_special_tokens_and_spaces_between_them(llm, tokenizer, scripted):
    w = tokenizer.convert_tokens_to_ids
    script = [w("\u0120hello"), 3, w("\u0120paris"), 4, BOS_ID, w("\u0120w5")]
    assert {3, 4, BOS_ID} <= set(tokenizer.all_special_ids)
    expected = {
        (True, True): " hello paris w5",
        (False, False): " hello<|im_start|> paris<|im_end|><s> w5",
        (False, True): " hello <|im_start|>  paris <|im_end|> <s>  w5",
    }
    assert tokenizer.decode(script, skip_special_tokens=True) == expected[True, True]
    assert tokenizer.decode(script, skip_special_tokens=False) == expected[False, False]
    for (skip, spaces), text in expected.items():
        params = greedy(len(script), skip_special_tokens=skip,
                        spaces_between_special_tokens=spaces)
        for stream in (False, True):
            scripted(list(script))
            assert _generate(llm, [5, 6, 7], params, stream).text == text, (skip, spaces, stream)


def test_incremental_decode_equals_full_decode(tokenizer):
    """Streaming text built token by token equals the decode of all tokens, specials and
    all, for each setting."""
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        ids = torch.randint(0, 64, (30,), generator=g).tolist()
        for options in ((True, True), (False, True), (False, False)):
            detok = IncrementalDetokenizer(tokenizer, [BOS_ID, 9], *options)
            seq = [BOS_ID, 9]
            for t in ids:
                seq.append(t)
                detok.step(seq)
            assert detok.text == decode(tokenizer, ids, *options), (trial, options)


# --------------------------------------------------------------------------- chat, metrics


def test_chat_output_carries_the_rendered_prompt(llm, tokenizer):
    messages = [{"role": "user", "content": "what is the capital of france ?"}]
    out = llm.chat(messages, greedy(4), use_tqdm=False)[0]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out.prompt == rendered and "<|im_start|>" in rendered
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "input_ids") or isinstance(ids, dict) else ids
    assert out.prompt_token_ids == list(ids)


def test_request_metrics_follow_an_injected_clock(llm):
    engine = llm.llm_engine
    ticks = itertools.count(100)
    engine.clock = lambda: float(next(ticks))
    try:
        out = llm.generate([random_prompts([10], seed=4)[0]], greedy(3), use_tqdm=False)[0]
        m = out.metrics
        # arrival 100; each step reads the clock when scheduled and after the forward pass:
        # step 1 (prefill + first token) 101 / 102, steps 2 and 3 103 / 104 and 105 / 106.
        assert (m.arrival_time, m.first_scheduled_time, m.first_token_time) == (100, 101, 102)
        assert (m.last_token_time, m.finished_time, m.time_in_queue) == (106, 106, 1)
        engine.add_request("aborted", [5, 6, 7], greedy(50))
        engine.step()
        aborted = engine.abort_request("aborted").metrics
        assert aborted.arrival_time < aborted.first_token_time < aborted.finished_time
    finally:
        engine.clock = time.time
