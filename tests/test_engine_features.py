"""Engine features: prefix caching, preemption, chunked prefill, batching, sampling
controls (seeds, n, stop conditions, EOS, min/max tokens, logprobs, penalties) and chat.

Greedy results are always checked against transformers (conftest.hf_greedy), never only
against another novainfer configuration.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    BOS_ID,
    EOS_ID,
    MIN_GREEDY_MARGIN,
    VOCAB_SIZE,
    build_tokenizer,
    completion_tokens,
    copy_checkpoint,
    hf_greedy,
    hf_logprobs,
    hf_next_logits,
    random_prompts,
)
from conftest import make_llm as _make_llm

from novainfer import SamplingParams

MODEL = "llama_untied"  # 3 layers, GQA ratio 4, untied lm_head: the most "diverse" tiny model
MAX_TOKENS = 24


def make_llm(model_dir, **kwargs):
    """Engines with a small KV budget (32 MiB, still ~87k tokens for this model) instead
    of the 2 GiB CPU default: much faster to build and light on CI memory."""
    if "num_kv_blocks" not in kwargs:
        kwargs.setdefault("kv_cache_memory", 32 << 20)
    return _make_llm(model_dir, **kwargs)


def greedy(max_tokens=MAX_TOKENS, **kw) -> SamplingParams:
    kw.setdefault("ignore_eos", True)
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


@pytest.fixture(scope="module")
def model_dir(checkpoint):
    return checkpoint(MODEL)


@pytest.fixture(scope="module")
def llm(model_dir):
    """Default-configured engine shared by most tests (prefix caching on)."""
    return make_llm(model_dir)


@pytest.fixture(scope="module")
def tokenizer():
    """Independent copy of the checkpoint tokenizer (not the engine's)."""
    return build_tokenizer()


@pytest.fixture(scope="module")
def prompts():
    """Prompts of assorted lengths (no shared prefixes)."""
    return random_prompts([1, 5, 16, 17, 40, 90, 150], seed=11)


@pytest.fixture(scope="module")
def expected(model_dir, prompts):
    return hf_greedy(model_dir, prompts, MAX_TOKENS)


@pytest.fixture(scope="module")
def shared_prefix_prompts():
    """Prompts sharing a 70-token prefix (4+ full blocks of 16) with different tails."""
    prefix = random_prompts([70], seed=21)[0]
    tails = random_prompts([1, 3, 16, 30], seed=22)
    return [prefix + t for t in tails]


@pytest.fixture(scope="module")
def shared_prefix_expected(model_dir, shared_prefix_prompts):
    return hf_greedy(model_dir, shared_prefix_prompts, MAX_TOKENS)


# --------------------------------------------------------------------------- scheduling / KV


def test_batch_matches_transformers_and_single_requests(llm, prompts, expected):
    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    assert completion_tokens(outs) == expected
    assert all(o.finished and o.prompt is None for o in outs)  # token-id prompts: no text
    assert len({o.request_id for o in outs}) == len(outs)
    # batch-composition independence: each prompt alone gives the same tokens
    for prompt, exp in zip(prompts, expected):
        alone = completion_tokens(llm.generate([prompt], greedy(), use_tqdm=False))[0]
        assert alone == exp, f"prompt len {len(prompt)}: alone {alone} vs batch/reference {exp}"


def test_outputs_follow_prompt_order_with_per_prompt_params(llm, prompts, expected):
    """A list of SamplingParams (one per prompt) applies element-wise, results keep order."""
    lengths = [3, 9, 1, 24, 7, 12, 5]
    params = [greedy(max_tokens=n) for n in lengths]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    for out, n, exp in zip(outs, lengths, expected):
        assert list(out.outputs[0].token_ids) == exp[:n]
        assert out.outputs[0].finish_reason == "length"


def test_prefix_caching_on_off_same_outputs(
    llm, model_dir, shared_prefix_prompts, shared_prefix_expected
):
    off = make_llm(model_dir, enable_prefix_caching=False)
    outs_off = off.generate(shared_prefix_prompts, greedy(), use_tqdm=False)
    assert completion_tokens(outs_off) == shared_prefix_expected
    assert all(o.num_cached_tokens == 0 for o in outs_off)

    # Caching on: first pass (may already share the prefix inside the batch) ...
    first = llm.generate(shared_prefix_prompts, greedy(), use_tqdm=False)
    assert completion_tokens(first) == shared_prefix_expected
    # ... then each prompt again, one at a time: its blocks are now cached.
    for prompt, exp in zip(shared_prefix_prompts, shared_prefix_expected):
        out = llm.generate([prompt], greedy(), use_tqdm=False)[0]
        assert list(out.outputs[0].token_ids) == exp
        assert 0 < out.num_cached_tokens < len(prompt), (len(prompt), out.num_cached_tokens)


def test_prefix_cache_reused_by_a_different_prompt(llm, model_dir, shared_prefix_prompts):
    """A new prompt that only shares the prefix reuses its cached KV and is still exact."""
    llm.generate([shared_prefix_prompts[0]], greedy(), use_tqdm=False)
    new_prompt = shared_prefix_prompts[0][:70] + random_prompts([25], seed=99)[0]
    exp = hf_greedy(model_dir, [new_prompt], MAX_TOKENS)[0]
    out = llm.generate([new_prompt], greedy(), use_tqdm=False)[0]
    assert out.num_cached_tokens >= 64  # at least the 4 full blocks of the shared prefix
    assert list(out.outputs[0].token_ids) == exp


def test_prefix_cache_full_block_aligned_hit(llm, model_dir):
    """A repeated prompt made only of full blocks (64 = 4 x 16 tokens) is entirely cached;
    the engine must still compute the last prompt position to get the first logits."""
    prompt = random_prompts([64], seed=77)[0]
    exp = hf_greedy(model_dir, [prompt], MAX_TOKENS)[0]
    for _ in range(2):
        out = llm.generate([prompt], greedy(), use_tqdm=False)[0]
        assert list(out.outputs[0].token_ids) == exp
        assert out.num_cached_tokens < len(prompt)
    assert out.num_cached_tokens > 0


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_recompute_is_exact(model_dir, prefix_caching):
    # 8 blocks of 16 tokens = 128 slots. Each sequence grows to 20 + 40 = 60 tokens
    # (4 blocks) and 8 of them are queued, so the scheduler must preempt.
    llm = make_llm(
        model_dir,
        num_kv_blocks=8,
        block_size=16,
        max_model_len=128,
        enable_prefix_caching=prefix_caching,
    )
    prompts = random_prompts([20, 18, 22, 20, 17, 21, 19, 20], seed=33)
    exp = hf_greedy(model_dir, prompts, 40)
    outs = llm.generate(prompts, greedy(max_tokens=40), use_tqdm=False)
    assert completion_tokens(outs) == exp
    assert llm.llm_engine.scheduler.num_preemptions > 0


def test_preemption_keeps_seeded_samples(model_dir):
    """Preempted (recomputed) sequences keep the tokens they already sampled and continue
    their own random stream: same tokens as each seeded request run alone."""
    prompts = random_prompts([20, 18, 22, 20, 17, 21, 19, 20], seed=34)
    params = [
        SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True, seed=100 + k)
        for k in range(len(prompts))
    ]
    small = make_llm(model_dir, num_kv_blocks=8, block_size=16, max_model_len=128)
    outs = completion_tokens(small.generate(prompts, params, use_tqdm=False))
    assert small.llm_engine.scheduler.num_preemptions > 0
    big = make_llm(model_dir)
    alone = [
        completion_tokens(big.generate([p], sp, use_tqdm=False))[0]
        for p, sp in zip(prompts, params)
    ]
    assert outs == alone


def test_chunked_prefill(model_dir):
    llm = make_llm(model_dir, max_num_batched_tokens=32, max_num_seqs=2)
    prompts = random_prompts([50, 90, 7, 130, 33], seed=44)
    exp = hf_greedy(model_dir, prompts, 16)
    outs = llm.generate(prompts, greedy(max_tokens=16), use_tqdm=False)
    assert completion_tokens(outs) == exp


def test_max_num_seqs_1(model_dir, prompts, expected):
    llm = make_llm(model_dir, max_num_seqs=1)
    outs = llm.generate(prompts[:4], greedy(), use_tqdm=False)
    assert completion_tokens(outs) == expected[:4]


# --------------------------------------------------------------------------- text prompts / detokenization


def test_string_prompt_and_text(llm, model_dir, tokenizer):
    text = "hello the capital of w7 w300 is w12"
    ids = tokenizer(text).input_ids
    assert ids[0] == BOS_ID
    out = llm.generate(text, greedy(), use_tqdm=False)[0]
    assert out.prompt == text
    assert out.prompt_token_ids == ids
    exp = hf_greedy(model_dir, [ids], MAX_TOKENS)[0]
    comp = out.outputs[0]
    assert list(comp.token_ids) == exp
    assert comp.text == tokenizer.decode(exp, skip_special_tokens=True)


def test_text_is_detokenized_token_ids(llm, prompts, tokenizer):
    for out in llm.generate(prompts, greedy(), use_tqdm=False):
        comp = out.outputs[0]
        assert comp.text == tokenizer.decode(comp.token_ids, skip_special_tokens=True)


# --------------------------------------------------------------------------- stop conditions


def test_max_tokens_gives_length(llm, prompts, expected):
    assert EOS_ID not in expected[4][:5]
    comp = llm.generate(
        [prompts[4]], SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False
    )[0].outputs[0]
    assert list(comp.token_ids) == expected[4][:5]
    assert comp.finish_reason == "length"


def test_stop_string(llm, prompts, tokenizer):
    prompt = prompts[5]
    full = llm.generate([prompt], greedy(), use_tqdm=False)[0].outputs[0]
    full_text = tokenizer.decode(full.token_ids, skip_special_tokens=True)
    stop = tokenizer.decode(full.token_ids[10:12])  # two words from the middle, e.g. "w3 w17"
    cut = full_text.index(stop)
    assert cut > 0

    comp = llm.generate([prompt], greedy(stop=stop), use_tqdm=False)[0].outputs[0]
    assert comp.text == full_text[:cut]
    assert stop not in comp.text
    assert comp.finish_reason == "stop"
    assert comp.stop_reason == stop
    # generation stopped as soon as the stop string appeared
    n = len(comp.token_ids)
    assert list(comp.token_ids) == list(full.token_ids[:n])
    assert stop in tokenizer.decode(comp.token_ids)
    assert stop not in tokenizer.decode(comp.token_ids[:-1])


def _first_new_token_at_or_after(tokens, start):
    for i in range(start, len(tokens)):
        if tokens[i] not in tokens[:i]:
            return i
    pytest.fail(f"no token at position >= {start} that does not occur earlier: {tokens}")


def test_stop_token_ids(llm, prompts, expected, tokenizer):
    exp = expected[6]
    i = _first_new_token_at_or_after(exp, 4)  # the 5th greedy token (or first new one after)
    comp = llm.generate([prompts[6]], greedy(stop_token_ids=[exp[i]]), use_tqdm=False)[0].outputs[0]
    assert list(comp.token_ids) == exp[: i + 1]
    assert comp.finish_reason == "stop"
    assert comp.stop_reason == exp[i]
    assert comp.text == tokenizer.decode(exp[:i])  # like EOS, the stop token is not text


@pytest.fixture(scope="module")
def eos_case(model_dir, prompts, expected, tmp_path_factory):
    """A copy of the checkpoint whose generation_config lists a token that greedy decoding
    produces (at position i) as an extra EOS: (llm, prompt, greedy tokens, i)."""
    exp = expected[5]
    i = _first_new_token_at_or_after(exp, 2)
    folder = copy_checkpoint(model_dir, tmp_path_factory.mktemp("eos") / "ckpt")
    gen_cfg_path = folder / "generation_config.json"
    gen_cfg = json.loads(gen_cfg_path.read_text())
    gen_cfg["eos_token_id"] = [EOS_ID, exp[i]]
    gen_cfg_path.write_text(json.dumps(gen_cfg))
    return make_llm(folder), prompts[5], exp, i


def test_eos_from_generation_config(eos_case, tokenizer):
    llm, prompt, exp, i = eos_case
    comp = llm.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False
    )[0].outputs[0]
    assert list(comp.token_ids) == exp[: i + 1]  # EOS is included in token_ids ...
    assert comp.finish_reason == "stop"
    assert comp.text == tokenizer.decode(exp[:i])  # ... but not in the text


def test_ignore_eos(eos_case):
    llm, prompt, exp, _ = eos_case
    comp = llm.generate([prompt], greedy(ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert list(comp.token_ids) == exp
    assert comp.finish_reason == "length"


@pytest.fixture(scope="module")
def all_stop_but_one(model_dir, prompts, tmp_path_factory):
    """Every token but one (`keep`, the least likely first token) ends generation, so greedy
    decoding stops at its first token unless min_tokens holds the stops back, and while it
    does, `keep` is the only choice: the reply's length is known exactly.

    (llm whose generation_config lists all those tokens as EOS, prompt, keep, the stop ids)."""
    prompt = prompts[5]
    keep = int(hf_next_logits(model_dir, prompt).argmin())
    stops = [t for t in range(VOCAB_SIZE) if t != keep]
    folder = copy_checkpoint(model_dir, tmp_path_factory.mktemp("all_eos") / "ckpt")
    gen_cfg_path = folder / "generation_config.json"
    gen_cfg = json.loads(gen_cfg_path.read_text())
    gen_cfg["eos_token_id"] = stops
    gen_cfg_path.write_text(json.dumps(gen_cfg))
    return make_llm(folder), prompt, keep, stops


@pytest.mark.parametrize("min_tokens", [0, 1, 7])
@pytest.mark.parametrize("stop_by", ["eos", "stop_token_ids"])
def test_min_tokens_exact_boundary(all_stop_but_one, llm, model_dir, min_tokens, stop_by):
    eos_llm, prompt, keep, stops = all_stop_but_one
    if stop_by == "eos":
        engine, params = eos_llm, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                 min_tokens=min_tokens)
    else:
        engine, params = llm, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                             min_tokens=min_tokens, stop_token_ids=stops)
    # Guard: once min_tokens is reached the greedy choice is clearly not `keep`, so a stop.
    logits = hf_next_logits(model_dir, prompt + [keep] * min_tokens)
    assert logits[keep] < logits.max() - MIN_GREEDY_MARGIN
    comp = engine.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    # min_tokens non-stop tokens (only `keep` is left), then the stop the model wanted all along.
    assert list(comp.token_ids[:min_tokens]) == [keep] * min_tokens
    assert len(comp.token_ids) == min_tokens + 1
    assert comp.token_ids[-1] in stops and comp.finish_reason == "stop"


def test_min_tokens_defers_stop_string(llm, prompts, tokenizer):
    # " " is in every word token (" w17", " the"): the stop string would end the reply at its
    # first token; with min_tokens=k it must end it at exactly the k-th.
    prompt, k = prompts[5], 12
    full = llm.generate([prompt], greedy(), use_tqdm=False)[0].outputs[0]
    words = [tokenizer.decode([t]) for t in full.token_ids]
    assert all(" " in w for w in (words[0], words[k - 2], words[k - 1])), words  # guard
    comp = llm.generate([prompt], greedy(stop=" ", min_tokens=k), use_tqdm=False)[0].outputs[0]
    assert list(comp.token_ids) == list(full.token_ids[:k])
    assert comp.finish_reason == "stop" and comp.stop_reason == " "
    assert comp.text == tokenizer.decode(full.token_ids[: k - 1]) + words[k - 1].split(" ")[0]


# --------------------------------------------------------------------------- sampling


SEEDED = {
    "temperature": 0.8,
    "top_k": 50,
    "top_p": 0.9,
    "min_p": 0.05,
    "max_tokens": 24,
    "ignore_eos": True,
}


def test_seeded_request_independent_of_batch(llm, prompts):
    target = prompts[4]
    params = SamplingParams(seed=123, **SEEDED)
    alone = completion_tokens(llm.generate([target], params, use_tqdm=False))[0]
    again = completion_tokens(llm.generate([target], params, use_tqdm=False))[0]
    assert alone == again

    others = [prompts[1], prompts[5], prompts[6]]
    unseeded = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    batch = llm.generate(
        [others[0], target, others[1], others[2]],
        [unseeded, params, unseeded, unseeded],
        use_tqdm=False,
    )
    assert list(batch[1].outputs[0].token_ids) == alone

    other_seed = completion_tokens(
        llm.generate([target], SamplingParams(seed=124, **SEEDED), use_tqdm=False)
    )[0]
    assert other_seed != alone


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [(1.0, 2, 1.0, 0.0), (1.0, -1, 0.3, 0.0), (1.0, -1, 1.0, 0.3), (0.8, 5, 0.6, 0.1)],
    ids=["top_k", "top_p", "min_p", "combined"],
)
def test_sampled_tokens_respect_top_k_top_p_min_p(
    llm, model_dir, prompts, temperature, top_k, top_p, min_p
):
    """Every sampled token lies inside the top-k / nucleus / min-p set of transformers'
    temperature-scaled distribution (a necessary condition whatever the filter order)."""
    n_not_argmax = 0
    for seed, prompt in enumerate(prompts[2:6]):
        params = SamplingParams(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            max_tokens=24,
            ignore_eos=True,
            seed=seed,
        )
        toks = completion_tokens(llm.generate([prompt], params, use_tqdm=False))[0]
        ref = hf_logprobs(model_dir, prompt, toks)
        probs = torch.softmax(ref / temperature, dim=-1)
        for step, tok in enumerate(toks):
            p = probs[step]
            higher = p > p[tok] * (1 + 1e-5)
            n_not_argmax += bool(higher.any())
            if top_k > 0:
                assert int(higher.sum()) < top_k, f"step {step}: token rank > top_k"
            assert p[higher].sum().item() < top_p + 1e-5, f"step {step}: outside the nucleus"
            assert p[tok].item() >= min_p * p.max().item() - 1e-6, f"step {step}: below min_p"
    assert n_not_argmax > 0, "sampling never left the argmax: the test has no power"


def test_n_completions(llm, prompts):
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    outs = llm.generate([prompts[3]], params, use_tqdm=False)
    assert len(outs) == 1
    comps = outs[0].outputs
    assert [c.index for c in comps] == [0, 1]
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in comps)
    assert list(comps[0].token_ids) != list(comps[1].token_ids)
    again = llm.generate([prompts[3]], params, use_tqdm=False)[0].outputs
    assert [list(c.token_ids) for c in again] == [list(c.token_ids) for c in comps]


def test_n_greedy_completions_all_match_transformers(llm, prompts, expected):
    """n sequences forked from one prompt (17 tokens: the last KV block is partly filled and
    shared) must not corrupt each other's KV cache."""
    comps = llm.generate([prompts[3]], greedy(n=3), use_tqdm=False)[0].outputs
    assert [c.index for c in comps] == [0, 1, 2]
    for c in comps:
        assert list(c.token_ids) == expected[3]


def test_n_sampled_branches_have_exact_logprobs(llm, model_dir, prompts):
    """Each of n diverging sampled branches is scored exactly as transformers scores that
    branch's own token sequence (catches KV sharing / copy-on-write bugs)."""
    prompt = prompts[3]
    params = SamplingParams(
        n=3, temperature=1.0, seed=11, max_tokens=16, ignore_eos=True, logprobs=0
    )
    comps = llm.generate([prompt], params, use_tqdm=False)[0].outputs
    assert len({tuple(c.token_ids) for c in comps}) > 1
    for c in comps:
        ref = hf_logprobs(model_dir, prompt, c.token_ids)
        assert len(c.logprobs) == len(c.token_ids) == 16
        for step, (tok, pos) in enumerate(zip(c.token_ids, c.logprobs)):
            assert list(pos) == [tok]  # logprobs=0: only the sampled token
            assert pos[tok].logprob == pytest.approx(ref[step, tok].item(), abs=1e-4), (
                f"completion {c.index} step {step}"
            )


def test_temperature_zero_is_deterministic_even_with_filters(llm, prompts, expected):
    params = SamplingParams(
        temperature=0.0, top_k=3, top_p=0.5, max_tokens=MAX_TOKENS, ignore_eos=True
    )
    assert completion_tokens(llm.generate([prompts[2]], params, use_tqdm=False))[0] == expected[2]


# --------------------------------------------------------------------------- logprobs


def test_top3_logprobs_greedy(llm, model_dir, prompts, tokenizer):
    prompt = prompts[4]
    comp = llm.generate([prompt], greedy(max_tokens=10, logprobs=3), use_tqdm=False)[0].outputs[0]
    assert len(comp.logprobs) == len(comp.token_ids) == 10
    ref = hf_logprobs(model_dir, prompt, comp.token_ids)
    for step, (tok, pos) in enumerate(zip(comp.token_ids, comp.logprobs)):
        assert tok in pos and pos[tok].rank == 1
        assert len(pos) == 3  # greedy: the sampled token is one of the top 3
        ref_top = torch.topk(ref[step], 3)
        assert sorted(pos) == sorted(ref_top.indices.tolist()), f"step {step}"
        for rank, (tid, val) in enumerate(
            zip(ref_top.indices.tolist(), ref_top.values.tolist()), 1
        ):
            assert pos[tid].rank == rank
            assert pos[tid].logprob == pytest.approx(val, abs=1e-4)
            assert pos[tid].logprob <= 0
            if pos[tid].decoded_token is not None:
                assert pos[tid].decoded_token == tokenizer.decode([tid])


def test_logprobs_include_sampled_token_outside_top_k(llm, model_dir, prompts):
    """With logprobs=3 and a hot temperature, low-ranked sampled tokens appear as a 4th
    entry with their true rank in the raw (untempered) distribution."""
    prompt = prompts[5]
    params = SamplingParams(temperature=2.0, max_tokens=24, ignore_eos=True, seed=5, logprobs=3)
    comp = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    ref = hf_logprobs(model_dir, prompt, comp.token_ids)
    outside = 0
    for step, (tok, pos) in enumerate(zip(comp.token_ids, comp.logprobs)):
        true_rank = int((ref[step] > ref[step, tok]).sum()) + 1
        assert tok in pos
        assert pos[tok].rank == true_rank, f"step {step}"
        assert pos[tok].logprob == pytest.approx(ref[step, tok].item(), abs=1e-4)
        assert all(lp.logprob <= 0 for lp in pos.values())
        if true_rank > 3:
            outside += 1
            assert len(pos) == 4
        else:
            assert len(pos) == 3
    assert outside > 0, "test needs at least one sampled token outside the top 3"
    assert comp.cumulative_logprob == pytest.approx(
        sum(ref[s, t].item() for s, t in enumerate(comp.token_ids)), abs=1e-3
    )


# --------------------------------------------------------------------------- penalties


def reference_penalized_greedy(
    model_dir, prompt, steps, repetition=1.0, presence=0.0, frequency=0.0
):
    """Greedy decoding on transformers logits with vLLM's penalty semantics:
    repetition_penalty over prompt + output tokens (divide positive logits, multiply
    negative ones), presence/frequency penalties over output tokens only."""
    out: list[int] = []
    for _ in range(steps):
        logits = hf_next_logits(model_dir, prompt + out).clone()
        if repetition != 1.0:
            seen = torch.tensor(sorted(set(prompt + out)))
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / repetition, vals * repetition)
        if out:
            counts = torch.bincount(torch.tensor(out), minlength=logits.numel()).float()
            logits -= frequency * counts + presence * (counts > 0).float()
        top2 = torch.topk(logits, 2).values
        assert (top2[0] - top2[1]).item() > MIN_GREEDY_MARGIN, "near tie in penalty reference"
        out.append(int(logits.argmax()))
    return out


@pytest.fixture(scope="module")
def repetitive_prompt(model_dir):
    """A short prompt whose plain greedy continuation repeats tokens (so penalties bite)."""
    candidates = random_prompts([6, 8, 10, 12, 14], seed=55)
    conts = hf_greedy(model_dir, candidates, 16)
    best = min(range(len(candidates)), key=lambda k: len(set(conts[k])))
    assert len(set(conts[best])) < 14, conts[best]
    return candidates[best], conts[best]


@pytest.mark.parametrize(
    "kwargs",
    [{"repetition_penalty": 1.8}, {"presence_penalty": 1.5}, {"frequency_penalty": 1.0}],
    ids=["repetition", "presence", "frequency"],
)
def test_penalties_match_reference(llm, model_dir, repetitive_prompt, kwargs):
    prompt, plain = repetitive_prompt
    ref = reference_penalized_greedy(
        model_dir,
        prompt,
        16,
        repetition=kwargs.get("repetition_penalty", 1.0),
        presence=kwargs.get("presence_penalty", 0.0),
        frequency=kwargs.get("frequency_penalty", 0.0),
    )
    assert ref != plain, "penalty should change this greedy continuation"
    got = completion_tokens(
        llm.generate([prompt], greedy(max_tokens=16, **kwargs), use_tqdm=False)
    )[0]
    assert got == ref


def test_penalties_do_not_leak_between_requests(llm, model_dir, repetitive_prompt):
    """A penalized request in the same batch must not change an unpenalized one."""
    prompt, plain = repetitive_prompt
    outs = llm.generate(
        [prompt, prompt],
        [
            greedy(max_tokens=16, repetition_penalty=1.8, frequency_penalty=1.0),
            greedy(max_tokens=16),
        ],
        use_tqdm=False,
    )
    assert list(outs[1].outputs[0].token_ids) == plain
    assert list(outs[0].outputs[0].token_ids) != plain


# --------------------------------------------------------------------------- chat


def test_chat_single_conversation(llm, model_dir, tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    outs = llm.chat(messages, SamplingParams(max_tokens=5))  # default use_tqdm=True
    assert len(outs) == 1
    expected_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert outs[0].prompt_token_ids == list(expected_ids)
    assert outs[0].prompt_token_ids.count(BOS_ID) == 1  # template adds BOS; no second one
    assert 1 <= len(outs[0].outputs[0].token_ids) <= 5

    greedy_out = llm.chat(
        messages, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )[0]
    assert list(greedy_out.outputs[0].token_ids) == hf_greedy(model_dir, [expected_ids], 8)[0]


def test_chat_batch_of_conversations(llm, tokenizer):
    convs = [
        [{"role": "user", "content": "hi"}],
        [
            {"role": "system", "content": "w1 w2"},
            {"role": "user", "content": "hello w3"},
            {"role": "assistant", "content": "w4"},
            {"role": "user", "content": "w5 ?"},
        ],
    ]
    outs = llm.chat(convs, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert len(outs) == 2
    for out, conv in zip(outs, convs):
        ids = tokenizer.apply_chat_template(
            conv, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert out.prompt_token_ids == list(ids)
