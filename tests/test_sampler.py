"""The sampler's random draw (engine/sampler.py:draw) on hand-made distributions, given as
logits log(p) (so p = 0 is a logit of -inf).

The engine-level tests check that sampled tokens respect top-k/top-p/min-p and that seeded
requests are reproducible; these check the draw itself: empirical frequencies match the
probabilities, tokens of probability 0 are never drawn (including the first and last
entries), and a seeded row's token does not depend on its batch-mates or its row.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from novainfer.engine.sampler import draw as draw_logits
from novainfer.engine.sampler import draw_rows, filter_logits


def draw(probs, seqs, generator):
    return draw_logits(torch.log(probs), seqs, generator)


def _seqs(n, seeds=None):
    seeds = seeds or {}
    return [
        SimpleNamespace(generator=torch.Generator().manual_seed(seeds[i]) if i in seeds else None)
        for i in range(n)
    ]


def test_frequencies_match_probabilities_and_zeros_are_never_drawn():
    probs = torch.tensor([0.0, 0.1, 0.0, 0.6, 0.3, 0.0])
    rows = 40_000
    batch = probs.expand(rows, -1).contiguous()
    tokens = draw(batch, _seqs(rows), torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=6).double() / rows
    assert counts[[0, 2, 5]].sum() == 0
    # 4 standard deviations of a binomial frequency at these p and n is <= 0.0099.
    torch.testing.assert_close(counts, probs.double(), atol=0.01, rtol=0)


def test_mass_across_chunk_boundaries_and_the_padded_tail():
    """Vocabulary 2500: not a multiple of the 1024-entry chunks the search goes through."""
    probs = torch.zeros(2500)
    where = [0, 1023, 1024, 2047, 2499]
    probs[where] = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    rows = 20_000
    batch = probs.expand(rows, -1).contiguous()
    tokens = draw(batch, _seqs(rows), torch.Generator().manual_seed(4))
    counts = torch.bincount(tokens, minlength=2500).double() / rows
    assert counts.sum() == 1 and set(tokens.unique().tolist()) == set(where)
    torch.testing.assert_close(counts[where], probs[where].double(), atol=0.013, rtol=0)


def test_unnormalised_rows_and_mass_at_the_edges():
    probs = torch.tensor([[0.0, 0.0, 0.0, 2.0], [5.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    got = draw(probs.repeat(500, 1), _seqs(1500), torch.Generator().manual_seed(1)).view(500, 3)
    assert (got[:, 0] == 3).all() and (got[:, 1] == 0).all()
    assert set(got[:, 2].tolist()) == {1, 2}


def test_seeded_row_ignores_batch_mates_and_position():
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(6, 1000, generator=g), dim=-1)
    target = probs[4]
    alone = [
        int(draw(target[None], _seqs(1, {0: 11}), torch.Generator().manual_seed(s)))
        for s in (0, 1)
    ]
    assert alone[0] == alone[1]  # the engine generator does not touch a seeded row
    batch = torch.stack([probs[0], probs[1], target, probs[3]])
    mixed = draw(batch, _seqs(4, {2: 11}), torch.Generator().manual_seed(3))
    assert int(mixed[2]) == alone[0]
    draws = {int(draw(target[None], _seqs(1, {0: s}), g)) for s in range(20)}
    assert len(draws) > 1, "different seeds always gave the same token: the test has no power"


def test_scale_is_the_inverse_temperature():
    """draw(x, scale=s) samples softmax(x * s): the same tokens as draw(x * s) for the same
    random numbers, and the right frequencies."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 1500, generator=g) * 3
    logits[1, :700] = float("-inf")
    scale = torch.tensor([0.5, 1.0, 2.0, 1 / 0.7])
    rows = 4 * 500
    batch, scales = logits.repeat(500, 1), scale.repeat(500)
    direct = draw_logits(batch * scales[:, None], _seqs(rows), torch.Generator().manual_seed(6))
    scaled = draw_logits(batch, _seqs(rows), torch.Generator().manual_seed(6), scale=scales)
    assert torch.equal(direct, scaled)
    assert (scaled.view(500, 4)[:, 1] >= 700).all()
    probs = torch.softmax(torch.tensor([[0.0, 1.0, 2.0]]) * 0.5, dim=-1)[0]
    many = draw_logits(
        torch.tensor([[0.0, 1.0, 2.0]]).expand(30_000, -1).contiguous(), _seqs(30_000),
        torch.Generator().manual_seed(7), scale=torch.full((30_000,), 0.5),
    )
    counts = torch.bincount(many, minlength=3).double() / 30_000
    torch.testing.assert_close(counts, probs.double(), atol=0.012, rtol=0)


def _params(**overrides):
    base = {"top_k": -1, "top_p": 1.0, "min_p": 0.0, "temperature": 0.7}
    return SimpleNamespace(**{**base, **overrides})


def test_unfiltered_rows_are_untouched_by_filtered_batch_mates():
    """A row without top-k/top-p/min-p gets exactly logits * (1 / temperature) and, seeded,
    the same token whether its batch-mates filter (float32 top-p once cut such rows' tails:
    their cumulative sum reaches 1 before the last tokens)."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 5000, generator=g) * 4
    scaled = logits * torch.full((3,), 1 / 0.7)[:, None]
    for mate in (_params(top_p=0.9), _params(top_k=5), _params(min_p=0.1)):
        seqs = [SimpleNamespace(generator=None, params=p) for p in (_params(), _params(), mate)]
        assert torch.equal(filter_logits(logits, seqs)[:2], scaled[:2])
    alone, batched = [], []
    for seed in range(30):
        seqs = [SimpleNamespace(generator=torch.Generator().manual_seed(seed), params=_params())]
        alone.append(int(draw_rows(logits[:1], seqs, torch.Generator())[0]))
        seqs.append(SimpleNamespace(generator=None, params=_params(top_p=0.5)))
        seqs[0].generator.manual_seed(seed)
        batched.append(int(draw_rows(logits[:2], seqs, torch.Generator())[0]))
    assert alone == batched and len(set(alone)) > 1


def test_top_k_without_a_vocabulary_sort_matches_the_sort():
    """Rows with top-k work on `topk`'s candidates and never sort the vocabulary; on
    tie-free logits they keep what the full sort keeps, row by row: top-k alone, top-k with
    top-p, k above the vocabulary, k = 1."""
    from novainfer.engine import sampler

    g = torch.Generator().manual_seed(21)
    logits = torch.randn(5, 3000, generator=g) * 3
    ks = [5, 40, 3000, 1, 7000]
    ps = [1.0, 0.8, 0.3, 0.5, 0.95]
    for row, (k, p) in enumerate(zip(ks, ps)):
        width = sampler.candidate_width(k, 3000)
        got = sampler._top_k_top_p_candidates(logits[row : row + 1], [k], [p], width)
        want = sampler._top_k_top_p_sorted(logits[row : row + 1], [k], [p])
        assert torch.equal(got, want), row
    kept = [int((~sampler._top_k_top_p_candidates(
        logits[r : r + 1], [k], [1.0], sampler.candidate_width(k, 3000)).isinf()).sum())
        for r, k in ((0, 5), (3, 1))]
    assert kept == [5, 1]
    assert [sampler.candidate_width(k, 3000) for k in (1, 50, 64, 65, 3000, 7000)] == [
        64, 64, 64, 128, 3000, 3000]


def test_a_row_filters_the_same_alone_or_batched():
    """A row's filtered logits (so a seeded row's token) do not depend on its batch-mates,
    even over bf16 logits full of ties: alone, beside a top-k mate of another k, beside a
    top-p-only mate (a full sort), beside an unfiltered one."""
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(2, 151_936, generator=g) * 3).bfloat16().float()
    for mine in (_params(top_k=50, temperature=1.0),
                 _params(top_k=50, top_p=0.9, temperature=1.0),
                 _params(top_p=0.8, temperature=1.0)):
        alone = filter_logits(logits[:1], [SimpleNamespace(generator=None, params=mine)])
        for mate in (_params(top_k=400, temperature=1.0), _params(top_p=0.5, temperature=1.0),
                     _params(temperature=1.0), mine):
            seqs = [SimpleNamespace(generator=None, params=p) for p in (mine, mate)]
            assert torch.equal(filter_logits(logits, seqs)[:1], alone), (mine, mate)
    kept = int((~filter_logits(logits[:1], [SimpleNamespace(
        generator=None, params=_params(top_k=50, temperature=1.0))]).isinf()).sum())
    assert kept >= 50  # ties with the 50th logit survive too


def test_top_k_keeps_a_tie_with_the_kth_logit():
    """As vLLM does: every logit equal to the k-th survives top-k, by either path."""
    from novainfer.engine import sampler

    logits = torch.tensor([[5.0, 3.0, 3.0, 1.0, 0.0]])
    for got in (sampler._top_k_top_p_candidates(logits, [2], [1.0], 5),
                sampler._top_k_top_p_sorted(logits, [2], [1.0])):
        assert (~got.isinf()).tolist() == [[True, True, True, False, False]]


def test_half_precision_logits_widen_inside_the_scaling():
    """`filter_logits` over bf16 logits gives the float32 rows of the widened logits
    (bitwise: the product widens before it multiplies) and never writes its input, though
    the filters overwrite the scaled copy."""
    g = torch.Generator().manual_seed(9)
    logits = (torch.randn(3, 5000, generator=g) * 3).bfloat16()
    before = logits.clone()
    seqs = [SimpleNamespace(generator=None, params=p) for p in (
        _params(top_p=0.8, temperature=0.7), _params(top_k=20, temperature=1.3),
        _params(top_p=0.5, min_p=0.1, temperature=0.5))]
    got = filter_logits(logits, seqs)
    assert got.dtype == torch.float32
    assert torch.equal(got, filter_logits(logits.float(), seqs))
    assert torch.equal(logits, before)
