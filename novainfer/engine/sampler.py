"""Turn the last-position logits of each sampling sequence into the next tokens.

Order: raw logprobs (reported to users) -> penalties -> min_tokens masking -> greedy argmax,
or temperature -> top-k -> top-p -> min-p -> a draw from each sequence's own generator, so a
seeded request draws the same numbers whatever it is batched with.
"""

from __future__ import annotations

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
    """Temperature, top-k, top-p and min-p, vectorised over rows with per-row settings."""
    dev = logits.device
    temps = [s.params.temperature for s in seqs]
    if all(t == temps[0] for t in temps):  # the common case needs no host-to-device copy
        logits = logits / temps[0]
    else:
        logits = logits / to_device(temps, dev, logits.dtype)[:, None]
    top_ks = [s.params.top_k for s in seqs]
    top_ps = [s.params.top_p for s in seqs]
    min_ps = [s.params.min_p for s in seqs]
    vocab = logits.shape[-1]
    if any(k != -1 for k in top_ks) or any(p < 1.0 for p in top_ps):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        k = to_device([vocab if k == -1 else min(k, vocab) for k in top_ks], dev)
        ranks = torch.arange(vocab, device=dev)[None, :]
        drop = ranks >= k[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly ahead of each token
        p = to_device(top_ps, dev, probs.dtype)
        drop = before >= p[:, None]  # the first token always survives (before == 0)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    if any(m > 0 for m in min_ps):
        probs = logits.softmax(dim=-1)
        m = to_device(min_ps, dev, probs.dtype)
        keep = probs >= m[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


DRAW_CHUNK = 1024  # vocabulary entries per chunk of the two-level inverse-CDF search


def draw(probs: torch.Tensor, seqs: list[Sequence], generator: torch.Generator) -> torch.Tensor:
    """Inverse-CDF draw: row i takes the first token whose cumulative probability exceeds
    u_i * (the row's total), u_i ~ U[0, 1). Tokens of probability 0 are never taken.

    One random number per row: an exponential race needs one per vocabulary entry (~2.4 ms
    per row on the CPU for a 49k vocabulary). The cumulative sum is taken in two levels, over
    chunk totals and then inside the one chunk the target falls in: a cumsum over the whole
    vocabulary is a slow scan (~0.3 ms per step for 256 x 152k on an H100). Unseeded rows
    share one batched draw from the engine's generator; a seeded request draws its number
    from its own generator, so its tokens do not depend on its batch-mates.
    """
    rows, vocab = probs.shape
    u = torch.rand(rows, generator=generator, device=probs.device, dtype=probs.dtype)
    for row, seq in enumerate(seqs):
        if seq.generator is not None:
            u[row : row + 1].uniform_(generator=seq.generator)
    chunks = F.pad(probs, (0, -vocab % DRAW_CHUNK)).view(rows, -1, DRAW_CHUNK)
    totals = chunks.sum(dim=-1)
    cdf = totals.cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    chunk = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)
    local = chunks.gather(1, chunk[:, :, None].expand(-1, 1, DRAW_CHUNK)).squeeze(1).cumsum(-1)
    rest = target - (cdf - totals).gather(1, chunk)  # mass left to cover inside the chunk
    # Rounding may put `rest` at or past the chunk's own total; stay inside its tokens.
    rest = torch.minimum(rest.clamp_(min=0), local[:, -1:] * (1 - 2**-20))
    tokens = chunk * DRAW_CHUNK + torch.searchsorted(local, rest, right=True)
    return tokens.squeeze(1).clamp_(max=vocab - 1)  # only reachable through NaN rows


def gather_logprobs(
    logprobs: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]
) -> list[PositionLogprobs | None]:
    out: list[PositionLogprobs | None] = []
    for row, seq in enumerate(seqs):
        k = seq.params.logprobs
        if k is None:
            out.append(None)
            continue
        row_lp = logprobs[row]
        token = int(tokens[row])
        chosen = float(row_lp[token])
        entry: PositionLogprobs = {}
        if k > 0:
            values, ids = row_lp.topk(k)
            for rank, (tid, val) in enumerate(zip(ids.tolist(), values.tolist()), start=1):
                entry[tid] = Logprob(val, rank)
        if token not in entry:
            rank = int((row_lp > row_lp[token]).sum()) + 1
            entry[token] = Logprob(chosen, rank)
        out.append(entry)
    return out


def sample(
    logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int], generator: torch.Generator
) -> tuple[list[int], list[PositionLogprobs | None]]:
    logits = logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits
    want_logprobs = any(s.params.logprobs is not None for s in seqs)
    raw_logprobs = logits.log_softmax(dim=-1) if want_logprobs else None
    if any(s.params.has_penalties for s in seqs) or any(s.params.min_tokens for s in seqs):
        logits = logits.clone()
        apply_penalties(logits, seqs)
        mask_stops_below_min_tokens(logits, seqs, eos_ids)
    sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if len(sampled_rows) == len(seqs):  # no greedy rows: no argmax, no row index
        tokens = draw(filter_logits(logits, seqs).softmax(dim=-1), seqs, generator)
    else:
        tokens = logits.argmax(dim=-1)
    if 0 < len(sampled_rows) < len(seqs):
        rows = to_device(sampled_rows, logits.device)
        sub = [seqs[i] for i in sampled_rows]
        probs = filter_logits(logits[rows], sub).softmax(dim=-1)
        tokens[rows] = draw(probs, sub, generator)
    logprobs = gather_logprobs(raw_logprobs, tokens, seqs) if want_logprobs else [None] * len(seqs)
    return tokens.tolist(), logprobs
