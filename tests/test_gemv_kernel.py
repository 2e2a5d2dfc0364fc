"""The one-row GEMV kernel (kernels/gemv.py) against its twin F.linear: odd sizes (masks on
both dimensions), a row of a wider tensor, with and without bias, every block shape the
config and the sweep use; and the switch that routes a batch-1 step's linear layers to it.
Without a GPU the kernel runs in the Triton interpreter (fp32/fp16)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from novainfer.kernels import _common, gemv
from novainfer.layers import linear

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEV = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV.type == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(64, 128), (77, 300), (5, 1030), (3, 2048)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_linear(dtype, n, k, with_bias):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, k, generator=g).to(dtype).to(DEV)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).to(DEV)
    b = torch.randn(n, generator=g).to(dtype).to(DEV) if with_bias else None
    got = gemv.gemv(x, w, b)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.dtype == dtype and got.shape == (1, n)
    torch.testing.assert_close(got.float(), want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("block", [(2, 128, 2), (16, 1024, 8), (4, 256, 4)])
def test_block_shapes_and_a_row_of_a_wider_tensor(block):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 700, generator=g).to(DEV)[1:, 50:650]
    w = torch.randn(33, 600, generator=g).to(DEV)
    torch.testing.assert_close(gemv.gemv(x, w, block=block), F.linear(x, w), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(gemv.gemv(x[0], w, block=block), F.linear(x[0], w), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(64, 128), (77, 300), (5, 1030)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("block", [None, (4, 128, 2)])
def test_add_rms_norm_prologue_matches_the_unfused_ops(dtype, n, k, with_residual, block):
    from novainfer.layers.norm import add_rms_norm, rms_norm

    g = torch.Generator().manual_seed(n + 7 * k)
    h = (3 * torch.randn(1, k, generator=g)).to(dtype).to(DEV)
    r = torch.randn(1, k, generator=g).to(dtype).to(DEV) if with_residual else None
    nw = (1 + torch.rand(k, generator=g)).to(dtype).to(DEV)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).to(DEV)
    b = torch.randn(n, generator=g).to(dtype).to(DEV)
    if with_residual:
        x, summed_want = add_rms_norm.reference(h, r, nw, 1e-6)
    else:
        x, summed_want = rms_norm.reference(h, nw, 1e-6), h
    want = F.linear(x.float(), w.float(), b.float())
    # k within one tile (the weight's load first), or several tiles (statistics first).
    got, summed = gemv.gemv_add_rms_norm(h, r, nw, 1e-6, w, b, block=block)
    assert torch.equal(summed, summed_want)  # the next residual: the same rounding exactly
    assert (summed is h) == (not with_residual)
    assert got.dtype == dtype and got.shape == (1, n)
    # bf16: the statistics' summation order may flip a rounding of the normalised x.
    torch.testing.assert_close(got.float(), want, rtol=TOL[dtype], atol=TOL[dtype])


def test_the_prologue_checks_its_shapes():
    w = torch.randn(4, 8, device=DEV)
    with pytest.raises(ValueError, match="residual"):
        gemv.gemv_add_rms_norm(torch.randn(1, 8, device=DEV), torch.randn(1, 4, device=DEV),
                               torch.ones(8, device=DEV), 1e-6, w)


def test_more_rows_or_a_column_major_weight_is_an_error():
    with pytest.raises(ValueError, match="one contiguous row"):
        gemv.gemv(torch.randn(2, 8, device=DEV), torch.randn(4, 8, device=DEV))
    with pytest.raises(ValueError, match="row-major"):
        gemv.gemv(torch.randn(1, 8, device=DEV), torch.randn(8, 4, device=DEV).t())


def test_the_switch_and_which_weights_fit():
    assert linear.gemv_setting(None) and linear.gemv_setting("1")
    assert not linear.gemv_setting("0")
    with pytest.raises(ValueError, match="NOVAINFER_GEMV must be '0' or '1'"):
        linear.gemv_setting("yes")
    assert linear.Linear(1024, 2048).gemv_fits  # qwen3-0.6b's o_proj: 4.7 -> 3.9 us
    assert linear.gemv_fits(1536, 17920)  # r1-distill-qwen-1.5b gate/up: 17.1 -> 15.3 us
    assert not linear.gemv_fits(4096, 28672)  # llama3-8b gate/up: cuBLAS is faster
    assert not linear.gemv_fits(8960, 1536)  # rows over 4096 long: cuBLAS


@pytest.mark.skipif(DEV.type != "cuda", reason="the routing is CUDA-only")
def test_linear_routes_one_bf16_row_to_the_kernel(monkeypatch):
    layer = linear.Linear(64, 32).to(DEV, torch.bfloat16)
    layer.weight.data.normal_()
    calls = []
    real = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(1, 64, device=DEV, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1.6e-2, atol=1e-2)
    layer(torch.randn(2, 64, device=DEV, dtype=torch.bfloat16))
    assert calls == [1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(64, 128), (78, 300), (6, 1030), (2, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("block", [None, (4, 128, 2), (16, 256, 4)])
def test_silu_mul_epilogue_matches_the_unfused_ops(dtype, n, k, with_bias, block):
    """gate/up's GEMV with the norm prologue and the SiLU-and-mul epilogue against the GEMV's
    own output through norm_act's silu_and_mul twin (the same roundings), and both against
    float64; odd half-widths leave programs with one valid output pair, or none."""
    from novainfer.kernels.norm_act import silu_and_mul
    from novainfer.layers.norm import add_rms_norm

    g = torch.Generator().manual_seed(n + 3 * k)
    h = (3 * torch.randn(1, k, generator=g)).to(dtype).to(DEV)
    r = torch.randn(1, k, generator=g).to(dtype).to(DEV)
    nw = (1 + torch.rand(k, generator=g)).to(dtype).to(DEV)
    w = (2 * torch.randn(n, k, generator=g) / k**0.5).to(dtype).to(DEV)
    b = torch.randn(n, generator=g).to(dtype).to(DEV) if with_bias else None
    got, summed = gemv.gemv_add_rms_norm(h, r, nw, 1e-6, w, b, block=block, silu_mul=True)
    gate_up, summed_want = gemv.gemv_add_rms_norm(h, r, nw, 1e-6, w, b, block=block)
    assert torch.equal(summed, summed_want)
    assert got.dtype == dtype and got.shape == (1, n // 2)
    # Default tolerances of the dtype: fp32's exp may differ from F.silu's by an ulp.
    torch.testing.assert_close(got, silu_mul_twin(gate_up))
    x, _ = add_rms_norm.reference(h, r, nw, 1e-6)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    want = F.silu(exact[:, : n // 2]) * exact[:, n // 2:]
    torch.testing.assert_close(got.double(), want, rtol=4 * TOL[dtype], atol=4 * TOL[dtype])
    if DEV.type == "cuda":
        torch.testing.assert_close(got, silu_and_mul(gate_up))


def silu_mul_twin(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU-and-mul rounded as kernels/norm_act.py's kernel rounds it, in PyTorch."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    act = F.silu(gate).to(gate_up.dtype).float()
    return (act * up).to(gate_up.dtype)


def test_the_silu_mul_epilogue_needs_gate_and_up_halves():
    h = torch.randn(1, 8, device=DEV)
    with pytest.raises(ValueError, match="even number of weight rows"):
        gemv.gemv_add_rms_norm(h, None, torch.ones(8, device=DEV), 1e-6,
                               torch.randn(5, 8, device=DEV), silu_mul=True)
    with pytest.raises(ValueError, match="BLOCK_N >= 2"):
        gemv.gemv_add_rms_norm(h, None, torch.ones(8, device=DEV), 1e-6,
                               torch.randn(4, 8, device=DEV), block=(1, 8, 1), silu_mul=True)


def test_the_pdl_switch():
    assert _common.pdl_setting(None) and _common.pdl_setting(" 1 ")
    assert not _common.pdl_setting("0")
    with pytest.raises(ValueError, match="NOVAINFER_PDL must be '0' or '1'"):
        _common.pdl_setting("on")
    assert not _common.pdl_applies(torch.device("cpu"))
    assert _common.pdl_launch(torch.device("cpu")) == {"PDL": False}


@pytest.mark.gpu
@pytest.mark.skipif(DEV.type != "cuda" or not _common.pdl_applies(DEV),
                    reason="programmatic dependent launch needs compute capability >= 9.0")
def test_pdl_launches_in_a_cuda_graph_read_what_the_previous_kernel_wrote(monkeypatch):
    """A chain of GEMVs, each reading the previous one's output (PDL kernel after PDL kernel,
    and after a cuBLAS matmul and an elementwise kernel), captured in a CUDA graph with PDL
    and without, and replayed with new inputs each time: the two agree bit for bit on every
    replay (and with the chain run eagerly, within bf16's tolerance: cuBLAS may pick another
    algorithm under capture). A kernel that read x before the previous kernel's writes
    landed would see the previous replay's values."""
    g = torch.Generator(device=DEV).manual_seed(5)
    dt = torch.bfloat16
    ws = [torch.randn(1024, 1024, generator=g, device=DEV, dtype=dt) / 32 for _ in range(5)]
    big = torch.randn(4096, 4096, generator=g, device=DEV, dtype=dt) / 64
    nw = torch.rand(1024, generator=g, device=DEV, dtype=dt) + 0.5
    gate_up = torch.randn(2048, 1024, generator=g, device=DEV, dtype=dt) / 32

    def chain(x):
        h = (big @ big[:, :1024])[:1] + x  # a slow cuBLAS producer
        for w in ws[:3]:
            h = gemv.gemv(h, w)  # PDL after PDL
        h = h * 1.5
        h, summed = gemv.gemv_add_rms_norm(h, x, nw, 1e-6, ws[3])
        act, _ = gemv.gemv_add_rms_norm(h, summed, nw, 1e-6, gate_up, silu_mul=True)
        return gemv.gemv(act, ws[4])

    def captured(pdl):
        monkeypatch.setattr(_common, "PDL", pdl)
        static = torch.zeros(1, 1024, device=DEV, dtype=dt)
        chain(static)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(static)
        return graph, static, out

    runs = [captured(False), captured(True)]
    for _ in range(4):
        x = torch.randn(1, 1024, generator=g, device=DEV, dtype=dt)
        outs = []
        for graph, static, out in runs:
            static.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            outs.append(out.clone())
        assert torch.equal(outs[1], outs[0])
        torch.testing.assert_close(outs[1], chain(x), rtol=2e-2, atol=2e-2)
