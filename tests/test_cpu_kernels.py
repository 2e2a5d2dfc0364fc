"""The CPU C kernels (novainfer/kernels/cpu_*.c) against their PyTorch twins.

Decode attention against gather + SDPA and against the reference backend (GQA ratios
1/3/4/8, head_dims 8/40/64/128, block sizes 1/16/256, lengths on and off block boundaries,
batches small enough for the per-head work split and large enough for the per-sequence
one); the `cpu` backend on mixed decode + prefill-over-prefix batches with padded slots;
the fused element-wise ops (norms, rope in place on strided views, SiLU-and-mul, KV write);
the fallbacks (other dtypes, no compiler); and the guards at the ctypes boundary (bad
tensors never reach C; out-of-range indices are refused before anything is read or written).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_paged_batch

from novainfer.kernels import cpu_native
from novainfer.layers import activation, fusion, norm, rotary
from novainfer.layers.attention import available_backends, get_backend
from novainfer.layers.attention.cpu_backend import CpuBackend
from novainfer.layers.attention.torch_ref import TorchReferenceBackend, gather_kv

pytestmark = pytest.mark.skipif(
    not cpu_native.native_available(), reason="no C compiler: the CPU kernels cannot be built"
)
CPU = torch.device("cpu")


def _paged_case(num_seqs, lens, num_heads, num_kv_heads, head_dim, block_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = max(-(-n // block_size) for n in lens)
    num_blocks = num_seqs * blocks_per_seq + 3
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    # Each sequence gets a random, non-contiguous set of blocks; unused table entries are 0.
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(num_seqs, blocks_per_seq + 2, dtype=torch.int32)
    for i, n in enumerate(lens):
        used = -(-n // block_size)
        tables[i, :used] = perm[i * blocks_per_seq : i * blocks_per_seq + used]
    q = torch.randn(num_seqs, num_heads, head_dim, generator=g)
    return q, cache, tables, torch.tensor(lens, dtype=torch.int32)


def _sdpa_decode(q, cache, tables, lens, scale):
    out = torch.empty_like(q)
    for i, n in enumerate(lens.tolist()):
        k, v = gather_kv(cache, tables[i : i + 1], n)
        out[i] = F.scaled_dot_product_attention(
            q[i : i + 1, :, None], k, v, scale=scale, enable_gqa=True
        )[0, :, 0]
    return out


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,block_size",
    [(4, 4, 64, 16), (9, 3, 64, 16), (8, 2, 128, 16), (16, 2, 64, 256), (8, 1, 40, 4),
     (4, 1, 8, 1), (8, 8, 128, 32)],
)
@pytest.mark.parametrize("num_seqs", [1, 2, 9])
def test_decode_attention_matches_sdpa(num_heads, num_kv_heads, head_dim, block_size, num_seqs):
    # Lengths of one token, exactly one block, one past it, and longer ragged ones.
    pool = [1, block_size, block_size + 1, 3 * block_size - 1, 77, 300, 2 * block_size]
    lens = [pool[(i * 3) % len(pool)] for i in range(num_seqs)]
    q, cache, tables, lens_t = _paged_case(num_seqs, lens, num_heads, num_kv_heads, head_dim,
                                           block_size)
    scale = head_dim**-0.5
    got = cpu_native.paged_decode_attention(q, cache[0], cache[1], tables, lens_t, scale)
    want = _sdpa_decode(q, cache, tables, lens_t, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decode_attention_single_thread_and_long_context():
    q, cache, tables, lens = _paged_case(3, [4000, 1, 2049], 8, 2, 64, 16, seed=3)
    torch.set_num_threads(1)
    try:
        got = cpu_native.paged_decode_attention(q, cache[0], cache[1], tables, lens, 0.125)
    finally:
        torch.set_num_threads(2)
    torch.testing.assert_close(got, _sdpa_decode(q, cache, tables, lens, 0.125), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(8, 2, 64), (4, 4, 32), (8, 1, 128)])
def test_cpu_backend_matches_reference(num_heads, num_kv_heads, head_dim):
    # Four decodes, a prefill chunk over a cached prefix, a whole prefill; the cache already
    # holds the prefixes and this step's K/V are written by the backend.
    q, k, v, base, meta = make_paged_batch(
        [1, 1, 1, 1, 33, 7], [1, 16, 17, 90, 70, 7], num_heads, num_kv_heads, head_dim, 16, seed=1
    )
    ref_cache, cpu_cache = base.clone(), base.clone()
    want = TorchReferenceBackend().forward(q, k, v, ref_cache, meta, head_dim**-0.5)
    got = CpuBackend().forward(q, k, v, cpu_cache, meta, head_dim**-0.5)
    torch.testing.assert_close(cpu_cache, ref_cache, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_store_kv_skips_padding_slots():
    cache = torch.zeros(2, 4, 4, 2, 8)
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    slots = torch.tensor([3, -1, 0, 15, -1])
    cpu_native.store_kv(k, v, cache, slots)
    flat_k, flat_v = cache[0].view(16, 2, 8), cache[1].view(16, 2, 8)
    for row, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat_k[slot], k[row]) and torch.equal(flat_v[slot], v[row])
    written = {s for s in slots.tolist() if s >= 0}
    untouched = [s for s in range(16) if s not in written]
    assert flat_k[untouched].abs().sum() == 0 and flat_v[untouched].abs().sum() == 0


@pytest.mark.parametrize("rows", [1, 7, 200])  # 200 x 576 crosses the parallel threshold
@pytest.mark.parametrize("n", [576, 77])  # 77: the 8-wide and the scalar tails of the sum too
def test_norms_match_reference(rows, n):
    g = torch.Generator().manual_seed(rows)
    x, res = torch.randn(rows, n, generator=g), torch.randn(rows, n, generator=g)
    w = torch.randn(n, generator=g)
    torch.testing.assert_close(
        norm.rms_norm(x, w, 1e-6), norm.rms_norm.reference(x, w, 1e-6), rtol=1e-5, atol=1e-5
    )
    out, total = norm.add_rms_norm(x, res, w, 1e-5)
    want_out, want_total = norm.add_rms_norm.reference(x, res, w, 1e-5)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(total, want_total)
    assert not torch.equal(res, total)  # the inputs are left alone


@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(1, 9, 3, 64), (37, 4, 2, 128),
                                                             (300, 16, 8, 64), (5, 2, 1, 8)])
def test_rope_in_place_on_strided_views(tokens, heads, kv_heads, head_dim):
    rope = rotary.RotaryEmbedding(head_dim, 1024, 10000.0, {})
    g = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    pos = torch.randint(0, 1024, (tokens,), generator=g)
    want_q, want_k = rotary.apply_rope.reference(q.clone(), k.clone(), pos, rope.cos, rope.sin)
    got_q, got_k = rotary.apply_rope(q, k, pos, rope.cos, rope.sin)
    assert got_q.data_ptr() == q.data_ptr()  # rotated in place
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before)  # v untouched


@pytest.mark.parametrize("rows,size", [(1, 1536), (3, 8), (64, 1536)])
def test_silu_and_mul_matches_reference(rows, size):
    gate_up = torch.randn(rows, 2 * size, generator=torch.Generator().manual_seed(rows)) * 6
    torch.testing.assert_close(
        activation.silu_and_mul(gate_up), activation.silu_and_mul.reference(gate_up),
        rtol=1e-5, atol=1e-5,
    )


def test_other_dtypes_and_opt_out_use_the_pytorch_code(monkeypatch):
    x = torch.randn(4, 64, dtype=torch.float64)
    w = torch.randn(64, dtype=torch.float64)
    assert torch.equal(norm.rms_norm(x, w, 1e-6), norm.rms_norm.reference(x, w, 1e-6))
    monkeypatch.setattr(fusion, "PLAIN_PYTORCH", True)  # what NOVAINFER_NO_COMPILE=1 sets
    q, k = torch.randn(2, 4, 64), torch.randn(2, 2, 64)
    rope = rotary.RotaryEmbedding(64, 16, 10000.0, {})
    got_q, _ = rotary.apply_rope(q, k, torch.tensor([0, 5]), rope.cos, rope.sin)
    assert got_q.data_ptr() != q.data_ptr()  # the PyTorch version returns new tensors


def test_registry_lists_cpu_only_where_it_runs():
    assert available_backends(CPU, 64)[0] == "cpu"
    assert "cpu" not in available_backends(CPU, 36)  # not a multiple of 8: reference only
    assert isinstance(get_backend("auto", CPU, 64), CpuBackend)
    with pytest.raises(ValueError, match="allowed: auto, torch"):
        get_backend("cpu", CPU, 36)


def test_without_a_compiler_auto_falls_back_and_explicit_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_native, "_library", None)
    monkeypatch.setenv("NOVAINFER_CACHE_DIR", str(tmp_path))  # no library built there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.warns(UserWarning, match="CPU attention kernel is unavailable"):
        backend = get_backend("auto", CPU, 64)
    assert isinstance(backend, TorchReferenceBackend) and backend.name == "torch"
    with pytest.raises(ValueError, match="attention_backend 'cpu' is not available"):
        get_backend("cpu", CPU, 64)


def _bad_calls():
    """(name, call) pairs the wrappers must refuse before calling C: a wrong dtype, a
    non-contiguous tensor or a shape that does not fit the others."""
    q, cache, tables, lens = _paged_case(2, [5, 20], 4, 2, 16, 4)
    kv = torch.randn(3, 2, 16)
    kv_cache = torch.zeros(2, 6, 4, 2, 16)
    x, w = torch.randn(3, 32), torch.randn(32)
    rope = rotary.RotaryEmbedding(16, 64, 10000.0, {})
    qr, kr, pos = torch.randn(3, 4, 16), torch.randn(3, 2, 16), torch.tensor([0, 1, 2])
    packed = cpu_native.pack_linear_weight(torch.randn(40, 32))

    def attn(**change):
        args = {"q": q, "k_cache": cache[0], "v_cache": cache[1], "block_tables": tables,
                "seq_lens": lens, "scale": 0.25}
        return lambda: cpu_native.paged_decode_attention(**{**args, **change})

    return [
        ("q float64", attn(q=q.double())),
        ("head_dim not a multiple of 8", attn(q=q[..., :12], k_cache=cache[0][..., :12])),
        ("k_cache not contiguous", attn(k_cache=cache[0].transpose(0, 1).contiguous()
                                        .transpose(0, 1))),
        ("v_cache of another shape", attn(v_cache=cache[1][:-1])),
        ("kv heads not dividing heads", attn(q=torch.randn(2, 3, 16))),
        ("seq_lens of another batch", attn(seq_lens=lens[:1])),
        ("out float64", attn(out=torch.empty_like(q, dtype=torch.float64))),
        ("store_kv k float64", lambda: cpu_native.store_kv(kv.double(), kv, kv_cache,
                                                           torch.tensor([0, 1, 2]))),
        ("store_kv cache not contiguous",
         lambda: cpu_native.store_kv(kv, kv, kv_cache.transpose(1, 2), torch.tensor([0, 1, 2]))),
        ("store_kv cache of other heads",
         lambda: cpu_native.store_kv(kv, kv, kv_cache[..., :8], torch.tensor([0, 1, 2]))),
        ("store_kv a slot per row", lambda: cpu_native.store_kv(kv, kv, kv_cache,
                                                                torch.tensor([0, 1]))),
        ("rms_norm weight of another size", lambda: cpu_native.rms_norm(x, w[:16], 1e-6)),
        ("add_rms_norm residual float64",
         lambda: cpu_native.add_rms_norm(x, x.double(), w, 1e-6)),
        ("rope q float64", lambda: cpu_native.apply_rope(qr.double(), kr, pos, rope.cos,
                                                         rope.sin)),
        ("rope table of another head_dim",
         lambda: cpu_native.apply_rope(qr, kr, pos, rope.cos[:, :8], rope.sin[:, :8])),
        ("rope a position per token", lambda: cpu_native.apply_rope(qr, kr, pos[:2], rope.cos,
                                                                    rope.sin)),
        ("silu_and_mul odd width", lambda: cpu_native.silu_and_mul(torch.randn(2, 7))),
        ("packed_linear panels of another size",
         lambda: cpu_native.packed_linear(x, packed, None, 60)),
        ("packed_linear x of another width",
         lambda: cpu_native.packed_linear(torch.randn(3, 16), packed, None, 40)),
        ("packed_linear bias of another size",
         lambda: cpu_native.packed_linear(x, packed, torch.randn(39), 40)),
        ("pack_linear_weight float64",
         lambda: cpu_native.pack_linear_weight(torch.randn(40, 32, dtype=torch.float64))),
    ]


@pytest.mark.parametrize("name,call", _bad_calls(), ids=[n for n, _ in _bad_calls()])
def test_bad_tensors_never_reach_the_kernels(monkeypatch, name, call):
    def no_kernel(*args):
        raise AssertionError(f"{args[0]} ran with a bad argument")

    monkeypatch.setattr(cpu_native, "_run", no_kernel)
    with pytest.raises(ValueError, match=r"must be .*\(internal bug guard"):
        call()


def test_out_of_range_indices_are_refused_before_memory_is_touched():
    # The kernels check every index they will use before their first read or write.
    q, cache, tables, lens = _paged_case(2, [5, 20], 4, 2, 16, 4)  # 13 blocks of 4, 7 a row
    out = torch.full_like(q, 7.0)
    for bad_tables, bad_lens, match in [
        (tables, torch.tensor([5, 29], dtype=torch.int32), r"seq_lens must be in \[1, 28\]"),
        (tables, torch.tensor([0, 20], dtype=torch.int32), r"seq_lens .* got \[0\]"),
        (tables.index_fill(1, torch.tensor([1]), 13), lens, r"block ids in \[0, 13\).* \[13"),
        (tables.index_fill(1, torch.tensor([4]), -1), lens, r"block_tables .* got \[-1\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            cpu_native.paged_decode_attention(q, cache[0], cache[1], bad_tables, bad_lens, 0.25,
                                              out=out)
        assert (out == 7.0).all()
    # Entries past a sequence's length are never read: padding may hold anything.
    padded = tables.clone()
    padded[0, 2:] = -5
    cpu_native.paged_decode_attention(q, cache[0], cache[1], padded, lens, 0.25, out=out)

    kv_cache = torch.zeros(2, 6, 4, 2, 16)  # 24 slots
    kv = torch.randn(3, 2, 16)
    with pytest.raises(ValueError, match=r"slots must be below 24 .* got \[24\]"):
        cpu_native.store_kv(kv, kv, kv_cache, torch.tensor([0, -1, 24]))
    assert (kv_cache == 0).all()  # not even the valid rows were written

    rope = rotary.RotaryEmbedding(16, 64, 10000.0, {})
    qr, kr = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    before = qr.clone(), kr.clone()
    for pos in ([0, 64, 1], [0, -1, 1]):
        with pytest.raises(ValueError, match=r"positions must be in \[0, 64\)"):
            cpu_native.apply_rope(qr, kr, torch.tensor(pos), rope.cos, rope.sin)
        assert torch.equal(qr, before[0]) and torch.equal(kr, before[1])


def test_backend_refuses_metadata_that_points_outside_the_cache():
    q, k, v, cache, meta = make_paged_batch([1, 1, 5], [3, 9, 5], 4, 2, 16, 4, seed=2)
    num_slots = cache.shape[1] * cache.shape[2]
    meta.slot_mapping = meta.slot_mapping.clone()
    meta.slot_mapping[0] = num_slots
    with pytest.raises(ValueError, match="slots must be below"):
        CpuBackend().forward(q, k, v, cache.clone(), meta, 0.25)
    _, _, _, _, meta = make_paged_batch([1, 1, 5], [3, 9, 5], 4, 2, 16, 4, seed=2)
    meta.block_tables = meta.block_tables.clone()
    meta.block_tables[1, 0] = cache.shape[1]
    with pytest.raises(ValueError, match="block ids"):
        CpuBackend().forward(q, k, v, cache.clone(), meta, 0.25)
