"""The sampler's Triton chunk-statistics kernel (kernels/sampling.py) against its PyTorch twin
(engine/sampler.py:chunk_stats on a CPU tensor).

Without a GPU the kernel runs in the Triton interpreter (fp32/fp16); with one, compiled, plus
bf16 at the benchmark's shape (256 rows x 151,936 entries) and the whole draw on the GPU.
Edges: vocabularies of 1, one chunk +- 1 and not a chunk multiple; chunks and rows that are
all -inf; with and without the per-row temperature scale.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

pytest.importorskip("triton")

from types import SimpleNamespace

from novainfer.engine.sampler import DRAW_CHUNK, chunk_stats, draw
from novainfer.kernels.sampling import chunk_stats_triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEV = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA device (compiled triton)"
)


def _logits(rows, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    if rows > 1:
        x[1] = float("-inf")  # a row with nothing allowed
    if rows > 2 and vocab > DRAW_CHUNK:
        x[2, :DRAW_CHUNK] = float("-inf")  # a whole chunk masked
        x[2, -1] = float("-inf")
    return x


@pytest.mark.parametrize("vocab", [1, 1000, DRAW_CHUNK, DRAW_CHUNK + 1, 2500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_scale", [False, True])
def test_chunk_stats_match_reference(vocab, dtype, with_scale):
    x = _logits(3, vocab, dtype)
    scale = torch.tensor([0.5, 1.0, 1 / 0.7]) if with_scale else None
    want_max, want_sum = chunk_stats(x, scale)  # CPU tensor: the PyTorch twin
    got_max, got_sum = chunk_stats_triton(
        x.to(DEV), None if scale is None else scale.to(DEV), DRAW_CHUNK
    )
    assert got_max.shape == (3, -(-vocab // DRAW_CHUNK))
    torch.testing.assert_close(got_max.cpu(), want_max, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_sum.cpu(), want_sum, rtol=1e-5, atol=1e-6)
    assert torch.isneginf(got_max[1]).all() and (got_sum[1] == 0).all()


def test_chunk_stats_of_a_strided_view_and_no_rows():
    x = _logits(4, 2100, torch.float32)
    view = x[::2]  # rows 2 apart: a row stride the kernel must honour
    got = chunk_stats_triton(view.to(DEV), None, DRAW_CHUNK)
    for g, w in zip(got, chunk_stats(view, None)):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-6)
    assert chunk_stats_triton(x[:0].to(DEV), None, DRAW_CHUNK)[0].shape == (0, 3)


@gpu
@pytest.mark.gpu
def test_gpu_bf16_benchmark_shape_and_draw_frequencies():
    x = _logits(256, 151_936, torch.bfloat16).cuda()
    scale = torch.full((256,), 1 / 0.6, device="cuda")
    got = chunk_stats(x, scale)  # CUDA tensor: the Triton kernel
    want = chunk_stats(x.cpu(), scale.cpu())
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-4, atol=1e-6)

    probs = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3])
    padded = torch.full((5000, 3000), float("-inf"))
    where = [0, 1023, 1024, 2047, 2999]
    padded[:, where] = torch.log(probs)
    seqs = [SimpleNamespace(generator=None)] * 5000
    tokens = draw(padded.cuda().bfloat16(), seqs, torch.Generator("cuda").manual_seed(0))
    counts = torch.bincount(tokens.cpu(), minlength=3000).double() / 5000
    assert counts[[0, 1024]].sum() == 0 and counts.sum() == 1
    torch.testing.assert_close(counts[where], probs.double(), atol=0.03, rtol=0)
