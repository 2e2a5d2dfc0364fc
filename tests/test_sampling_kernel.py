"""The sampler's Triton kernels (kernels/sampling.py: the chunk statistics and the token pick)
against their PyTorch twins (engine/sampler.py: chunk_stats and pick_token on CPU tensors).

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

from novainfer.engine.sampler import DRAW_CHUNK, chunk_stats, draw, pick_token
from novainfer.kernels.sampling import chunk_stats_triton, pick_token_triton

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


def _cdf_bounds(x, scale, tokens):
    """float64 cumulative weight before and through each row's token, over the row's total."""
    w = x.double() * (1.0 if scale is None else scale.double()[:, None])
    p = torch.softmax(w, dim=-1).nan_to_num(0.0)
    cdf = p.cumsum(-1)
    hi = cdf.gather(1, tokens[:, None]).squeeze(1)
    return hi - p.gather(1, tokens[:, None]).squeeze(1), hi, p.gather(1, tokens[:, None])


@pytest.mark.parametrize("vocab", [1, 1000, DRAW_CHUNK, DRAW_CHUNK + 1, 2500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_scale", [False, True])
def test_pick_token_matches_reference(vocab, dtype, with_scale):
    """The token for u: the twin's, and inside the float64 CDF interval that u falls in (up
    to rounding at an interval's edge); never a token of weight 0; u at 0 and just below 1
    included; rows of nothing but -inf give the last token (the twin's NaN-row fallback)."""
    reps = 24
    base = _logits(3, vocab, dtype)
    x = base.repeat_interleave(reps, 0)
    g = torch.Generator().manual_seed(vocab)
    u = torch.rand(x.shape[0], 1, generator=g)
    u[::reps] = 0.0
    u[1::reps] = 1 - 2**-24
    scale = torch.tensor([0.5, 1.0, 1 / 0.7]).repeat_interleave(reps) if with_scale else None
    top, sums = chunk_stats(x, scale)
    want = pick_token(x, scale, u, top, sums)
    dev_scale = None if scale is None else scale.to(DEV)
    got_top, got_sums = chunk_stats_triton(x.to(DEV), dev_scale, DRAW_CHUNK)
    got = pick_token_triton(x.to(DEV), dev_scale, u.to(DEV), got_top, got_sums,
                            DRAW_CHUNK).cpu()
    assert got.dtype == torch.int64 and got.shape == (x.shape[0],)
    live = torch.isfinite(x).any(-1)
    assert (got[~live] == vocab - 1).all() and (want[~live] == vocab - 1).all()
    lo, hi, weight = _cdf_bounds(x[live], None if scale is None else scale[live], got[live])
    assert (weight > 0).all(), "drew a token of weight 0"
    target = u[live].squeeze(1).double()
    assert ((lo - 1e-5 <= target) & (target <= hi + 1e-5)).all()
    # The same token as the twin's but where two float32 sums land on either side of u.
    assert (got == want).float().mean() >= 0.95, f"{int((got != want).sum())} differ"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's NaN warnings (interpreter)
@pytest.mark.parametrize("with_scale", [False, True])
def test_pick_token_of_nan_and_inf_rows_is_the_last_token(with_scale):
    """A NaN logit (or +inf, whose weight is inf / inf) leaves the row without a distribution:
    the kernel gives the last token, as the twin's searchsorted does with NaN."""
    vocab = 2500
    x = _logits(4, vocab, torch.float32)
    x[0] = float("nan")
    x[1, 1500] = float("nan")  # one NaN, in the second chunk
    x[2, 10] = float("inf")
    scale = torch.full((4,), 1 / 0.7) if with_scale else None
    u = torch.full((4, 1), 0.3)
    want = pick_token(x, scale, u, *chunk_stats(x, scale))
    dev_scale = None if scale is None else scale.to(DEV)
    got = pick_token_triton(x.to(DEV), dev_scale, u.to(DEV),
                            *chunk_stats_triton(x.to(DEV), dev_scale, DRAW_CHUNK),
                            DRAW_CHUNK).cpu()
    assert want[:3].tolist() == [vocab - 1] * 3
    assert got[:3].tolist() == [vocab - 1] * 3
    assert got[3] == want[3] != vocab - 1  # the finite row beside them is drawn as usual


def test_pick_token_of_no_rows():
    x = _logits(2, 2100, torch.float32)[:0]
    top, sums = chunk_stats_triton(x.to(DEV), None, DRAW_CHUNK)
    assert pick_token_triton(x.to(DEV), None, torch.zeros(0, 1, device=DEV), top, sums,
                             DRAW_CHUNK).shape == (0,)


@gpu
@pytest.mark.gpu
def test_gpu_pick_token_agrees_with_the_twin_at_the_benchmark_shape():
    """bf16 logits of 256 rows x 151,936 entries at temperature 0.6: the compiled kernel draws
    the twin's token for (nearly) every u."""
    x = _logits(256, 151_936, torch.bfloat16, seed=3).cuda()
    scale = torch.full((256,), 1 / 0.6, device="cuda")
    u = torch.rand(256, 1, generator=torch.Generator().manual_seed(1)).cuda()
    top, sums = chunk_stats(x, scale)
    got = pick_token_triton(x, scale, u, top, sums, DRAW_CHUNK).cpu()
    want = pick_token(x.cpu(), scale.cpu(), u.cpu(), *chunk_stats(x.cpu(), scale.cpu()))
    assert (got == want).float().mean() >= 0.98
    live = torch.isfinite(x.cpu()).any(-1)
    lo, hi, weight = _cdf_bounds(x.cpu()[live].float(), scale.cpu()[live], got[live])
    assert (weight > 0).all()
    target = u.cpu()[live].squeeze(1).double()
    assert ((lo - 1e-4 <= target) & (target <= hi + 1e-4)).all()


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
