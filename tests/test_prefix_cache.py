"""Prefix caching is keyed by content, never by the hash alone: block position (the hash
chain), hash collisions, cache_salt isolation, and deep chains. Engine results are checked
against transformers (conftest.hf_greedy)."""

from __future__ import annotations

from array import array

import pytest
from conftest import completion_tokens, hf_greedy, make_llm, random_prompts

from novainfer import SamplingParams
from novainfer.engine import block_manager
from novainfer.engine.block_manager import BlockManager
from novainfer.engine.sequence import Sequence
from novainfer.outputs import RequestMetrics

BS = 16


def greedy(n: int = 8) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(checkpoint):
    return checkpoint("llama_untied")


def engine(model_dir):
    return make_llm(model_dir, kv_cache_memory=16 << 20, block_size=BS)


def test_block_at_another_position_is_not_reused(model_dir, monkeypatch):
    """A = Y + X + [7] caches block X at position 16; B = X + [9, 11, 13] starts with the same
    16 tokens at position 0 and must compute them itself (different KV: RoPE, context)."""
    y, x = random_prompts([BS, BS], seed=5)
    a, b = y + x + [7], x + [9, 11, 13]
    expected = hf_greedy(model_dir, [a, b], 8)

    def run(llm):
        out_a = llm.generate([a], greedy(), use_tqdm=False)[0]
        out_b = llm.generate([b], greedy(), use_tqdm=False)[0]
        return out_a, out_b

    out_a, out_b = run(engine(model_dir))
    assert completion_tokens([out_a, out_b]) == expected
    assert out_b.num_cached_tokens == 0
    # Even a hash that forgets the parent (so X's hash is the same at both positions) must
    # not make B reuse A's block: the stored key names the parent.
    real = block_manager.block_hash
    monkeypatch.setattr(block_manager, "block_hash",
                        lambda parent, tokens, extras=(): real(None, tokens, extras))
    out_a, out_b = run(engine(model_dir))
    assert completion_tokens([out_a, out_b]) == expected
    assert out_b.num_cached_tokens == 0


def test_forced_hash_collisions_still_give_the_right_tokens(model_dir, monkeypatch):
    """Every block hashes to the same value: hits are only taken where the content matches."""
    monkeypatch.setattr(block_manager, "block_hash", lambda parent, tokens, extras=(): 42)
    prefix = random_prompts([2 * BS], seed=8)[0]
    tails = random_prompts([5, 20, 3], seed=9)
    prompts = [prefix + t for t in tails] + random_prompts([40, 33], seed=10)
    expected = hf_greedy(model_dir, prompts, 8)
    llm = engine(model_dir)
    first = llm.generate([prompts[0]], greedy(), use_tqdm=False)
    rest = llm.generate(prompts[1:], greedy(), use_tqdm=False)
    assert completion_tokens(first + rest) == expected
    # One cache slot for the one hash: the first block of the shared prefix is still found.
    again = llm.generate([prompts[1]], greedy(), use_tqdm=False)[0]
    assert completion_tokens([again]) == [expected[1]]
    assert again.num_cached_tokens == BS


def test_cache_salt_isolates_requests(model_dir):
    prompt = random_prompts([3 * BS + 5], seed=12)[0]
    expected = hf_greedy(model_dir, [prompt], 8)[0]
    llm = engine(model_dir)

    def run(salt=None, params_salt=None):
        params = greedy()
        if params_salt is not None:
            params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                    cache_salt=params_salt)
        p = {"prompt_token_ids": prompt} if salt is None else {
            "prompt_token_ids": prompt, "cache_salt": salt}
        out = llm.generate([p], params, use_tqdm=False)[0]
        assert list(out.outputs[0].token_ids) == expected
        return out.num_cached_tokens

    assert run("tenant-a") == 0
    assert run("tenant-a") == 3 * BS  # the same tenant shares its own cache
    assert run("tenant-b") == 0
    assert run() == 0  # no salt is a tenant of its own
    assert run() == 3 * BS
    assert run(params_salt="tenant-b") == 3 * BS  # SamplingParams.cache_salt is the same salt
    with pytest.raises(ValueError, match="cache_salt"):
        llm.generate([{"prompt_token_ids": prompt, "cache_salt": "x"}],
                     SamplingParams(cache_salt="y"), use_tqdm=False)
    for bad in ("", 5):
        with pytest.raises(ValueError, match="cache_salt"):
            llm.generate([{"prompt_token_ids": prompt, "cache_salt": bad}], use_tqdm=False)
    # Each salt has its own copy of the prompt's first block: no two salts share a block.
    bm = llm.llm_engine.block_manager
    first_tokens = array("q", prompt[:BS]).tobytes()  # keys hold a block's tokens as int64
    firsts = [k for k in bm.keys if k is not None and k[1] == first_tokens]
    assert sorted(k[0] for k in firsts) == [(), (("cache_salt", "tenant-a"),),
                                            (("cache_salt", "tenant-b"),)]


def _seq(tokens: list[int], seq_id: int, extras: tuple = ()) -> Sequence:
    return Sequence(seq_id=seq_id, request_id=str(seq_id), index=0, token_ids=list(tokens),
                    num_prompt_tokens=len(tokens), params=SamplingParams(), generator=None,
                    metrics=RequestMetrics(0.0), cache_extras=extras)


def _compute(bm: BlockManager, seq: Sequence) -> int:
    cached = bm.allocate_new(seq, seq.num_tokens)
    assert cached is not None
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_computed_blocks(seq)
    return cached


def test_deep_chains_compare_cheaply():
    """Thousands of one-token blocks: keys nest that deep, yet comparing them must neither
    recurse to the bottom (RecursionError) nor cost more than a block per hit."""
    n = 5000
    tokens = list(range(n))
    bm = BlockManager(3 * n, 1, True, 4, n + 1)
    first = _seq(tokens, 0)
    assert _compute(bm, first) == 0
    second = _seq(tokens, 1)
    assert _compute(bm, second) == n - 1  # all but the last token come from the cache
    bm.free_seq(first)
    bm.free_seq(second)
    # A sequence that diverges late re-registers its own tail on top of the shared keys.
    third = _seq(tokens[: n - 10] + [7] * 10, 2)
    assert _compute(bm, third) == n - 10
    fourth = _seq(tokens[: n - 10] + [7] * 10, 3)
    assert _compute(bm, fourth) == n - 1
    # Salted and unsalted sequences never share, even with equal tokens.
    salted = _seq(tokens, 4, (("cache_salt", "s"),))
    assert _compute(bm, salted) == 0


def test_block_hash_is_xxh3_over_parent_or_extras_then_tokens():
    """The one-shot hash equals a streaming xxh3-128 over the same pieces (the values before
    the one-shot form), and every piece changes it."""
    import xxhash

    tokens = array("q", [5, 2**40, -1, 7]).tobytes()
    h = xxhash.xxh3_128()
    h.update((12345).to_bytes(16, "little"))
    h.update(tokens)
    assert block_manager.block_hash(12345, tokens) == h.intdigest()
    extras = (("cache_salt", "a"),)
    encoded = repr(extras).encode()
    h = xxhash.xxh3_128()
    for piece in (len(encoded).to_bytes(8, "little"), encoded, tokens):
        h.update(piece)
    assert block_manager.block_hash(None, tokens, extras) == h.intdigest()
    others = {block_manager.block_hash(12346, tokens), block_manager.block_hash(None, tokens),
              block_manager.block_hash(12345, tokens[:-8] + array("q", [8]).tobytes())}
    assert block_manager.block_hash(12345, tokens) not in others and len(others) == 3
