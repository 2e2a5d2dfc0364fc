"""Whole-step decode graphs (engine/cuda_graphs.py): the forward pass, the LM head and the
sampler in one replay for small batches whose rows all sample plainly.

On the CPU the graph logic runs with each "graph" replayed as the eager call it recorded
(as tests/test_prefill_graphs.py does); the GPU test runs the engine with real graphs and
checks its tokens against the same engine sampling outside the graphs.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from test_prefill_graphs import DEV, INTERPRET, _fake_capture, _step, _triton_model

from novainfer.engine import cuda_graphs
from novainfer.engine.cuda_graphs import DecodeGraphs, sample_graph_seqs
from novainfer.engine.sampler import plain_sampling, sample_plain, sample_tensors, uniforms
from novainfer.sampling_params import SamplingParams

BLOCK = 8


def _seq(seed=None, **params):
    return SimpleNamespace(
        params=SamplingParams(**params),
        generator=None if seed is None else torch.Generator(DEV).manual_seed(seed),
    )


def test_switch():
    assert sample_graph_seqs(None) == sample_graph_seqs("") == 8
    assert sample_graph_seqs("0") == 0
    assert sample_graph_seqs("32") == 32
    for bad in ("-1", "eight", "1.5", " 4"):
        with pytest.raises(ValueError, match="NOVAINFER_SAMPLE_GRAPH_SEQS"):
            sample_graph_seqs(bad)


def test_which_steps_sample_plainly():
    greedy, hot = dict(temperature=0.0), dict(temperature=0.7)
    assert plain_sampling([_seq(**greedy), _seq(**greedy)]) == "greedy"
    assert plain_sampling([_seq(**hot), _seq(seed=3, **hot)]) == "draw"
    assert plain_sampling([]) is None
    assert plain_sampling([_seq(**greedy), _seq(**hot)]) is None  # mixed
    for extra in (dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1)):
        assert plain_sampling([_seq(**hot), _seq(**hot, **extra)]) is None
    for extra in (dict(logprobs=2), dict(repetition_penalty=1.2), dict(min_tokens=3)):
        assert plain_sampling([_seq(**greedy, **extra)]) is None
        assert plain_sampling([_seq(**hot, **extra)]) is None


@pytest.mark.parametrize("mode", ["greedy", "draw"])
def test_sample_plain_is_what_sample_tensors_gives(mode):
    """The same uniforms from the same generators, in the same order: the same tokens."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(5, 3000, generator=g) * 3).to(DEV)
    temps = [0.0] * 5 if mode == "greedy" else [0.5, 1.0, 1.3, 0.8, 2.0]
    seeds = [None, 7, None, 11, None]

    def seqs():
        return [_seq(seed=s, temperature=t) for s, t in zip(seeds, temps)]

    assert plain_sampling(seqs()) == mode
    want = sample_tensors(logits, seqs(), [], torch.Generator(DEV).manual_seed(5)).tokens
    batch = seqs()
    scale = u = None
    if mode == "draw":
        scale = torch.tensor([1 / t for t in temps], device=DEV)
        u = uniforms(batch, torch.Generator(DEV).manual_seed(5), DEV)
    assert torch.equal(sample_plain(logits, mode, scale, u), want)


@pytest.mark.skipif(DEV.type == "cpu" and not INTERPRET, reason="needs triton")
def test_whole_step_graphs_match_the_eager_step(checkpoint, monkeypatch):
    """Batches of 1, 2 and 4 rows: the replay's tokens are the eager forward pass, LM head
    and sampler's, and the KV cache gets what the eager step writes. 3 rows (a padded
    bucket) and 5 (past the largest) do not sample in a graph."""
    pytest.importorskip("triton")
    if DEV.type == "cpu":
        monkeypatch.setattr(cuda_graphs, "_capture", _fake_capture)
    model, cfg = _triton_model(checkpoint("llama"))
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(cfg.num_layers, 2, 64, BLOCK, cfg.num_kv_heads, cfg.head_dim,
                        generator=g).to(DEV)
    before = cache.clone()
    graphs = DecodeGraphs(model, cache, 16, 64 // BLOCK, 256, cfg.hidden_size, torch.float32,
                          DEV, logits=model.compute_logits, sample_seqs=4)
    assert torch.equal(cache, before), "capturing wrote to the KV cache"
    assert graphs.sample_sizes == [1, 2, 4]
    assert {k for k in graphs.graphs if isinstance(k[1], str)} == {
        (s, m) for s in (1, 2, 4) for m in ("greedy", "draw")}
    steps = [[9], [30, 17], [5, 40, 22, 13]]
    for i, seq_lens in enumerate(steps):
        ids, positions, meta = _step([1] * len(seq_lens), seq_lens, 16 * i, cfg.vocab_size, i)
        assert graphs.can_sample(meta)
        for mode in ("greedy", "draw"):
            n = len(seq_lens)
            scale = torch.linspace(0.5, 2.0, n, device=DEV)
            u = torch.rand(n, 1, generator=torch.Generator().manual_seed(i)).to(DEV)
            want_cache = cache.clone()
            with torch.inference_mode():
                logits = model.compute_logits(model(ids, positions, want_cache, meta))
                want = sample_plain(logits, mode, scale, u)
                got = graphs.run_sampled(ids, positions, meta, mode, scale, u)
            assert torch.equal(got, want), (seq_lens, mode)
            torch.testing.assert_close(cache, want_cache, rtol=1e-5, atol=1e-5)
    assert graphs.sample_replays == 2 * len(steps)
    for rows in (3, 5):
        _, _, meta = _step([1] * rows, [3] * rows, 0, cfg.vocab_size, 9)
        assert graphs.can_run(meta) and not graphs.can_sample(meta)


def _generate(folder, prompts, params, sample_seqs, monkeypatch):
    from novainfer import LLM

    monkeypatch.setenv("NOVAINFER_SAMPLE_GRAPH_SEQS", str(sample_seqs))
    # An explicit KV size: memory-based sizing would hand the first engine 90% of the GPU.
    llm = LLM(str(folder), device="cuda", dtype="float32", attention_backend="triton",
              max_model_len=256, max_num_seqs=8, num_kv_blocks=256)
    outs = llm.generate(prompts, params, use_tqdm=False)
    graphs = llm.llm_engine.runner.graphs
    return [list(o.outputs[0].token_ids) for o in outs], graphs.sample_replays


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA device")
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("kind", ["greedy", "seeded", "unseeded"])
def test_gpu_engine_tokens_with_and_without_whole_step_graphs(checkpoint, monkeypatch, batch,
                                                               kind):
    """Greedy, seeded and unseeded temperature requests: the same tokens when the sampling
    runs inside the graphs as outside (unseeded rows: both engines' generators start from
    the default seed), and the whole-step graphs did run. At batch 4 the requests stop at
    different lengths, so the steps go 4 rows (graph), 3 (padded: eager), 2, 1 (graphs)."""
    folder = checkpoint("qwen3")
    prompts = [[5 + i, 17, 33 + 2 * i, 8] for i in range(batch)]
    params = [SamplingParams(max_tokens=24 - 4 * i, ignore_eos=True,
                             temperature=0.0 if kind == "greedy" else 0.8,
                             seed=100 + i if kind == "seeded" else None)
              for i in range(batch)]
    eager, eager_replays = _generate(folder, prompts, params, 0, monkeypatch)
    inside, replays = _generate(folder, prompts, params, 8, monkeypatch)
    assert eager_replays == 0 and replays >= (20 if batch == 1 else 12)
    assert inside == eager
