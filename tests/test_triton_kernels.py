"""Triton attention kernels (store_kv, paged decode, paged prefill) and the `triton` backend,
checked against the PyTorch reference (`novainfer.layers.attention.torch_ref`).

Without a GPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, fp32/fp16 only) on
small shapes. With a GPU the same small tests run compiled, and the `gpu`-marked tests check bf16
on realistic shapes (head_dim 128, 16/8 heads, contexts up to ~4k) and CUDA-graph capture.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton (and our kernel modules) are imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from conftest import make_paged_batch

from novainfer.kernels.decode_attention import (
    alloc_decode_workspace,
    decode_attention,
    MAX_GRID_Z,
    decode_order,
    decode_workspace_numel,
    default_num_splits,
    default_maxnreg,
    default_tile,
)
from novainfer.kernels.kv_cache import store_kv
from novainfer.kernels.prefill_attention import prefill_attention
from novainfer.layers.attention import available_backends, get_backend
from novainfer.layers.attention.metadata import AttentionMetadata
from novainfer.layers.attention.torch_ref import (
    TorchReferenceBackend,
    write_kv,
)
from novainfer.layers.attention.triton_backend import TritonBackend

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Small tests: compiled on a GPU, interpreted on CPU.
DEV = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")


def _interpreter_runs_loops() -> bool:
    """Triton 3.6's interpreter cannot take a loop bound loaded from memory with numpy 2.x
    (`int()` of a 1-element array); 3.9 can. Probe once instead of failing every test."""
    import triton
    import triton.language as tl
    from triton.runtime.errors import InterpreterError

    @triton.jit
    def _probe(X, N):
        acc = 0.0
        for _ in range(tl.load(N)):
            acc += 1.0
        tl.store(X, acc)

    x = torch.zeros(1)
    try:
        _probe[(1,)](x, torch.tensor([2], dtype=torch.int32))
    except (InterpreterError, TypeError):
        return False
    return x.item() == 2.0


if INTERPRET and not _interpreter_runs_loops():
    pytest.skip(
        "this triton version's interpreter cannot run the kernels (loop bounds loaded from "
        "memory); use triton >= 3.9 for TRITON_INTERPRET=1 or run compiled on a GPU",
        allow_module_level=True,
    )

gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRET,
    reason="needs a CUDA device and compiled triton kernels (TRITON_INTERPRET unset)",
)


# ----------------------------------------------------------------------------- helpers


def _make_batch(query_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype,
                device, num_pad_tokens=0, seed=0):
    return make_paged_batch(query_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size,
                            dtype, device, num_pad_tokens, seed)


def _ref_decode(q, cache, tables, seq_lens_host, scale):
    """Reference decode, rows with seq_len 0 -> zeros."""
    out = torch.zeros_like(q)
    nz = [i for i, n in enumerate(seq_lens_host) if n > 0]
    if not nz:
        return out
    idx = torch.tensor(nz, device=q.device)
    sub = [seq_lens_host[i] for i in nz]
    n = len(nz)
    meta = AttentionMetadata(
        slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=q.device),
        query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=q.device),
        seq_lens=torch.tensor(sub, dtype=torch.int32, device=q.device),
        block_tables=tables[idx],
        num_decodes=n,
        max_query_len=1,
        max_seq_len=max(sub),
        query_lens_host=[1] * n,
        seq_lens_host=sub,
    )
    kv_heads = cache.shape[3]
    dummy = torch.zeros(n, kv_heads, q.shape[2], dtype=q.dtype, device=q.device)
    out[idx] = TorchReferenceBackend().forward(q[idx], dummy, dummy, cache, meta, scale)
    return out


def _assert_close(out, ref, dtype):
    assert torch.isfinite(out).all()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    elif dtype == torch.float16:
        torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    else:
        err = (out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-6)
        assert err <= 1e-2, f"relative error {err:.3e}"
        torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)


# ----------------------------------------------------------------------------- store_kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 16), (1, 64), (3, 32)])
def test_store_kv_matches_reference(dtype, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(1)
    num_blocks, block_size, n = 6, 4, 9
    qkv = torch.randn(n, (4 + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype).to(DEV)
    # k/v as strided views of a fused qkv projection, like the model produces
    k = qkv[:, 4 * head_dim : (4 + num_kv_heads) * head_dim].view(n, num_kv_heads, head_dim)
    v = qkv[:, (4 + num_kv_heads) * head_dim :].view(n, num_kv_heads, head_dim)
    slots = torch.tensor([0, 5, -1, 23, 7, -1, 12, 3, 22], dtype=torch.int64, device=DEV)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    cache = cache.to(dtype).to(DEV)
    expected = cache.clone()
    write_kv(k, v, expected, slots)
    store_kv(k, v, cache, slots)
    assert torch.equal(cache, expected)


def test_store_kv_empty_and_all_padding():
    cache = torch.zeros(2, 2, 4, 1, 16, device=DEV)
    k = torch.randn(3, 1, 16, device=DEV)
    store_kv(k, k, cache, torch.full((3,), -1, dtype=torch.int64, device=DEV))
    store_kv(k[:0], k[:0], cache, torch.zeros(0, dtype=torch.int64, device=DEV))
    assert not cache.any()


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,block_size,num_splits",
    [
        (4, 4, 16, 4, 1),  # GQA 1, tiny blocks (KV tile spans several blocks)
        (4, 4, 16, 4, 3),
        (8, 2, 32, 16, 1),  # GQA 4
        (8, 2, 32, 16, 4),
        (8, 1, 64, 16, 2),  # GQA 8
        (4, 1, 128, 8, 2),  # head_dim 128
        (2, 2, 32, 128, 2),  # big blocks (KV tile inside one block)
        (4, 2, 32, 16, 32),  # the most splits (batch 1's default): most of them empty
    ],
)
def test_decode_matches_reference(num_heads, num_kv_heads, head_dim, block_size, num_splits):
    bs = block_size
    lens = [1, bs - 1 if bs > 1 else 2, bs, bs + 1, 3 * bs + 5, 70, 0]
    q, _, _, cache, meta = _make_batch(
        [1] * len(lens), lens, num_heads, num_kv_heads, head_dim, bs, torch.float32, DEV
    )
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    decode_attention(q, cache, meta.block_tables, meta.seq_lens, scale, out, num_splits=num_splits)
    ref = _ref_decode(q, cache, meta.block_tables, lens, scale)
    _assert_close(out, ref, torch.float32)
    assert not out[-1].any(), "seq_len 0 rows must produce zeros"


def test_decode_fp16_workspace_and_default_splits():
    lens = [0, 33, 5, 64, 0, 17]
    q, _, _, cache, meta = _make_batch([1] * 6, lens, 8, 2, 64, 16, torch.float16, DEV, seed=3)
    ref = _ref_decode(q, cache, meta.block_tables, lens, 0.125)
    ws = alloc_decode_workspace(8, 8, 64, 3, DEV)  # bigger than needed: caller-owned scratch
    assert ws.numel() >= decode_workspace_numel(6, 8, 64, 3)
    out = torch.empty_like(q)
    decode_attention(q, cache, meta.block_tables, meta.seq_lens, 0.125, out, 3, workspace=ws)
    _assert_close(out, ref, torch.float16)
    out2 = torch.empty_like(q)
    decode_attention(q, cache, meta.block_tables, meta.seq_lens, 0.125, out2)  # default splits
    _assert_close(out2, ref, torch.float16)


def test_decode_tile_rule():
    """128-token tiles at one or two splits in a 1- or 2-byte cache (5 stages for fp8: two
    K/V buffers), 64 at more splits or in fp32, 32 for head_dim > 128: a function of the
    split count only, so eager steps (whose block tables vary in width) compile no extra
    variant."""
    cpu = torch.device("cpu")
    assert default_tile(128, 1, 2, cpu) == (128, 2)
    assert default_tile(128, 1, 1, cpu) == (128, 5)
    assert default_tile(128, 2, 2, cpu) == (128, 2)
    assert default_tile(128, 4, 2, cpu) == (64, 2)
    assert default_tile(128, 20, 1, cpu) == (64, 2)  # batch 1
    assert default_tile(128, 1, 4, cpu) == (64, 2)  # fp32: twice the shared memory
    assert default_tile(256, 1, 2, cpu) == (32, 2)


def test_decode_register_cap_rule():
    """168 registers a thread for the fp8 cache's 128-token tiles at 4 warps (3 programs per
    SM instead of 2 on an H200, no spills), only where that was measured: Hopper, head_dim
    128, 16 query rows a program, fp16 dots. No cap anywhere else."""
    hopper = (9, 0)
    assert default_maxnreg(128, 1, 4, 128, 16, True, hopper) == 168
    assert default_maxnreg(64, 1, 4, 128, 16, True, hopper) is None  # batch 1's split tiles
    assert default_maxnreg(128, 2, 4, 128, 16, False, hopper) is None  # bf16: at copy speed
    assert default_maxnreg(128, 1, 8, 128, 16, True, hopper) is None
    assert default_maxnreg(128, 1, 4, 64, 16, True, hopper) is None
    assert default_maxnreg(128, 1, 4, 128, 32, True, hopper) is None  # a group of 32 heads
    assert default_maxnreg(128, 1, 4, 128, 16, False, hopper) is None  # NOVAINFER_FP8_DOT=bf16
    assert default_maxnreg(128, 1, 4, 128, 16, True, (10, 0)) is None  # not measured there


@pytest.mark.parametrize("block_size,fp16", [(16, True), (256, True), (16, False)])
def test_decode_128_token_tiles(block_size, fp16):
    """The default tile for long contexts (gathered across blocks, or inside one), against the
    reference, with lengths around the tile edge."""
    lens = [1, 127, 128, 129, 300, 0]
    dtype = torch.float16 if fp16 else torch.float32
    q, _, _, cache, meta = _make_batch([1] * len(lens), lens, 8, 2, 32, block_size, dtype, DEV,
                                       seed=5)
    assert meta.block_tables.shape[1] * block_size >= 256
    ref = _ref_decode(q, cache, meta.block_tables, lens, 0.2)
    for stages in (2, 3):
        out = torch.full_like(q, float("nan"))
        decode_attention(q, cache, meta.block_tables, meta.seq_lens, 0.2, out, num_splits=1,
                         block_n=128, num_stages=stages)
        _assert_close(out, ref, dtype)
        assert not out[-1].any()


def test_decode_all_padding_rows_are_zero():
    lens = [0, 0, 0]
    q, _, _, cache, meta = _make_batch([1] * 3, [1, 1, 1], 4, 2, 16, 4, torch.float32, DEV)
    meta.seq_lens.zero_()
    out = torch.full_like(q, float("nan"))
    decode_attention(q, cache, meta.block_tables, meta.seq_lens, 0.25, out, num_splits=2)
    assert not out.any()
    out = torch.full_like(q, float("nan"))
    decode_attention(q, cache, meta.block_tables, meta.seq_lens, 0.25, out, num_splits=1)
    assert not out.any() and len(lens) == 3


@pytest.mark.parametrize("num_splits", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_program_order_gives_the_same_bits(num_splits, dtype):
    """heads_first and order (any permutation, `decode_order`'s longest first included) only
    move programs: every output bit equals the plain launch's, padding rows included."""
    lens = [5, 0, 70, 33, 1, 16, 49]
    q, _, _, cache, meta = _make_batch([1] * len(lens), lens, 8, 2, 32, 16, dtype, DEV, seed=4)
    call = functools.partial(decode_attention, q, cache, meta.block_tables, meta.seq_lens,
                             0.2, num_splits=num_splits)
    plain = call(torch.full_like(q, float("nan")))
    _assert_close(plain, _ref_decode(q, cache, meta.block_tables, lens, 0.2), dtype)
    longest = decode_order(meta.seq_lens)
    assert [lens[i] for i in longest.tolist()] == sorted(lens, reverse=True)
    shuffled = torch.randperm(len(lens), generator=torch.Generator().manual_seed(2)).to(DEV)
    for kw in ({"heads_first": True}, {"order": longest}, {"order": shuffled.int()},
               {"heads_first": True, "order": longest}):
        out = call(torch.full_like(q, float("nan")), **kw)
        assert torch.equal(out, plain), kw


def _order_calls(monkeypatch, num_splits, value=None, lens=(9, 300, 3, 0, 122)):
    """The decode_attention calls (heads_first, order, num_splits) of two layers attending in
    one step through the triton backend, with NOVAINFER_DECODE_ORDER=value."""
    import novainfer.kernels.decode_attention as kernel_module
    import novainfer.layers.attention.triton_backend as backend_module

    if value is None:
        monkeypatch.delenv("NOVAINFER_DECODE_ORDER", raising=False)
    else:
        monkeypatch.setenv("NOVAINFER_DECODE_ORDER", value)
    kernel_module.decode_order_enabled.cache_clear()
    calls = []

    def record(*args, **kwargs):
        calls.append((kwargs["heads_first"], kwargs["order"], kwargs["num_splits"]))
        return decode_attention(*args, **kwargs)

    monkeypatch.setattr(backend_module, "decode_attention", record)
    lens = list(lens)
    q, _, _, cache, meta = _make_batch([1] * len(lens), lens, 4, 2, 16, 8, torch.float32, DEV)
    backend = TritonBackend(num_splits=num_splits)
    try:
        outs = [backend.attend(q, cache, meta, 0.25) for _ in range(2)]
    finally:
        kernel_module.decode_order_enabled.cache_clear()
    assert torch.equal(outs[0], outs[1])
    _assert_close(outs[0], _ref_decode(q, cache, meta.block_tables, lens, 0.25), torch.float32)
    return calls, lens, meta


def _split_rules(meta) -> tuple[int, int]:
    """The plain (2 programs per SM) and the ordered (4) split counts of `_order_calls`'s step;
    its contexts are long enough for the two to differ."""
    width = meta.block_tables.shape[1] * 8
    plain = default_num_splits(5, 2, width, DEV, programs_per_sm=2)
    ordered = default_num_splits(5, 2, width, DEV, programs_per_sm=4)
    assert plain < ordered
    return plain, ordered


@pytest.mark.parametrize("num_splits", [1, 2, 4, None])
def test_backend_orders_decodes_longest_first(monkeypatch, num_splits):
    calls, lens, meta = _order_calls(monkeypatch, num_splits)
    (first_heads, first, splits), (second_heads, second, _) = calls
    assert first_heads and second_heads
    assert [lens[i] for i in first.tolist()] == sorted(lens, reverse=True)
    assert second is first, "one argsort a step, shared by the layers"
    assert splits == (num_splits or _split_rules(meta)[1])  # twice the plain rule's programs


def test_backend_keeps_the_plain_launch_when_off(monkeypatch):
    assert [c[:2] for c in _order_calls(monkeypatch, 4, "off")[0]] == [(False, None)] * 2
    calls, _, meta = _order_calls(monkeypatch, None, "off")
    assert calls[0][2] == _split_rules(meta)[0]
    with pytest.raises(ValueError, match="NOVAINFER_DECODE_ORDER must be"):
        _order_calls(monkeypatch, 1, "shortest")


@pytest.mark.parametrize("n", [1, 5, 128, 129, 300])
def test_decode_order_is_a_stable_descending_sort(n):
    """decode_order's one-launch rank kernel (the interpreter on the CPU) against torch's
    stable argsort: ties (many equal lengths) keep index order, padding rows (0) go last,
    sizes off the kernel's 128-sequence block."""
    g = torch.Generator().manual_seed(n)
    lens = torch.randint(0, 20, (n,), generator=g, dtype=torch.int32)
    lens[torch.randint(0, n, (n // 4,), generator=g)] = 0
    got = decode_order(lens.to(DEV))
    assert got.dtype == torch.int32 and got.shape == (n,)
    assert got.cpu().tolist() == torch.argsort(lens, descending=True, stable=True).tolist()


def test_decode_order_arguments_are_checked():
    lens = [3, 9]
    q, _, _, cache, meta = _make_batch([1, 1], lens, 4, 2, 16, 8, torch.float32, DEV)
    call = functools.partial(decode_attention, q, cache, meta.block_tables, meta.seq_lens,
                             0.25, torch.empty_like(q))
    for bad in (torch.tensor([1, 0, 2], device=DEV), torch.tensor([1.0, 0.0], device=DEV)):
        with pytest.raises(ValueError, match="order must be an int32 or int64 tensor"):
            call(order=bad)
    many = torch.zeros(MAX_GRID_Z + 1, 4, 16, device=DEV)
    with pytest.raises(ValueError, match="at most 65535"):
        decode_attention(many, cache, meta.block_tables[:1].expand(len(many), -1),
                         torch.zeros(len(many), dtype=torch.int32, device=DEV), 0.25,
                         torch.empty_like(many), heads_first=True)


def test_backend_one_decode_needs_no_argsort(monkeypatch):
    calls = _order_calls(monkeypatch, None, lens=(37,))[0]
    assert [c[:2] for c in calls] == [(True, None)] * 2


def test_default_num_splits_programs_per_sm():
    dev = torch.device("cpu")  # 8 "SMs" off CUDA
    assert default_num_splits(4, 2, 4096, dev) == 2  # 8 programs for 16 wanted
    assert default_num_splits(4, 2, 4096, dev, programs_per_sm=4) == 4
    assert default_num_splits(64, 2, 4096, dev, programs_per_sm=4) == 1
    assert default_num_splits(1, 1, 128, dev, programs_per_sm=4) == 2  # 64-token pieces


# ----------------------------------------------------------------------------- prefill


def _ref_forward(q, k, v, cache, meta, scale):
    return TorchReferenceBackend().forward(q, k, v, cache, meta, scale)


@pytest.mark.parametrize(
    "query_lens,seq_lens,num_heads,num_kv_heads,head_dim,block_size",
    [
        ([5, 20, 1], [5, 37, 9], 4, 4, 16, 8),  # fresh prompt, chunk over prefix, 1-token chunk
        ([17, 3], [17, 50], 8, 2, 32, 16),  # GQA 4, crosses query tiles
        ([40], [95], 8, 1, 64, 4),  # GQA 8, tiny blocks, long prefix
        ([9, 16], [30, 16], 2, 2, 128, 16),  # head_dim 128, block-boundary lengths
        ([33], [33], 2, 1, 16, 64),  # one big block holds everything
    ],
)
def test_prefill_matches_reference(
    query_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size
):
    q, k, v, cache, meta = _make_batch(
        query_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, torch.float32, DEV
    )
    scale = head_dim**-0.5
    write_kv(k, v, cache, meta.slot_mapping)
    ref = _ref_forward(q, k, v, cache.clone(), meta, scale)
    out = torch.full_like(q, float("nan"))
    prefill_attention(
        q, cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
        meta.max_query_len, scale, out,
    )
    _assert_close(out, ref, torch.float32)


def test_prefill_fp16_small_tiles():
    q, k, v, cache, meta = _make_batch([24, 7], [24, 40], 4, 2, 32, 8, torch.float16, DEV, seed=5)
    write_kv(k, v, cache, meta.slot_mapping)
    ref = _ref_forward(q, k, v, cache.clone(), meta, 0.2)
    out = torch.empty_like(q)
    prefill_attention(q, cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                      24, 0.2, out, block_m=16, block_n=16)
    _assert_close(out, ref, torch.float16)


@pytest.mark.parametrize("head_dim", [8, 48, 96])
def test_bad_head_dim_raises(head_dim):
    q = torch.zeros(1, 2, head_dim, device=DEV)
    cache = torch.zeros(2, 1, 4, 2, head_dim, device=DEV)
    bt = torch.zeros(1, 1, dtype=torch.int32, device=DEV)
    lens = torch.ones(1, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="power of 2"):
        decode_attention(q, cache, bt, lens, 1.0, torch.empty_like(q))
    qsl = torch.tensor([0, 1], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="power of 2"):
        prefill_attention(q, cache, bt, qsl, lens, 1, 1.0, torch.empty_like(q))


# ----------------------------------------------------------------------------- backend


@pytest.mark.parametrize(
    "query_lens,seq_lens,num_heads,num_kv_heads,head_dim,block_size,pad,dtype",
    [
        ([1, 1, 1, 6, 12], [1, 9, 17, 6, 30], 4, 1, 32, 8, 3, torch.float32),
        ([1, 1], [16, 40], 8, 2, 16, 16, 0, torch.float32),  # decodes only
        ([10, 3], [10, 21], 4, 4, 64, 16, 2, torch.float32),  # prefills only
        ([1, 1, 5], [33, 4, 20], 8, 2, 32, 4, 1, torch.float16),
    ],
)
def test_backend_matches_reference(
    query_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, pad, dtype
):
    q, k, v, cache, meta = _make_batch(
        query_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, DEV,
        num_pad_tokens=pad, seed=7,
    )
    scale = head_dim**-0.5
    cache_ref = cache.clone()
    ref = TorchReferenceBackend().forward(q, k, v, cache_ref, meta, scale)
    out = TritonBackend().forward(q, k, v, cache, meta, scale)
    n = q.shape[0] - pad
    assert torch.equal(cache, cache_ref)
    _assert_close(out[:n], ref[:n], dtype)


def test_registry():
    assert "triton" not in available_backends(torch.device("cpu"))
    assert available_backends(torch.device("cpu"))[-1] == "torch"
    names = available_backends(torch.device("cuda"))
    assert names[-1] == "torch" and "triton" in names
    assert get_backend("torch", torch.device("cpu")).name == "torch"
    with pytest.raises(ValueError, match="triton"):
        get_backend("triton", torch.device("cpu"))
    if torch.cuda.is_available():
        assert get_backend("triton", torch.device("cuda")).name == "triton"


# ----------------------------------------------------------------------------- GPU (bf16)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_heads,num_kv_heads", [(16, 8), (16, 2), (8, 8)])
def test_gpu_decode_bf16_realistic(num_heads, num_kv_heads):
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(11)
    lens = torch.randint(1, 4097, (61,), generator=gen).tolist() + [1, 16, 17, 4096, 0, 0, 0]
    q, _, _, cache, meta = _make_batch(
        [1] * len(lens), lens, num_heads, num_kv_heads, 128, 16, torch.bfloat16, dev
    )
    ref = _ref_decode(q, cache, meta.block_tables, lens, 128**-0.5)
    for splits in (None, 1, 8):
        out = torch.full_like(q, float("nan"))
        decode_attention(q, cache, meta.block_tables, meta.seq_lens, 128**-0.5, out, splits)
        _assert_close(out, ref, torch.bfloat16)
        assert not out[-3:].any()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_prefill_bf16_realistic(head_dim):
    dev = torch.device("cuda")
    query_lens = [1000, 512, 37, 2048, 1]
    seq_lens = [1000, 3584, 4000, 2048, 3000]
    q, k, v, cache, meta = _make_batch(
        query_lens, seq_lens, 16, 8, head_dim, 16, torch.bfloat16, dev, seed=2
    )
    write_kv(k, v, cache, meta.slot_mapping)
    ref = _ref_forward(q, k, v, cache.clone(), meta, head_dim**-0.5)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                      meta.max_query_len, head_dim**-0.5, out)
    _assert_close(out, ref, torch.bfloat16)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_gpu_backend_mixed_bf16(block_size):
    dev = torch.device("cuda")
    query_lens = [1] * 40 + [300, 1024, 7]
    gen = torch.Generator().manual_seed(4)
    seq_lens = torch.randint(1, 3000, (40,), generator=gen).tolist() + [300, 2500, 1500]
    q, k, v, cache, meta = _make_batch(
        query_lens, seq_lens, 16, 8, 128, block_size, torch.bfloat16, dev, num_pad_tokens=5
    )
    cache_ref = cache.clone()
    ref = TorchReferenceBackend().forward(q, k, v, cache_ref, meta, 128**-0.5)
    backend = get_backend("auto", dev)
    assert backend.name in ("triton", "flash_attn")
    out = TritonBackend().forward(q, k, v, cache, meta, 128**-0.5)
    n = q.shape[0] - 5
    assert torch.equal(cache, cache_ref)
    _assert_close(out[:n], ref[:n], torch.bfloat16)


@gpu
@pytest.mark.gpu
def test_gpu_decode_cuda_graph():
    """Capture once with fixed splits and workspace; replay with changed lengths (incl. 0)."""
    dev = torch.device("cuda")
    batch, heads, kv_heads, d, bs, max_blocks = 32, 16, 8, 128, 16, 256
    lens = [4096] * batch
    q, _, _, cache, meta = _make_batch([1] * batch, lens, heads, kv_heads, d, bs,
                                       torch.bfloat16, dev, seed=9)
    splits = 4
    ws = alloc_decode_workspace(batch, heads, d, splits, dev)
    seq_lens = torch.full((batch,), 4096, dtype=torch.int32, device=dev)
    tables = meta.block_tables[:, :max_blocks].contiguous()
    out = torch.empty_like(q)

    def step():
        decode_attention(q, cache, tables, seq_lens, d**-0.5, out, splits, workspace=ws)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm up / compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        new = torch.randint(0, 4097, (batch,), generator=gen)
        new[:3] = torch.tensor([0, 1, 4096])
        seq_lens.copy_(new.to(torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        ref = _ref_decode(q, cache, tables, new.tolist(), d**-0.5)
        _assert_close(out, ref, torch.bfloat16)
        assert not out[0].any()


@gpu
@pytest.mark.gpu
def test_gpu_graph_derives_the_decode_order_at_replay():
    """A captured decode step sorts its own sequences: the capture drops what the warm-up
    derived into the metadata (engine/cuda_graphs.py `_capture`), so a replay with new
    lengths runs the longest-first order of those lengths, and the bits of an eager call."""
    from novainfer.engine.cuda_graphs import _capture

    dev = torch.device("cuda")
    lens = [40, 9, 33, 3, 22, 17]
    q, _, _, cache, meta = _make_batch([1] * 6, lens, 16, 8, 128, 16, torch.bfloat16, dev)
    backend = TritonBackend(num_splits=1)
    out = torch.empty_like(q)
    graph = _capture(lambda: out.copy_(backend.attend(q, cache, meta, 0.1)), None, meta)
    order = meta.backend_cache["triton_decode_order"]  # the graph's own tensor
    new = [5, 9, 30, 3, 22, 0]
    meta.seq_lens.copy_(torch.tensor(new, dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert [new[i] for i in order.tolist()] == sorted(new, reverse=True)
    eager = dataclasses.replace(meta, backend_cache={})
    assert torch.equal(out, backend.attend(q, cache, eager, 0.1))


@gpu
@pytest.mark.gpu
def test_gpu_second_capture_warms_up_on_its_own_order(monkeypatch):
    """Two captures with one metadata (the LoRA and the sampling graphs do this): the second
    warm-up must sort the lengths itself, not read the first graph's order tensor, which a
    capture allocates but never writes (zeroed here, as stale memory may be)."""
    import novainfer.layers.attention.triton_backend as backend_module
    from novainfer.engine.cuda_graphs import _capture

    eager_orders = []

    def record(*args, **kwargs):
        if not torch.cuda.is_current_stream_capturing():
            eager_orders.append(kwargs["order"].clone())
        return decode_attention(*args, **kwargs)

    monkeypatch.setattr(backend_module, "decode_attention", record)
    dev = torch.device("cuda")
    lens = [40, 9, 33, 3, 22, 17]
    q, _, _, cache, meta = _make_batch([1] * 6, lens, 16, 8, 128, 16, torch.bfloat16, dev)
    backend = TritonBackend(num_splits=1)
    out = torch.empty_like(q)
    _capture(lambda: out.copy_(backend.attend(q, cache, meta, 0.1)), None, meta)
    meta.backend_cache["triton_decode_order"].zero_()
    eager_orders.clear()
    _capture(lambda: out.copy_(backend.attend(q, cache, meta, 0.1)), None, meta)
    assert eager_orders, "the warm-up attended"
    for order in eager_orders:
        assert [lens[i] for i in order.tolist()] == sorted(lens, reverse=True)

