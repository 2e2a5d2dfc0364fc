"""Top-p without a vocabulary sort (kernels/top_p.py) against its PyTorch twin, the sort path
(engine/sampler.py `_top_k_top_p_sorted`), and against the definition in float64.

Without a GPU the kernel runs in the Triton interpreter (fp32); with one, compiled, at the
benchmark's shape too. Edges: vocabularies of 1, one program's chunk +- 1; p tiny, 0.5 and
next to 1; -inf entries, chunks and rows of nothing but -inf, maxima far below zero (small
temperatures), ties (bf16-rounded logits), signed zeros, a strided view, no rows.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

pytest.importorskip("triton")

from types import SimpleNamespace

import triton
import triton.language as tl

from novainfer.engine import sampler
from novainfer.kernels.top_p import SPLIT, _decide, top_p_filter_triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEV = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA device (compiled triton)"
)
PS = [0.9, 0.5, 1e-4, 0.999, 0.3]


@triton.jit
def _decide_kernel(MASS, OUT, ABOVE, SHIFT: tl.constexpr):
    """One `_decide` with the prefix 0x70000000, nothing above it and a target of 0.5."""
    mass = tl.load(MASS + tl.arange(0, 16))
    prefix, above = _decide(mass, 0.0, 0.5, tl.full((), 0x70000000, tl.uint32), SHIFT)
    tl.store(OUT, prefix.to(tl.int32, bitcast=True))
    tl.store(ABOVE, above)


def _logits(rows, vocab, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * scale
    if rows > 2 and vocab > 3:
        x[2, ::3] = float("-inf")  # banned tokens
    return x


def _mass_ahead(x: torch.Tensor) -> torch.Tensor:
    """float64 [rows, vocab]: the probability mass of the logits larger than each one."""
    p = torch.softmax(x.double(), dim=-1).nan_to_num(0.0)
    order = x.double().argsort(dim=-1, descending=True, stable=True)
    sorted_x = x.double().gather(1, order)
    ahead = p.gather(1, order).cumsum(-1) - p.gather(1, order)
    # Tied logits share the mass ahead of the first of them.
    first = torch.cat([torch.ones_like(sorted_x[:, :1], dtype=torch.bool),
                       sorted_x[:, 1:] != sorted_x[:, :-1]], dim=1)
    idx = torch.where(first, torch.arange(x.shape[1]).expand_as(first), 0).cummax(1).values
    return torch.empty_like(ahead).scatter_(1, order, ahead.gather(1, idx))


def _check(got: torch.Tensor, x: torch.Tensor, ps: list[float], margin: float = 1e-5):
    """Kept logits are unchanged, dropped ones -inf, and a logit is kept exactly when the
    mass ahead of it is below p (the top one always), but where float32 sums may round to
    either side of p."""
    kept = ~torch.isneginf(got)
    assert torch.equal(got[kept], x[kept])
    ahead = _mass_ahead(x)
    p = torch.tensor(ps, dtype=torch.float64)[:, None]
    clear = (ahead - p).abs() > margin
    live = torch.isfinite(x)
    want = live & (ahead < p)
    assert torch.equal(kept & clear & live, want & clear), "kept set differs from top-p"
    for row in range(x.shape[0]):
        if live[row].any():
            assert kept[row, x[row].argmax()], "the top logit must survive"


@pytest.mark.parametrize("vocab", [1, 5, 1000, SPLIT, SPLIT + 1, 20_000])
def test_top_p_matches_the_sort_and_the_definition(vocab):
    x = _logits(len(PS), vocab, seed=vocab)
    got = top_p_filter_triton(x.to(DEV), torch.tensor(PS, device=DEV)).cpu()
    want = sampler._top_k_top_p_sorted(x, [-1] * len(PS), PS)
    _check(got, x, PS)
    _check(want, x, PS)
    _same_as_the_sort(got, want, x, PS)


def _same_as_the_sort(got, want, x, ps, margin=1e-5):
    """The kernel and the sort keep the same logits wherever the mass ahead is clear of p
    (every row, p next to 1 included); rows with no token at the edge are identical."""
    clear = (_mass_ahead(x) - torch.tensor(ps, dtype=torch.float64)[:, None]).abs() > margin
    assert torch.equal(got.isneginf() & clear, want.isneginf() & clear)
    rows = clear.all(-1)
    assert torch.equal(got[rows], want[rows])


@pytest.mark.parametrize("cap", [1, 24, 512])
def test_the_later_passes_read_the_candidates_or_the_chunk(monkeypatch, cap):
    """Passes after COMPACT read the logits pass COMPACT kept under its prefix, or the
    chunk again where there were more than CAP: with CAP 1 every chunk overflows, with 24
    some do, at the default only row 1's chunk of 4,096 ties; the kept set is the
    definition's every time."""
    from novainfer.kernels import top_p

    monkeypatch.setattr(top_p, "CAP", cap)
    x = _logits(len(PS), 3 * SPLIT + 100, seed=31)
    x[1, :SPLIT] = 1.5  # a chunk of ties: every logit under every prefix (overflows)
    got = top_p_filter_triton(x.to(DEV), torch.tensor(PS, device=DEV)).cpu()
    _check(got, x, PS)
    _same_as_the_sort(got, sampler._top_k_top_p_sorted(x, [-1] * len(PS), PS), x, PS)


def test_ties_signed_zeros_and_dead_rows():
    """bf16-rounded logits (many ties): every logit equal to a kept one is kept, as by the
    sort; a row of nothing but -inf stays so; -0.0 and +0.0 logits; a flat row keeps all."""
    x = (_logits(4, 3000, seed=3, scale=2.0).bfloat16().float())
    x[1] = float("-inf")
    x[2, :] = 0.0
    x[2, ::2] = -0.0
    x[3, :10] = 20.0  # ten tied leaders with p 0.05: all of them survive
    ps = [0.8, 0.9, 0.5, 0.05]
    got = top_p_filter_triton(x.to(DEV), torch.tensor(ps, device=DEV)).cpu()
    want = sampler._top_k_top_p_sorted(x, [-1] * 4, ps)
    assert torch.equal(got.isneginf(), want.isneginf())
    assert torch.isneginf(got[1]).all()
    assert not torch.isneginf(got[2]).any()
    assert (~got[3].isneginf()).sum() == 10
    kept0 = got[0][~got[0].isneginf()]
    assert (x[0] >= kept0.min()).sum() == kept0.numel()  # ties with the cut kept


def test_rows_far_below_zero_and_dead_chunks():
    """Logits whose largest is far below zero (exp of them underflows float32): what a small
    temperature makes of raw logits (-2.9 / 0.02 = -145). Rows shifted by -200, a row at
    temperature 0.02, and rows with a chunk of nothing but -inf under a max of -118 (a dead
    chunk must weigh 0, not lift the row's max to 0)."""
    vocab = 3 * SPLIT + 17
    x = _logits(6, vocab, seed=21)
    x[0] -= 200.0
    x[1] = x[1] / 4 - 2.9 - x[1].max() / 4  # raw max -2.9 ...
    x[1] /= 0.02  # ... at temperature 0.02, as filter_logits scales before filtering
    x[2] = x[2] - x[2].max() - 118.0
    x[2, SPLIT : 2 * SPLIT] = float("-inf")  # a dead middle chunk
    x[3] = x[3] - x[3].max() - 118.0
    x[3, 3 * SPLIT :] = float("-inf")  # a dead last (partial) chunk
    x[4] = float("-inf")
    x[4, 5] = -300.0  # one live logit
    x[5] = x[5] * 40 - 90.0  # a wide spread: most weights underflow against the max
    ps = [0.9, 0.5, 0.99, 0.3, 0.7, 0.999]
    got = top_p_filter_triton(x.to(DEV), torch.tensor(ps, device=DEV)).cpu()
    want = sampler._top_k_top_p_sorted(x, [-1] * len(ps), ps)
    assert not torch.isnan(got).any()
    for row in range(len(ps)):
        assert not torch.isneginf(got[row]).all(), f"row {row} lost every logit"
    _check(got, x, ps)
    _check(want, x, ps)
    assert (~got[4].isneginf()).tolist() == (~x[4].isneginf()).tolist()


def test_a_prefix_without_mass_takes_the_top_digit():
    """`_decide` when no digit under the prefix weighs anything (weights that underflow after
    the first pass's rescaling): the top digit, so the cut rises to the top of the range and
    drops only weightless logits; digit 0 could decode as a NaN cut."""
    out = torch.zeros(1, dtype=torch.int32, device=DEV)
    above = torch.zeros(1, device=DEV)
    _decide_kernel[(1,)](torch.zeros(16, device=DEV), out, above, SHIFT=20)
    assert out.item() == 0x70000000 | (15 << 20) and above.item() == 0.0
    mass = torch.zeros(16, device=DEV)
    mass[[3, 9]] = torch.tensor([0.25, 0.5], device=DEV)  # 0.5 ahead of digit 3: cut at 9
    _decide_kernel[(1,)](mass, out, above, SHIFT=20)
    assert out.item() == 0x70000000 | (9 << 20) and above.item() == 0.0


def test_a_row_is_filtered_the_same_alone_or_batched():
    x = _logits(5, 9000, seed=11)
    both = top_p_filter_triton(x.to(DEV), torch.tensor(PS, device=DEV)).cpu()
    for row in range(5):
        alone = top_p_filter_triton(x[row : row + 1].to(DEV),
                                    torch.tensor(PS[row : row + 1], device=DEV)).cpu()
        assert torch.equal(alone[0], both[row]), row


def test_strided_rows_no_rows_and_dtype():
    x = _logits(6, 2100, seed=4)
    view = x.to(DEV)[::2]
    ps = [0.7, 0.2, 0.95]
    got = top_p_filter_triton(view, torch.tensor(ps, device=DEV)).cpu()
    _check(got, x[::2], ps)
    assert top_p_filter_triton(x[:0].to(DEV), torch.ones(0, device=DEV)).shape == (0, 2100)
    with pytest.raises(ValueError, match="float32"):
        top_p_filter_triton(x.to(DEV).half(), torch.ones(6, device=DEV))


def test_in_place_writes_the_same_rows_over_its_input():
    """`inplace` (the sampler's path) gives the copying call's rows in the input's own
    storage, a row stride wider than the vocabulary included; it refuses a column stride."""
    x = _logits(4, 2100, seed=8)
    ps = [0.6, 0.9, 0.2, 0.99]
    want = top_p_filter_triton(x[:, :2000].to(DEV), torch.tensor(ps, device=DEV)).cpu()
    wide = x.clone().to(DEV)
    view = wide[:, :2000]  # rows 2100 apart
    got = top_p_filter_triton(view, torch.tensor(ps, device=DEV), inplace=True)
    assert got.data_ptr() == view.data_ptr()
    assert torch.equal(got.cpu(), want)
    assert torch.equal(wide[:, 2000:].cpu(), x[:, 2000:])  # beyond the view: untouched
    with pytest.raises(ValueError, match="unit stride"):
        top_p_filter_triton(wide.t(), torch.ones(2100, device=DEV), inplace=True)
    overlapping = torch.as_strided(wide, (4, 2000), (100, 1))  # rows share their entries
    with pytest.raises(ValueError, match="do not overlap"):
        top_p_filter_triton(overlapping, torch.ones(4, device=DEV), inplace=True)
    copied = top_p_filter_triton(overlapping, torch.tensor(ps, device=DEV))  # not in place
    _check(copied.cpu(), overlapping.cpu(), ps)


def test_the_sort_keeps_a_tie_at_the_top_p_cut():
    """The twin's tie rule at the cut: 0.5 of the mass is reached inside a tie, and the tie
    is kept whole (by position it would split)."""
    x = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]]))
    got = sampler._top_k_top_p_sorted(x, [-1], [0.5])
    assert (~got.isneginf()).tolist() == [[True, True, True, True]]
    got = sampler._top_k_top_p_sorted(x, [-1], [0.4])
    assert (~got.isneginf()).tolist() == [[True, False, False, False]]


@gpu
@pytest.mark.gpu
def test_gpu_benchmark_shape_and_the_sampler_path():
    """256 rows x 151,936 entries of bf16-rounded logits: the compiled kernel keeps the
    sort's set; `filter_logits` on CUDA takes it for top-p-only rows, and a seeded row
    draws the same token alone or batched."""
    x = (_logits(256, 151_936, seed=5).bfloat16().float())
    ps = [0.9, 0.95, 0.5, 0.99] * 64
    got = top_p_filter_triton(x.cuda(), torch.tensor(ps, device="cuda")).cpu()
    want = sampler._top_k_top_p_sorted(x.cuda(), [-1] * 256, ps).cpu()
    _check(got, x, ps, margin=1e-4)
    _same_as_the_sort(got, want, x, ps, margin=1e-4)
    cold = (x[:16] / 0.02 - 150.0).cuda()  # small temperature: the max far below zero
    _check(top_p_filter_triton(cold, torch.tensor(ps[:16], device="cuda")).cpu(),
           cold.cpu(), ps[:16], margin=1e-4)

    params = SimpleNamespace(top_k=-1, top_p=0.9, min_p=0.0, temperature=1.0)
    mate = SimpleNamespace(top_k=-1, top_p=0.5, min_p=0.0, temperature=0.7)
    seqs = [SimpleNamespace(generator=None, params=params)]
    alone = sampler.filter_logits(x[:1].cuda(), seqs).cpu()
    pair = x[:2].cuda()
    batched = sampler.filter_logits(
        pair, seqs + [SimpleNamespace(generator=None, params=mate)]).cpu()
    assert torch.equal(alone[0], batched[0])
    assert torch.equal(pair.cpu(), x[:2])  # the kernel wrote the sampler's copy, not this
    topk = SimpleNamespace(top_k=50, top_p=1.0, min_p=0.0, temperature=1.0)
    mixed = sampler.filter_logits(  # the top-p row filtered on a copy of its row, in place
        pair, seqs + [SimpleNamespace(generator=None, params=topk)]).cpu()
    assert torch.equal(mixed[0], alone[0]) and torch.equal(pair.cpu(), x[:2])
    half = sampler.filter_logits(x[:2].bfloat16().cuda(), seqs * 2).cpu()  # widened inside
    assert torch.equal(half, sampler.filter_logits(x[:2].bfloat16().float().cuda(),
                                                   seqs * 2).cpu())
    _check(alone, x[:1], [0.9], margin=1e-4)
