"""The fp8 KV cache's kernels: the store (quantize) and the attention kernels' fp8 reads,
checked against their PyTorch twins (novainfer/kernels/fp8.py, the reference backend on a
dequantized cache).

Without a GPU the Triton kernels run in the interpreter. Its fp32 -> e4m3 cast rounds some
values differently from the hardware (subnormals), so on the CPU the stored values are
chosen exactly representable after scaling (the scale, the saturation and the byte layout
are still checked); the `gpu` tests store random values and compare the bytes exactly.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

pytest.importorskip("triton")

from conftest import make_paged_batch

from novainfer.kernels.decode_attention import decode_attention, decode_order
from novainfer.kernels.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    calibrate_kv_scales,
    dequantize_fp8,
    quantize_fp8,
)
from novainfer.kernels.kv_cache import store_kv
from novainfer.kernels.prefill_attention import prefill_attention
from novainfer.layers.attention.torch_ref import TorchReferenceBackend, write_kv
from novainfer.layers.attention.triton_backend import TritonBackend

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEV = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRET,
    reason="needs a CUDA device and compiled triton kernels (TRITON_INTERPRET unset)",
)
if DEV.type == "cuda" and torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("Triton's e4m3 needs compute capability 8.9+", allow_module_level=True)

SCALES = (0.5, 2.0)  # k, v: not 1, so a scale applied to the wrong tensor (or not at all) shows


def _scales(device=DEV) -> torch.Tensor:
    return torch.tensor(SCALES, dtype=torch.float32, device=device)


def _representable(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x moved onto the fp8 grid of `scale` (so quantizing it is exact), in x's dtype."""
    s = torch.tensor(scale)
    return dequantize_fp8(quantize_fp8(x.cpu(), s), s, x.dtype).to(x.device)


def _fp8_cache(cache: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.stack([quantize_fp8(cache[0], scales[0]), quantize_fp8(cache[1], scales[1])])


def _dequantized(cache: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.stack([dequantize_fp8(cache[i], scales[i], dtype) for i in (0, 1)])


# ---------------------------------------------------------------------- the number format


def test_quantize_saturates_and_round_trips():
    scale = torch.tensor(0.25)
    x = torch.tensor([0.0, 1.0, -3.0, 104.0, 112.1, -200.0, 1e9, -1e9])
    q = quantize_fp8(x, scale)
    assert q.dtype == FP8_DTYPE
    back = dequantize_fp8(q, scale, torch.float32)
    # saturated at ±448 * scale instead of NaN (a plain cast of 1e9 / 0.25 would be NaN)
    assert back[-2] == FP8_MAX * 0.25 and back[-1] == -FP8_MAX * 0.25 and back[3] == 104.0
    assert torch.isfinite(back).all()
    # normal range: e4m3 keeps 3 mantissa bits, a relative error of at most 2^-4
    y = torch.randn(10_000) * 3
    yb = dequantize_fp8(quantize_fp8(y, scale), scale, torch.float32)
    normal = y.abs() / 0.25 >= 2.0**-6
    assert ((yb - y).abs() <= y.abs() * 2.0**-4 + 1e-7)[normal].all()


def test_calibrate_sets_amax_over_448_and_keeps_zero_scales():
    k = torch.tensor([[1.0, -8.96]])
    v = torch.zeros(1, 2)
    scales = torch.ones(2)
    calibrate_kv_scales(k, v, scales)
    torch.testing.assert_close(scales, torch.tensor([8.96 / FP8_MAX, 1.0]))


# ---------------------------------------------------------------------- the store


def _store_case(representable: bool, dtype=torch.float32):
    _, k, v, cache, meta = make_paged_batch([3, 1, 5], [3, 9, 12], 4, 2, 32, 4, dtype, DEV,
                                            num_pad_tokens=2, seed=1)
    k = k * 3
    k[0, 0, :4] = torch.tensor([1e4, -1e4, 300.0, -0.001])  # saturates / saturates / fits / tiny
    if representable:
        k, v = _representable(k, SCALES[0]), _representable(v, SCALES[1])
    return k, v, meta, cache.shape


@pytest.mark.parametrize("representable", [True, pytest.param(False, marks=[gpu, pytest.mark.gpu])])
def test_store_kv_fp8_matches_torch_twin(representable):
    k, v, meta, shape = _store_case(representable)
    scales = _scales()
    cache = torch.zeros(shape, dtype=FP8_DTYPE, device=DEV)
    ref = torch.zeros(shape, dtype=FP8_DTYPE, device=DEV)
    store_kv(k, v, cache, meta.slot_mapping, scales)
    write_kv(k, v, ref, meta.slot_mapping, kv_scales=scales)
    assert torch.equal(cache.view(torch.uint8), ref.view(torch.uint8))
    slot = int(meta.slot_mapping[0])
    first = cache[0].view(-1, *shape[-2:])[slot, 0, :2].float()
    assert first.tolist() == [FP8_MAX, -FP8_MAX]  # saturated, not NaN
    # padding rows (slot -1) wrote nothing: as many non-zero slots as real tokens at most
    written = cache.view(torch.uint8).view(2, -1, *shape[-2:]).flatten(2).ne(0).any(-1).any(0)
    assert int(written.sum()) <= int((meta.slot_mapping >= 0).sum())


# ---------------------------------------------------------------------- attention reads


def _attention_case(query_lens, seq_lens, dtype, seed=3, heads=(4, 2), head_dim=32, block=8):
    q, k, v, cache, meta = make_paged_batch(query_lens, seq_lens, heads[0], heads[1], head_dim,
                                            block, dtype, DEV, seed=seed)
    scales = _scales()
    fp8 = _fp8_cache(cache.float() * 4, scales)  # values up to ~16: well inside e4m3's range
    return q, k, v, fp8, _dequantized(fp8, scales, dtype), scales, meta


def _close(out, ref, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=5e-5, rtol=1e-4)
    else:
        err = (out.float() - ref.float()).norm() / ref.float().norm()
        assert err <= 2e-2, f"relative error {err:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_reads_fp8_like_the_dequantized_cache(dtype):
    lens = [5, 33, 17, 64]
    q, _, _, fp8, deq, scales, meta = _attention_case([1] * 4, lens, dtype)
    out = torch.empty_like(q)
    ref = torch.empty_like(q)
    for splits in (1, 3):
        decode_attention(q, fp8, meta.block_tables, meta.seq_lens, 0.2, out,
                         num_splits=splits, kv_scales=scales)
        TorchReferenceBackend().decode(q, deq, meta, 0.2, ref)
        _close(out, ref, dtype)


def test_decode_fp8_program_order_gives_the_same_bits():
    """Over an fp8 cache too, launching a sequence's kv heads side by side and the sequences
    longest first changes no output bit (kernels/decode_attention.py, decode_order)."""
    lens = [5, 130, 17, 0, 64]
    q, _, _, fp8, _, scales, meta = _attention_case([1] * 5, lens, torch.float32)
    for splits in (1, 2):
        plain, ordered = torch.empty_like(q), torch.empty_like(q)
        decode_attention(q, fp8, meta.block_tables, meta.seq_lens, 0.2, plain,
                         num_splits=splits, kv_scales=scales)
        decode_attention(q, fp8, meta.block_tables, meta.seq_lens, 0.2, ordered,
                         num_splits=splits, kv_scales=scales, heads_first=True,
                         order=decode_order(meta.seq_lens))
        assert torch.equal(ordered, plain)


def test_decode_fp8_128_token_tiles():
    """fp8's default tile for long contexts (128 tokens, 5 stages) against the dequantized
    cache, with lengths around the tile edge."""
    lens = [127, 128, 129, 300]
    q, _, _, fp8, deq, scales, meta = _attention_case([1] * 4, lens, torch.float32)
    out, ref = torch.empty_like(q), torch.empty_like(q)
    decode_attention(q, fp8, meta.block_tables, meta.seq_lens, 0.2, out, num_splits=1,
                     kv_scales=scales, block_n=128, num_stages=5)
    TorchReferenceBackend().decode(q, deq, meta, 0.2, ref)
    _close(out, ref, torch.float32)


def test_decode_fp16_dots_narrow_and_clamp_q():
    """The fp16-dot kernel (the default for bf16 models, run here on fp32 q, which the CPU
    interpreter handles): q narrowed to fp16 gives the dequantized cache's answer within
    fp16 rounding, and a query element beyond fp16's range saturates (no inf, no NaN)."""
    lens = [5, 33, 17, 64]
    q, _, _, fp8, deq, scales, meta = _attention_case([1] * 4, lens, torch.float32)
    out, ref = torch.empty_like(q), torch.empty_like(q)
    decode_attention(q, fp8, meta.block_tables, meta.seq_lens, 0.2, out, kv_scales=scales,
                     dot_f16=True)
    TorchReferenceBackend().decode(q.half().float(), deq, meta, 0.2, ref)
    _close(out, ref, torch.float16)
    q[0, 0, 0] = 1e6
    decode_attention(q, fp8, meta.block_tables, meta.seq_lens, 0.2, out, kv_scales=scales,
                     dot_f16=True)
    assert torch.isfinite(out).all()
    clamped = q.clamp(-65504, 65504).half().float()
    TorchReferenceBackend().decode(clamped, deq, meta, 0.2, ref)
    _close(out, ref, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_reads_fp8_like_the_dequantized_cache(dtype):
    q, _, _, fp8, deq, scales, meta = _attention_case([7, 20], [7, 45], dtype)
    out = torch.empty_like(q)
    ref = torch.empty_like(q)
    prefill_attention(q, fp8, meta.block_tables, meta.query_start_loc, meta.seq_lens, 20, 0.2,
                      out, kv_scales=scales)
    TorchReferenceBackend.prefill(q, deq, meta, 0.2, ref)
    _close(out, ref, dtype)


def test_reference_backend_on_fp8_equals_reference_on_dequantized():
    """The torch backend's fp8 path is the dequantize-then-attend rule, exactly."""
    q, k, v, fp8, deq, scales, meta = _attention_case([1, 1, 6], [9, 30, 20], torch.float32)
    k, v = _representable(k, SCALES[0]), _representable(v, SCALES[1])
    out = TorchReferenceBackend().forward(q, k, v, fp8, meta, 0.2, scales)
    ref = TorchReferenceBackend().forward(q, k, v, deq, meta, 0.2)
    torch.testing.assert_close(_dequantized(fp8, scales, torch.float32), deq)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_triton_backend_fp8_matches_reference_backend():
    q, k, v, fp8, _, scales, meta = _attention_case([1, 1, 5, 12], [9, 30, 20, 12], torch.float32)
    k, v = _representable(k, SCALES[0]), _representable(v, SCALES[1])
    ref_cache = fp8.clone()
    ref = TorchReferenceBackend().forward(q, k, v, ref_cache, meta, 0.2, scales)
    out = TritonBackend().forward(q, k, v, fp8, meta, 0.2, scales)
    assert torch.equal(fp8.view(torch.uint8), ref_cache.view(torch.uint8))
    _close(out, ref, torch.float32)


# ---------------------------------------------------------------------- GPU, realistic shapes


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("query_lens,seq_lens", [([1] * 32, [700 + 97 * i for i in range(32)]),
                                                 ([1, 1, 300, 1000], [4000, 17, 800, 1000])])
def test_bf16_fp8_backend_matches_reference_on_realistic_shapes(query_lens, seq_lens):
    q, k, v, fp8, _, scales, meta = _attention_case(
        query_lens, seq_lens, torch.bfloat16, heads=(16, 8), head_dim=128, block=16)
    ref_cache = fp8.clone()
    ref = TorchReferenceBackend().forward(q, k, v, ref_cache, meta, 128**-0.5, scales)
    out = TritonBackend().forward(q, k, v, fp8, meta, 128**-0.5, scales)
    assert torch.equal(fp8.view(torch.uint8), ref_cache.view(torch.uint8))
    _close(out, ref, torch.bfloat16)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dot_f16", [False, True], ids=["bf16-dots", "fp16-dots"])
def test_bf16_decode_over_fp8_in_either_dot_dtype(dot_f16):
    """NOVAINFER_FP8_DOT's two kernels (the dots in bf16, or q narrowed and the cache widened
    to fp16) both match the dequantized cache's reference, split and not."""
    lens = [700 + 97 * i for i in range(32)]
    q, _, _, fp8, deq, scales, meta = _attention_case(
        [1] * 32, lens, torch.bfloat16, heads=(16, 8), head_dim=128, block=16)
    out, ref = torch.empty_like(q), torch.empty_like(q)
    TorchReferenceBackend().decode(q, deq, meta, 128**-0.5, ref)
    for splits in (1, 4):
        decode_attention(q, fp8, meta.block_tables, meta.seq_lens, 128**-0.5, out,
                         num_splits=splits, kv_scales=scales, dot_f16=dot_f16)
        _close(out, ref, torch.bfloat16)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("heads,head_dim,dtype", [((16, 8), 128, torch.bfloat16),
                                                  ((12, 2), 128, torch.bfloat16),
                                                  ((8, 8), 64, torch.float16)],
                         ids=["group2-bf16", "group6-bf16", "group1-d64-fp16"])
def test_fp8_decode_v_pairs_equals_the_byte_path(heads, head_dim, dtype):
    """V read as 16-bit pairs (`v_pairs`, inline PTX: GPU only) against the byte-wise read
    and the dequantized cache's reference: groups of 2, 6 and 1, 64- and 128-token tiles,
    1-4 splits, lengths at the tile edges, and a padding row (length 0: zeros)."""
    lens = [1, 15, 16, 17, 63, 64, 65, 127, 128, 129, 700, 2049]
    q, _, _, fp8, deq, scales, meta = _attention_case(
        [1] * len(lens), lens, dtype, heads=heads, head_dim=head_dim, block=16)
    ref = torch.empty_like(q)
    TorchReferenceBackend().decode(q, deq, meta, head_dim**-0.5, ref)
    seq_lens = meta.seq_lens.clone()
    seq_lens[2] = 0  # the kernels' padding row (CUDA graphs)
    live = [i for i in range(len(lens)) if i != 2]
    for splits, block_n, stages in ((1, 128, 5), (2, 128, 3), (4, 64, 2)):
        outs = []
        for pairs in (False, True):
            out = torch.full_like(q, float("nan"))
            decode_attention(q, fp8, meta.block_tables, seq_lens, head_dim**-0.5, out,
                             num_splits=splits, kv_scales=scales, block_n=block_n,
                             num_stages=stages, dot_f16=True, v_pairs=pairs)
            outs.append(out)
        assert not outs[1][2].any() and not outs[0][2].any(), "a padding row gives zeros"
        _close(outs[1][live], ref[live], dtype)
        torch.testing.assert_close(outs[1], outs[0], atol=2e-3, rtol=1e-2)


def test_v_pairs_where_they_cannot_apply_is_an_error():
    """V pairs need compiled kernels (inline PTX) on CUDA, an fp8 cache and fp16 dots:
    asking for them elsewhere names the argument instead of silently taking the byte path."""
    q, _, _, fp8, deq, scales, meta = _attention_case([1, 1], [9, 30], torch.float32)
    out = torch.empty_like(q)
    with pytest.raises(ValueError, match="v_pairs=True needs"):
        decode_attention(q, deq, meta.block_tables, meta.seq_lens, 0.2, out, v_pairs=True)
    if DEV.type != "cuda":  # the interpreter: the byte path, also by default
        with pytest.raises(ValueError, match="compiled kernels on CUDA"):
            decode_attention(q, fp8, meta.block_tables, meta.seq_lens, 0.2, out,
                             kv_scales=scales, dot_f16=True, v_pairs=True)
        ref = torch.empty_like(q)
        TorchReferenceBackend().decode(q, _dequantized(fp8, scales, q.dtype), meta, 0.2, ref)
        decode_attention(q, fp8, meta.block_tables, meta.seq_lens, 0.2, out, kv_scales=scales)
        _close(out, ref, torch.float32)


def test_fp8_dot_setting_is_checked(monkeypatch):
    from novainfer.kernels import decode_attention as module

    monkeypatch.delenv("NOVAINFER_FP8_DOT", raising=False)
    module.fp8_dot_fp16.cache_clear()
    try:
        assert module.fp8_dot_fp16()  # the default
        monkeypatch.setenv("NOVAINFER_FP8_DOT", "bf16")
        module.fp8_dot_fp16.cache_clear()
        assert not module.fp8_dot_fp16()
        monkeypatch.setenv("NOVAINFER_FP8_DOT", "int8")
        module.fp8_dot_fp16.cache_clear()
        with pytest.raises(ValueError, match="NOVAINFER_FP8_DOT must be"):
            module.fp8_dot_fp16()
    finally:
        monkeypatch.delenv("NOVAINFER_FP8_DOT", raising=False)
        module.fp8_dot_fp16.cache_clear()
