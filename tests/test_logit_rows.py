"""The LM head of eagerly sampled rows runs at a few fixed row counts on CUDA (engine/worker.py
`logit_rows`): the padding must not change what is sampled. On the CPU the list is empty, so
these tests set it by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import completion_tokens, make_llm

from novainfer import SamplingParams
from novainfer.engine.cuda_graphs import padded_rows


def test_padded_rows_picks_the_smallest_bucket_that_fits():
    buckets = [1, 2, 4, 8, 16, 32]
    assert [padded_rows(n, buckets) for n in (1, 2, 3, 5, 8, 9, 31, 32)] == [
        1, 2, 4, 8, 8, 16, 32, 32]
    assert padded_rows(33, buckets) == 33  # past the largest: unpadded
    assert padded_rows(7, []) == 7  # no buckets (the CPU)


def test_cpu_worker_has_no_logit_buckets(checkpoint):
    llm = make_llm(checkpoint("qwen3"))
    assert llm.llm_engine.runner.worker.logit_rows == []


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_padded_lm_head_rows_sample_the_same_tokens(checkpoint, async_scheduling):
    """Greedy and seeded requests of different lengths (so steps sample 5, 4, ... rows, and
    prompt chunks sample fewer): identical tokens and logprobs with the LM head padded to
    buckets, and every LM head call it made had a bucket's row count."""
    folder = checkpoint("qwen3")
    prompts = [[3 + i, 11, 40 + 3 * i, 7, 9 + i] * (1 + i) for i in range(5)]
    params = [SamplingParams(max_tokens=6 + 3 * i, ignore_eos=True, logprobs=2,
                             temperature=0.0 if i % 2 else 0.9, seed=50 + i)
              for i in range(5)]
    kwargs = {"async_scheduling": async_scheduling, "max_num_batched_tokens": 16}

    plain = make_llm(folder, **kwargs).generate(prompts, params, use_tqdm=False)
    llm = make_llm(folder, **kwargs)
    worker = llm.llm_engine.runner.worker
    worker.logit_rows = [1, 2, 4, 8]
    head_rows, sampled = [], []
    compute, sample_logits = worker.model.compute_logits, worker.sample_logits

    def compute_spy(hidden: torch.Tensor):
        head_rows.append(hidden.shape[0])
        return compute(hidden)

    def sample_spy(hidden, inputs):
        logits = sample_logits(hidden, inputs)
        sampled.append((inputs.logits_indices.numel(), None if logits is None else len(logits)))
        return logits

    worker.model.compute_logits = compute_spy
    worker.sample_logits = sample_spy
    padded = llm.generate(prompts, params, use_tqdm=False)
    assert completion_tokens(padded) == completion_tokens(plain)
    for a, b in zip(padded, plain):
        for pa, pb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert pa.keys() == pb.keys()
            for t in pa:
                assert pa[t].logprob == pytest.approx(pb[t].logprob, abs=1e-5)
    assert head_rows and set(head_rows) <= {1, 2, 4, 8}
    assert all(rows == n for n, rows in sampled if n)  # the padding's logits are dropped
    assert {n for n, _ in sampled} & {3, 5, 6, 7}  # some steps were padded


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_logit_rows_are_warm_buckets_and_tokens_match_the_eager_engine(checkpoint):
    """On CUDA: the buckets are the decode graphs' sizes, and an engine with CUDA graphs
    (sampling rows padded beside graph replays) gives the tokens of one without."""
    from novainfer import LLM
    from novainfer.engine.cuda_graphs import bucket_sizes

    from novainfer.models.decoder import CausalLM

    folder = checkpoint("qwen3")
    prompts = [[3 + i, 11, 40 + 3 * i, 7, 9 + i] * (1 + i) for i in range(5)]
    params = [SamplingParams(max_tokens=6 + 3 * i, ignore_eos=True, temperature=0.0)
              for i in range(5)]
    kw = {"device": "cuda", "dtype": "float32", "attention_backend": "triton",
          "max_model_len": 256, "max_num_seqs": 8, "num_kv_blocks": 256}
    rows = []
    compute = CausalLM.compute_logits

    def spy(self, hidden):
        rows.append(hidden.shape[0])
        return compute(self, hidden)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CausalLM, "compute_logits", spy)
        graphs = LLM(str(folder), **kw)
        warm = list(rows)
        with_graphs = completion_tokens(graphs.generate(prompts, params, use_tqdm=False))
    assert graphs.llm_engine.runner.worker.logit_rows == bucket_sizes(8) == [1, 2, 4, 8]
    assert warm[-4:] == [1, 2, 4, 8]  # the start-up calls, after any capture's
    assert set(rows) <= set(warm)  # no LM head call at a row count it had not warmed
    del graphs
    eager = LLM(str(folder), enforce_eager=True, **kw)
    assert completion_tokens(eager.generate(prompts, params, use_tqdm=False)) == with_graphs
