"""The `flash_attn` attention backend and its registry rules.

The flash-attn package was not available anywhere these tests were written to run, so on the
CPU the backend drives a stand-in `flash_attn` module (installed into sys.modules) whose two
functions follow flash-attn 2's documented contract in plain torch: paged K/V gathered
through block_table, a causal mask aligned to the bottom-right corner, GQA query head h
reading KV head h // (heads / kv_heads), all-masked rows giving zeros, and the library's
argument checks (int32 index tensors, page size a multiple of 256). It is written apart from
novainfer's torch reference, which the backend's output is compared with. Unlike the real
kernels the stand-in also takes float32, so the comparison can be tight.

The `gpu`-marked tests at the end need CUDA and the real package (skipped otherwise).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys

import pytest
import torch
from conftest import make_paged_batch

from novainfer.layers.attention import available_backends, get_backend
from novainfer.layers.attention.flash_attn_backend import FlashAttnBackend
from novainfer.layers.attention.metadata import AttentionMetadata
from novainfer.layers.attention.torch_ref import TorchReferenceBackend

CUDA = torch.device("cuda")  # only ever a label here: nothing runs on it without a GPU
CPU = torch.device("cpu")
HAS_TRITON = importlib.util.find_spec("triton") is not None


# ----------------------------------------------------------------------------- stand-in


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RuntimeError(message)  # the real library raises RuntimeError from TORCH_CHECK


def _check_paged(k_cache, v_cache, block_table, batch: int, q) -> None:
    _check(k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache needs contiguous last dim")
    _check(k_cache.shape[1] % 256 == 0, "Paged KV cache block size must be divisible by 256")
    _check(block_table.dtype == torch.int32, "block_table must have dtype torch.int32")
    _check(block_table.dim() == 2 and block_table.shape[0] == batch, "block_table shape")
    _check(block_table.stride(-1) == 1, "block_table must have contiguous last dimension")
    _check(q.dtype == k_cache.dtype == v_cache.dtype, "query and key must have the same dtype")
    _check(q.shape[-1] % 8 == 0 and q.shape[-1] <= 256, "head_dim")
    _check(q.shape[-2] % k_cache.shape[2] == 0, "heads must be divisible by kv heads")


def _paged_rows(cache: torch.Tensor, table_row: torch.Tensor, length: int) -> torch.Tensor:
    """A sequence's first `length` K (or V) rows: its pages in block-table order."""
    pages = -(-length // cache.shape[1])
    return cache[table_row[:pages].long()].flatten(0, 1)[:length]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool):
    """q [sq, h, d], k/v [sk, hk, d] -> [sq, h, d], computed in float64."""
    sq, sk = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if causal:  # bottom-right: query i sees keys j <= i + sk - sq
        keep = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked row -> output 0
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


def _install_stand_in(monkeypatch) -> list:
    """Put the stand-in at sys.modules["flash_attn"]; returns the list its calls go to."""
    calls: list = []

    def flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
        softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
        deterministic=False, return_attn_probs=False, block_table=None,
    ):
        calls.append(("varlen", {"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k,
                                 "block_table": block_table, "causal": causal}))
        _check(block_table is not None, "the stand-in only models the paged (block_table) path")
        _check(dropout_p == 0.0 and window_size == (-1, -1) and softcap == 0.0, "unmodelled")
        _check(q.dim() == 3, "q must be (total_q, nheads, headdim)")
        batch = cu_seqlens_q.numel() - 1
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            _check(cu.dtype == torch.int32 and cu.is_contiguous(), f"{name} must be int32")
            _check(cu.numel() == batch + 1 and int(cu[0]) == 0, f"{name} shape")
        _check(isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int), "max_seqlen: int")
        _check_paged(k, v, block_table, batch, q)
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        out = torch.zeros_like(q)
        for b in range(batch):
            q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
            len_k = int(cu_seqlens_k[b + 1] - cu_seqlens_k[b])
            _check(q1 - q0 <= max_seqlen_q and len_k <= max_seqlen_k, "max_seqlen too small")
            _check(len_k <= block_table.shape[1] * k.shape[1], "block_table too narrow")
            keys = _paged_rows(k, block_table[b], len_k)
            values = _paged_rows(v, block_table[b], len_k)
            out[q0:q1] = _attend(q[q0:q1], keys, values, scale, causal)
        return out

    def flash_attn_with_kvcache(
        q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
        cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
        softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
        rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False,
    ):
        calls.append(("kvcache", {"cache_seqlens": cache_seqlens, "block_table": block_table}))
        _check(k is None and v is None and rotary_cos is None, "the stand-in does not append")
        _check(cache_batch_idx is None and cache_leftpad is None, "unmodelled")
        _check(block_table is not None, "the stand-in only models the paged (block_table) path")
        _check(q.dim() == 4, "q must be (batch_size, seqlen, nheads, headdim)")
        batch = q.shape[0]
        _check(isinstance(cache_seqlens, torch.Tensor), "stand-in takes tensor cache_seqlens")
        _check(cache_seqlens.dtype == torch.int32 and cache_seqlens.shape == (batch,),
               "cache_seqlens must be int32 of shape (batch_size,)")
        _check_paged(k_cache, v_cache, block_table, batch, q)
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        out = torch.zeros_like(q)
        for b in range(batch):
            len_k = int(cache_seqlens[b])
            keys = _paged_rows(k_cache, block_table[b], len_k)
            values = _paged_rows(v_cache, block_table[b], len_k)
            out[b] = _attend(q[b], keys, values, scale, causal)
        return out

    module = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("flash_attn", None))
    module.flash_attn_varlen_func = flash_attn_varlen_func
    module.flash_attn_with_kvcache = flash_attn_with_kvcache
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return calls


def test_stand_in_follows_documented_causal_mask(monkeypatch):
    """flash-attn's docstring: seqlen_q=2, seqlen_k=5 keeps [[1,1,1,1,0],[1,1,1,1,1]];
    seqlen_q=5, seqlen_k=2 keeps [[0,0],[0,0],[0,0],[1,0],[1,1]] and all-zero rows give 0."""
    _install_stand_in(monkeypatch)
    from flash_attn import flash_attn_varlen_func

    gen = torch.Generator().manual_seed(0)
    d = 8
    k = torch.randn(1, 256, 1, d, generator=gen)
    v = torch.randn(1, 256, 1, d, generator=gen)
    table = torch.zeros(1, 1, dtype=torch.int32)

    def run(sq, sk):
        q = torch.randn(sq, 1, d, generator=gen)
        cu_q = torch.tensor([0, sq], dtype=torch.int32)
        cu_k = torch.tensor([0, sk], dtype=torch.int32)
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, sq, sk, causal=True, block_table=table)
        return q, out

    q, out = run(2, 5)
    for i, visible in enumerate((4, 5)):
        probs = torch.softmax(q[i, 0] @ k[0, :visible, 0].T * d**-0.5, dim=0)
        torch.testing.assert_close(out[i, 0], probs @ v[0, :visible, 0])
    q, out = run(5, 2)
    assert not out[:3].any()
    probs = torch.softmax(q[4, 0] @ k[0, :2, 0].T * d**-0.5, dim=0)
    torch.testing.assert_close(out[4, 0], probs @ v[0, :2, 0])


# ----------------------------------------------------------------------------- batches


def _make_batch(query_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size,
                num_pad_tokens=0, seed=0):
    """fp32 on the CPU (the stand-in takes fp32, so the comparison can be tight)."""
    return make_paged_batch(query_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size,
                            num_pad_tokens=num_pad_tokens, seed=seed)


def _fresh_meta(meta: AttentionMetadata) -> AttentionMetadata:
    """The same step for another backend: an empty backend_cache."""
    return AttentionMetadata(**{**meta.__dict__, "backend_cache": {}})


# Decode lengths and chunk positions straddle the 256-token block boundaries.
BATCHES = {
    "mixed": ([1, 1, 1, 1, 1, 300, 40, 2, 256], [1, 255, 256, 257, 700, 300, 600, 257, 1024]),
    "decodes_only": ([1] * 4, [256, 1, 513, 90]),
    "prefills_only": ([17, 512], [17, 800]),
}


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (8, 2), (8, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_backend_matches_torch_reference(monkeypatch, batch, num_heads, num_kv_heads, head_dim):
    calls = _install_stand_in(monkeypatch)
    query_lens, seq_lens = BATCHES[batch]
    q, k, v, cache, meta = _make_batch(
        query_lens, seq_lens, num_heads, num_kv_heads, head_dim, 256, num_pad_tokens=3, seed=5
    )
    scale = head_dim**-0.5
    cache_ref = cache.clone()
    ref = TorchReferenceBackend().forward(q, k, v, cache_ref, _fresh_meta(meta), scale)
    out = FlashAttnBackend(CPU).forward(q, k, v, cache, meta, scale)
    n = q.shape[0] - 3
    assert torch.equal(cache, cache_ref)
    torch.testing.assert_close(out[:n], ref[:n], atol=2e-5, rtol=1e-4)
    kinds = [kind for kind, _ in calls]
    has_prefill = meta.num_seqs > meta.num_decodes
    assert kinds == ["kvcache"] * (meta.num_decodes > 0) + ["varlen"] * has_prefill


def test_prefill_values_derived_once_per_step(monkeypatch):
    """Two layers of one step share the int32 offsets built for the varlen call."""
    calls = _install_stand_in(monkeypatch)
    q, k, v, cache, meta = _make_batch([1, 1, 30, 300], [9, 400, 300, 555], 4, 2, 64, 256)
    backend = FlashAttnBackend(CPU)
    first = backend.forward(q, k, v, cache, meta, 0.125)
    second = backend.forward(q, k, v, cache, meta, 0.125)
    torch.testing.assert_close(first, second)
    varlen = [args for kind, args in calls if kind == "varlen"]
    assert len(varlen) == 2
    assert varlen[0]["cu_seqlens_k"] is varlen[1]["cu_seqlens_k"]
    assert varlen[0]["cu_seqlens_q"] is varlen[1]["cu_seqlens_q"]
    assert varlen[0]["cu_seqlens_k"].tolist() == [0, 300, 855]
    assert varlen[0]["cu_seqlens_q"].tolist() == [0, 30, 330]
    assert varlen[0]["causal"]


def test_stand_in_refuses_small_blocks(monkeypatch):
    """Like flash-attn 2, the stand-in refuses pages of 16 tokens: a backend test that passed
    with block_size 16 would be testing a more lenient double than the real library."""
    _install_stand_in(monkeypatch)
    q, k, v, cache, meta = _make_batch([1, 5], [20, 40], 4, 2, 64, 16)
    with pytest.raises(RuntimeError, match="divisible by 256"):
        FlashAttnBackend(CPU).forward(q, k, v, cache, meta, 0.125)


# ----------------------------------------------------------------------------- registry


def test_registry_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # hides a real install too
    assert "flash_attn" not in available_backends(CUDA, 128, 256, torch.bfloat16)
    if HAS_TRITON:
        assert available_backends(CUDA, 128, 256, torch.bfloat16)[0] == "triton"
    with pytest.raises(ValueError, match=r"flash_attn.*not installed.*allowed: auto, "):
        get_backend("flash_attn", CUDA, 128, 256, torch.bfloat16)
    with pytest.raises(ValueError, match=r"CUDA.*allowed: auto, (cpu, )?torch$"):
        get_backend("flash_attn", CPU, 128, 256, torch.bfloat16)


@pytest.mark.skipif(not HAS_TRITON, reason="flash_attn also needs triton (the KV-cache write)")
def test_registry_with_the_package(monkeypatch):
    _install_stand_in(monkeypatch)
    assert available_backends(CUDA, 128, 256, torch.bfloat16) == ["flash_attn", "triton", "torch"]
    assert available_backends(CUDA, 64, 256, torch.float16)[0] == "flash_attn"
    assert "flash_attn" not in available_backends(CPU, 128, 256, torch.bfloat16)
    # auto keeps triton whenever flash-attn could not run, or the caller cannot vouch for it.
    for args in ((128, 16, torch.bfloat16), (128, 256, torch.float32), (128, None, None),
                 (None, 256, torch.bfloat16)):
        assert available_backends(CUDA, *args)[0] == "triton", args
    assert available_backends(CUDA, 264, 256, torch.bfloat16) == ["torch"]  # > 256: neither
    with pytest.raises(ValueError, match=r"block_size a multiple of 256 \(use block_size=256\), "
                                         r"got 16; allowed: auto, triton, torch"):
        get_backend("flash_attn", CUDA, 128, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="float16 / bfloat16 only"):
        get_backend("flash_attn", CUDA, 128, 256, torch.float32)
    with pytest.raises(ValueError, match="head_dim a multiple of 8"):
        get_backend("flash_attn", CUDA, 12, 256, torch.bfloat16)
    assert get_backend("auto", CUDA, 128, 256, torch.bfloat16).name == "flash_attn"
    # An explicit choice with settings left unsaid is flash-attn's to check on first use.
    assert get_backend("flash_attn", CUDA, 128).name == "flash_attn"


class _NoLoadFinder(importlib.abc.MetaPathFinder):
    """Finds a `flash_attn` whose loading fails the test."""

    def find_spec(self, name, path=None, target=None):
        if name == "flash_attn":
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise AssertionError("the registry imported flash_attn")


@pytest.mark.skipif(not HAS_TRITON, reason="flash_attn also needs triton (the KV-cache write)")
def test_registry_does_not_import_flash_attn(monkeypatch):
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_NoLoadFinder(), *sys.meta_path])
    assert available_backends(CUDA, 128, 256, torch.bfloat16)[0] == "flash_attn"
    assert "flash_attn" not in sys.modules


# ----------------------------------------------------------------------------- GPU (real package)

real_flash_attn = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="needs a CUDA device and the flash-attn package",
)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@real_flash_attn
@pytest.mark.gpu
@pytest.mark.parametrize("num_heads,num_kv_heads", [(16, 8), (16, 2), (8, 8)])
def test_gpu_backend_matches_reference_bf16(num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(3)
    decode_lens = torch.randint(1, 3000, (40,), generator=gen).tolist() + [1, 256, 257]
    query_lens = [1] * len(decode_lens) + [300, 1024, 7]
    seq_lens = decode_lens + [300, 2500, 1500]
    q, k, v, cache, meta = _make_batch(query_lens, seq_lens, num_heads, num_kv_heads, 128, 256,
                                       num_pad_tokens=5, seed=4)
    dev = torch.device("cuda")
    q, k, v, cache = (t.to(dev, torch.bfloat16) for t in (q, k, v, cache))
    for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
        setattr(meta, name, getattr(meta, name).to(dev))
    cache_ref = cache.clone()
    ref = TorchReferenceBackend().forward(q, k, v, cache_ref, _fresh_meta(meta), 128**-0.5)
    backend = get_backend("auto", dev, 128, 256, torch.bfloat16)
    assert backend.name == "flash_attn"
    out = backend.forward(q, k, v, cache, meta, 128**-0.5)
    n = q.shape[0] - 5
    assert torch.equal(cache, cache_ref)
    assert _rel_err(out[:n], ref[:n]) <= 1e-2


@real_flash_attn
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama_untied", "qwen3"])
def test_gpu_llm_greedy_tokens_follow_fp32_reference(checkpoint, name):
    """fp16 engine with flash_attn (chunked prefill over cached blocks, CUDA-graph decodes):
    every greedy token is transformers' fp32 argmax, or within fp16 noise (0.1 nats) of it."""
    from conftest import completion_tokens, hf_logprobs, random_prompts

    from novainfer import LLM, SamplingParams

    model_dir = checkpoint(name)
    long_prompt, other = random_prompts([300, 40], seed=11)
    prompts = [long_prompt, long_prompt[:280] + other, *random_prompts([5, 64, 257], seed=12)]
    llm = LLM(str(model_dir), device="cuda", dtype="float16", attention_backend="flash_attn",
              block_size=256, max_model_len=512, max_num_seqs=8, num_kv_blocks=16,
              max_num_batched_tokens=128)
    assert llm.llm_engine.runner.backend.name == "flash_attn"
    assert llm.llm_engine.runner.graphs is not None
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    # The first request fills (and caches) block 0, which the second one's prefill reuses.
    generated = completion_tokens(llm.generate(prompts[:1], params, use_tqdm=False))
    generated += completion_tokens(llm.generate(prompts[1:], params, use_tqdm=False))
    for prompt, tokens in zip(prompts, generated):
        logprobs = hf_logprobs(model_dir, prompt, tokens)
        chosen = logprobs[torch.arange(len(tokens)), torch.tensor(tokens)]
        gaps = logprobs.max(dim=-1).values - chosen
        assert float(gaps.max()) <= 0.1, (len(prompt), gaps.tolist())
