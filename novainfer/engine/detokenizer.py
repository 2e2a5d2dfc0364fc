"""Incremental detokenization and stop-string detection for one sequence.

Decoding only a short window around the newest tokens keeps each step O(1) in the output
length; multi-byte characters split across tokens are held back until complete.
"""

from __future__ import annotations

from typing import Any

from novainfer.outputs import Logprob, PositionLogprobs


def decode(
    tokenizer: Any,
    ids: list[int],
    skip_special_tokens: bool = True,
    spaces_between_special_tokens: bool = True,
) -> str:
    """Text of `ids`. Kept special tokens are set apart by spaces unless
    `spaces_between_special_tokens` is False (transformers' slow-tokenizer meaning, for every
    tokenizer: fast tokenizers would otherwise ignore the flag)."""
    if skip_special_tokens or not spaces_between_special_tokens:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    special = set(tokenizer.all_special_ids)
    parts: list[str] = []
    run: list[int] = []
    for t in ids:
        if t in special:
            if run:
                parts.append(tokenizer.decode(run))
                run = []
            parts.append(tokenizer.decode([t]))
        else:
            run.append(t)
    if run:
        parts.append(tokenizer.decode(run))
    return " ".join(parts)


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.options = (skip_special_tokens, spaces_between_special_tokens)
        # A little prompt context so the first output token decodes with its leading space;
        # none when kept special tokens are spaced, or a special first token would get the
        # space that joins it to the prompt.
        spaced = not skip_special_tokens and spaces_between_special_tokens
        self.prefix_offset = len(prompt_ids) if spaced else max(len(prompt_ids) - 5, 0)
        self.read_offset = len(prompt_ids)
        self.text = ""

    def step(self, token_ids: list[int]) -> str:
        """Consume the newest token of `token_ids` (prompt + output); return the new text."""
        tok, options = self.tokenizer, self.options
        prefix = decode(tok, token_ids[self.prefix_offset : self.read_offset], *options)
        full = decode(tok, token_ids[self.prefix_offset :], *options)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        self.text += delta
        return delta


def find_stop(text: str, delta_len: int, stops: list[str]) -> tuple[int, str] | None:
    """Earliest stop string that ends inside the last `delta_len` characters of `text`."""
    best: tuple[int, str] | None = None
    for stop in stops:
        start = max(0, len(text) - delta_len - len(stop) + 1)
        idx = text.find(stop, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, stop)
    return best


def stop_string_hit(
    detok: IncrementalDetokenizer, token_ids: list[int], params: Any, past_min: bool
) -> str | None:
    """Consume the newest token; when it completes one of `params.stop_list` (and the sequence
    is past `min_tokens`), cut the text at the stop string (after it with
    `include_stop_str_in_output`) and return that string."""
    delta = detok.step(token_ids)
    hit = find_stop(detok.text, len(delta), params.stop_list) if past_min and delta else None
    if hit is None:
        return None
    end = hit[0] + len(hit[1]) if params.include_stop_str_in_output else hit[0]
    detok.text = detok.text[:end]
    return hit[1]


def output_text(
    tokenizer: Any,
    detok: IncrementalDetokenizer | None,
    output_ids: list[int],
    params: Any,
    finish_reason: str | None,
    stop_reason: int | str | None,
) -> str:
    """The text of a sequence's output so far: the incremental text while it runs or when a
    stop string ended it, else a full decode (without the EOS or stop token that ended it,
    unless `include_stop_str_in_output`)."""
    if detok is not None and (finish_reason is None or isinstance(stop_reason, str)):
        return detok.text
    if tokenizer is None:
        return ""
    stopped_by_token = finish_reason == "stop" and not isinstance(stop_reason, str)
    if stopped_by_token and not params.include_stop_str_in_output:
        output_ids = output_ids[:-1]
    return decode(
        tokenizer, output_ids, params.skip_special_tokens, params.spaces_between_special_tokens
    )


def decorate(tokenizer: Any, texts: dict[int, str], position: PositionLogprobs) -> PositionLogprobs:
    """A position's logprob entries with each token's text; `texts` memoizes the text of each
    token id (prompt logprobs name up to k + 1 tokens at every prompt position)."""
    for tid in position.keys() - texts.keys():
        texts[tid] = tokenizer.decode([tid])
    return {tid: Logprob(lp.logprob, lp.rank, texts[tid]) for tid, lp in position.items()}
