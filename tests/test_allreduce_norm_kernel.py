"""The fused all-reduce + residual add + RMSNorm kernel (kernels/allreduce_norm.py) against
its PyTorch twin: the sum over the ranks, then `add_rms_norm` (layers/norm.py).

The kernel runs as one rank (the first, a middle or the last) of a group whose other ranks
have already done their part: their partial sums are in their slots and their signals in
this rank's pad, all in this process's memory. That checks the arithmetic, the rows each
program owns, the slot offsets, which rank's buffer is whose, and the flag protocol (the
rank consumes the peers' flags and raises its own in theirs). Without a
GPU it runs in the Triton interpreter (fp32/fp16); on one GPU compiled, bf16 too. Two real
GPUs run it in tests/test_gpu_tensor_parallel.py.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from novainfer.kernels.allreduce_norm import allreduce_add_rms_norm
from novainfer.layers.norm import add_rms_norm

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEV = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV.type == "cuda" else [])
pytestmark = pytest.mark.skipif(DEV.type == "cpu" and not INTERPRET,
                                reason="needs a GPU or the Triton interpreter")
PAD_SLOTS = 64


def _reference(parts, residual, weight, eps, bias):
    s = parts[0].to(torch.float64)
    for p in parts[1:]:
        s = s + p.to(torch.float64)
    s = s.to(parts[0].dtype)
    if bias is not None:
        s = s + bias
    if residual is None:
        return add_rms_norm(s, torch.zeros_like(s), weight, eps)
    return add_rms_norm(s, residual, weight, eps)


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)])
@pytest.mark.parametrize("rows,programs", [(1, 8), (5, 2), (13, 4)])
@pytest.mark.parametrize("with_residual,with_bias", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_rank_of_a_group_matches_sum_then_add_rms_norm(world, rank, rows, programs,
                                                         with_residual, with_bias, dtype):
    n, eps, slot_offset, pad_base = 77, 1e-6, 96, 8
    g = torch.Generator().manual_seed(rows * 31 + world)
    parts = [(torch.randn(rows, n, generator=g) * 3).to(dtype).to(DEV) for _ in range(world)]
    residual = torch.randn(rows, n, generator=g).to(dtype).to(DEV) if with_residual else None
    bias = torch.randn(n, generator=g).to(dtype).to(DEV) if with_bias else None
    weight = (1 + 0.5 * torch.randn(n, generator=g)).to(dtype).to(DEV)
    # Every rank's symmetric buffer: the peers' rows already at the slot, this rank's garbage.
    bufs = [torch.full((slot_offset + rows * n + 5,), 7.0, dtype=dtype, device=DEV)
            for _ in range(world)]
    peers = [r for r in range(world) if r != rank]
    for r in peers:
        bufs[r][slot_offset:slot_offset + rows * n] = parts[r].reshape(-1)
    pads = [torch.zeros(PAD_SLOTS, dtype=torch.int32, device=DEV) for _ in range(world)]
    used = min(rows, programs)
    for pid in range(used):
        for r in peers:
            pads[rank][pad_base + pid * world + r] = 1  # peer r has signalled program pid
    buffers = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64, device=DEV)
    pad_ptrs = torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64, device=DEV)

    out, total = allreduce_add_rms_norm(
        parts[rank].clone(), residual, weight, eps, bias, buffers=buffers, pads=pad_ptrs,
        rank=rank, world=world, slot_offset=slot_offset, pad_base=pad_base, programs=programs)

    want_out, want_total = _reference(parts, residual, weight, eps, bias)
    tol = {torch.float32: {"rtol": 1e-5, "atol": 1e-5},
           torch.float16: {"rtol": 1e-3, "atol": 2e-3},
           torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2}}[dtype]
    torch.testing.assert_close(total, want_total, **tol)
    torch.testing.assert_close(out, want_out, **tol)
    # This rank's rows were staged in its slot, nothing else of any buffer was touched.
    mine = bufs[rank]
    assert torch.equal(mine[slot_offset:slot_offset + rows * n], parts[rank].reshape(-1))
    assert (mine[:slot_offset] == 7).all() and (mine[slot_offset + rows * n:] == 7).all()
    for r in peers:
        assert torch.equal(bufs[r][slot_offset:slot_offset + rows * n], parts[r].reshape(-1))
    # The flags: this rank consumed every peer's and raised its own in every peer's pad.
    assert int(pads[rank].sum()) == 0
    for r in peers:
        raised = pads[r].nonzero().flatten().tolist()
        assert raised == [pad_base + pid * world + rank for pid in range(used)]


def test_no_rows_launches_nothing():
    x = torch.empty(0, 16)
    empty = torch.zeros(1, dtype=torch.int64)  # never dereferenced
    out, total = allreduce_add_rms_norm(x, None, torch.ones(16), 1e-6, None, buffers=empty,
                                        pads=empty, rank=0, world=2, slot_offset=0,
                                        pad_base=0, programs=4)
    assert out.shape == total.shape == (0, 16)
