"""The hand-written Triton RMSNorm, add + RMSNorm and SiLU-and-mul (kernels/norm_act.py)
against their PyTorch twins (layers/norm.py, layers/activation.py `.reference`), and the
NOVAINFER_FUSED_OPS switch that selects them.

Without a GPU the kernels run in the Triton interpreter (fp32/fp16); the `gpu` tests check
bf16 compiled, CUDA-graph capture, and the whole model under either setting of the switch.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton (and our kernel modules) are imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from novainfer.kernels import norm_act
from novainfer.layers import activation, fusion, norm, rotary

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEV = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRET,
    reason="needs a CUDA device and compiled triton kernels (TRITON_INTERPRET unset)",
)

# Qwen3-0.6B (1024, q/k norm 128), Qwen2-0.5B (896), Qwen2-1.5B (1536), Llama-3-8B (4096), odd.
SIZES = [128, 896, 1536, 4096, 77]
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float16: {"rtol": 1e-3, "atol": 1e-3},
       torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2}}  # one rounding step of the dtype


def _inputs(rows: int, n: int, dtype: torch.dtype, device=DEV, seed: int = 0):
    g = torch.Generator().manual_seed(seed + rows * 7919 + n)
    x = (torch.randn(rows, n, generator=g) * 3).to(dtype).to(device)
    res = torch.randn(rows, n, generator=g).to(dtype).to(device)
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(dtype).to(device)
    return x, res, w


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL[dtype])
    if dtype == torch.float32:
        return  # fp32 sums in another order differ in the last bit everywhere
    # Same rounding order as the reference: the fp32 statistics' last-bit differences
    # vanish in the rounding to 16 bits, so nearly every element is bit-identical.
    same = (got == want).float().mean().item()
    assert same > 0.97, f"only {same:.1%} of elements equal the reference"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 37])
@pytest.mark.parametrize("n", SIZES)
def test_rms_norm_matches_reference(dtype, rows, n):
    x, _, w = _inputs(rows, n, dtype)
    _close(norm_act.rms_norm(x, w, 1e-6), norm.rms_norm.reference(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 37])
@pytest.mark.parametrize("n", SIZES)
def test_add_rms_norm_matches_reference(dtype, rows, n):
    x, res, w = _inputs(rows, n, dtype)
    x_before, res_before = x.clone(), res.clone()
    out, total = norm_act.add_rms_norm(x, res, w, 1e-5)
    want_out, want_total = norm.add_rms_norm.reference(x, res, w, 1e-5)
    assert torch.equal(total, want_total)  # the residual stream is exact
    _close(out, want_out, dtype)
    assert torch.equal(x, x_before) and torch.equal(res, res_before)  # inputs left alone


def test_many_rows_and_mixed_weight_dtype():
    """Many rows (several programs of several rows each) and an fp32 weight on fp16
    activations (the output is promoted, as in PyTorch)."""
    x, res, _ = _inputs(300, 128, torch.float16)
    w = torch.randn(128, generator=torch.Generator().manual_seed(3)).to(DEV)
    out = norm_act.rms_norm(x, w, 1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, norm.rms_norm.reference(x, w, 1e-6), rtol=1e-5, atol=1e-5)
    got, total = norm_act.add_rms_norm(x, res, w, 1e-6)
    want, want_total = norm.add_rms_norm.reference(x, res, w, 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(total, want_total)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_of_strided_heads(dtype):
    """q/k norm: [tokens, heads, head_dim] views of the fused qkv output, read in place."""
    tokens, heads, kv_heads, d = 5, 4, 2, 64
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=g).to(dtype).to(DEV)
    q = qkv[:, : heads * d].view(tokens, heads, d)
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(tokens, kv_heads, d)
    w = (1 + torch.randn(d, generator=g)).to(dtype).to(DEV)
    for t in (q, k):
        got = norm_act.rms_norm(t, w, 1e-6)
        assert got.is_contiguous()
        _close(got, norm.rms_norm.reference(t, w, 1e-6), dtype)


def test_empty_and_bad_inputs():
    x, res, w = _inputs(3, 64, torch.float32)
    assert norm_act.rms_norm(x[:0], w, 1e-6).shape == (0, 64)
    assert norm_act.silu_and_mul(x[:0]).shape == (0, 32)
    with pytest.raises(ValueError, match="weight has shape"):
        norm_act.rms_norm(x, w[:32], 1e-6)
    with pytest.raises(ValueError, match="residual"):
        norm_act.add_rms_norm(x, res.half(), w, 1e-6)
    with pytest.raises(ValueError, match="must be even"):
        norm_act.silu_and_mul(x[:, :63])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,size", [(1, 3072), (37, 1536), (4, 77), (2, 4864)])
def test_silu_and_mul_matches_reference(dtype, rows, size):
    g = torch.Generator().manual_seed(rows + size)
    gate_up = (torch.randn(rows, 2 * size, generator=g) * 4).to(dtype).to(DEV)
    _close(norm_act.silu_and_mul(gate_up), activation.silu_and_mul.reference(gate_up), dtype)


def test_silu_and_mul_of_strided_rows():
    g = torch.Generator().manual_seed(8)
    wide = torch.randn(6, 300, generator=g).to(DEV)
    gate_up = wide[:, :256]  # rows strided by 300
    _close(norm_act.silu_and_mul(gate_up), activation.silu_and_mul.reference(gate_up),
           torch.float32)


def test_fused_ops_switch_values():
    assert fusion.fused_ops_mode(None) == "triton"
    assert fusion.fused_ops_mode("") == "triton"
    assert fusion.fused_ops_mode(" Triton ") == "triton"
    with pytest.raises(ValueError, match="NOVAINFER_FUSED_OPS must be one of compile, triton"):
        fusion.fused_ops_mode("eager")
    assert norm.rms_norm.triton_name == "rms_norm"
    assert norm.add_rms_norm.triton_name == "add_rms_norm"
    assert activation.silu_and_mul.triton_name == "silu_and_mul"
    for op in (norm.rms_norm, norm.add_rms_norm, activation.silu_and_mul):
        assert callable(fusion.triton_op(op.triton_name))


def _qk_inputs(tokens, heads, kv_heads, d, dtype, device=DEV, max_pos=4096, seed=0):
    g = torch.Generator().manual_seed(seed + tokens)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=g) * 2).to(dtype).to(device)
    q = qkv[:, : heads * d].view(tokens, heads, d)  # strided views, as in the model
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(tokens, kv_heads, d)
    qw = (1 + 0.3 * torch.randn(d, generator=g)).to(dtype).to(device)
    kw = (1 + 0.3 * torch.randn(d, generator=g)).to(dtype).to(device)
    rope = rotary.RotaryEmbedding(d, max_pos, 1e6, {}).to(device)
    pos = torch.randint(0, max_pos, (tokens,), generator=g).to(device)
    return q, k, pos, qw, kw, rope


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,heads,kv_heads,d", [(1, 16, 8, 128), (9, 4, 2, 64),
                                                     (33, 3, 1, 32), (5, 6, 2, 48)])
def test_qk_norm_rope_matches_reference(dtype, tokens, heads, kv_heads, d):
    q, k, pos, qw, kw, rope = _qk_inputs(tokens, heads, kv_heads, d, dtype)
    got_q, got_k = norm_act.qk_norm_rope(q, k, pos, qw, kw, 1e-6, rope.cos, rope.sin)
    want_q, want_k = rotary.qk_norm_rope_reference(q, k, pos, qw, kw, 1e-6, rope.cos, rope.sin)
    _close(got_q, want_q, dtype)
    _close(got_k, want_k, dtype)


def test_qk_norm_rope_only_on_cuda_under_triton(monkeypatch):
    """Off CUDA, or under compile, the model keeps its q_norm, k_norm and rotary modules."""
    q, k, pos, qw, kw, rope = _qk_inputs(7, 4, 2, 64, torch.float32, torch.device("cpu"))
    monkeypatch.setattr(fusion, "FUSED_OPS", "triton")
    assert not rotary.fused_qk_norm_rope_applies(q)
    with pytest.raises(ValueError, match="q/k norm weights"):
        norm_act.qk_norm_rope(q, k, pos, qw[:32], kw, 1e-6, rope.cos, rope.sin)


# ----------------------------------------------------------------------------- GPU


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 256, 4096])
def test_gpu_bf16_qk_norm_rope_matches_reference(tokens):
    q, k, pos, qw, kw, rope = _qk_inputs(tokens, 16, 8, 128, torch.bfloat16,
                                         torch.device("cuda"), max_pos=40960)
    got = norm_act.qk_norm_rope(q, k, pos, qw, kw, 1e-6, rope.cos, rope.sin)
    want = rotary.qk_norm_rope_reference(q, k, pos, qw, kw, 1e-6, rope.cos, rope.sin)
    exact = rotary.qk_norm_rope_reference(q.double(), k.double(), pos, qw.double(),
                                          kw.double(), 1e-6, rope.cos, rope.sin)
    for a, b, x in zip(got, want, exact):
        torch.testing.assert_close(a, b, **TOL[torch.bfloat16])
        # Compiled, only 80-87% of the elements are bit-identical to PyTorch's eager ops
        # (H200; > 97% in the interpreter): instead, as accurate as they are on average.
        ours, theirs = ((t.double() - x).abs().mean().item() for t in (a, b))
        assert ours <= 1.1 * theirs, f"mean error {ours:.3e} vs PyTorch's {theirs:.3e}"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 7, 512, 4096])
@pytest.mark.parametrize("n", [128, 896, 1024, 1536, 4096])
def test_gpu_bf16_norms_match_reference(rows, n):
    x, res, w = _inputs(rows, n, torch.bfloat16, torch.device("cuda"))
    _close(norm_act.rms_norm(x, w, 1e-6), norm.rms_norm.reference(x, w, 1e-6), torch.bfloat16)
    out, total = norm_act.add_rms_norm(x, res, w, 1e-6)
    want_out, want_total = norm.add_rms_norm.reference(x, res, w, 1e-6)
    assert torch.equal(total, want_total)
    _close(out, want_out, torch.bfloat16)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 64, 512])
@pytest.mark.parametrize("size", [3072, 8960, 14336])
def test_gpu_bf16_silu_and_mul_matches_reference(rows, size):
    g = torch.Generator().manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * size, generator=g) * 4).to(torch.bfloat16).cuda()
    _close(norm_act.silu_and_mul(gate_up), activation.silu_and_mul.reference(gate_up),
           torch.bfloat16)


@gpu
@pytest.mark.gpu
def test_gpu_new_batch_sizes_compile_nothing():
    """Only the grid depends on the row count: once each op ran at one size, sizes that
    hit Triton's integer specialisations (1, multiples of 16) and positions at odd and even
    offsets of a packed buffer compile nothing new."""
    from novainfer.bench_strict import CompileWatch

    cuda = torch.device("cuda")

    def run_all(rows):
        x, res, w = _inputs(rows, 1024, torch.bfloat16, cuda)
        norm_act.add_rms_norm(x, res, w, 1e-6)
        norm_act.rms_norm(x, w, 1e-6)
        norm_act.silu_and_mul(torch.cat([x, res], dim=-1))
        q, k, pos, qw, kw, rope = _qk_inputs(rows, 16, 8, 128, torch.bfloat16, cuda)
        # The engine's positions are a view into the step's packed int64 buffer, after the
        # token ids: 16-byte aligned only for an even token count.
        packed = torch.zeros(2 * rows, dtype=torch.int64, device=cuda)
        packed[rows:].copy_(pos)
        norm_act.qk_norm_rope(q, k, packed[rows:], qw, kw, 1e-6, rope.cos, rope.sin)
        norm_act.rms_norm(q, qw, 1e-6)

    run_all(5)
    with CompileWatch() as watch:
        for rows in (1, 2, 16, 17, 32, 512, 4099):
            run_all(rows)
        torch.cuda.synchronize()
    assert watch.events == []


@gpu
@pytest.mark.gpu
def test_gpu_ops_capture_in_a_cuda_graph():
    """Captured once, replayed on new inputs: the same results as eager calls, and no memory
    allocated by a replay."""
    x, res, w = _inputs(64, 1024, torch.bfloat16, torch.device("cuda"))
    gate_up = torch.randn(64, 2 * 3072, device="cuda", dtype=torch.bfloat16)

    q, k, pos, qw, kw, rope = _qk_inputs(64, 16, 8, 128, torch.bfloat16, torch.device("cuda"))

    def step():
        out, total = norm_act.add_rms_norm(x, res, w, 1e-6)
        return (out, total, norm_act.rms_norm(total, w, 1e-6), norm_act.silu_and_mul(gate_up),
                *norm_act.qk_norm_rope(q, k, pos, qw, kw, 1e-6, rope.cos, rope.sin))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x.copy_(torch.randn(x.shape, generator=g))
        res.copy_(torch.randn(res.shape, generator=g))
        gate_up.copy_(torch.randn(gate_up.shape, generator=g))
        q.copy_(torch.randn(q.shape, generator=g))
        pos.copy_(torch.randint(0, 4096, pos.shape, generator=g))
        before = torch.cuda.memory_stats()["allocation.all.allocated"]
        graph.replay()
        torch.cuda.synchronize()
        assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
        for got, want in zip(captured, step()):
            assert torch.equal(got, want)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["qwen3"])  # every fused op, q/k norm + rope included
@pytest.mark.parametrize("mode", ["triton", "compile"])
def test_gpu_model_with_fused_ops(checkpoint, monkeypatch, name, mode):
    """The whole model under NOVAINFER_FUSED_OPS=triton (the default) and =compile: fp32
    greedy tokens (CUDA graphs) equal transformers'; bf16 last-position logits are as close
    to the plain PyTorch ops' and to the fp32 answer as the rule of the bf16 tests in
    tests/test_gpu_e2e.py allows (1e-2, or twice transformers' own bf16 error on this same
    checkpoint, which is not calmed here). Two bf16 implementations of these random models
    sit ~1% apart on rounding alone (1.01e-2 against the plain ops, an H200, 2026-12-02); a
    wrong norm, rotation or head shows up as tens of percent."""
    from conftest import hf_greedy, random_prompts
    from test_gpu_e2e import (
        MAX_TOKENS,
        PROMPT_LENGTHS,
        _bf16_bound,
        _engine_logits,
        _greedy,
        _llm,
        _rel,
    )

    monkeypatch.setattr(fusion, "FUSED_OPS", mode)
    model_dir = checkpoint(name)
    prompts = random_prompts(PROMPT_LENGTHS, seed=7)
    llm = _llm(model_dir, dtype="float32", attention_backend="triton")
    assert llm.llm_engine.runner.graphs is not None
    assert _greedy(llm, prompts) == hf_greedy(model_dir, prompts, MAX_TOKENS)
    del llm
    llm = _llm(model_dir, dtype="bfloat16", attention_backend="triton", enforce_eager=True)
    for prompt in random_prompts([5, 64, 300], seed=3):
        fused = _engine_logits(llm, prompt)
        monkeypatch.setattr(fusion, "PLAIN_PYTORCH", True)
        plain = _engine_logits(llm, prompt)
        monkeypatch.setattr(fusion, "PLAIN_PYTORCH", False)
        exact, allowed = _bf16_bound(model_dir, prompt)
        assert _rel(fused, plain) <= allowed, f"{name}/{mode}: vs plain {_rel(fused, plain):.3e}"
        assert _rel(fused, exact) <= allowed, f"{name}/{mode}: vs fp32 {_rel(fused, exact):.3e}"
