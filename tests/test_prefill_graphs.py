"""Prefill CUDA graphs (engine/cuda_graphs.py): the buckets, the switch, and the padding.

A prefill step replayed from a graph runs at its token bucket with padding tokens (slot -1)
and padding sequences (no query tokens). The padding test runs the real buffer filling and
metadata on the Triton backend: compiled with real graphs on a GPU, interpreted on the CPU
(TRITON_INTERPRET=1) with each "graph" replayed as the eager call it would record. It checks
the real tokens' hidden states against the unpadded forward, the KV cache written exactly
where the step's slots say and nowhere else, and that capturing writes nothing.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from novainfer.engine import cuda_graphs
from novainfer.engine.cuda_graphs import (
    PREFILL_GRAPH_SEQS,
    PrefillGraphs,
    prefill_buckets,
    prefill_graph_tokens,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEV = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
BLOCK = 8


def test_buckets():
    assert prefill_buckets(8) == []
    assert prefill_buckets(16) == [16]
    assert prefill_buckets(100) == [16, 32, 64, 100]
    assert prefill_buckets(2048) == [16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792,
                                     2048]
    assert prefill_buckets(1000) == [16, 32, 64, 128, 256, 512, 768, 1000]


def test_switch():
    assert prefill_graph_tokens(None) == prefill_graph_tokens("") == 2048
    assert prefill_graph_tokens("0") == 0
    assert prefill_graph_tokens("512") == 512
    for bad in ("-1", "1k", "0.5", " 64"):
        with pytest.raises(ValueError, match="NOVAINFER_PREFILL_GRAPH_TOKENS"):
            prefill_graph_tokens(bad)


class _EagerGraph:
    """What `_capture` gives back on the CPU: the recorded call, run again on replay. Values
    derived into the metadata are derived afresh on each replay, as a captured graph's
    kernels do (the decode order, layers/attention/triton_backend.py)."""

    def __init__(self, run, meta=None):
        self.run, self.meta = run, meta

    def replay(self):
        if self.meta is not None:
            self.meta.backend_cache.clear()
        self.run()

    def pool(self):
        return None


def _fake_capture(run, pool, meta):
    """engine/cuda_graphs.py `_capture` on the CPU: the warm-up call (on values it derives
    itself, as there), then an _EagerGraph."""
    meta.backend_cache.clear()
    run()
    return _EagerGraph(run, meta)


def _triton_model(folder):
    from novainfer.distributed.parallel import TensorParallel
    from novainfer.layers.attention.triton_backend import TritonBackend
    from novainfer.loader.weights import load_weights
    from novainfer.models.config import ModelConfig
    from novainfer.models.registry import model_class

    cfg = ModelConfig.from_folder(folder)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device(DEV):
            model = model_class(cfg)(cfg, 256, TritonBackend(), TensorParallel())
    finally:
        torch.set_default_dtype(previous)
    load_weights(model, folder, cfg.tie_word_embeddings)
    return model.eval(), cfg


def _step(query_lens, seq_lens, first_block, vocab, seed):
    """A step: each sequence's blocks follow the previous one's (from `first_block`); its
    query tokens are the last `query_len` of `seq_len` (decodes, query_len 1, first)."""
    from novainfer.layers.attention import AttentionMetadata

    g = torch.Generator().manual_seed(seed)
    width = max(-(-s // BLOCK) for s in seq_lens)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    slots, positions, block = [], [], first_block
    for i, (q, s) in enumerate(zip(query_lens, seq_lens)):
        n = -(-s // BLOCK)
        tables[i, :n] = torch.arange(block, block + n)
        for p in range(s - q, s):
            slots.append(int(tables[i, p // BLOCK]) * BLOCK + p % BLOCK)
            positions.append(p)
        block += n
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=DEV), query_start_loc=qsl.to(DEV),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEV),
        block_tables=tables.to(DEV), num_decodes=len(query_lens) - len(
            [q for q in query_lens if q > 1]), max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), query_lens_host=list(query_lens),
        seq_lens_host=list(seq_lens),
    )
    ids = torch.randint(3, vocab, (len(slots),), generator=g).to(DEV)
    return ids, torch.tensor(positions, device=DEV), meta


@pytest.mark.skipif(DEV.type == "cpu" and not INTERPRET, reason="needs triton")
def test_padded_prefill_matches_the_eager_step(checkpoint, monkeypatch):
    pytest.importorskip("triton")
    if DEV.type == "cpu":
        monkeypatch.setattr(cuda_graphs, "_capture", _fake_capture)
    model, cfg = _triton_model(checkpoint("llama"))
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(cfg.num_layers, 2, 64, BLOCK, cfg.num_kv_heads, cfg.head_dim,
                        generator=g).to(DEV)  # the cached prefixes' K/V: random
    before = cache.clone()
    graphs = PrefillGraphs(model, cache, 64, 64 // BLOCK, 256, cfg.hidden_size,
                           torch.float32, DEV)
    assert torch.equal(cache, before), "capturing wrote to the KV cache"
    assert graphs.sizes == [16, 32, 64]
    steps = [  # (query_lens, seq_lens): every step of the 64-token bucket but the last
        ([5, 17, 20], [5, 40, 20]),  # three sequences, one behind a cached prefix
        ([40], [40]),  # then one: the slots and tokens the first step used are padding now
        ([2, 3, 4, 30], [2, 3, 12, 30]),  # all PREFILL_GRAPH_SEQS slots
        ([9], [25]),  # the 16-token bucket
    ]
    assert max(len(q) for q, _ in steps) == PREFILL_GRAPH_SEQS
    for i, (query_lens, seq_lens) in enumerate(steps):
        ids, positions, meta = _step(query_lens, seq_lens, 8 * i, cfg.vocab_size, seed=i)
        assert graphs.can_run(meta, ids.numel())
        want_cache = cache.clone()
        with torch.inference_mode():
            want = model(ids, positions, want_cache, meta)
            got = graphs.run(ids, positions, meta)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        written = torch.zeros(cache.shape[2] * BLOCK, dtype=torch.bool)
        written[meta.slot_mapping.cpu()] = True
        written = written.view(cache.shape[2], BLOCK)
        torch.testing.assert_close(cache[:, :, written], want_cache[:, :, written],
                                   rtol=1e-5, atol=1e-5)
        assert torch.equal(cache[:, :, ~written], want_cache[:, :, ~written]), \
            f"step {i}: a padding token wrote to the KV cache"
    assert graphs.replays == len(steps)


def test_which_steps_run_from_a_graph():
    from novainfer.layers.attention import AttentionMetadata

    def meta(query_lens, num_decodes=0):
        return AttentionMetadata(
            slot_mapping=None, query_start_loc=None, seq_lens=None, block_tables=None,
            num_decodes=num_decodes, max_query_len=max(query_lens), max_seq_len=0,
            query_lens_host=query_lens, seq_lens_host=query_lens)

    graphs = PrefillGraphs.__new__(PrefillGraphs)
    graphs.max_size = 64
    assert graphs.can_run(meta([40, 24]), 64)
    assert not graphs.can_run(meta([40, 25]), 65)  # past the largest bucket
    assert not graphs.can_run(meta([1, 30], num_decodes=1), 31)  # a decode in the step
    assert not graphs.can_run(meta([2] * (PREFILL_GRAPH_SEQS + 1)), 10)  # too many sequences
