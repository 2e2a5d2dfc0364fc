"""Turn the last-position logits of each sampling sequence into the next tokens.

Order: raw logprobs (reported to users) -> penalties -> min_tokens masking -> greedy argmax,
or temperature -> top-k -> top-p -> min-p -> a draw from each sequence's own generator, so a
seeded request draws the same numbers whatever it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from novainfer.engine.sequence import Sequence
from novainfer.outputs import Logprob, PositionLogprobs


def to_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list as a device tensor without a host sync: a plain torch.tensor(...,
    device=cuda) waits for every queued kernel, which would make the step sync twice (here
    and when the sampled ids are read). Pinned memory comes from torch's caching allocator."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def inverse_temperatures(seqs: list[Sequence], device: torch.device) -> torch.Tensor:
    """float32 [rows] of 1 / temperature (rows that draw: temperature > 0), on the device."""
    return to_device([1.0 / s.params.temperature for s in seqs], device, torch.float32)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.has_penalties:
            continue
        if p.repetition_penalty != 1.0:
            seen = to_device(sorted(set(seq.token_ids)), logits.device)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if seq.output_counts and (p.frequency_penalty or p.presence_penalty):
            ids = to_device(list(seq.output_counts), logits.device)
            counts = to_device(list(seq.output_counts.values()), logits.device, logits.dtype)
            logits[row, ids] -= p.frequency_penalty * counts + p.presence_penalty


def mask_stops_below_min_tokens(
    logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int]
) -> None:
    for row, seq in enumerate(seqs):
        if seq.num_output_tokens < seq.params.min_tokens:
            banned = list(seq.params.stop_token_ids) + ([] if seq.params.ignore_eos else eos_ids)
            if banned:
                logits[row, banned] = float("-inf")


def filter_logits(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p, vectorised over rows with per-row settings.

    Rows with top-k take `topk`'s candidates (no vocabulary sort; ties with the k-th logit
    kept, as in vLLM), rows with top-p alone a radix search for the cut on CUDA (a sort
    elsewhere). Each row's path and arithmetic depend on its own settings only, never on
    its batch-mates', so a seeded request draws the same token alone or batched."""
    dev = logits.device
    # Times the float32 1 / temperature, exactly as `draw_rows` scales unfiltered rows: a row
    # gets the same values (a seeded row the same token) whether or not a batch-mate filters.
    # Half-precision logits widen inside the product (float32 math, one new [rows, vocab]
    # tensor, which the filters below may overwrite: no caller's tensor is written).
    inverse = inverse_temperatures(seqs, dev)
    logits = logits * inverse[:, None]
    top_ks = [s.params.top_k for s in seqs]
    top_ps = [s.params.top_p for s in seqs]
    min_ps = [s.params.min_p for s in seqs]
    vocab = logits.shape[-1]
    groups: dict[int, list[int]] = {}  # candidate width -> rows; 0: top-p alone
    for row, (k, p) in enumerate(zip(top_ks, top_ps)):
        if k != -1:
            groups.setdefault(candidate_width(k, vocab), []).append(row)
        elif p < 1.0:
            groups.setdefault(0, []).append(row)
    for width, rows in groups.items():
        ks, ps = [top_ks[r] for r in rows], [top_ps[r] for r in rows]
        whole = len(rows) == len(seqs)
        index = None if whole else to_device(rows, dev)
        part = logits if whole else logits[index]
        if width:
            part = _top_k_top_p_candidates(part, ks, ps, width)
        else:
            part = _top_p_alone(part, ps)
        if whole:
            logits = part
        else:
            logits[index] = part
    if any(m > 0 for m in min_ps):
        probs = logits.softmax(dim=-1)
        m = to_device(min_ps, dev, probs.dtype)
        keep = probs >= m[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


def candidate_width(k: int, vocab: int) -> int:
    """How many of a top-k row's largest logits its filter looks at: k rounded up to a power
    of two (at least 64), so rows of similar k share one `topk` call, and a row's width, hence
    its arithmetic, depends on its own k alone."""
    return min(max(64, 1 << (min(k, vocab) - 1).bit_length()), vocab)


def _top_k_top_p_sorted(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]
                        ) -> torch.Tensor:
    """Top-k then top-p over a full-vocabulary sort: the CPU path of rows with top-p and no
    top-k, and the twin both faster paths are tested against. A row keeps the logits at or
    above its smallest survivor, so a logit tied with a kept one is kept (vLLM's rule for
    the k-th logit, applied at the top-p cut too)."""
    dev, vocab = logits.device, logits.shape[-1]
    sorted_logits = logits.sort(dim=-1, descending=True).values
    k = to_device([vocab if k == -1 else min(k, vocab) for k in top_ks], dev)
    kth = sorted_logits.gather(1, (k - 1)[:, None])
    drop = sorted_logits < kth  # ties with the k-th kept
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly ahead of each token
    p = to_device(top_ps, dev, probs.dtype)
    # The first token always survives (before == 0). Rows with top_p 1 drop nothing: in
    # float32 their cumsum reaches 1 before the tail, which would cut it.
    drop |= (before >= p[:, None]) & (p[:, None] < 1.0)
    smallest = sorted_logits.masked_fill(drop, float("inf")).amin(dim=-1)
    return logits.masked_fill(logits < smallest[:, None], float("-inf"))


def _top_p_alone(logits: torch.Tensor, top_ps: list[float]) -> torch.Tensor:
    """Top-p without top-k: on CUDA a radix search for each row's cut (kernels/top_p.py, no
    vocabulary sort), written over `logits` (the caller's own float32 copy), elsewhere the
    sort it is tested against (also on CUDA for float64 or column-strided logits, which
    the sampler never passes: slower, the same set)."""
    if logits.is_cuda and logits.dtype == torch.float32 and logits.stride(-1) == 1:
        from novainfer.kernels.top_p import top_p_filter_triton

        ps = to_device(top_ps, logits.device, torch.float32)
        return top_p_filter_triton(logits, ps, inplace=True)
    return _top_k_top_p_sorted(logits, [-1] * len(top_ps), top_ps)


def _top_k_top_p_candidates(logits: torch.Tensor, top_ks: list[int], top_ps: list[float],
                            width: int) -> torch.Tensor:
    """Top-k then top-p without sorting the vocabulary, for rows whose k <= `width`: their
    `width` largest logits (`topk`, already sorted) hold every candidate; top-p runs over
    the first k of them, and each row keeps the logits at or above its smallest survivor
    (so a logit tied with the k-th is kept, as in vLLM)."""
    dev, vocab = logits.device, logits.shape[-1]
    values, _ = logits.topk(width, dim=-1)  # [rows, width], descending
    k = to_device([min(k, vocab) for k in top_ks], dev)
    drop = torch.arange(width, device=dev)[None, :] >= k[:, None]
    probs = values.masked_fill(drop, float("-inf")).softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly ahead of each candidate
    p = to_device(top_ps, dev, probs.dtype)
    drop |= (before >= p[:, None]) & (p[:, None] < 1.0)  # the first always survives
    smallest = values.masked_fill(drop, float("inf")).amin(dim=-1)
    return logits.masked_fill(logits < smallest[:, None], float("-inf"))


DRAW_CHUNK = 1024  # vocabulary entries per chunk of the two-level inverse-CDF search


def chunk_stats(
    logits: torch.Tensor, scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per DRAW_CHUNK-entry chunk of x = logits * scale (scale [rows] or None): the max and
    sum(exp(x - max)), float32 [rows, chunks]; an all -inf chunk gives (-inf, 0). One Triton
    pass on CUDA (kernels/sampling.py); this PyTorch code is its twin everywhere else."""
    if logits.is_cuda:
        from novainfer.kernels.sampling import chunk_stats_triton

        return chunk_stats_triton(logits, scale, DRAW_CHUNK)
    x = logits.float() if scale is None else logits.float() * scale[:, None]
    rows, vocab = x.shape
    x = F.pad(x, (0, -vocab % DRAW_CHUNK), value=float("-inf")).view(rows, -1, DRAW_CHUNK)
    top = x.amax(dim=-1)
    shift = top.masked_fill(top == float("-inf"), 0.0)
    return top, (x - shift[..., None]).exp_().sum(dim=-1)


def draw(
    logits: torch.Tensor,
    seqs: list[Sequence],
    generator: torch.Generator,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw one token per row from softmax(logits * scale) (scale [rows], e.g. 1 / temperature,
    or None) by inverse CDF: the first token whose cumulative weight exceeds u * (the row's
    total), u ~ U[0, 1). Tokens of weight 0 (logit -inf) are never taken.

    One random number per row: an exponential race needs one per vocabulary entry (~2.4 ms
    per row on the CPU for a 49k vocabulary). The cumulative sum is taken in two levels, over
    chunk totals and then inside the one chunk the target falls in, so the whole vocabulary
    is read once (`chunk_stats`) and never scanned or copied. Unseeded rows share one batched
    draw from the engine's generator; a seeded request draws its number from its own
    generator, so its tokens do not depend on its batch-mates.
    """
    return draw_from(logits, scale, uniforms(seqs, generator, logits.device))


def uniforms(
    seqs: list[Sequence], generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """One u ~ U[0, 1) per row, float32 [rows, 1]: a batched draw from the engine's generator,
    then a seeded request's own number from its generator."""
    u = torch.rand(len(seqs), 1, generator=generator, device=device)
    for row, seq in enumerate(seqs):
        if seq.generator is not None:
            u[row].uniform_(generator=seq.generator)
    return u


def draw_from(logits: torch.Tensor, scale: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """`draw` for given uniforms u (float32 [rows, 1]): no host work, so a CUDA graph can
    hold it (engine/cuda_graphs.py) with `scale` and `u` in static buffers."""
    top, sums = chunk_stats(logits, scale)
    if logits.is_cuda:
        from novainfer.kernels.sampling import pick_token_triton

        return pick_token_triton(logits, scale, u, top, sums, DRAW_CHUNK)
    return pick_token(logits, scale, u, top, sums)


def pick_token(
    logits: torch.Tensor, scale: torch.Tensor | None, u: torch.Tensor, top: torch.Tensor,
    sums: torch.Tensor,
) -> torch.Tensor:
    """The token of each row for its u (float32 [rows, 1]), given `chunk_stats`' (top, sums):
    the chunk where the cumulative weight first exceeds u * (the row's total), then the token
    inside it. One Triton program per row on CUDA (kernels/sampling.py); this is its twin."""
    vocab = logits.shape[1]
    row_max = top.amax(dim=-1, keepdim=True)
    shift = row_max.masked_fill(row_max == float("-inf"), 0.0)
    totals = sums * torch.exp(top - shift)  # chunk weights on the row's common scale
    cdf = totals.cumsum(dim=-1)
    target = u * cdf[:, -1:]
    chunk = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)
    cols = chunk * DRAW_CHUNK + torch.arange(DRAW_CHUNK, device=logits.device)
    values = logits.gather(1, cols.clamp(max=vocab - 1)).float()
    if scale is not None:
        values = values * scale[:, None]
    local = torch.exp(values - shift).masked_fill_(cols >= vocab, 0.0).cumsum(dim=-1)
    rest = (target - (cdf - totals).gather(1, chunk)).clamp_(min=0)  # left to cover inside
    # Rounding may put `rest` at or past the chunk's own total; stay inside its tokens.
    rest = torch.minimum(rest, local[:, -1:] * (1 - 2**-20))
    tokens = chunk * DRAW_CHUNK + torch.searchsorted(local, rest, right=True)
    return tokens.squeeze(1).clamp_(max=vocab - 1)  # only reachable through NaN rows


def widened(logits: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision logits; float32/float64 ones as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def needs_filtering(seqs: list[Sequence]) -> bool:
    return any(s.params.top_k != -1 or s.params.top_p < 1.0 or s.params.min_p > 0 for s in seqs)


def plain_sampling(seqs: list[Sequence]) -> str | None:
    """"greedy" when every row takes the argmax, "draw" when every row draws with its
    temperature alone, None otherwise (logprobs, penalties, min_tokens, top-k / top-p /
    min-p, or greedy and sampled rows mixed). For such steps `sample_plain` is exactly what
    `sample_tensors` computes, without host work."""
    if not seqs or any(s.params.logprobs is not None or s.params.has_penalties
                       or s.params.min_tokens for s in seqs):
        return None
    greedy = [s.params.greedy for s in seqs]
    if all(greedy):
        return "greedy"
    if any(greedy) or needs_filtering(seqs):
        return None
    return "draw"


def sample_plain(
    logits: torch.Tensor, mode: str, scale: torch.Tensor | None, u: torch.Tensor | None
) -> torch.Tensor:
    """The tokens of a `plain_sampling` step: the argmax ("greedy"), or the draw with the
    rows' 1 / temperature and uniforms ("draw"), as `sample_tensors` takes them."""
    if mode == "greedy":
        return logits.argmax(dim=-1)
    return draw_from(logits, scale, u)


def draw_rows(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator):
    """Sampled tokens for rows that are all non-greedy. Without top-k / top-p / min-p the
    temperature goes into the draw's single pass over the logits (no tempered copy)."""
    if needs_filtering(seqs):
        return draw(filter_logits(logits, seqs), seqs, generator)  # widens as it scales
    inverse = inverse_temperatures(seqs, logits.device)
    return draw(logits, seqs, generator, scale=inverse)


def logprob_table(logprobs: torch.Tensor, tokens: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Per row of log-probabilities [rows, vocab] (float32/float64), on the device: the row's
    token in `tokens`, its logprob and rank (1 + the number of tokens more likely), then the
    top max(ks) token ids and their logprobs. Ids and ranks ride along as floats of the
    logprobs' dtype (exact: a vocabulary is far below 2**24), so the table reaches the host
    in one copy; `table_entries` turns it into entries."""
    dtype = logprobs.dtype
    chosen = logprobs.gather(1, tokens[:, None])
    ranks = (logprobs > chosen).sum(dim=-1, keepdim=True) + 1
    kmax = max(ks, default=0)
    columns = [tokens[:, None].to(dtype), chosen, ranks.to(dtype)]
    if kmax:
        top_vals, top_ids = logprobs.topk(kmax)
        columns += [top_ids.to(dtype), top_vals]
    return torch.cat(columns, dim=1)


def table_entries(table: list[list[float]], ks: list[int]) -> list[PositionLogprobs]:
    """A `logprob_table` on the host (as lists): per row, the top ks[row] tokens (ranks
    1..k) and the row's own token with its rank."""
    kmax = max(ks, default=0)
    out: list[PositionLogprobs] = []
    for row, k in zip(table, ks):
        entry: PositionLogprobs = {}
        for r in range(k):
            entry[int(row[3 + r])] = Logprob(row[3 + kmax + r], r + 1)
        token = int(row[0])
        if token not in entry:
            entry[token] = Logprob(row[1], int(row[2]))
        out.append(entry)
    return out


def logprob_entries(
    logprobs: torch.Tensor, tokens: torch.Tensor, ks: list[int]
) -> list[PositionLogprobs]:
    """`logprob_table` brought to the host as entries (one sync)."""
    return table_entries(logprob_table(logprobs, tokens, ks).tolist(), ks)


@dataclass
class Samples:
    """One step's samples, still on the device: the tokens, and the logprob table of the
    rows that asked for logprobs (`logprob_rows`, with their k)."""

    tokens: torch.Tensor  # int64 [rows]
    logprob_table: torch.Tensor | None
    logprob_rows: list[int]
    ks: list[int]

    def host_logprobs(self, table: list[list[float]] | None) -> list[PositionLogprobs | None]:
        """Per row, its entries from the table brought to the host, or None."""
        out: list[PositionLogprobs | None] = [None] * self.tokens.shape[0]
        if table is not None:
            for i, entry in zip(self.logprob_rows, table_entries(table, self.ks)):
                out[i] = entry
        return out


def sample_tensors(
    logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int], generator: torch.Generator
) -> Samples:
    """Next token (and the logprob table when asked) per row, without waiting for the device.
    `logits` may be bf16 (the LM head's output): argmax and the unfiltered draw read it as it
    is; penalties, filters and logprobs work on a float32 copy."""
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    raw_logprobs = widened(logits).log_softmax(dim=-1) if rows else None
    if any(s.params.has_penalties for s in seqs) or any(s.params.min_tokens for s in seqs):
        logits = widened(logits).clone()
        apply_penalties(logits, seqs)
        mask_stops_below_min_tokens(logits, seqs, eos_ids)
    sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if len(sampled_rows) == len(seqs):  # no greedy rows: no argmax, no row index
        tokens = draw_rows(logits, seqs, generator)
    else:
        tokens = logits.argmax(dim=-1)
    if 0 < len(sampled_rows) < len(seqs):
        index = to_device(sampled_rows, logits.device)
        tokens[index] = draw_rows(logits[index], [seqs[i] for i in sampled_rows], generator)
    table = None
    ks = [seqs[i].params.logprobs for i in rows]
    if rows:
        chosen = tokens
        if len(rows) < len(seqs):  # only some rows asked: index them (a copy of those rows)
            index = to_device(rows, logits.device)
            raw_logprobs, chosen = raw_logprobs[index], tokens[index]
        table = logprob_table(raw_logprobs, chosen, ks)
    return Samples(tokens, table, rows, ks)

